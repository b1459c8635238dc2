"""``python -m vlsafe_jax.bench hysac_step``: the full HySAC LoRA train step, JAX vs PyTorch (perf.md W3).

One step = one batch of B quadruplets (safe image, unsafe image, safe caption, unsafe caption): both images go
through the LoRA'd vision tower and both captions through the LoRA'd text tower, the features are lifted onto the
hyperboloid (float32), the seven-term loss is taken (``hysac.md`` §3, reference weighting 1/49, contrastive over
the per-device batch), gradients flow to the LoRA adapters (r16, alpha 1, dropout 0.1 on k/v/out_proj, fc1, fc2 and
the patch embedding, both towers) and the four scalars, and AdamW (betas (0.9, 0.98), eps 1e-8, wd 0.2 on LoRA,
0 on the scalars, lr 1e-4) updates them. Batches are synthetic and device-resident (compute only, perf.md §4.4).

- JAX: the trainer's own jitted, state-donating step (``train.hysac_trainer.build_hysac`` / ``make_train_step``),
  towers in ``--dtype`` (bf16 by default on accelerators) with float32 parameters, hyperbolic math in float32.
- PyTorch, same process, same weights: HF ``CLIPVisionModelWithProjection`` + ``CLIPTextModelWithProjection``
  loaded from the directory our CLIP is read from (``attn_implementation="sdpa"``), each wrapped with the
  installed ``peft`` library (``LoraConfig``, same targets/rank/alpha/dropout), LoRA A/B copied from the JAX model
  (``models.lora.export_peft``), the seven-term loss of ``bench/lorentz.py`` (reused, not re-written), the scalar
  clamps before every forward, ``torch.optim.AdamW`` (``fused=True`` on CUDA; the default implementation on CPU),
  bf16 autocast when ``--dtype bfloat16``, and ``torch.compile`` of forward + loss (the tuned baseline, on by default;
  ``--no-torch-compile`` times eager PyTorch instead, and the verdict then says so).

Parity (printed PASS/FAIL, before timing; what ``tests/bench/test_hysac_step_bench.py`` runs): float32, dropout off,
nonzero LoRA B (so the adapters are active in the forward), the same batch; two full steps on each side. Checked:
the total loss and the seven terms of step 1 and step 2 (step 2 follows one AdamW update, so it also checks the
optimizer), ``|jax - torch| <= 1e-4 * |torch| + 1e-6``; and the global gradient norm of step 1, relative 1e-3.
JAX matmuls run at ``highest`` precision and TF32 is off in torch during the check. PyTorch runs eager here.

Report per side (perf.md §6): step time (median of windows, min/max), quadruplets/s, the ratio R = JAX throughput /
PyTorch throughput with the §7 verdict, achieved TFLOP/s and MFU under the LoRA 4N convention and 6N (GPU only;
analytic FLOPs of ``hysac_trainer.step_flops``: 2 images + 2 captions per quadruplet), peak memory (GPU: JAX
``peak_bytes_in_use`` / ``torch.cuda.max_memory_allocated``; CPU: the process max RSS, shared by both sides), the
device, versions and host load average; one JSON record per run appended to ``runs/bench/results.jsonl``.

Presets:
  small (default)  CPU-sized: 64 px / patch 8 (65 tokens), width 256, 4 layers per tower, 32 text tokens,
                   batch 16, float32 on CPU, torch.compile.
  l14              openai/clip-vit-large-patch14 shapes (224 px, 77 tokens), batch 32 per device, bf16,
                   torch.compile: for a GPU (never run on the 2-core CPU host).

Examples:
  python -m vlsafe_jax.bench hysac_step
  python -m vlsafe_jax.bench hysac_step --preset l14
  python -m vlsafe_jax.bench hysac_step --dtype bfloat16 --batch 8 --windows 5 --steps 2
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import tempfile
import time
from typing import Any

# JAX and PyTorch share one GPU here; JAX's default 75% preallocation would starve torch (read at backend init,
# which has not happened yet when the bench module is imported).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from checkpoints_convert import clip as convert
from vlsafe_jax import perf
from vlsafe_jax import sharding
from vlsafe_jax.bench import clip as clip_bench
from vlsafe_jax.bench.lorentz import torch_loss_fn
from vlsafe_jax.methods.hysac import losses as H
from vlsafe_jax.methods.hysac import scalars as scalars_lib
from vlsafe_jax.models import lora as lora_lib
from vlsafe_jax.models.clip import CLIP, CLIPConfig
from vlsafe_jax.train import common
from vlsafe_jax.train import hysac_trainer

PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(
        text=dict(vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=32, eos_token_id=2),
        vision=dict(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4),
        projection_dim=256, seq_len=32, batch=16, lora_rank=16, dtype="auto", torch_compile=True,
        windows=5, steps=2),
    "l14": dict(
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, eos_token_id=2),
        vision=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16),
        projection_dim=768, seq_len=77, batch=32, lora_rank=16, dtype="bfloat16", torch_compile=True,
        windows=5, steps=20),
}

# Parity tolerances (float32, highest matmul precision on both sides).
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
GRAD_NORM_RTOL = 1e-3


def hysac_config(lora_rank: int = 16, dropout: float = 0.1) -> ml_collections.ConfigDict:
  """The ``cfg.hysac`` block of the reference setting (``hysac.md`` §4.2, §5.1) for ``build_hysac``."""
  h = ml_collections.ConfigDict()
  h.lora = ml_collections.ConfigDict(dict(rank=lora_rank, alpha=1.0, dropout=dropout,
                                          targets=lora_lib.DEFAULT_TARGETS))
  h.scalars = ml_collections.ConfigDict(dict(alpha_init="inv_sqrt_embed_dim", curv_init=1.0, learn_curv=True,
                                             freeze_logit_scale=False))
  h.loss = ml_collections.ConfigDict(dict(eta=1.0, entailment_lambda=1.0, weighting="reference",
                                          negatives="local"))
  h.optim = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.2,
                                           schedule="constant", warmup_steps=0))
  return h


# ------------------------------------------------------------------------------------------------------------
# Shared weights and batch
# ------------------------------------------------------------------------------------------------------------

def write_hf_clip(spec: dict[str, Any], directory: str, seed: int = 0):
  """Random-weight HF ``CLIPModel`` of the preset's shapes saved to ``directory`` (read by both sides)."""
  return clip_bench.write_hf(spec, directory, seed)


