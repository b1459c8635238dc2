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
import numpy as np


def _prompts(n, n_img, image_token, seed=0):
  from vlsafe_jax.data.vlm_prompts import SEG_IMAGE, SEG_OTHER, SEG_QUESTION, Prompt
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    a, b = rs.randint(4, 10), rs.randint(8, 20)
    ids = [1] + list(rs.randint(3, 100, a)) + [image_token] * n_img + list(rs.randint(3, 100, b))
    segs = [SEG_OTHER] * (1 + a) + [SEG_IMAGE] * n_img + [SEG_QUESTION] * b
    out.append(Prompt(np.asarray(ids, np.int32), np.asarray(segs, np.int32), ""))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench cmrm")
  ap.add_argument("--preset", default="small", choices=["small", "7b"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--anchors", type=int, default=32)
  ap.add_argument("--windows", type=int, default=15)
  ap.add_argument("--steps", type=int, default=5, help="generate calls per timing window")
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args(argv)
  import jax.numpy as jnp
  from vlsafe_jax import perf
  from vlsafe_jax.data.vlm_prompts import collate
  from vlsafe_jax.methods.cmrm import shift, steer
  from vlsafe_jax.models import llava as LV

  import torch
  import transformers
  if args.preset == "small":
    text = dict(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4)
    image_token, dtype = 127, "float32"
  else:
    text = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16)
    image_token, dtype = 32000, "bfloat16"
  cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**vision),
                                 text_config=transformers.LlamaConfig(**text), image_token_index=image_token)
  cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  hf = transformers.LlavaForConditionalGeneration(cfg).eval().to(getattr(torch, dtype))
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = LV.Llava.from_pretrained(d, dtype=getattr(jnp, dtype))
  n_img = model.config.num_image_tokens
  size = model.config.vision_config.image_size
  L, D = model.config.text_config.num_hidden_layers, model.config.text_config.hidden_size
  b, n_new = args.batch, args.new_tokens
  prompts = _prompts(b, n_img, image_token)
  arr = collate(prompts, 0, side="left")
  pixels = np.random.RandomState(1).randn(b, size, size, 3).astype(np.float32)
  vec = np.random.RandomState(2).randn(L, D).astype(np.float32) * 0.01

  def gen(**kw):
    return LV.generate(model, arr["input_ids"], pixels, arr["attention_mask"], max_new_tokens=n_new,
                       eos_token_id=(), **kw).tokens

  class _Batch:
    pass
  batch = _Batch()
  batch.prompts, batch.attention_mask = prompts, arr["attention_mask"]
  sample = steer.Steerer(model, level="sample")
  dataset = steer.Steerer(model, level="dataset", vectors=vec, alpha=1.0)
  cases = {"off": lambda: gen(), "dataset": lambda: gen(**dataset(batch)),
           "sample": lambda: gen(**sample(batch))}
  rows, record = [], {"workload": "W8 cmrm", "preset": args.preset, "batch": b, "new_tokens": n_new,
                      "dtype": dtype, "weights": "random", **perf.environment()}
  # Interleaved windows: the overhead is a few percent, less than the drift between separate runs on a shared host.
  measured = perf.time_interleaved(cases, windows=args.windows, steps=args.steps)
  timings = {name: t.median for name, t in measured.items()}
  for name, t in measured.items():
    rows.append([f"jax {name}", t.median * 1e3, b * n_new / t.median, t.best * 1e3, t.worst * 1e3])
  overhead = perf.paired_overhead(measured["off"], measured["dataset"])
  anchors = _prompts(args.anchors, n_img, image_token, seed=3)
  shift.extract_pairs(model, anchors[:16], batch_size=16)              # compile
  t0 = time.perf_counter()
  shift.extract_pairs(model, anchors, batch_size=16)
  extract_100 = (time.perf_counter() - t0) * 100.0 / args.anchors
  if not args.no_torch:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids_t = torch.tensor(arr["input_ids"].astype(np.int64))
    mask_t = torch.tensor(arr["attention_mask"].astype(np.int64))
    pix_t = torch.tensor(pixels.transpose(0, 3, 1, 2).copy()).to(getattr(torch, dtype))

    def tgen():
      with torch.no_grad():
        return hf.generate(input_ids=ids_t, attention_mask=mask_t, pixel_values=pix_t, max_new_tokens=n_new,
                           min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    t = perf.time_fn(tgen, windows=args.windows, steps=1, sync=lambda x: x)
    rows.append(["torch off", t.median * 1e3, b * n_new / t.median, t.best * 1e3, t.worst * 1e3])
    v_t = torch.tensor(vec).to(getattr(torch, dtype))
    hs = [layer.register_forward_hook(lambda m, i, o, l=l: ((o[0] if isinstance(o, tuple) else o) + v_t[l],
                                                            *((o[1:]) if isinstance(o, tuple) else ()))
                                      if isinstance(o, tuple) else o + v_t[l])
          for l, layer in enumerate(hf.model.language_model.layers)]
    t = perf.time_fn(tgen, windows=args.windows, steps=1, sync=lambda x: x)
    for h in hs:
      h.remove()
    rows.append(["torch hooks", t.median * 1e3, b * n_new / t.median, t.best * 1e3, t.worst * 1e3])
    record["torch_ratio_off"] = (b * n_new / timings["off"]) / rows[-2][2]
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), preset {args.preset}, batch {b}, "
        f"{n_new} new tokens, prompt {arr['input_ids'].shape[1]} tokens ({n_img} image), {dtype}, random weights")
  print(perf.format_table(["case", "generate ms (median)", "tokens/s", "best ms", "worst ms"], rows))
  print(f"dataset-level steering overhead vs off: {overhead:+.2f}% (median of {args.windows} paired windows; "
        f"target <= 3%)")
  print(f"extraction: {extract_100:.3f} s per 100 anchor prompts (2 prefills each)")
  record.update(timings_s=timings, overhead_pct=overhead, extract_s_per_100=extract_100,
                rows=[[str(c) for c in r] for r in rows])
  perf.append_result(record)
  return record


if __name__ == "__main__":
  main()
