"""``python -m vlsafe_jax.bench llava``: LLaVA prefill latency and greedy-decode tokens/s, JAX vs HF PyTorch.

Workloads W6/W7 (perf.md §5). Both sides run in this process on the same device kind with the same weights (the
``small`` preset builds a random HF ``LlavaForConditionalGeneration``, saves it and loads it into JAX through the
converter) or the same shapes with random weights (``7b`` preset: llava-1.5-7b-hf shapes, CLIP ViT-L/14-336 +
Vicuna-7B, bf16, intended for a GPU; results are labelled "random weights").

Each prompt is one image (N image tokens) plus ``--text-len`` text tokens. Measured per batch size B:
  * prefill: vision tower + projector + decoder over the B x P prompt, writing the KV cache (JAX: one jitted
    program; torch: ``model(input_ids, pixel_values, logits_to_keep=1)``);
  * generate: B x N greedy tokens end to end (JAX: :func:`vlsafe_jax.models.llava.generate`; torch: ``generate``
    eager with its dynamic cache, and static cache + ``torch.compile`` with ``--torch-compile``);
  * decode tok/s = B * (N - 1) / (generate(N) - generate(1)), aggregated over the batch (shared prefill and
    fixed costs cancel).
Batch-1 decode also reports achieved bytes/s = (decoder weights + KV cache read per token) * tok/s and, on GPUs,
the fraction of the device's peak bandwidth (perf.device_peak).

Examples:
  python -m vlsafe_jax.bench llava                                   # small CPU config, batch 1 and 8
  python -m vlsafe_jax.bench llava --preset 7b --batch 1,32 --new-tokens 128 --torch-compile   # GPU, bf16
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlsafe_jax import _compat, perf
from vlsafe_jax.bench.llama import DECODE_HEADERS, decode_rows
from vlsafe_jax.models import llama as L
from vlsafe_jax.models import llava as LV
from vlsafe_jax.models.clip import CLIPVisionConfig

PRESETS = {
    # 2 CPU cores, a few minutes: 112 px / patch 14 -> 64 image tokens; small GQA decoder.
    "small": dict(
        vision=dict(image_size=112, patch_size=14, hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4),
        text=dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
        image_token_index=2047),
    # llava-1.5-7b-hf: CLIP ViT-L/14-336 (576 image tokens) + Vicuna-7B (vocab 32064).
    "7b": dict(
        vision=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=768),
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        image_token_index=32000),
}


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench llava", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8 on CPU, 1,32 on GPU)")
  p.add_argument("--text-len", type=int, default=40, help="text tokens per prompt besides the image tokens")
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="default: float32 for small, bfloat16 for 7b")
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--steps", type=int, default=3, help="calls per timing window")
  p.add_argument("--no-torch", action="store_true", help="JAX side only")
  p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the tuned HF decode: static cache + torch.compile (default on)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default: torch's own; 1 resists CPU oversubscription on shared hosts)")
  p.add_argument("--out", default="runs/bench/results.jsonl")
  return p.parse_args(argv)


def config(spec: dict) -> LV.LlavaConfig:
  """Our LlavaConfig from a preset dict (``vision`` / ``text`` HF kwargs + ``image_token_index``)."""
  return LV.LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]),
                        text_config=L.LlamaConfig(**spec["text"], pad_token_id=0, eos_token_id=2),
                        image_token_index=spec["image_token_index"])


def hf_config(spec: dict):
  """The matching ``transformers.LlavaConfig`` (layer -2 features, CLS dropped, erf GELU projector, SDPA)."""
  import transformers  # lazy: heavy dependency transformers (imports torch)
  hf_cfg = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**spec["vision"]),
      text_config=transformers.LlamaConfig(**spec["text"], pad_token_id=0, eos_token_id=2, bos_token_id=1),
      image_token_index=spec["image_token_index"], vision_feature_layer=-2,
      vision_feature_select_strategy="default", projector_hidden_act="gelu")
  hf_cfg.vision_config.model_type = "clip_vision_model"
  hf_cfg._attn_implementation = "sdpa"
  return hf_cfg


def build(spec: dict, dtype, *, want_torch: bool, torch_device: str, same_weights: bool):
  """``(jax Llava, HF torch model or None, config)`` with random weights.

  ``same_weights``: the HF model is saved and loaded into JAX through the converter (identical weights: for
  parity; costs a write of the whole model). Otherwise each side draws its own weights (timing does not depend
  on the values; perf.md labels such runs "random weights") and the JAX side is initialised on device by one
  jitted init (no host copy of 7B parameters).
  """
  cfg = config(spec)
  hf = None
  if want_torch:
    import torch  # lazy: heavy dependency torch, transformers (imports torch)
    import transformers
    torch.manual_seed(0)
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    if same_weights:
      hf = transformers.LlavaForConditionalGeneration(hf_config(spec)).to(tdtype).eval()
      with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = LV.Llava.from_pretrained(d, dtype=dtype, param_dtype=dtype)
      return model, hf.to(device=torch_device), cfg
    with torch.device(torch_device):
      hf = transformers.LlavaForConditionalGeneration(hf_config(spec)).to(tdtype).eval()
  graphdef, _ = nnx.split(_compat.eval_shape(lambda: LV.Llava(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.state(LV.Llava(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))))()
  return nnx.merge(graphdef, state), hf, cfg


def prompts(cfg: LV.LlavaConfig, b: int, text_len: int, rs: np.random.RandomState):
  """``(ids (B, P) int32, mask (B, P), pixels (B, h, w, 3))``: BOS + N image tokens + ``text_len`` text tokens."""
  n_img = cfg.num_image_tokens
  text = rs.randint(3, min(cfg.text_config.vocab_size, cfg.image_token_index) - 1, (b, text_len))
  ids = np.concatenate([np.ones((b, 1), np.int64), np.full((b, n_img), cfg.image_token_index), text], 1)
  ids = ids.astype(np.int32)
  vc = cfg.vision_config
  return ids, np.ones_like(ids), rs.randn(b, vc.image_size, vc.image_size, 3).astype(np.float32)


def jax_prefill(model: LV.Llava, cache_len: int):
  """``(fn(ids, pixels, mask) -> (last logits, cache), jitted, state)``: vision + projector + decoder, one jit."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(st, ids, pixels, mask):
    m = nnx.merge(graphdef, st)
    logits, cache, _ = m(ids, pixels, attention_mask_bt=mask, kv_cache=m.init_cache(ids.shape[0], cache_len),
                         logits="last")
    return logits, cache
  return (lambda ids, pixels, mask: prefill(state, ids, pixels, mask)), prefill, state


