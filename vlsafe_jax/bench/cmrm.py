"""``python -m vlsafe_jax.bench cmrm``: CMRM steering overhead (perf.md W8), JAX vs HF PyTorch + forward hooks.

Measured on one LLaVA (random weights; ``small`` preset on CPU by default, ``7b`` = LLaVA-1.5-7B shapes in bf16,
intended for a GPU and never run on CPU here):
  * decode tokens/s for B x N greedy tokens, steering off / dataset-level (L, D) on / sample-level on (the two
    extra prefills of §3.2 included in the sample-level time);
  * overhead of dataset-level steering vs unsteered (target <= 3%): median over interleaved windows of the
    per-window ratio (perf.time_interleaved), so host drift hits both cases alike;
  * extraction time per 100 anchor prompts (two prefills each: corrupted image and text only);
  * the same generate with the HF torch model, unsteered and with steering forward hooks (same weights).
Appends a record to runs/bench/results.jsonl.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlsafe_jax import perf
from vlsafe_jax.bench.llava import last_logits_kl
from vlsafe_jax.data.vlm_prompts import SEG_IMAGE, SEG_OTHER, SEG_QUESTION, Prompt, collate
from vlsafe_jax.methods.cmrm import shift, steer
from vlsafe_jax.models import llava as LV


def _prompts(n, n_img, image_token, seed=0):
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    a, b = rs.randint(4, 10), rs.randint(8, 20)
    ids = [1] + list(rs.randint(3, 100, a)) + [image_token] * n_img + list(rs.randint(3, 100, b))
    segs = [SEG_OTHER] * (1 + a) + [SEG_IMAGE] * n_img + [SEG_QUESTION] * b
    out.append(Prompt(np.asarray(ids, np.int32), np.asarray(segs, np.int32), ""))
  return out


# LLaVA shapes of the two presets (HF config kwargs); dtype of the timed runs.
PRESETS = {
    "small": dict(text=dict(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4),
                  vision=dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4),
                  image_token=127, dtype="float32"),
    "7b": dict(text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32),
               vision=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16),
               image_token=32000, dtype="bfloat16"),
}


def build(spec: dict):
  """``(hf, jax Llava)`` with identical random weights (HF model saved and loaded through the converter)."""
  import torch  # lazy: torch and transformers are the optional HF baseline
  import transformers
  cfg = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**spec["vision"]),
      text_config=transformers.LlamaConfig(**spec["text"], pad_token_id=0, bos_token_id=1, eos_token_id=2),
      image_token_index=spec["image_token"])
  cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  hf = transformers.LlavaForConditionalGeneration(cfg).eval().to(getattr(torch, spec["dtype"]))
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = LV.Llava.from_pretrained(d, dtype=getattr(jnp, spec["dtype"]))
  return hf, model


class _Batch:
  """The ``batch`` object a :class:`~vlsafe_jax.methods.cmrm.steer.Steerer` reads (prompts + mask)."""

  def __init__(self, prompts, attention_mask):
    self.prompts, self.attention_mask = prompts, attention_mask


def setup(model, batch: int, seed: int = 2):
  """Prompts, pixels and steering cases for one batch: ``(arr, pixels, batch_obj, steerers, vec)``."""
  c = model.config
  n_img, size = c.num_image_tokens, c.vision_config.image_size
  L, D = c.text_config.num_hidden_layers, c.text_config.hidden_size
  prompts = _prompts(batch, n_img, c.image_token_index)
  arr = collate(prompts, 0, side="left")
  pixels = np.random.RandomState(1).randn(batch, size, size, 3).astype(np.float32)
  vec = np.random.RandomState(seed).randn(L, D).astype(np.float32) * 0.01
  steerers = {"dataset": steer.Steerer(model, level="dataset", vectors=vec, alpha=1.0),
              "sample": steer.Steerer(model, level="sample")}
  return arr, pixels, _Batch(prompts, arr["attention_mask"]), steerers, vec


def add_hooks(hf, vec):
  """Forward hooks adding ``vec[l]`` to decoder layer l's output (the HF way to steer); returns the handles."""
  import torch  # lazy: heavy dependency torch
  v_t = torch.tensor(vec).to(device=next(hf.parameters()).device, dtype=next(hf.parameters()).dtype)

  def hook(l):
    def fn(mod, inp, out):
      if isinstance(out, tuple):
        return (out[0] + v_t[l], *out[1:])
      return out + v_t[l]
    return fn
  return [layer.register_forward_hook(hook(l)) for l, layer in enumerate(hf.model.language_model.layers)]


def torch_generate_fn(hf, arr, pixels, n_new: int, device: str, static_compile: bool = False):
  """HF greedy generate of ``n_new`` tokens (``static_compile``: static cache; compile the LM outside)."""
  import torch  # lazy: heavy dependency torch
  ids_t = torch.tensor(arr["input_ids"].astype(np.int64), device=device)
  mask_t = torch.tensor(arr["attention_mask"].astype(np.int64), device=device)
  pix_t = torch.tensor(pixels.transpose(0, 3, 1, 2).copy()).to(device=device, dtype=next(hf.parameters()).dtype)
  kw = {"cache_implementation": "static"} if static_compile else {}

  def tgen(n=n_new, **extra):
    with torch.no_grad():
      return hf.generate(input_ids=ids_t, attention_mask=mask_t, pixel_values=pix_t, max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0, **kw, **extra)
  return tgen