def synthetic_batch(spec: dict[str, Any], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Host batch of ``batch`` quadruplets: normalised-pixel-like NHWC float32 images and (B, T) int32 captions.

  Captions have random lengths; the end-of-text id (``vocab - 1``, the largest id, so HF's and our argmax pooling
  pick it) ends each caption and pads the rest, like CLIP's tokenizer output with HySAC's EOT padding.
  """
  rng = np.random.default_rng(seed)
  v, t = spec["vision"], spec["text"]
  hw, seq, eot = v["image_size"], spec["seq_len"], t["vocab_size"] - 1
  out: dict[str, np.ndarray] = {}
  for kind in ("safe", "unsafe"):
    out[f"{kind}_image"] = rng.normal(size=(batch, hw, hw, 3)).astype(np.float32)
    ids = rng.integers(1, eot, size=(batch, seq)).astype(np.int32)
    lengths = rng.integers(2, seq, size=batch)
    for i, n in enumerate(lengths):
      ids[i, n:] = eot
    out[f"{kind}_ids"] = ids
  return out


# ------------------------------------------------------------------------------------------------------------
# JAX side: the trainer's step
# ------------------------------------------------------------------------------------------------------------

def build_jax(hf_dir: str, spec: dict[str, Any], *, batch: int, dtype, dropout: float, n_devices: int = 1,
              seed: int = 0, lora_b_std: float = 0.0) -> common.TrainSetup:
  """The trainer's HySAC setup (model, AdamW state, jitted donated step) on the first ``n_devices`` devices.

  ``lora_b_std > 0`` replaces the zero-initialised LoRA B matrices by N(0, std^2) so that the adapters change the
  forward pass (for the parity check; timing does not depend on values).
  """
  mesh = sharding.make_mesh(data=-1, devices=jax.devices()[:n_devices])
  h = hysac_config(spec.get("lora_rank", 16), dropout)
  clip = CLIP.from_pretrained(hf_dir, dtype=dtype, param_dtype=jnp.float32)
  setup = hysac_trainer.build_hysac(
      clip, options=hysac_trainer.options_from_cfg(h),
      loss_cfg=hysac_trainer.loss_config(h, "hysac", batch // n_devices), optim=h.optim, total_steps=1_000_000,
      mesh=mesh, seed=seed)
  if lora_b_std > 0:
    rng = np.random.default_rng(seed + 7)

    def fill(path, x):
      if any(getattr(k, "key", None) == "lora_b" for k in path):
        return jnp.asarray(rng.normal(scale=lora_b_std, size=x.shape), x.dtype)
      return x
    params = jax.tree_util.tree_map_with_path(fill, setup.state["params"])
    setup.state = {**setup.state, "params": jax.device_put(params, setup.state_sh["params"])}
  return setup


def jax_trainables(setup: common.TrainSetup) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """Current LoRA tensors in PEFT names/layout (``base_model.model.<tower>...``) and the four log-scalars."""
  model = nnx.merge(setup.graphdef, setup.state["params"], setup.frozen)
  lora = lora_lib.export_peft(model.clip, prefix="base_model.model.")
  sc = model.scalars
  scalars = {name: float(jax.device_get(getattr(sc, name)[...])) for name in scalars_lib.SCALAR_NAMES}
  return lora, scalars


# ------------------------------------------------------------------------------------------------------------
# PyTorch side: HF towers + PEFT LoRA + the bench/lorentz.py loss
# ------------------------------------------------------------------------------------------------------------

def _torch_lift(f, log_alpha, c, eps: float = 1e-8, cap: float = math.asinh(2.0 ** 15)):
  """``exp0_c(exp(log_alpha) f)`` in torch, float32: the same clamps as ``geometry.lorentz.exp_map0``."""
  import torch  # lazy: heavy dependency torch
  v = torch.exp(log_alpha) * f.float()
  s = torch.sqrt(c) * torch.linalg.vector_norm(v, dim=-1, keepdim=True)
  return torch.sinh(torch.clamp(s, eps, cap)) / torch.clamp(s, min=eps) * v


def build_torch(hf_dir: str, spec: dict[str, Any], lora: dict[str, np.ndarray], scalars: dict[str, float], *,
                device: str, dropout: float):
  """HF towers from ``hf_dir`` wrapped with PEFT LoRA (weights ``lora``) + the scalars; returns a module.

  ``module(batch) -> (total, [7 terms])`` for a dict of torch tensors (NCHW images); ``module.scalar_params``
  and ``module.lora_params`` are the two AdamW groups; ``module.clamp_()`` applies the per-step scalar clamps.
  """
  import torch  # lazy: heavy dependency torch, transformers (imports torch), peft (imports torch)
  import transformers
  from peft import LoraConfig, get_peft_model
  from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

  transformers.logging.set_verbosity_error()  # the towers ignore the other tower's keys of a CLIPModel file
  cfg = LoraConfig(r=spec.get("lora_rank", 16), lora_alpha=1, lora_dropout=dropout, bias="none",
                   target_modules=list(lora_lib.DEFAULT_TARGETS))
  towers = {}
  for name, cls in (("vision_model", CLIPVisionModelWithProjection), ("text_model", CLIPTextModelWithProjection)):
    base = cls.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32)
    tower = get_peft_model(base, cfg)
    mine = {k: torch.from_numpy(v) for k, v in lora.items() if k.startswith(f"base_model.model.{name}.")}
    theirs = {k for k in tower.state_dict() if ".lora_" in k}
    if set(mine) != theirs:
      raise ValueError(f"hysac_step: LoRA sites differ between JAX and PEFT for {name}: only JAX "
                       f"{sorted(set(mine) - theirs)[:4]}, only PEFT {sorted(theirs - set(mine))[:4]}")
    tower.load_state_dict(mine, strict=False)
    towers[name] = tower
  loss_fn = torch_loss_fn()
  bounds = scalars_lib.ScalarBounds()

  class TorchHySAC(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.visual, self.textual = towers["vision_model"], towers["text_model"]
      for k in scalars_lib.SCALAR_NAMES:
        setattr(self, k, torch.nn.Parameter(torch.tensor(scalars[k], dtype=torch.float32)))

    @property
    def scalar_params(self):
      return [getattr(self, k) for k in scalars_lib.SCALAR_NAMES]

    @property
    def lora_params(self):
      return [p for n, p in self.named_parameters() if p.requires_grad and ".lora_" in n]

    @torch.no_grad()
    def clamp_(self):
      for k in scalars_lib.SCALAR_NAMES:
        lo, hi = bounds.interval(k)
        getattr(self, k).clamp_(min=lo, max=hi)

    def forward(self, b):
      n = b["safe_image"].shape[0]
      img = self.visual(pixel_values=torch.cat([b["safe_image"], b["unsafe_image"]])).image_embeds
      txt = self.textual(input_ids=torch.cat([b["safe_ids"], b["unsafe_ids"]])).text_embeds
      # Hyperbolic part in float32 even under bf16 autocast (hysac.md §5.1).
      with torch.autocast(device_type=img.device.type, enabled=False):
        c = torch.exp(self.curv)
        e_img, e_txt = _torch_lift(img, self.visual_alpha, c), _torch_lift(txt, self.textual_alpha, c)
        return loss_fn(e_img[:n], e_img[n:], e_txt[:n], e_txt[n:], self.curv, self.logit_scale)

  return TorchHySAC().to(device)


def torch_optimizer(module, device: str):
  """AdamW like the trainer: betas (0.9, 0.98), eps 1e-8, wd 0.2 on LoRA and 0 on the scalars, lr 1e-4."""
  import torch  # lazy: heavy dependency torch
  o = hysac_config().optim
  kw = dict(lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  if device.startswith("cuda"):
    kw["fused"] = True
  return torch.optim.AdamW([{"params": module.lora_params, "weight_decay": o.weight_decay},
                            {"params": module.scalar_params, "weight_decay": 0.0}], **kw)


def torch_batch(batch: dict[str, np.ndarray], device: str) -> dict[str, Any]:
  import torch  # lazy: heavy dependency torch
  out = {}
  for k, v in batch.items():
    t = torch.from_numpy(v.transpose(0, 3, 1, 2).copy() if v.ndim == 4 else v.astype(np.int64))
    out[k] = t.to(device)
  return out


def make_torch_step(module, opt, tb, *, device: str, bf16: bool, loss_fn=None):
  """``step() -> (total, terms)``: clamp, forward (autocast when ``bf16``), backward, AdamW."""
  import torch  # lazy: heavy dependency torch
  fwd = module if loss_fn is None else loss_fn

  def step():
    opt.zero_grad(set_to_none=True)
    module.clamp_()
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
      total, terms = fwd(tb)
    total.backward()
    opt.step()
    return total, terms
  return step


def _grad_norm(module) -> float:
  import torch  # lazy: heavy dependency torch
  gs = [p.grad.float().pow(2).sum() for p in module.parameters() if p.grad is not None]
  return float(torch.sqrt(sum(gs)))


# ------------------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------------------

def compare(jax_vals: dict[str, float], torch_vals: dict[str, float]) -> tuple[bool, dict[str, float]]:
  """Checks the parity values of both sides; returns ``(ok, {key: normalised error})``.

  Keys ``loss@k`` and ``<term>@k`` use ``|j - t| / (LOSS_RTOL |t| + LOSS_ATOL)`` and ``grad_norm@1`` uses
  ``|j - t| / (GRAD_NORM_RTOL |t|)``: a value <= 1 passes.
  """
  errs = {}
  for k, t in torch_vals.items():
    j = jax_vals[k]
    tol = GRAD_NORM_RTOL * abs(t) if k.startswith("grad_norm") else LOSS_RTOL * abs(t) + LOSS_ATOL
    errs[k] = abs(j - t) / tol if math.isfinite(j) and math.isfinite(t) else math.inf
  return all(e <= 1.0 for e in errs.values()), errs


def parity_check(spec: dict[str, Any], *, batch: int, hf_dir: str | None = None, device: str | None = None,
                 seed: int = 0, verbose: bool = True) -> dict[str, Any]:
  """Two float32, dropout-free train steps on each side from the same weights and batch; see the module doc.

  Returns ``{"ok", "errors", "jax", "torch"}`` (values keyed ``loss@1``, ``<term>@1``, ``grad_norm@1``,
  ``loss@2``, ``<term>@2``).
  """
  import torch  # lazy: heavy dependency torch
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  with tempfile.TemporaryDirectory() as tmp:
    if hf_dir is None:
      hf_dir = tmp
      write_hf_clip(spec, hf_dir, seed)
    host = synthetic_batch(spec, batch, seed + 1)
    setup = build_jax(hf_dir, spec, batch=batch, dtype=jnp.float32, dropout=0.0, seed=seed, lora_b_std=0.05)
    lora, scalars = jax_trainables(setup)
    module = build_torch(hf_dir, spec, lora, scalars, device=device, dropout=0.0)

  jb = sharding.shard_batch(host, setup.mesh)
  rng = jax.random.key(seed)
  jv: dict[str, float] = {}
  state = setup.state
  with jax.default_matmul_precision("highest"):
    for k in (1, 2):
      state, m = setup.step_fn(state, setup.frozen, jb, rng)
      m = jax.device_get(m)
      jv[f"loss@{k}"] = float(m["loss"])
      jv.update({f"{t}@{k}": float(m[t]) for t in H.TERM_NAMES})
      if k == 1:
        jv["grad_norm@1"] = float(m["grad_norm"])

  tv: dict[str, float] = {}
  prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    opt = torch_optimizer(module, device)
    step = make_torch_step(module, opt, torch_batch(host, device), device=device, bf16=False)
    for k in (1, 2):
      total, terms = step()
      tv[f"loss@{k}"] = float(total.detach())
      tv.update({f"{t}@{k}": float(terms[i].detach()) for i, t in enumerate(H.TERM_NAMES)})
      if k == 1:
        tv["grad_norm@1"] = _grad_norm(module)
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
  ok, errs = compare(jv, tv)
  if verbose:
    worst = max(errs, key=errs.get)
    print(f"parity (float32, dropout off, batch {batch}, 2 steps): loss@1 jax {jv['loss@1']:.7f} torch "
          f"{tv['loss@1']:.7f}; loss@2 jax {jv['loss@2']:.7f} torch {tv['loss@2']:.7f}; grad norm jax "
          f"{jv['grad_norm@1']:.6g} torch {tv['grad_norm@1']:.6g}; worst {worst} at {errs[worst]:.3f} of its "
          f"tolerance (loss/terms {LOSS_RTOL:g} rel + {LOSS_ATOL:g}, grad norm {GRAD_NORM_RTOL:g} rel) -> "
          f"{'PASS' if ok else 'FAIL'}", flush=True)
  return {"ok": ok, "errors": errs, "jax": jv, "torch": tv}


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------

def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench hysac_step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                 help="tower compute dtype (params stay float32); auto = bfloat16 on GPU, float32 on CPU")
  p.add_argument("--batch", type=int, default=None, help="quadruplets per device (default: the preset's)")
  p.add_argument("--devices", type=int, default=1, help="JAX devices in the data mesh (PyTorch uses one)")
  p.add_argument("--windows", type=int, default=None)
  p.add_argument("--steps", type=int, default=None, help="steps per timing window")
  p.add_argument("--min-window-s", type=float, default=0.0, help="extend each window to at least this long")
  p.add_argument("--parity-batch", type=int, default=None, help="batch of the parity check (default: min(batch, 8))")
  p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None,
                 help="torch.compile forward + loss, the tuned baseline (default on; inductor's C++ build adds a "
                      "few minutes on a 2-core CPU host)")
  p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads")
  p.add_argument("--jax-single-thread", action="store_true",
                 help="CPU: XLA's Eigen matmuls on one thread (--xla_cpu_multi_thread_eigen=false), to compare with "
                      "--torch-threads 1 on an oversubscribed host; must act before JAX's backend starts")
  p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                 help="time JAX and torch in alternating windows in one process (default: on for CPU, where "
                      "host drift between two sequential timings exceeds the effect; off on GPU, where each side "
                      "is timed alone so its peak memory is its own)")
  p.add_argument("--no-torch", action="store_true", help="time the JAX side only (no parity)")
  p.add_argument("--skip-parity", action="store_true")
  p.add_argument("--out", default="runs/bench/results.jsonl", help="JSON-lines file to append ('' = none)")
  return p.parse_args(argv)


def _verdict(r: float, jax_worst: float, torch_best: float, tuned: bool, parity_ok: bool | None) -> str:
  """perf.md §7 (times are seconds per step, so 'JAX slowest window faster' = jax_worst < torch_best)."""
  if r >= 1.10:
    v = "clearly ahead" if r >= 1.25 else "ahead"
    if not jax_worst < torch_best:
      v = "ahead on median only (windows overlap)"
  elif r >= 0.95:
    v = "parity"
  else:
    v = "behind"
  if not tuned:
    v += " (vs eager torch, not the tuned torch.compile reference: no claim)"
  if parity_ok is None:
    v += " (parity not run: no claim)"
  elif not parity_ok:
    v += " (parity FAILED: no claim)"
  return v


def run(spec: dict[str, Any], *, batch_per_device: int, dtype_name: str, windows: int, steps: int,
        torch_compile: bool, interleave: bool, devices: int = 1, min_window_s: float = 0.0, with_torch: bool = True,
        parity: bool = True, parity_spec: dict[str, Any] | None = None, parity_batch: int | None = None,
        hf_dir: str | None = None) -> dict[str, Any]:
  """One HySAC-step measurement: parity (optional), then both sides timed; returns the record.

  Args:
    spec: preset dict (``PRESETS[...]`` shapes).
    batch_per_device: quadruplets per device (torch runs one device's batch).
    dtype_name: tower compute dtype, "float32" or "bfloat16".
    torch_compile: torch.compile of forward + loss.
    interleave: JAX and torch in alternating windows (CPU); else one after the other (GPU: per-side memory).
    parity_spec: shapes of the parity check (default ``spec``; the suite passes a reduced-depth copy at real
      widths on GPUs); ``parity_batch``: its batch (default min(batch, 8)).
    hf_dir: an HF CLIP directory of ``spec``'s shapes to reuse (default: written here, random weights).

  Returns:
    ``{"jax": side, "torch": side | None, "ratio", "verdict", "parity", "torch_label", "flops_4N", "flops_6N",
    "interleaved"}``; a side holds step times (median/min/max/windows), quadruplets/s, TFLOP/s, MFU 4N/6N, peak bytes.
  """
  on_gpu = jax.devices()[0].platform == "gpu"
  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  per_dev = batch_per_device
  batch = per_dev * devices
  torch = None
  tdevice = "cpu"
  if with_torch:
    import torch  # lazy: heavy dependency torch
    tdevice = "cuda" if torch.cuda.is_available() else "cpu"
  flops_4n = hysac_trainer.step_flops(_clip_config(spec), spec["seq_len"])   # per quadruplet
  flops_6n = 1.5 * flops_4n                                                    # + weight-gradient GEMMs
  rec: dict[str, Any] = {"flops_4N": flops_4n, "flops_6N": flops_6n, "torch": None, "parity": None}

  with tempfile.TemporaryDirectory() as tmp:
    if hf_dir is None:
      hf_dir = tmp
      if torch is not None:
        write_hf_clip(spec, hf_dir)
      else:
        _write_hf_clip_without_torch(spec, hf_dir)
    if torch is not None and parity:
      pb = parity_batch or min(per_dev, 8)
      rec["parity"] = parity_check(parity_spec or spec, batch=pb, hf_dir=None if parity_spec else hf_dir,
                                   device=tdevice)
      gc.collect()

    host = synthetic_batch(spec, batch, seed=1)
    setup = build_jax(hf_dir, spec, batch=batch, dtype=dtype, dropout=0.1, n_devices=devices)
    lora, scalars = jax_trainables(setup) if torch is not None else (None, None)
    jb = sharding.shard_batch(host, setup.mesh)
    rng = jax.random.key(0)
    holder = {"state": setup.state}

    def j_step():
      holder["state"], m = setup.step_fn(holder["state"], setup.frozen, jb, rng)
      return m["loss"]

    interleave = interleave and torch is not None
    if not interleave:
      tj = perf.time_fn(j_step, windows=windows, steps=steps, min_window_s=min_window_s)
      rec["jax"] = _side_record(tj, batch, devices, flops_4n, flops_6n, _jax_peak_bytes() if on_gpu else None)
      del holder, setup, jb
      gc.collect()

    if torch is not None:
      module = build_torch(hf_dir, spec, lora, scalars, device=tdevice, dropout=0.1)
      opt = torch_optimizer(module, tdevice)
      fwd = torch.compile(module) if torch_compile else module
      one_device = {k: v[:per_dev] for k, v in host.items()}
      tstep = make_torch_step(module, opt, torch_batch(one_device, tdevice), device=tdevice,
                              bf16=dtype == jnp.bfloat16, loss_fn=fwd)
      if tdevice.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
      if interleave:
        t_sync = perf.torch_sync(tdevice)
        both = perf.time_interleaved({"jax": j_step, "torch": lambda: tstep()[0]}, windows=windows, steps=steps,
                                     sync=lambda x: perf.block(x) if isinstance(x, jax.Array) else t_sync(x))
        tj, tt = both["jax"], both["torch"]
        rec["jax"] = _side_record(tj, batch, devices, flops_4n, flops_6n, None)
      else:
        tt = perf.time_fn(lambda: tstep()[0], windows=windows, steps=steps, min_window_s=min_window_s,
                          sync=perf.torch_sync(tdevice))
      t_peak = torch.cuda.max_memory_allocated() if tdevice.startswith("cuda") else None
      rec["torch"] = _side_record(tt, per_dev, 1, flops_4n, flops_6n, t_peak)
      rec["torch_label"] = (f"PyTorch ({'torch.compile' if torch_compile else 'eager'}, SDPA, PEFT, "
                            f"{'fused ' if tdevice.startswith('cuda') else ''}AdamW"
                            f"{', bf16 autocast' if dtype == jnp.bfloat16 else ''})")
      # Per-device throughputs (torch runs one device's batch): R = (per_dev / t_jax) / (per_dev / t_torch).
      r = tt.median / tj.median
      rec["ratio"] = r
      rec["verdict"] = _verdict(r, tj.worst, tt.best, tuned=bool(torch_compile),
                                parity_ok=None if rec["parity"] is None else rec["parity"]["ok"])
      if not on_gpu:
        rec["verdict"] += " [CPU measurement; perf.md's claims are about GPUs]"
  rec["interleaved"] = interleave
  return rec


def main(argv: list[str]) -> None:
  args = _parse(argv)
  if args.jax_single_thread:
    # XLA reads XLA_FLAGS when the backend starts (the jax.devices() call below, under `python -m
    # vlsafe_jax.bench`); a backend started earlier in the process would silently ignore this.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  spec = PRESETS[args.preset]
  on_gpu = jax.devices()[0].platform == "gpu"
  dtype_name = args.dtype or spec["dtype"]
  if dtype_name == "auto":
    dtype_name = "bfloat16" if on_gpu else "float32"
  per_dev = args.batch or spec["batch"]
  batch = per_dev * args.devices
  windows, steps = args.windows or spec["windows"], args.steps or spec["steps"]
  tc = spec["torch_compile"] if args.torch_compile is None else args.torch_compile
  with_torch = not args.no_torch
  if with_torch and args.torch_threads:
    import torch  # lazy: heavy dependency torch
    torch.set_num_threads(args.torch_threads)
  env = perf.environment()
  env["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  interleave = not on_gpu if args.interleave is None else args.interleave
  rec = run(spec, batch_per_device=per_dev, devices=args.devices, dtype_name=dtype_name, windows=windows,
            steps=steps, min_window_s=args.min_window_s, torch_compile=tc, interleave=interleave,
            with_torch=with_torch, parity=not args.skip_parity, parity_batch=args.parity_batch)
  parity = rec["parity"]
  rows = [_row("JAX (jit, donated)", rec["jax"], on_gpu)]
  if rec["torch"] is not None:
    rows.append(_row(rec["torch_label"], rec["torch"], on_gpu))
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  vc, tcfg = spec["vision"], spec["text"]
  flops_4n = rec["flops_4N"]
  print(f"\nHySAC LoRA train step (perf.md W3), preset {args.preset}: {batch} quadruplets/step "
        f"({per_dev}/device x {args.devices}), 2 x {vc['image_size']} px images (patch {vc['patch_size']}, "
        f"width {vc['hidden_size']}, {vc['num_hidden_layers']} layers) + 2 x {spec['seq_len']}-token captions "
        f"(width {tcfg['hidden_size']}, {tcfg['num_hidden_layers']} layers), LoRA r{spec.get('lora_rank', 16)} "
        f"alpha 1 dropout 0.1, towers {dtype_name} / params float32; {flops_4n / 1e9:.3f} GFLOP per quadruplet (4N)")
  print(f"device {env['device_kind']} ({env['platform']}, {env['device_count']} visible), jax {env['jax']}, "
        f"flax {env['flax']}, torch {env.get('torch', '-')} ({env.get('torch_device', 'cpu')}, "
        f"{env.get('torch_threads', '-')} threads); XLA_FLAGS '{env['xla_flags']}'; "
        f"windows x steps = {windows} x {steps}"
        f"{' (JAX and torch interleaved)' if rec['interleaved'] else ''}")
  print(perf.format_table(["side", "ms/step median", "min", "max", "quadruplets/s", "TFLOP/s (4N)",
                           "MFU 4N", "MFU 6N", "peak mem", "first step s"], rows))
  if parity is not None:
    print(f"parity: {'PASS' if parity['ok'] else 'FAIL'}")
  if "ratio" in rec:
    print(f"R = JAX / PyTorch throughput = {rec['ratio']:.2f}x  ->  {rec['verdict']}")
  notes = []
  if not on_gpu:
    notes.append(f"CPU run: MFU not defined; peak memory is the process max RSS shared by both sides "
                 f"({rss / 2**30:.2f} GiB)")
  if with_torch and not tc:
    notes.append("torch.compile disabled (--no-torch-compile): the ratio is against eager PyTorch")
  if load and with_torch and not on_gpu and load[0] > env["host_cpus"]:
    notes.append(f"the host is oversubscribed (load {load[0]:.1f} > {env['host_cpus']} CPUs): torch's OpenMP threads "
                 f"degrade badly then (measured 2 vs 1 threads: up to ~6x slower); compare with --torch-threads 1")
  if load:
    notes.append(f"host load average (1/5/15 min) {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on "
                 f"{env['host_cpus']} CPUs (shared host: numbers are noisy)")
  for n in notes:
    print("note: " + n)
  if args.out:
    perf.append_result({
        "bench": "hysac_step", "workload": "W3", "preset": args.preset, "dtype": dtype_name, "batch": batch,
        "batch_per_device": per_dev, "devices": args.devices, "windows": windows, "steps": steps,
        "torch_compile": bool(tc), "flops_per_quadruplet_4N": flops_4n, "flops_per_quadruplet_6N": 1.5 * flops_4n,
        "flop_convention": "analytic matmul+attention, 2/MAC; 4N = fwd + activation grads (LoRA), 6N = + weight grads",
        **{k: v for k, v in rec.items() if k not in ("parity", "flops_4N", "flops_6N")},
        "parity": None if parity is None else {"ok": parity["ok"], "jax": parity["jax"], "torch": parity["torch"]},
        "max_rss_bytes": rss, "env": env, "load_avg": load, "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
        args.out)


# ------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------

def _clip_config(spec):
  p = spec["projection_dim"]
  return CLIPConfig.from_hf({"projection_dim": p, "text_config": {**spec["text"], "projection_dim": p},
                             "vision_config": {**spec["vision"], "projection_dim": p}})


def _write_hf_clip_without_torch(spec, directory):
  """``--no-torch``: a random CLIP of the preset's shapes in HF layout through our exporter."""
  convert.export_hf(CLIP(_clip_config(spec), rngs=nnx.Rngs(0)), directory)


def _jax_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _side_record(t: perf.Timing, batch: int, n_devices: int, flops_4n: float, flops_6n: float,
                 peak: int | None) -> dict[str, Any]:
  per_s = batch / t.median
  return {"step_ms_median": t.median * 1e3, "step_ms_min": t.best * 1e3, "step_ms_max": t.worst * 1e3,
          "window_ms": [w * 1e3 for w in t.window_s], "first_step_s": t.compile_s, "quadruplets_per_s": per_s,
          "quadruplets_per_s_per_device": per_s / n_devices, "tflops_4N": flops_4n * per_s / 1e12,
          "mfu_4N": perf.mfu(flops_4n * per_s / n_devices), "mfu_6N": perf.mfu(flops_6n * per_s / n_devices),
          "peak_bytes": peak}


def _row(label: str, r: dict[str, Any], on_gpu: bool) -> list[Any]:
  pct = lambda v: f"{v:.1%}" if v is not None else "-"
  mem = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else ("RSS, see note" if not on_gpu else "-")
  return [label, r["step_ms_median"], r["step_ms_min"], r["step_ms_max"], f"{r['quadruplets_per_s']:.2f}",
          f"{r['tflops_4N']:.4f}", pct(r["mfu_4N"]), pct(r["mfu_6N"]), mem, f"{r['first_step_s']:.1f}"]


__all__ = ["PRESETS", "hysac_config", "write_hf_clip", "synthetic_batch", "build_jax", "jax_trainables",
           "build_torch", "torch_optimizer", "torch_batch", "make_torch_step", "compare", "parity_check", "main"]
