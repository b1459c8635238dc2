"""``python -m vlsafe_jax.bench tga_step``: TGA stage-2 train-step throughput, JAX vs an HF PyTorch step.

The same step on both sides, same weights (small preset: a random HF ``LlavaForConditionalGeneration`` saved and
loaded into JAX through the converter), same synthetic batch (every row: BOS, retrieved text, N image tokens,
question, answer; reference rows: BOS, prefix, caption; no padding):

* JAX: the trainer's jitted, donated step (:func:`vlsafe_jax.train.tga_trainer.build_stage`, stage
  ``finetune``: projector + decoder trainable, vision frozen): truncated reference pass under stop_gradient,
  training pass with in-scan masked means, CE + alignment + pair-wise terms, AdamW;
* PyTorch: HF forward with ``output_hidden_states`` (hidden-state stack, masked means taken from it), the
  reference pass under ``no_grad`` through the first ``max(layers)`` decoder layers only (the layer list is
  sliced, the same truncation), the same loss with a differentiable ``torch.exp``, ``loss.backward()`` and
  ``torch.optim.AdamW`` (fused on CUDA) over the same parameters.

Before timing, the first-step losses of both sides are compared (fp32: parity when |dL| <= 1e-4 * L).
Throughput = B x T training tokens per step (the reference-pass tokens are extra work on both sides, not counted).

Presets: ``small`` (CPU, default, fp32), ``7b`` (Mistral-7B-Instruct-v0.2 + CLIP-L/14-336 shapes, bf16, random
weights, for an 80 GB GPU when memory permits; layers 10-18) and ``7b-reduced`` (7B width, 4 decoder layers,
layers 1-3): GPU presets are never run in the CPU build environment.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vlsafe_jax import perf
from vlsafe_jax import sharding
from vlsafe_jax.methods.tga import loss as loss_lib
from vlsafe_jax.models import llama as L
from vlsafe_jax.models import llava as LV
from vlsafe_jax.models.clip import CLIPVisionConfig
from vlsafe_jax.train import tga_trainer

_MISTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6)
_CLIP_L336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, projection_dim=768)
PRESETS = {
    "small": dict(vision=dict(image_size=56, patch_size=14, hidden_size=96, intermediate_size=192,
                              num_hidden_layers=3, num_attention_heads=4),
                  text=dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
                  layers=(1, 2, 3), batch=4, retrieved=12, question=10, answer=24, caption=16, dtype="float32"),
    "7b": dict(vision=_CLIP_L336, text=dict(_MISTRAL, num_hidden_layers=32), layers=tuple(range(10, 19)), batch=4,
               retrieved=24, question=32, answer=128, caption=32, dtype="bfloat16"),
    "7b-reduced": dict(vision=_CLIP_L336, text=dict(_MISTRAL, num_hidden_layers=4), layers=(1, 2, 3), batch=4,
                       retrieved=24, question=32, answer=128, caption=32, dtype="bfloat16"),
}


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench tga_step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--steps", type=int, default=20, help="steps per timing window (perf.md §6: >= 5 x >= 20)")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the HF step with torch.compile of the training forward (default on)")
  p.add_argument("--torch-threads", type=int, default=None)
  p.add_argument("--out", default="runs/bench/results.jsonl")
  return p.parse_args(argv)


def make_batch(cfg: LV.LlavaConfig, p: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Synthetic stage-2 batch (no padding) with the trainer's keys."""
  rs = np.random.RandomState(seed)
  v = cfg.text_config.vocab_size
  n = cfg.num_image_tokens
  word = lambda k: rs.randint(3, min(v, cfg.image_token_index) - 1, size=(batch, k))
  segs = [(np.ones((batch, 1), np.int64), 0), (word(p["retrieved"]), 1),
          (np.full((batch, n), cfg.image_token_index), 2), (word(p["question"]), 0), (word(p["answer"]), 5)]
  ids = np.concatenate([s for s, _ in segs], 1).astype(np.int32)
  seg = np.concatenate([np.full(s.shape, k) for s, k in segs], 1)
  labels = np.where(seg == 5, ids, -100).astype(np.int32)
  ref = np.concatenate([np.ones((batch, 1), np.int64), word(6), word(p["caption"])], 1).astype(np.int32)
  cap = np.zeros(ref.shape, np.float32)
  cap[:, 7:] = 1
  size = cfg.vision_config.image_size
  return {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int32), "labels": labels,
          "retrieved_mask": (seg == 1).astype(np.float32), "image_mask": (seg == 2).astype(np.float32),
          "ref_ids": ref, "ref_attention_mask": np.ones(ref.shape, np.int32), "caption_mask": cap,
          "aux_weight": np.ones((batch,), np.float32), "diag_weight": np.ones((batch,), np.float32),
          "pixels": rs.randn(batch, size, size, 3).astype(np.float32)}