def steering_parity(model, hf, batch: int = 2, device: str = "cpu") -> dict:
  """Dataset-level steering, JAX vs HF + hooks: KL of the first generated token's distribution (same weights)."""
  arr, pixels, b_obj, steerers, vec = setup(model, batch)
  j = LV.generate(model, arr["input_ids"], pixels, arr["attention_mask"], max_new_tokens=1, eos_token_id=(),
                  **steerers["dataset"](b_obj)).first_logits
  hooks = add_hooks(hf, vec)
  try:
    out = torch_generate_fn(hf, arr, pixels, 1, device)(return_dict_in_generate=True, output_logits=True)
  finally:
    for h in hooks:
      h.remove()
  t = out.logits[0].float().cpu().numpy()
  j = np.asarray(j, np.float32)
  return {"kl": last_logits_kl(j, t), "max_abs_logit_diff": float(np.max(np.abs(j - t)))}


def measure(model, hf, *, batch: int, new_tokens: int, windows: int, steps: int, torch_device: str = "cpu",
            torch_static_compile: bool = False, torch_windows: int | None = None) -> dict:
  """JAX off / dataset / sample in interleaved windows (+ torch off / hooks when ``hf``); returns Timings and the
  paired dataset-level overhead in percent."""
  arr, pixels, b_obj, steerers, vec = setup(model, batch)

  def gen(**kw):
    return LV.generate(model, arr["input_ids"], pixels, arr["attention_mask"], max_new_tokens=new_tokens,
                       eos_token_id=(), **kw).tokens

  cases = {"off": lambda: gen(), "dataset": lambda: gen(**steerers["dataset"](b_obj)),
           "sample": lambda: gen(**steerers["sample"](b_obj))}
  # Interleaved windows: the overhead is a few percent, less than the drift between separate runs on a shared host.
  jax_t = perf.time_interleaved(cases, windows=windows, steps=steps)
  out = {"jax": jax_t, "overhead_pct": perf.paired_overhead(jax_t["off"], jax_t["dataset"]),
         "prompt_len": int(arr["input_ids"].shape[1])}
  if hf is not None:
    import torch  # lazy: heavy dependency torch
    lm = hf.model.language_model
    if torch_static_compile:
      lm.forward = torch.compile(lm.forward, mode="reduce-overhead", fullgraph=False)
    tgen = torch_generate_fn(hf, arr, pixels, new_tokens, torch_device, torch_static_compile)
    sync = perf.torch_sync(torch_device)
    tw = torch_windows or windows
    try:
      t_off = perf.time_fn(tgen, windows=tw, steps=1, sync=sync)
      hooks = add_hooks(hf, vec)
      try:
        t_hooks = perf.time_fn(tgen, windows=tw, steps=1, sync=sync)
      finally:
        for h in hooks:
          h.remove()
    finally:
      if torch_static_compile:
        lm.forward = type(lm).forward.__get__(lm)
    out["torch"] = {"off": t_off, "hooks": t_hooks}
    out["torch_overhead_pct"] = 100.0 * (t_hooks.median / t_off.median - 1.0)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench cmrm")
  ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--anchors", type=int, default=32)
  ap.add_argument("--windows", type=int, default=15)
  ap.add_argument("--steps", type=int, default=5, help="generate calls per timing window")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                  help="also time HF static cache + torch.compile with and without the hooks (default on)")
  args = ap.parse_args(argv)

  spec = PRESETS[args.preset]
  hf, model = build(spec)
  b, n_new = args.batch, args.new_tokens
  m = measure(model, None if args.no_torch else hf, batch=b, new_tokens=n_new, windows=args.windows,
              steps=args.steps)
  rows = [[f"jax {name}", t.median * 1e3, b * n_new / t.median, t.best * 1e3, t.worst * 1e3]
          for name, t in m["jax"].items()]
  record = {"workload": "W8 cmrm", "preset": args.preset, "batch": b, "new_tokens": n_new, "dtype": spec["dtype"],
            "weights": "random", **perf.environment()}
  n_img = model.config.num_image_tokens
  anchors = _prompts(args.anchors, n_img, spec["image_token"], seed=3)
  shift.extract_pairs(model, anchors[:16], batch_size=16)              # compile
  t0 = time.perf_counter()
  shift.extract_pairs(model, anchors, batch_size=16)
  extract_100 = (time.perf_counter() - t0) * 100.0 / args.anchors
  if not args.no_torch:
    variants = [("eager", False)] + ([("static+compile", True)] if args.torch_compile else [])
    for label, sc in variants:
      tm = m if not sc else measure(model, hf, batch=b, new_tokens=n_new, windows=1, steps=1,
                                    torch_static_compile=True, torch_windows=args.windows)
      for name, t in tm["torch"].items():
        rows.append([f"torch {label} {name}", t.median * 1e3, b * n_new / t.median, t.best * 1e3, t.worst * 1e3])
      record[f"torch_{label}_overhead_pct"] = tm["torch_overhead_pct"]
    record["torch_ratio_off"] = m["torch"]["off"].median / m["jax"]["off"].median
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), preset {args.preset}, batch {b}, "
        f"{n_new} new tokens, prompt {m['prompt_len']} tokens ({n_img} image), {spec['dtype']}, random weights")
  print(perf.format_table(["case", "generate ms (median)", "tokens/s", "best ms", "worst ms"], rows))
  print(f"dataset-level steering overhead vs off: {m['overhead_pct']:+.2f}% (median of {args.windows} paired "
        f"windows; target <= 3%)")
  print(f"extraction: {extract_100:.3f} s per 100 anchor prompts (2 prefills each)")
  record.update(timings_s={k: t.median for k, t in m["jax"].items()}, overhead_pct=m["overhead_pct"],
                extract_s_per_100=extract_100, rows=[[str(c) for c in r] for r in rows])
  perf.append_result(record)
  return record


if __name__ == "__main__":
  main()