def time_jax(model: LV.Llava, ids, mask, pixels, n_new: int, *, windows: int, steps: int):
  """JAX ``(prefill, generate(n_new), generate(1))`` Timings for one prompt batch."""
  pre, _, _ = jax_prefill(model, ids.shape[1] + n_new)
  j_ids, j_mask, j_pix = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)
  t_pre = perf.time_fn(lambda: pre(j_ids, j_pix, j_mask), windows=windows, steps=steps)
  gen = lambda n: (lambda: LV.generate(model, ids, j_pix, mask, max_new_tokens=n, eos_token_id=()).tokens)
  return t_pre, perf.time_fn(gen(n_new), windows=windows, steps=steps), perf.time_fn(gen(1), windows=windows,
                                                                                       steps=steps)


def torch_inputs(hf, ids, mask, pixels, device: str):
  import torch  # lazy: heavy dependency torch
  tdt = next(hf.parameters()).dtype
  return (torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device),
          torch.tensor(pixels.transpose(0, 3, 1, 2).copy(), device=device, dtype=tdt))


def time_torch(hf, ids, mask, pixels, n_new: int, *, device: str, windows: int, steps: int,
               static_compile: bool = False):
  """HF ``(prefill, generate(n_new), generate(1))`` Timings: eager dynamic cache, or (``static_compile``) the
  tuned decode of the PyTorch blog / gpt-fast: static KV cache and ``torch.compile(mode="reduce-overhead")`` of the
  language model's forward (CUDA graphs on GPUs)."""
  import torch  # lazy: heavy dependency torch
  sync = perf.torch_sync(device)
  t_ids, t_mask, t_pix = torch_inputs(hf, ids, mask, pixels, device)

  def t_prefill():
    with torch.no_grad():
      return hf(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pix, use_cache=True, logits_to_keep=1).logits

  kw = {"cache_implementation": "static"} if static_compile else {}

  def t_generate(n):
    def run():
      with torch.no_grad():
        return hf.generate(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pix, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return perf.time_fn(run, windows=windows, steps=steps, sync=sync)

  lm = hf.model.language_model if hasattr(hf, "model") else hf.language_model
  if static_compile:
    lm.forward = torch.compile(lm.forward, mode="reduce-overhead", fullgraph=False)
  try:
    tp = perf.time_fn(t_prefill, windows=windows, steps=steps, sync=sync)
    return tp, t_generate(n_new), t_generate(1)
  finally:
    if static_compile:
      lm.forward = type(lm).forward.__get__(lm)


def last_logits_kl(jax_logits, torch_logits) -> float:
  """Mean over rows of KL(torch || jax) of the next-token distributions (float64 on the host)."""
  p = np.asarray(torch_logits, np.float64)
  q = np.asarray(jax_logits, np.float64)
  p = p - p.max(-1, keepdims=True)
  q = q - q.max(-1, keepdims=True)
  lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
  lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def main(argv: list[str]) -> None:
  args = _parse(argv)
  on_gpu = jax.default_backend() == "gpu"
  dtype_name = args.dtype or ("bfloat16" if args.preset == "7b" else "float32")
  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  batches = [int(x) for x in (args.batch or ("1,32" if on_gpu else "1,8")).split(",")]
  torch_device = "cpu"
  want_torch = not args.no_torch
  if want_torch:
    try:
      import torch  # lazy: heavy dependency torch
      torch_device = "cuda" if torch.cuda.is_available() else "cpu"
      if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    except ImportError:
      want_torch = False
  env = perf.environment()          # after set_num_threads so the record shows the thread count used
  model, hf, cfg = build(PRESETS[args.preset], dtype, want_torch=want_torch, torch_device=torch_device,
                         same_weights=args.preset == "small")
  n_img, n_new = cfg.num_image_tokens, args.new_tokens
  p_len = 1 + n_img + args.text_len
  bytes_per = 2 if dtype == jnp.bfloat16 else 4
  rows, records = [], []
  rs = np.random.RandomState(0)
  for b in batches:
    ids, mask, pixels = prompts(cfg, b, args.text_len, rs)
    results = {"jax": time_jax(model, ids, mask, pixels, n_new, windows=args.windows, steps=args.steps)}
    if hf is not None:
      results["torch eager"] = time_torch(hf, ids, mask, pixels, n_new, device=torch_device, windows=args.windows,
                                          steps=args.steps)
      if args.torch_compile:
        results["torch static+compile"] = time_torch(hf, ids, mask, pixels, n_new, device=torch_device,
                                                     windows=args.windows, steps=args.steps, static_compile=True)
    new_rows, measured = decode_rows(results, b, p_len, n_new, cfg.text_config, bytes_per)
    rows.extend(new_rows)
    for side, fields in measured:
      records.append({"workload": "W6/W7 llava", "side": side, "preset": args.preset, "dtype": dtype_name,
                      "batch": b, "prompt_len": p_len, "image_tokens": n_img, "new_tokens": n_new, **fields,
                      "prefill_flops": b * LV.llava_prefill_flops(cfg, p_len - n_img), "weights": "random", **env})
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  for r in records:
    r["host_load_avg_1m"] = None if load is None else load[0]
  print(f"host load average (1 min) at the end: {load[0] if load else '-'} on {env['host_cpus']} CPUs")
  print(f"device: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)); jax {env['jax']}, "
        f"torch {env.get('torch', '-')} on {torch_device}; preset {args.preset}, {dtype_name}, random weights; "
        f"prompt = 1 BOS + {n_img} image + {args.text_len} text tokens")
  print(perf.format_table(DECODE_HEADERS, rows))
  for r in records:
    perf.append_result(r, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
