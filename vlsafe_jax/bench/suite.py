"""``python -m vlsafe_jax.bench suite --preset gpu|cpu-smoke [--dry-run] [--out DIR]``: every workload, one process.

GPU time comes in short windows, so one command produces every figure of perf.md's workloads, at real shapes with
random weights (nothing downloaded), JAX against the tuned PyTorch a user would pick instead, and writes
``DIR/suite_<preset>.json`` (one record per row, plus environment) and ``DIR/suite_<preset>.md`` (the table).

Rows (``gpu`` preset shapes; ``cpu-smoke`` runs the same code paths on tiny shapes):
  clip_{image,text}_b{1,64,256}   W1/W2  CLIP ViT-L/14 towers, inference, bf16
  hysac_step_b32                  W3     HySAC LoRA train step, ViT-L/14, 7 terms, AdamW
  lorentz_b{256,1024,4096}        W4     the Lorentz loss block, forward + backward, float32
  uwm_calibration                 W5     UWM vision calibration on ViT-L/14 (pairs/s, projected time for 8192 pairs)
  llava_prefill_b1                W6     LLaVA-1.5-7B prefill, 576 image + 64 text tokens (BOS included)
  llava_decode_b{1,8}             W7     greedy decode, bf16 KV cache; share of the HBM roofline
  cmrm_{dataset,sample}_b8        W8     CMRM steering at 7B shapes (overhead vs unsteered in the record)
  tga_step                        -      TGA stage-2 train step, Mistral-7B width, 4 decoder layers

Every row holds: JAX time (median of windows, min/max) and throughput; the PyTorch time, its baseline
(``torch_baseline``: on GPUs bf16 + SDPA + ``torch.compile`` and fused AdamW; decode with a static KV cache and
``torch.compile(mode="reduce-overhead")``), the ratio R = JAX throughput / PyTorch throughput; MFU from the
analytic FLOP models of perf.md (``vlsafe_jax.perf``/model modules; fp32 rows against the bf16 peak, as perf.md
says); for decode the share of the HBM roofline; peak memory per side (GPU: ``torch.cuda.max_memory_allocated`` and
the compiled program's ``memory_analysis`` or the device's peak); parity, checked before the row is timed; the
attention implementation each call site used. Each group of rows reuses its ``bench <name>`` module.

``--dry-run`` needs no device: it prints every row's shapes, FLOP count and expected memory (weights, optimizer
state, KV cache and inputs; activations excluded) from the same plan the run uses, and the attention kernel
``attention_impl="auto"`` would pick on an H100/H200. A wall-clock budget (``--budget-s``, 480 s for ``gpu``)
skips the remaining groups when it runs out, and the record files are rewritten after every group, so a short GPU
lease always leaves results. ``--rows`` picks groups or rows (comma-separated prefixes).

Examples:
  python -m vlsafe_jax.bench suite --preset gpu --dry-run
  python -m vlsafe_jax.bench suite --preset gpu --out runs/bench/suite
  python -m vlsafe_jax.bench suite --preset cpu-smoke --out /tmp/suite --torch-compile off
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# JAX and PyTorch share one GPU; JAX's default 75% preallocation would starve torch (read when the backend
# starts, which has not happened when the suite module is imported).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert import clip as convert
from vlsafe_jax import _compat, perf
from vlsafe_jax.bench import clip as clip_bench
from vlsafe_jax.bench import cmrm as cmrm_bench
from vlsafe_jax.bench import hysac_step
from vlsafe_jax.bench import llava as llava_bench
from vlsafe_jax.bench import lorentz as lorentz_bench
from vlsafe_jax.bench import tga_step
from vlsafe_jax.bench import uwm as uwm_bench
from vlsafe_jax.models import attention
from vlsafe_jax.models import clip as C
from vlsafe_jax.models import llava as LV
from vlsafe_jax.train import hysac_trainer, tga_trainer

GROUPS = ("clip", "hysac", "lorentz", "uwm", "llava", "cmrm", "tga")

# Tiny shapes for cpu-smoke: the gpu preset's code paths (separate same-weight parity models included), seconds
# per group on 2 cores.
_TINY_CLIP = dict(
    text=dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=11, eos_token_id=2),
    vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4),
    projection_dim=16, seq_len=11, lora_rank=4)
_TINY_LLAVA = dict(
    vision=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4),
    text=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256),
    image_token_index=127)
_TINY_TGA = dict(tga_step.PRESETS["small"], batch=2, retrieved=4, question=4, answer=6, caption=5,
                 vision=dict(tga_step.PRESETS["small"]["vision"], num_hidden_layers=2),
                 text=dict(tga_step.PRESETS["small"]["text"], vocab_size=256, num_hidden_layers=3))


def _reduced_depth(spec: dict, layers: int = 2) -> dict:
  """The same widths with ``layers`` layers per tower / decoder: the parity model of a GPU row."""
  out = dict(spec)
  for k in ("text", "vision"):
    if k in out:
      out[k] = dict(out[k], num_hidden_layers=layers)
  return out


PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(
        clip=dict(spec=clip_bench.PRESETS["l14"], dtype="bfloat16", batches=(1, 64, 256), windows=5, steps=10),
        hysac=dict(spec=hysac_step.PRESETS["l14"], batch=32, dtype="bfloat16", windows=5, steps=10,
                   parity_spec=_reduced_depth(hysac_step.PRESETS["l14"]), parity_batch=4),
        lorentz=dict(batches=(256, 1024, 4096), dim=768, windows=5, steps=20),
        uwm=dict(vision=uwm_bench.PRESETS["l14"]["vision"], pairs=1024, batch=128, project_pairs=8192),
        llava=dict(spec=llava_bench.PRESETS["7b"], dtype="bfloat16", text_len=63, new_tokens=64, batches=(1, 8),
                   windows=3, steps=2, parity_spec=_reduced_depth(llava_bench.PRESETS["7b"])),
        cmrm=dict(batch=8, new_tokens=32, windows=5, steps=1),
        tga=dict(spec=tga_step.PRESETS["7b-reduced"], windows=3, steps=5),
        interleave=False, budget_s=480.0),
    "cpu-smoke": dict(
        clip=dict(spec=_TINY_CLIP, dtype="float32", batches=(1, 4), windows=2, steps=1),
        hysac=dict(spec=dict(_TINY_CLIP, batch=4, dtype="float32"), batch=4, dtype="float32", windows=2, steps=1,
                   parity_spec=_reduced_depth(dict(_TINY_CLIP, batch=4), 1), parity_batch=2),
        lorentz=dict(batches=(32, 64), dim=48, windows=2, steps=1),
        uwm=dict(vision=_TINY_CLIP["vision"], pairs=16, batch=8, project_pairs=8192),
        llava=dict(spec=_TINY_LLAVA, dtype="float32", text_len=7, new_tokens=8, batches=(1, 2), windows=2, steps=1,
                   parity_spec=_reduced_depth(_TINY_LLAVA)),
        cmrm=dict(batch=2, new_tokens=4, windows=2, steps=1),
        tga=dict(spec=_TINY_TGA, windows=2, steps=1),
        interleave=True, budget_s=None),
}
# Groups whose PyTorch side uses torch.compile under `--torch-compile auto` on a CPU (the standalone CPU benches'
# tuned baseline; compiling the 7B-style graphs with inductor's C++ backend takes minutes on 2 cores).
_CPU_AUTO_COMPILE = ("clip", "lorentz")


# ------------------------------------------------------------------------------------------------------------
# The plan: rows, shapes, FLOPs and expected memory (no device needed)
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
  """One table row as planned: what is measured, its analytic work and the memory it should need."""
  name: str
  group: str
  workload: str
  shapes: dict[str, Any]
  dtype: str
  unit: str                       # throughput unit (items per second)
  items: float                    # items per timed call
  flops: float | None             # analytic FLOPs per timed call (perf.md convention)
  flop_note: str
  memory: dict[str, float]        # expected bytes per side: {"weights", "optimizer", "kv_cache", "inputs", "total"}
  decode_bytes: float | None = None   # bytes read per decode step (weights + KV), for the HBM roofline share
  attention_gpu: dict[str, str] | None = None   # call site -> implementation "auto" picks on an H100/H200

  def plan_record(self) -> dict[str, Any]:
    return {"row": self.name, "group": self.group, "workload": self.workload, "shapes": self.shapes,
            "dtype": self.dtype, "unit": self.unit, "items_per_call": self.items, "flops_per_call": self.flops,
            "flops_per_item": None if self.flops is None else self.flops / self.items, "flop_note": self.flop_note,
            "expected_memory_bytes": self.memory, "decode_bytes_per_step": self.decode_bytes,
            "attention_on_gpu": self.attention_gpu}


@functools.lru_cache(maxsize=None)
def _param_counts(kind: str, cfg) -> dict[str, int]:
  """Parameters per top-level submodule (and ``"total"``) of a ``"clip"`` or ``"llava"`` model of config ``cfg``,
  from its abstract (eval_shape'd) state: exact, no memory, no device. Cached: tracing a 7B init takes seconds."""
  make = (lambda: C.CLIP(cfg, rngs=nnx.Rngs(0))) if kind == "clip" else (lambda: LV.Llava(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(_compat.eval_shape(make))
  counts = {str(k): sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in state.items()}
  return {**counts, "total": sum(counts.values())}


def _mem(**parts: float) -> dict[str, float]:
  parts = {k: float(v) for k, v in parts.items()}
  return {**parts, "total": sum(parts.values())}


def _jdtype(name: str):
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _bytes(dtype: str) -> int:
  return 2 if dtype == "bfloat16" else 4


def _gpu_attention(site: str, dtype: str, q_shape, k_shape, has_mask: bool) -> str:
  impl, reason = attention.choose_impl("auto", platform="gpu", dtype=jnp.dtype(dtype), q_shape=q_shape,
                                       k_shape=k_shape, has_mask=has_mask, compute_capability="9.0")
  return f"{impl} ({reason})"


def _clip_config(spec: dict) -> C.CLIPConfig:
  p = spec["projection_dim"]
  return C.CLIPConfig.from_hf({"projection_dim": p, "text_config": {**spec["text"], "projection_dim": p},
                               "vision_config": {**spec["vision"], "projection_dim": p}})


def plan(preset: str) -> list[Row]:
  """Every row of ``preset`` with shapes, FLOPs per call and expected memory (abstract shapes only)."""
  P = PRESETS[preset]
  rows: list[Row] = []

  # ---- CLIP towers (W1/W2): inference FLOPs per image / text (perf.md §3: 162.0 / 13.3 GFLOP at L/14).
  c = P["clip"]
  cfg = _clip_config(c["spec"])
  vc, tc, nb = cfg.vision_config, cfg.text_config, _bytes(c["dtype"])
  n_all = _param_counts("clip", cfg)["total"]
  for tower in ("image", "text"):
    for b in c["batches"]:
      if tower == "image":
        t, heads = vc.num_positions, vc.num_attention_heads
        shapes = {"batch": b, "image_size": vc.image_size, "patch": vc.patch_size, "tokens": t,
                  "width": vc.hidden_size, "layers": vc.num_hidden_layers}
        inputs = b * vc.image_size ** 2 * 3 * nb
        att = _gpu_attention("clip.vision", c["dtype"], (b, t, heads, vc.hidden_size // heads),
                             (b, t, heads, vc.hidden_size // heads), False)
      else:
        t, heads = tc.max_position_embeddings, tc.num_attention_heads
        shapes = {"batch": b, "tokens": t, "width": tc.hidden_size, "layers": tc.num_hidden_layers}
        inputs = b * t * 4
        att = _gpu_attention("clip.text", c["dtype"], (b, t, heads, tc.hidden_size // heads),
                             (b, t, heads, tc.hidden_size // heads), False)
      rows.append(Row(f"clip_{tower}_b{b}", "clip", "W1" if tower == "image" else "W2", shapes, c["dtype"],
                      "img/s" if tower == "image" else "txt/s", b, b * clip_bench.tower_flops(cfg, tower),
                      "forward, analytic matmul + attention, 2 FLOP/MAC",
                      _mem(weights=n_all * nb, inputs=inputs),
                      attention_gpu={"clip.vision" if tower == "image" else "clip.text": att}))

  # ---- HySAC step (W3): 4N per quadruplet (perf.md §2: 701 GFLOP at L/14, 77 tokens).
  h = P["hysac"]
  hcfg = _clip_config(h["spec"])
  seq = h["spec"]["seq_len"]
  n = _param_counts("clip", hcfg)["total"]
  hv = hcfg.vision_config
  hh = hv.hidden_size // hv.num_attention_heads
  lora = _lora_params(hcfg, h["spec"].get("lora_rank", 16))
  b = h["batch"]
  rows.append(Row(
      f"hysac_step_b{b}", "hysac", "W3",
      {"quadruplets": b, "images": 2 * b, "texts": 2 * b, "image_size": hv.image_size, "patch": hv.patch_size,
       "text_tokens": seq, "lora_rank": h["spec"].get("lora_rank", 16)}, h["dtype"], "quadruplets/s", b,
      b * hysac_trainer.step_flops(hcfg, seq),
      "4N (LoRA: forward + activation gradients); 6N = 1.5x in the record",
      _mem(weights=4 * n, optimizer=4 * 3 * lora, inputs=2 * b * (hv.image_size ** 2 * 3 * 4 + seq * 4)),
      attention_gpu={"clip.vision": _gpu_attention("clip.vision", h["dtype"],
                                                   (2 * b, hv.num_positions, hv.num_attention_heads, hh),
                                                   (2 * b, hv.num_positions, hv.num_attention_heads, hh), False)}))

  # ---- Lorentz block (W4): 12 matmuls of B x (D+1) x B (4 terms x forward + 2 backward); latency-bound.
  lz = P["lorentz"]
  for b in lz["batches"]:
    d = lz["dim"]
    rows.append(Row(f"lorentz_b{b}", "lorentz", "W4", {"batch": b, "dim": d, "terms": 7}, "float32", "calls/s", 1,
                    12 * 2.0 * b * b * (d + 1), "12 B x (D+1) x B matmuls (forward + backward of 4 contrastive "
                    "terms); elementwise work not counted",
                    _mem(inputs=4 * b * d * 4, residuals=4 * b * b * 4)))

  # ---- UWM calibration (W5): two vision forwards per pair.
  u = P["uwm"]
  # Vision tower + projection of a CLIP with the clip rows' text tower (the same model when the shapes agree).
  uv = C.CLIPVisionConfig(**u["vision"], projection_dim=cfg.projection_dim)
  uc = _param_counts("clip", dataclasses.replace(cfg, vision_config=uv))
  n_v = uc["vision_model"] + uc["visual_projection"]
  rows.append(Row("uwm_calibration", "uwm", "W5",
                  {"pairs_timed": u["pairs"], "pairs_projected": u["project_pairs"], "batch": u["batch"],
                   "image_size": uv.image_size, "fc2": f"{uv.num_hidden_layers} x {uv.hidden_size} x "
                                                      f"{uv.intermediate_size}"},
                  "float32", "pairs/s", u["pairs"], u["pairs"] * 2 * C.clip_image_flops(uv),
                  "2 vision forwards per pair (scoring not counted)",
                  _mem(weights=4 * n_v, inputs=2 * u["batch"] * uv.image_size ** 2 * 3 * 4,
                       torch_psi_tensors=2 * u["batch"] * uv.hidden_size * uv.intermediate_size * 4)))

  # ---- LLaVA (W6/W7) and CMRM (W8) share one model.
  lv = P["llava"]
  lcfg = llava_bench.config(lv["spec"])
  nb = _bytes(lv["dtype"])
  n_llava = _param_counts("llava", lcfg)["total"]
  t_cfg = lcfg.text_config
  p_len = 1 + lcfg.num_image_tokens + lv["text_len"]
  n_new = lv["new_tokens"]
  heads, kvh, hd = t_cfg.num_attention_heads, t_cfg.num_key_value_heads, t_cfg.head_dim
  kv = lambda bb, s: 2 * t_cfg.num_hidden_layers * bb * s * kvh * hd * nb
  px = lambda bb: bb * lcfg.vision_config.image_size ** 2 * 3 * 4
  rows.append(Row("llava_prefill_b1", "llava", "W6",
                  {"batch": 1, "image_tokens": lcfg.num_image_tokens, "text_tokens": lv["text_len"] + 1,
                   "prompt": p_len}, lv["dtype"], "prompt tok/s", p_len,
                  LV.llava_prefill_flops(lcfg, p_len - lcfg.num_image_tokens),
                  "vision tower + projector + decoder over the prompt, LM head on every position",
                  _mem(weights=n_llava * nb, kv_cache=kv(1, p_len + n_new), inputs=px(1)),
                  attention_gpu={"llama": _gpu_attention("llama", lv["dtype"], (1, p_len, heads, hd),
                                                         (1, p_len + n_new, kvh, hd), True)}))
  for b in lv["batches"]:
    ctx = p_len + n_new // 2
    rows.append(Row(f"llava_decode_b{b}", "llava", "W7",
                    {"batch": b, "prompt": p_len, "new_tokens": n_new, "kv_cache_len": p_len + n_new}, lv["dtype"],
                    "tok/s", b, b * perf.llama_prefill_flops(t_cfg, 1), "2 FLOP/MAC per token and parameter (+ LM head)",
                    _mem(weights=n_llava * nb, kv_cache=kv(b, p_len + n_new), inputs=px(b)),
                    decode_bytes=perf.llama_decode_bytes(t_cfg, ctx, nb, batch=b),
                    attention_gpu={"llama": _gpu_attention("llama", lv["dtype"], (b, 1, heads, hd),
                                                           (b, p_len + n_new, kvh, hd), True)}))
  cm = P["cmrm"]
  b, n_new_c = cm["batch"], cm["new_tokens"]
  cm_prompt = 1 + 9 + lcfg.num_image_tokens + 19        # longest of bench/cmrm.py's random prompts (padded to it)
  for level in ("dataset", "sample"):
    extra = 2 * b * LV.llava_prefill_flops(lcfg, cm_prompt - lcfg.num_image_tokens) if level == "sample" else 0.0
    rows.append(Row(f"cmrm_{level}_b{b}", "cmrm", "W8",
                    {"batch": b, "new_tokens": n_new_c, "prompt_max": cm_prompt, "level": level}, lv["dtype"],
                    "tok/s", b * n_new_c,
                    b * LV.llava_prefill_flops(lcfg, cm_prompt - lcfg.num_image_tokens) +
                    b * n_new_c * perf.llama_prefill_flops(t_cfg, 1) + extra,
                    "greedy generate: prefill + decode" + (" + 2 extraction prefills per row" if extra else ""),
                    _mem(weights=n_llava * nb, kv_cache=kv(b, cm_prompt + n_new_c), inputs=px(b))))

  # ---- TGA stage-2 step.
  tg = P["tga"]
  p = tg["spec"]
  tcfg = tga_step._jax_config(p)
  seq_len = 1 + p["retrieved"] + tcfg.num_image_tokens + p["question"] + p["answer"]
  ref_len = 1 + 6 + p["caption"]
  tc_counts = _param_counts("llava", tcfg)
  n_t, n_vis = tc_counts["total"], tc_counts["vision_tower"]
  trainable = n_t - n_vis
  rows.append(Row("tga_step", "tga", "-",
                  {"batch": p["batch"], "seq_len": seq_len, "ref_len": ref_len,
                   "decoder_layers": tcfg.text_config.num_hidden_layers, "width": tcfg.text_config.hidden_size,
                   "loss_layers": list(p["layers"])}, p["dtype"], "tok/s", p["batch"] * seq_len,
                  p["batch"] * tga_trainer.step_flops(tcfg, seq_len, ref_len, "finetune", max(p["layers"])),
                  "forward x3 over projector + decoder (trainable), + truncated reference pass",
                  _mem(weights=4 * n_t, optimizer=3 * 4 * trainable, inputs=p["batch"] * (seq_len * 4 * 4))))
  return rows


def _lora_params(cfg: C.CLIPConfig, rank: int) -> int:
  """LoRA parameters of HySAC's targets (k/v/out, fc1, fc2 per layer and the patch embedding; both towers)."""
  total = 0
  for t in (cfg.vision_config, cfg.text_config):
    d, f = t.hidden_size, t.intermediate_size
    total += t.num_hidden_layers * rank * (3 * 2 * d + (d + f) + (f + d))
  v = cfg.vision_config
  return total + rank * (v.num_channels * v.patch_size ** 2 + v.hidden_size)


# ------------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------------

def side(t: perf.Timing | None, items: float, flops: float | None, *, peak: int | None = None,
         peak_source: str | None = None, decode_bytes: float | None = None, per_call_s: float | None = None,
         **extra) -> dict[str, Any] | None:
  """One side's measurement: time per call (median/min/max, windows), throughput, TFLOP/s, MFU, HBM share, peak.

  ``per_call_s`` replaces the timing's median when the row's "call" is derived (decode: seconds per step).
  """
  if t is None and per_call_s is None:
    return None
  s = per_call_s if per_call_s is not None else t.median
  out = {"ms": s * 1e3, "per_s": items / s if s > 0 else float("nan")}
  if t is not None:
    out.update(ms_median_window=t.median * 1e3, ms_min=t.best * 1e3, ms_max=t.worst * 1e3,
               windows_ms=[w * 1e3 for w in t.window_s], compile_s=t.compile_s)
  if flops is not None and s > 0:
    out["tflops"] = flops / s / 1e12
    out["mfu"] = perf.mfu(flops / s)
  peak_hw = perf.device_peak()
  if decode_bytes is not None:
    # s <= 0 happens on tiny CPU shapes, where generate(N) - generate(1) is within the noise: no rate then.
    out["bytes_per_s"] = decode_bytes / s if s > 0 else None
    out["hbm_share"] = None if peak_hw is None or s <= 0 else decode_bytes / s / (peak_hw[1] * 1e12)
  out.update(peak_bytes=peak, peak_source=peak_source, **extra)
  return out


def _record(row: Row, jax_side, torch_side, *, baseline: str | None, parity: dict | None, **extra) -> dict:
  rec = {**row.plan_record(), "status": "ok", "jax": jax_side, "torch": torch_side, "torch_baseline": baseline,
         "parity": parity, "attention": attention.choices(), **extra}
  if jax_side and torch_side and torch_side.get("per_s") and jax_side.get("per_s"):
    rec["ratio"] = jax_side["per_s"] / torch_side["per_s"]
  else:
    rec["ratio"] = None
  return rec


def _program_peak(jitted, *args) -> int | None:
  """Bytes a compiled JAX program needs (arguments + outputs + temporaries - aliased), from XLA's analysis."""
  try:
    m = jitted.lower(*args).compile().memory_analysis()
  except Exception:  # noqa: BLE001 - a backend without the analysis: no number rather than no row
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _device_peak() -> int | None:
  return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


class Ctx:
  """Run-wide settings shared by the group runners."""

  def __init__(self, preset: str, torch_compile: str, with_torch: bool):
    self.preset, self.P = preset, PRESETS[preset]
    self.on_gpu = jax.devices()[0].platform == "gpu"
    self.with_torch = with_torch
    self.device = "cpu"
    if with_torch:
      import torch  # torch is an optional extra: imported only when the PyTorch side runs
      self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self._compile = torch_compile
    self.interleave = self.P["interleave"] and not self.on_gpu

  def compile_for(self, group: str) -> bool:
    """Whether ``group``'s PyTorch side uses torch.compile (``--torch-compile on/off/auto``)."""
    if self._compile != "auto":
      return self._compile == "on"
    return self.on_gpu or group in _CPU_AUTO_COMPILE

  def free(self):
    gc.collect()
    if self.with_torch and self.device.startswith("cuda"):
      import torch  # lazy: heavy dependency torch
      torch.cuda.empty_cache()

  def reset_torch_peak(self):
    if self.with_torch and self.device.startswith("cuda"):
      import torch  # lazy: heavy dependency torch
      torch.cuda.reset_peak_memory_stats()

  def torch_peak(self) -> int | None:
    if self.with_torch and self.device.startswith("cuda"):
      import torch  # lazy: heavy dependency torch
      return int(torch.cuda.max_memory_allocated())
    return None


def _sync_any(device: str):
  t_sync = perf.torch_sync(device)
  return lambda x: perf.block(x) if isinstance(x, (jax.Array, tuple, dict)) else t_sync(x)


def _time_sides(ctx: Ctx, fns: dict[str, Callable[[], Any]], windows: int, steps: int) -> dict[str, perf.Timing]:
  """Interleaved windows on a CPU host; one side after the other on a GPU (each side's peak memory its own)."""
  sync = _sync_any(ctx.device)
  if ctx.interleave and len(fns) > 1:
    return perf.time_interleaved(fns, windows=windows, steps=steps, sync=sync)
  return {k: perf.time_fn(f, windows=windows, steps=steps, sync=sync) for k, f in fns.items()}


# ------------------------------------------------------------------------------------------------------------
# Group runners: each reuses its bench module and returns records for its rows
# ------------------------------------------------------------------------------------------------------------

def run_clip(ctx: Ctx, rows: list[Row]) -> list[dict]:
  c = ctx.P["clip"]
  with tempfile.TemporaryDirectory() as d:
    hf = clip_bench.write_hf(c["spec"], d) if ctx.with_torch else None
    if hf is None:
      convert.export_hf(C.CLIP(_clip_config(c["spec"]), rngs=nnx.Rngs(0)), d)
    ours = clip_bench.load_jax(d, c["dtype"])
  cfg = ours.config
  jfns, jitted, state = clip_bench.jax_encoders(ours)
  compile_ = ctx.compile_for("clip")
  tfns = clip_bench.torch_encoders(hf, ctx.device, c["dtype"], compile_) if ctx.with_torch else None
  baseline = (f"HF get_*_features, SDPA, {c['dtype']} weights, " + ("torch.compile" if compile_ else "eager")
              if ctx.with_torch else None)
  rng = np.random.RandomState(0)
  out = []
  parity: dict[str, dict] = {}
  for row in rows:
    tower, b = row.name.split("_")[1], int(row.name.split("_b")[-1])
    x, to_torch = clip_bench.make_input(cfg, tower, b, rng, c["dtype"], ctx.device)
    fns = {"jax": (lambda x=x: jfns[tower](x))}
    t_out = None
    if tfns is not None:
      import torch  # lazy: heavy dependency torch
      tx = to_torch()
      fns["torch"] = (lambda tx=tx: tfns[tower](tx))
      if tower not in parity:
        # Parity first (per tower, on this batch): the two embedding sets must point the same way.
        with torch.inference_mode():
          t_out = tfns[tower](tx).float().cpu().numpy()
        cos = clip_bench.embedding_cosine(jfns[tower](x), t_out)
        tol = 0.9999 if c["dtype"] == "float32" else 0.99
        parity[tower] = {"ok": cos >= tol, "metric": "min embedding cosine", "value": cos, "tol": tol}
      ctx.reset_torch_peak()
      with torch.inference_mode():
        t = _time_sides(ctx, fns, c["windows"], c["steps"])
    else:
      t = _time_sides(ctx, fns, c["windows"], c["steps"])
    jpeak = _program_peak(jitted[tower], state, x)
    out.append(_record(row, side(t["jax"], b, row.flops, peak=jpeak, peak_source="compiled program"),
                       side(t.get("torch"), b, row.flops, peak=ctx.torch_peak(),
                            peak_source="torch.cuda.max_memory_allocated" if ctx.on_gpu else None),
                       baseline=baseline, parity=parity.get(tower)))
  return out


def run_hysac(ctx: Ctx, rows: list[Row]) -> list[dict]:
  h = ctx.P["hysac"]
  spec = dict(h["spec"], batch=h["batch"])
  compile_ = ctx.compile_for("hysac")
  rec = hysac_step.run(spec, batch_per_device=h["batch"], dtype_name=h["dtype"], windows=h["windows"],
                       steps=h["steps"], torch_compile=compile_, interleave=ctx.interleave,
                       with_torch=ctx.with_torch, parity=ctx.with_torch, parity_spec=h["parity_spec"],
                       parity_batch=h["parity_batch"])
  row = rows[0]
  par = rec["parity"]
  parity = None if par is None else {
      "ok": par["ok"], "metric": "loss, 7 terms (2 steps) and grad norm, float32" +
      (", reduced depth at real widths" if h["parity_spec"] else ""), "value": max(par["errors"].values()),
      "tol": 1.0}

  def conv(s):
    if s is None:
      return None
    t = perf.Timing(s["first_step_s"], [w / 1e3 for w in s["window_ms"]])
    return side(t, row.items, row.flops, peak=s["peak_bytes"],
                peak_source="device peak" if ctx.on_gpu and s["peak_bytes"] else None, mfu_6N=s["mfu_6N"])
  return [_record(row, conv(rec["jax"]), conv(rec["torch"]), baseline=rec.get("torch_label"), parity=parity,
                  verdict=rec.get("verdict"))]


def run_lorentz(ctx: Ctx, rows: list[Row]) -> list[dict]:
  lz = ctx.P["lorentz"]
  compile_ = ctx.compile_for("lorentz")
  baselines = ("compile",) if compile_ else ("eager",)
  parity = None
  if ctx.with_torch:
    p = lorentz_bench.parity(lz["dim"], ctx.device)
    parity = {"ok": p["ok"], "metric": "loss / terms / grads rel. error, float32", "value": p["grad_rel_err"],
              "tol": 1e-3, **p}
  out = []
  for row in rows:
    b = row.shapes["batch"]
    ctx.reset_torch_peak()
    t = lorentz_bench.measure(b, lz["dim"], windows=lz["windows"], steps=lz["steps"], baselines=baselines,
                              device=ctx.device, interleave=ctx.interleave, with_torch=ctx.with_torch)
    jpeak = _program_peak(lorentz_bench.jax_step(), *lorentz_bench.jax_inputs(lorentz_bench.inputs(b, lz["dim"])))
    tt = t.get("torch.compile" if compile_ else "torch eager")
    out.append(_record(row, side(t["jax"], 1, row.flops, peak=jpeak, peak_source="compiled program"),
                       side(tt, 1, row.flops, peak=ctx.torch_peak()),
                       baseline=("torch.compile (inductor)" if compile_ else "eager") if ctx.with_torch else None,
                       parity=parity, interleaved=ctx.interleave))
  return out


def run_uwm(ctx: Ctx, rows: list[Row]) -> list[dict]:
  u = ctx.P["uwm"]
  rec = uwm_bench.run(u["vision"], u["pairs"], u["batch"], ctx.device, with_torch=ctx.with_torch)
  row = rows[0]
  proj = u["project_pairs"]
  jside = side(None, row.items, row.flops, per_call_s=rec["jax_calibration_s"], peak=rec["jax_peak_bytes"],
               peak_source="device peak (process)" if ctx.on_gpu else None, compile_s=rec["jax_first_pass_s"]
               - rec["jax_calibration_s"], projected_s=proj / rec["jax_pairs_per_s"], edit_s=rec["jax_edit_s"])
  tside, parity = None, None
  if ctx.with_torch:
    tside = side(None, row.items, row.flops, per_call_s=rec["torch_calibration_s"], peak=rec["torch_peak_bytes"],
                 projected_s=proj / rec["torch_pairs_per_s"], edit_s=rec["torch_edit_s"])
    parity = {"ok": rec["max_rel_score_diff"] <= 1e-3, "metric": "max rel. score difference", "tol": 1e-3,
              "value": rec["max_rel_score_diff"], "mask_entries_differing": rec["mask_diff"]}
  return [_record(row, jside, tside, parity=parity, projected_pairs=proj,
                  baseline="reference algorithm, eager (forward hooks, N x d_out x d_in scores), float32"
                  if ctx.with_torch else None)]


class _LlavaModels:
  """The LLaVA pair shared by the llava and cmrm groups (built once)."""
  models = None


def _llava_models(ctx: Ctx):
  if _LlavaModels.models is None:
    lv = ctx.P["llava"]
    parity_spec = lv["parity_spec"]
    timed = llava_bench.build(lv["spec"], _jdtype(lv["dtype"]), want_torch=ctx.with_torch,
                              torch_device=ctx.device, same_weights=parity_spec is None)
    _LlavaModels.models = {"timed": timed, "parity": timed if parity_spec is None else None}
  return _LlavaModels.models


def _llava_parity_pair(ctx: Ctx):
  """Same-weight models for the parity checks (the timed pair itself on the smoke preset)."""
  m = _llava_models(ctx)
  if m["parity"] is None:
    lv = ctx.P["llava"]
    m["parity"] = llava_bench.build(lv["parity_spec"], _jdtype(lv["dtype"]), want_torch=True,
                                    torch_device=ctx.device, same_weights=True)
  return m["parity"]


def run_llava(ctx: Ctx, rows: list[Row]) -> list[dict]:
  lv = ctx.P["llava"]
  compile_ = ctx.compile_for("llava")
  parity = None
  if ctx.with_torch:
    import torch  # lazy: heavy dependency torch
    pm, phf, pcfg = _llava_parity_pair(ctx)
    ids, mask, pixels = llava_bench.prompts(pcfg, 2, lv["text_len"], np.random.RandomState(5))
    pre, _, _ = llava_bench.jax_prefill(pm, ids.shape[1] + 1)
    j_logits = np.asarray(pre(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))[0], np.float32)
    t_ids, t_mask, t_pix = llava_bench.torch_inputs(phf, ids, mask, pixels, ctx.device)
    with torch.no_grad():
      t_logits = phf(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pix, logits_to_keep=1).logits
    t_logits = t_logits[:, -1].float().cpu().numpy()
    kl = llava_bench.last_logits_kl(j_logits.reshape(t_logits.shape), t_logits)
    parity = {"ok": kl <= 0.015, "metric": "last-token KL(torch, jax)", "value": kl, "tol": 0.015,
              "max_abs_logit_diff": float(np.max(np.abs(j_logits.reshape(t_logits.shape) - t_logits))),
              "model": "same weights" + (", reduced depth at 7B widths" if lv["parity_spec"] else "")}
  model, hf, cfg = _llava_models(ctx)["timed"]
  n_new = lv["new_tokens"]
  baseline_decode = ("HF generate, static KV cache + torch.compile(reduce-overhead), SDPA" if compile_ else
                     "HF generate, dynamic cache, eager, SDPA")
  rs = np.random.RandomState(0)
  out = []
  by_batch = {}
  for b in sorted({int(r.shapes["batch"]) for r in rows}):
    ids, mask, pixels = llava_bench.prompts(cfg, b, lv["text_len"], rs)
    tj = llava_bench.time_jax(model, ids, mask, pixels, n_new, windows=lv["windows"], steps=lv["steps"])
    jpeak = _device_peak()
    tt, tpeak, label = None, None, None
    if hf is not None:
      ctx.reset_torch_peak()
      try:
        tt = llava_bench.time_torch(hf, ids, mask, pixels, n_new, device=ctx.device, windows=lv["windows"],
                                    steps=lv["steps"], static_compile=compile_)
        label = baseline_decode
      except Exception as e:  # noqa: BLE001 - a failing compile must not lose the row; time eager and say so
        if not compile_:
          raise
        tt = llava_bench.time_torch(hf, ids, mask, pixels, n_new, device=ctx.device, windows=lv["windows"],
                                    steps=lv["steps"])
        label = f"HF generate eager (static cache + compile failed: {type(e).__name__}: {str(e)[:100]})"
      tpeak = ctx.torch_peak()
    by_batch[b] = (tj, tt, tpeak, jpeak, label)
  for row in rows:
    b = int(row.shapes["batch"])
    tj, tt, tpeak, jpeak, label = by_batch[b]
    src = "device peak (process)" if ctx.on_gpu else None
    if row.workload == "W6":
      out.append(_record(row, side(tj[0], row.items, row.flops, peak=jpeak, peak_source=src),
                         None if tt is None else side(tt[0], row.items, row.flops, peak=tpeak),
                         baseline=None if tt is None else "HF forward (logits_to_keep=1), SDPA, eager",
                         parity=parity))
      continue

    def per_step(tpl):
      # Decode seconds per step: generate(N) - generate(1) covers N - 1 decode steps (prefill cancels).
      return (tpl[1].median - tpl[2].median) / (n_new - 1)
    js = side(None, row.items, row.flops, per_call_s=per_step(tj), decode_bytes=row.decode_bytes, peak=jpeak,
              peak_source=src, generate_ms=tj[1].median * 1e3, generate1_ms=tj[2].median * 1e3,
              generate_windows_ms=[w * 1e3 for w in tj[1].window_s])
    ts = None if tt is None else side(None, row.items, row.flops, per_call_s=per_step(tt),
                                      decode_bytes=row.decode_bytes, peak=tpeak, generate_ms=tt[1].median * 1e3,
                                      generate1_ms=tt[2].median * 1e3)
    out.append(_record(row, js, ts, baseline=label, parity=parity))
  return out


def run_cmrm(ctx: Ctx, rows: list[Row]) -> list[dict]:
  cm = ctx.P["cmrm"]
  compile_ = ctx.compile_for("cmrm")
  parity = None
  if ctx.with_torch:
    pm, phf, _ = _llava_parity_pair(ctx)
    p = cmrm_bench.steering_parity(pm, phf, device=ctx.device)
    parity = {"ok": p["kl"] <= 0.015, "metric": "dataset-level steered first-token KL, JAX vs HF + hooks",
              "value": p["kl"], "tol": 0.015, "max_abs_logit_diff": p["max_abs_logit_diff"]}
  model, hf, _ = _llava_models(ctx)["timed"]
  label = None
  try:
    m = cmrm_bench.measure(model, hf, batch=cm["batch"], new_tokens=cm["new_tokens"], windows=cm["windows"],
                           steps=cm["steps"], torch_device=ctx.device, torch_static_compile=compile_)
    if hf is not None:
      label = "HF generate + forward hooks, " + ("static cache + torch.compile" if compile_ else "eager")
  except Exception as e:  # noqa: BLE001 - a failing compile must not lose the rows
    if not compile_ or hf is None:
      raise
    m = cmrm_bench.measure(model, hf, batch=cm["batch"], new_tokens=cm["new_tokens"], windows=cm["windows"],
                           steps=cm["steps"], torch_device=ctx.device)
    label = f"HF generate + forward hooks, eager (compile failed: {type(e).__name__}: {str(e)[:100]})"
  out = []
  for row in rows:
    level = row.shapes["level"]
    tj = m["jax"][level]
    js = side(tj, row.items, row.flops, unsteered_ms=m["jax"]["off"].median * 1e3,
              overhead_vs_off_pct=(m["overhead_pct"] if level == "dataset" else
                                   perf.paired_overhead(m["jax"]["off"], tj)))
    ts = None
    if "torch" in m and level == "dataset":
      ts = side(m["torch"]["hooks"], row.items, row.flops, unsteered_ms=m["torch"]["off"].median * 1e3,
                overhead_vs_off_pct=m["torch_overhead_pct"])
    out.append(_record(row, js, ts, baseline=label if level == "dataset" else
                       ("none: CMRM's sample level has no PyTorch implementation" if hf is not None else None),
                       parity=parity, prompt_len=m["prompt_len"]))
  return out


def run_tga(ctx: Ctx, rows: list[Row]) -> list[dict]:
  tg = ctx.P["tga"]
  rec = tga_step.run(tg["spec"], windows=tg["windows"], steps=tg["steps"], want_torch=ctx.with_torch,
                     torch_compile=ctx.compile_for("tga"))
  row = rows[0]
  js = side(rec["jax_timing"], row.items, row.flops, peak=rec["jax_peak_bytes"],
            peak_source="device peak (process)" if ctx.on_gpu else None, first_loss=rec["jax_first_loss"])
  ts, parity = None, None
  if "torch_timing" in rec:
    ts = side(rec["torch_timing"], row.items, row.flops, peak=rec["torch_peak_bytes"],
              first_loss=rec["torch_first_loss"])
    parity = {"ok": bool(rec["parity_first_loss"]), "metric": "first-step loss rel. difference",
              "value": abs(rec["jax_first_loss"] - rec["torch_first_loss"]) / abs(rec["torch_first_loss"]),
              "tol": rec["parity_tol"]}
  return [_record(row, js, ts, baseline=(rec.get("torch_label", "") + ", AdamW" +
                                         (" (fused)" if ctx.device.startswith("cuda") else ""))
                  if ts else None, parity=parity)]


RUNNERS = {"clip": run_clip, "hysac": run_hysac, "lorentz": run_lorentz, "uwm": run_uwm, "llava": run_llava,
           "cmrm": run_cmrm, "tga": run_tga}


# ------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------

def _fmt_bytes(v) -> str:
  return "-" if v is None else f"{v / 2**30:.2f} GiB"


def _fmt(v, spec=".4g") -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  return format(v, spec)


def markdown(result: dict) -> str:
  """The suite's table (GitHub markdown) with the device, versions and date in the heading."""
  env = result["env"]
  head = (f"Benchmark suite `{result['preset']}` on {env['device_kind']} ({env['platform']}), jax {env['jax']}, "
          f"flax {env['flax']}, torch {env.get('torch', '-')}"
          f"{' (' + env['torch_device'] + ')' if env.get('torch_device') else ''}, {result['time']}; "
          f"random weights; R = JAX throughput / PyTorch throughput; MFU against the device's dense bf16 peak "
          f"(fp32 rows too); parity checked before timing.")
  headers = ["row", "shapes", "dtype", "PyTorch baseline", "JAX ms", "PyTorch ms", "JAX /s", "PyTorch /s", "R",
             "MFU JAX / PT", "HBM share JAX / PT", "peak mem JAX / PT", "parity", "status"]
  lines = []
  for r in result["rows"]:
    j, t = r.get("jax") or {}, r.get("torch") or {}
    shapes = ", ".join(f"{k} {v}" for k, v in r["shapes"].items())
    par = r.get("parity")
    par_s = "-" if par is None else f"{'PASS' if par['ok'] else 'FAIL'} ({par['metric']}: {_fmt(par['value'], '.3g')})"
    pct = lambda s, k: _fmt(s.get(k), ".1%") if s else "-"
    lines.append([r["row"], shapes, r["dtype"], r.get("torch_baseline") or "-", _fmt(j.get("ms")), _fmt(t.get("ms")),
                  f"{_fmt(j.get('per_s'))} {r['unit']}" if j else "-", _fmt(t.get("per_s")),
                  _fmt(r.get("ratio"), ".2f") + ("x" if r.get("ratio") else ""),
                  f"{pct(j, 'mfu')} / {pct(t, 'mfu')}", f"{pct(j, 'hbm_share')} / {pct(t, 'hbm_share')}",
                  f"{_fmt_bytes(j.get('peak_bytes'))} / {_fmt_bytes(t.get('peak_bytes'))}", par_s, r["status"]])
  # A "|" inside a cell would split it in GitHub markdown.
  lines = [[str(v).replace("|", "\\|") for v in line] for line in lines]
  return head + "\n\n" + perf.format_table(headers, lines) + "\n"


def dry_run_text(preset: str, rows: list[Row]) -> str:
  """Shapes, FLOPs and expected memory per row (what ``--dry-run`` prints)."""
  out = [f"suite --preset {preset}: {len(rows)} rows (dry run: shapes, analytic FLOPs, expected memory per side = "
         f"weights + optimizer state + KV cache + inputs, activations excluded; attention = what "
         f"attention_impl='auto' picks on an H100/H200)"]
  headers = ["row", "workload", "shapes", "dtype", "GFLOP/call", "GFLOP/item", "expected memory", "attention (GPU)"]
  lines = []
  for r in rows:
    mem = r.memory
    parts = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem.items() if k != "total" and v)
    lines.append([r.name, r.workload, ", ".join(f"{k} {v}" for k, v in r.shapes.items()), r.dtype,
                  _fmt(None if r.flops is None else r.flops / 1e9, ".5g"),
                  _fmt(None if r.flops is None else r.flops / r.items / 1e9, ".5g"),
                  f"{_fmt_bytes(mem['total'])} ({parts})" + (f"; {r.decode_bytes / 1e9:.2f} GB read per decode step"
                                                           if r.decode_bytes else ""),
                  "; ".join(f"{k}: {v}" for k, v in (r.attention_gpu or {}).items()) or "-"])
  out.append(perf.format_table(headers, lines))
  return "\n".join(out)


def _selected(rows: list[Row], patterns: list[str] | None) -> list[Row]:
  if not patterns:
    return rows
  return [r for r in rows if any(r.name.startswith(p) or r.group == p for p in patterns)]


def _write(result: dict, out_dir: Path) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = f"suite_{result['preset']}"
  default = lambda o: o.item() if isinstance(o, np.generic) else str(o)
  (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=default))
  (out_dir / f"{stem}.md").write_text(markdown(result))


def run(preset: str, *, out_dir: str | Path, torch_compile: str = "auto", with_torch: bool = True,
        rows: list[str] | None = None, budget_s: float | None = None) -> dict:
  """Runs the suite and writes the record files; returns the result dict (``{"preset", "env", "rows", ...}``)."""
  t_start = time.perf_counter()
  planned = _selected(plan(preset), rows)
  ctx = Ctx(preset, torch_compile, with_torch)
  budget = PRESETS[preset]["budget_s"] if budget_s is None else budget_s
  result = {"preset": preset, "env": perf.environment(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_compile": torch_compile, "budget_s": budget,
            "rows": []}
  out_dir = Path(out_dir)
  _LlavaModels.models = None
  for group in GROUPS:
    group_rows = [r for r in planned if r.group == group]
    if not group_rows:
      continue
    elapsed = time.perf_counter() - t_start
    if budget is not None and elapsed > budget:
      result["rows"] += [{**r.plan_record(), "status": f"skipped: budget {budget:.0f} s spent", "jax": None,
                          "torch": None} for r in group_rows]
      continue
    print(f"[suite] {group}: {len(group_rows)} row(s), {elapsed:.0f} s elapsed", flush=True)
    t0 = time.perf_counter()
    attention.clear_choices()
    try:
      recs = RUNNERS[group](ctx, group_rows)
    except Exception as e:  # noqa: BLE001 - one failing group must not cost the others' numbers on a GPU lease
      tb = traceback.format_exc(limit=4)
      print(tb, flush=True)
      recs = [{**r.plan_record(), "status": f"error: {type(e).__name__}: {str(e)[:300]}", "jax": None,
               "torch": None, "traceback": tb} for r in group_rows]
    for r in recs:
      r["group_wall_s"] = time.perf_counter() - t0
      r["device"] = result["env"]["device_kind"]
    result["rows"] += recs
    if group == "cmrm" or "cmrm" not in {r.group for r in planned} and group == "llava":
      _LlavaModels.models = None      # the 7B pair is shared by llava and cmrm only
    ctx.free()
    result["wall_s"] = time.perf_counter() - t_start
    _write(result, out_dir)
  result["wall_s"] = time.perf_counter() - t_start
  _write(result, out_dir)
  return result


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench suite", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), required=True)
  p.add_argument("--dry-run", action="store_true", help="print shapes, FLOPs and expected memory; run nothing")
  p.add_argument("--out", default="runs/bench/suite", help="directory of the JSON and markdown record files")
  p.add_argument("--rows", default=None, help="comma-separated group names or row-name prefixes (default: all)")
  p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                 help="PyTorch baseline: auto = torch.compile on GPUs (and for the clip and lorentz rows on a "
                      "CPU), on = everywhere, off = eager everywhere; each row names its baseline")
  p.add_argument("--no-torch", action="store_true", help="JAX side only")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (CPU: 1 resists oversubscription on a shared host)")
  p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default: the preset's)")
  return p.parse_args(argv)


def main(argv: list[str]) -> None:
  args = _parse(argv)
  patterns = args.rows.split(",") if args.rows else None
  if args.dry_run:
    rows = _selected(plan(args.preset), patterns)
    print(dry_run_text(args.preset, rows))
    if args.out:
      out = Path(args.out)
      out.mkdir(parents=True, exist_ok=True)
      (out / f"suite_{args.preset}_plan.json").write_text(
          json.dumps({"preset": args.preset, "rows": [r.plan_record() for r in rows]}, indent=1))
    return
  if args.torch_threads and not args.no_torch:
    import torch  # lazy: heavy dependency torch
    torch.set_num_threads(args.torch_threads)
  result = run(args.preset, out_dir=args.out, torch_compile=args.torch_compile, with_torch=not args.no_torch,
               rows=patterns, budget_s=args.budget_s)
  print()
  print(markdown(result))
  bad = [r["row"] for r in result["rows"] if r["status"] != "ok"]
  print(f"[suite] {len(result['rows'])} rows in {result['wall_s']:.0f} s on {result['env']['device_kind']}; "
        f"records: {Path(args.out) / ('suite_' + args.preset + '.json')}" +
        (f"; not ok: {', '.join(bad)}" if bad else ""))


if __name__ == "__main__":
  main(sys.argv[1:])