def _hf_config(p):
  import transformers  # lazy: heavy dependency transformers (imports torch)
  text = dict(p["text"], pad_token_id=0, eos_token_id=2, bos_token_id=1)
  text_cfg = (transformers.MistralConfig(**text, sliding_window=None) if "rope_theta" in text
              else transformers.LlamaConfig(**text))
  cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**p["vision"]), text_config=text_cfg,
                                 image_token_index=text["vocab_size"] - 1, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default", projector_hidden_act="gelu")
  cfg._attn_implementation = "sdpa"
  return cfg


def _jax_config(p) -> LV.LlavaConfig:
  text = dict(p["text"], pad_token_id=0, eos_token_id=2)
  return LV.LlavaConfig(vision_config=CLIPVisionConfig(**p["vision"]), text_config=L.LlamaConfig(**text),
                        image_token_index=text["vocab_size"] - 1)


def torch_step_fn(hf, batch, layers, loss_cfg, device, lr=1e-5, autocast_bf16: bool = False, forward=None):
  """A closure running one HF training step and returning its (detached) loss.

  ``autocast_bf16``: float32 parameters and AdamW state, matmuls under ``torch.autocast(bfloat16)`` (the tuned
  mixed-precision recipe, like the JAX side's float32 params + bf16 compute). ``forward``: the callable for the
  training pass (default ``hf``; the suite passes ``torch.compile(hf)``).
  """
  import torch  # lazy: heavy dependency torch
  t = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
  t["input_ids"], t["labels"], t["ref_ids"] = t["input_ids"].long(), t["labels"].long(), t["ref_ids"].long()
  pix = t["pixels"].permute(0, 3, 1, 2).to(next(hf.parameters()).dtype)
  for prm in hf.model.vision_tower.parameters():
    prm.requires_grad_(False)
  params = [q for q in hf.parameters() if q.requires_grad]
  opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          fused=device.startswith("cuda"))
  lm = hf.model.language_model
  full_layers = lm.layers
  idx = [l for l in layers]

  def mmean(h, m):
    m = m.float()
    return (m[..., None] * h.float()).sum(1) / m.sum(1).clamp(min=1.0)[:, None]

  def cos(a, b):
    na = (a * a).sum(-1).clamp(min=loss_cfg.eps ** 2).sqrt()
    nb = (b * b).sum(-1).clamp(min=loss_cfg.eps ** 2).sqrt()
    return (a * b).sum(-1) / (na * nb)

  def step():
    with torch.no_grad():
      # Truncated reference pass: the layer list is cut after the deepest loss layer and the layer outputs are
      # read with forward hooks (HF's own hidden-state capture reports the final-norm output as the last entry).
      caught = {}
      hooks = [full_layers[l - 1].register_forward_hook(
          lambda mod, inp, out, l=l: caught.__setitem__(l, out[0] if isinstance(out, tuple) else out)) for l in idx]
      lm.layers = torch.nn.ModuleList(list(full_layers)[:max(idx)])
      lm(input_ids=t["ref_ids"], attention_mask=t["ref_attention_mask"])
      lm.layers = full_layers
      for h in hooks:
        h.remove()
      c = torch.stack([mmean(caught[l], t["caption_mask"]) for l in idx], 1)
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=autocast_bf16):
      out = (hf if forward is None else forward)(
          input_ids=t["input_ids"], pixel_values=pix, attention_mask=t["attention_mask"], labels=t["labels"],
          output_hidden_states=True)
    hs = out.hidden_states
    v = torch.stack([mmean(hs[l], t["image_mask"]) for l in idx], 1)
    r = torch.stack([mmean(hs[l], t["retrieved_mask"]) for l in idx], 1).detach()
    m = t["aux_weight"]
    n = m.shape[0] * len(idx)
    cvc, crc = cos(v, c), cos(r, c)
    l_al = loss_cfg.w_al * (torch.exp(-cvc) * m[:, None]).sum() / n
    l_pw = loss_cfg.w_pw * (torch.exp(crc - cvc) * m[:, None]).sum() / n
    loss = out.loss + l_al + l_pw
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()
  return step


def run(p: dict, *, windows: int, steps: int, want_torch: bool = True, torch_compile: bool = False,
        torch_autocast: bool | None = None) -> dict:
  """One TGA stage-2 measurement, both sides from the same weights; returns the record.

  ``torch_autocast`` (default: on for bf16 presets): PyTorch keeps float32 parameters and runs under bf16
  autocast, like the JAX step (float32 params, bf16 compute); off = the whole HF model cast to the preset dtype.
  ``torch_compile``: ``torch.compile`` of the HF training forward (the truncated reference pass stays eager);
  if compilation fails the record says so and eager is timed.
  """
  dtype = jnp.bfloat16 if p["dtype"] == "bfloat16" else jnp.float32
  autocast = (dtype == jnp.bfloat16) if torch_autocast is None else torch_autocast
  device = "cpu"
  hf = None
  if want_torch:
    import torch  # lazy: heavy dependency torch, transformers (imports torch)
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(_hf_config(p))
    with tempfile.TemporaryDirectory() as d:
      hf.save_pretrained(d)
      model = LV.Llava.from_pretrained(d, dtype=dtype, param_dtype=jnp.float32)
    t_dtype = torch.float32 if autocast else (torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32)
    hf = hf.to(device=device, dtype=t_dtype).train()
  else:
    model = LV.Llava(_jax_config(p), dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  cfg = model.config
  batch = make_batch(cfg, p, p["batch"])
  loss_cfg = loss_lib.TGALossConfig(layers=p["layers"])
  mesh = sharding.make_mesh(data=-1, devices=jax.devices()[:1])
  optim = ml_collections.ConfigDict(dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                         schedule="constant", warmup_steps=0))
  tokens = int(batch["input_ids"].size)
  with jax.set_mesh(mesh):
    setup = tga_trainer.build_stage(model, "finetune", loss_cfg=loss_cfg, optim=optim, total_steps=10 ** 6,
                                    mesh=mesh)
    jb = sharding.shard_batch(batch, mesh)
    box = {"state": setup.state}
    key = jax.random.key(0)

    def jstep():
      box["state"], m = setup.step_fn(box["state"], setup.frozen, jb, key)
      return m["loss"]
    t0 = time.perf_counter()
    first_jax = float(jstep())                    # compiles; the first-step loss is the parity check
    jax_compile_s = time.perf_counter() - t0
    tj = perf.time_fn(jstep, windows=windows, steps=steps)
  jax_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  del box, setup, jb
  flops = tga_trainer.step_flops(cfg, batch["input_ids"].shape[1], batch["ref_ids"].shape[1], "finetune",
                                 max(p["layers"])) * p["batch"]
  rec = {"workload": "tga_step", "dtype": p["dtype"], "batch": p["batch"],
         "seq_len": int(batch["input_ids"].shape[1]), "ref_len": int(batch["ref_ids"].shape[1]),
         "layers": list(p["layers"]), "jax_timing": tj, "jax_step_s": tj.window_s, "jax_median_s": tj.median,
         "jax_tokens_per_s": tokens / tj.median, "jax_compile_s": jax_compile_s, "flops_per_step": flops,
         "jax_first_loss": first_jax, "jax_peak_bytes": jax_peak, "tokens_per_step": tokens, "weights": "random"}
  m = perf.mfu(flops / tj.median)
  if m is not None:
    rec["jax_mfu"] = m
  if hf is not None:
    import torch  # lazy: heavy dependency torch
    forward, label = None, "eager"
    if torch_compile:
      forward, label = torch.compile(hf), "torch.compile"
    if device.startswith("cuda"):
      torch.cuda.reset_peak_memory_stats()
    ts = torch_step_fn(hf, batch, p["layers"], loss_cfg, device, autocast_bf16=autocast, forward=forward)
    t0 = time.perf_counter()
    try:
      first_torch = float(ts())
    except Exception as e:  # noqa: BLE001 - a failing compile must not lose the row; say so and time eager
      if forward is None:
        raise
      label = f"eager (torch.compile failed: {type(e).__name__}: {str(e)[:120]})"
      ts = torch_step_fn(hf, batch, p["layers"], loss_cfg, device, autocast_bf16=autocast)
      first_torch = float(ts())
    torch_first_s = time.perf_counter() - t0
    tt = perf.time_fn(ts, windows=windows, steps=steps, sync=perf.torch_sync(device))
    # bf16 steps differ by rounding; float32 must agree to 1e-4 relative.
    tol = 1e-4 if p["dtype"] == "float32" else 2e-2
    rec.update(torch_timing=tt, torch_step_s=tt.window_s, torch_median_s=tt.median,
               torch_tokens_per_s=tokens / tt.median, torch_first_s=torch_first_s, torch_first_loss=first_torch,
               parity_first_loss=abs(first_jax - first_torch) <= tol * abs(first_torch), parity_tol=tol,
               ratio=tt.median / tj.median, torch_label=label + (", bf16 autocast" if autocast else ""),
               jax_slowest_faster_than_torch_fastest=max(tj.window_s) < min(tt.window_s),
               torch_peak_bytes=torch.cuda.max_memory_allocated() if device.startswith("cuda") else None)
  return rec


def main(argv: list[str]) -> None:
  args = _parse(argv)
  p = dict(PRESETS[args.preset])
  if args.batch:
    p["batch"] = args.batch
  if not args.no_torch and args.torch_threads:
    import torch  # lazy: heavy dependency torch
    torch.set_num_threads(args.torch_threads)
  env = perf.environment()
  rows = []
  for compile_ in ((False, True) if args.torch_compile and not args.no_torch else (False,)):
    rec = run(p, windows=args.windows, steps=args.steps, want_torch=not args.no_torch, torch_compile=compile_)
    if not rows:
      rows.append(["jax", rec["jax_median_s"] * 1e3, rec["jax_tokens_per_s"], rec["jax_compile_s"]])
    if "torch_median_s" in rec:
      rows.append([f"torch ({rec['torch_label']})", rec["torch_median_s"] * 1e3, rec["torch_tokens_per_s"],
                   rec["torch_first_s"]])
      print(f"first-step loss: jax {rec['jax_first_loss']:.6f} torch {rec['torch_first_loss']:.6f} (parity: "
            f"{rec['parity_first_loss']}); JAX / PyTorch ({rec['torch_label']}) throughput ratio "
            f"R = {rec['ratio']:.2f}")
    perf.append_result({**{k: v for k, v in rec.items() if not k.endswith("_timing")}, "preset": args.preset,
                        "env": env}, args.out)
  print(perf.format_table(["side", "step ms (median)", "tokens/s", "first call s"], rows))
  print(f"device: {env['device_kind']} ({env['platform']}); preset {args.preset}, {p['dtype']}, batch {p['batch']}, "
        f"T={rec['seq_len']} (+ reference {rec['ref_len']})")


if __name__ == "__main__":
  main(sys.argv[1:])
