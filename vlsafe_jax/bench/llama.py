"""``python -m vlsafe_jax.bench llama``: decoder prefill latency and greedy-decode tokens/s, JAX vs HF PyTorch.

Workloads W6/W7 (perf.md §5) for the text decoder alone. Both sides run in this process on the same device
kind, with the same weights (the ``small`` preset builds a random HF model, saves it and loads it into JAX through
the converter) or the same shapes with random weights (``7b`` preset: LLaVA-1.5-7B / Vicuna-7B text config,
intended for a GPU; label results "random weights").

Measured per batch size B:
  * prefill: one forward over a B x P prompt writing the KV cache (JAX: jitted prefill; torch: ``model(ids)``);
  * generate: B x N greedy tokens end to end (JAX: one compiled prefill + ``while_loop``; torch: ``generate``
    eager with its dynamic cache, optionally also static cache + ``torch.compile``);
  * decode tok/s = B * (N - 1) / (generate(N) time - generate(1) time), aggregated over the batch: both runs
    share the prefill and the fixed overheads, so the difference is the N - 1 decode steps alone.
Batch-1 decode also reports achieved bytes/s = (weights + KV cache read per token) * tok/s, and the fraction of
the device's peak HBM bandwidth on GPUs (perf.md §2).

Examples:
  python -m vlsafe_jax.bench llama                         # small CPU config, batch 1 and 8
  python -m vlsafe_jax.bench llama --preset 7b --dtype bfloat16 --batch 1,32 --prompt-len 640 --new-tokens 128 \
      --torch-compile                                     # GPU
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlsafe_jax import _compat, perf
from vlsafe_jax.models import decoding, llama as L

PRESETS = {
    # Small enough for 2 CPU cores in a few minutes; GQA and prime-ish MLP like the tests.
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    # Vicuna-7B / LLaVA-1.5-7B text config (vocab 32064 as in llava-1.5-7b-hf).
    "7b": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
}


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench llama", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--steps", type=int, default=4, help="calls per timing window")
  p.add_argument("--no-torch", action="store_true", help="JAX side only")
  p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the tuned HF decode: static cache + torch.compile (default on)")
  p.add_argument("--out", default="runs/bench/results.jsonl")
  return p.parse_args(argv)


def _build(preset: str, dtype, want_torch: bool, torch_device: str):
  """(jax model, torch model or None, config). Small preset: identical weights through the converter."""
  kw = PRESETS[preset]
  cfg = L.LlamaConfig(**kw, pad_token_id=0, eos_token_id=2)
  hf = None
  if want_torch:
    import torch  # lazy: heavy dependency torch, transformers (imports torch)
    import transformers
    hf_cfg = transformers.LlamaConfig(**kw, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    if preset == "small":
      hf = transformers.LlamaForCausalLM(hf_cfg).eval()
      with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = L.Llama.from_pretrained(d, dtype=dtype, param_dtype=dtype)
      hf = hf.to(device=torch_device, dtype=tdtype)
      return model, hf, cfg
    with torch.device(torch_device):
      hf = transformers.LlamaForCausalLM(hf_cfg).to(tdtype).eval()
  # Random weights built directly on device (jit-ed init avoids a host-side float32 copy of 7B params).
  graphdef, state = nnx.split(_compat.eval_shape(lambda: L.Llama(cfg, dtype=dtype, param_dtype=dtype,
                                                                  rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.state(L.Llama(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))))()
  return nnx.merge(graphdef, state), hf, cfg



# Columns of :func:`decode_rows`' rows.
DECODE_HEADERS = ["side", "batch", "prompt", "new", "prefill ms", "prefill tok/s", "generate s", "decode tok/s",
                  "b1 bandwidth"]


def decode_rows(results, b: int, p_len: int, n_new: int, text_cfg, bytes_per: int):
  """Table rows for one batch size from ``{side: (prefill, generate(n_new), generate(1)) Timings}``.

  Decode rate = ``b * (n_new - 1) / (t(generate n_new) - t(generate 1))``, which cancels the prefill and the first
  token (robust to prefill noise); at batch 1 the achieved weight+KV bandwidth is added (vs the device peak when
  known). Returns ``(rows, [(side, record fields)])``: the fields are the JSON record's timing entries (prefill,
  generate and generate(1) medians and windows, compile time, decode tokens/s and bytes/s); JAX/torch-eager ratio
  rows close the list when both sides ran. Shared by the ``llama`` and ``llava`` benchmarks.
  """
  rows, measured = [], []
  for side, (tp, tg, t1) in results.items():
    decode_s = tg.median - t1.median
    tok_s = b * (n_new - 1) / decode_s if decode_s > 0 else float("nan")   # nan: noise swamped the decode
    row = [side, b, p_len, n_new, tp.median * 1e3, b * p_len / tp.median, tg.median, tok_s]
    bw = None
    if b == 1:
      bw = perf.llama_decode_bytes(text_cfg, p_len + n_new // 2, bytes_per) * tok_s
      peak = perf.device_peak()
      row.append(f"{bw / 1e9:.2f} GB/s" + (f" ({bw / (peak[1] * 1e12):.0%} of peak)" if peak else ""))
    else:
      row.append("")
    rows.append(row)
    measured.append((side, {"prefill_s": tp.median, "prefill_windows": tp.window_s, "generate_s": tg.median,
                            "generate_windows": tg.window_s, "generate1_s": t1.median,
                            "generate1_windows": t1.window_s, "compile_s": tg.compile_s, "decode_tok_s": tok_s,
                            "decode_bytes_s": bw}))
  if "torch eager" in results and "jax" in results:
    (jp, jg, j1), (tp_, tg_, t1_) = results["jax"], results["torch eager"]
    ratio = (tg_.median - t1_.median) / (jg.median - j1.median)
    rows.append(["ratio decode (JAX / torch eager)", b, "", "", "", "", "", f"{ratio:.2f}x", ""])
    rows.append(["ratio prefill (JAX / torch eager)", b, "", "", "", "", "", f"{tp_.median / jp.median:.2f}x", ""])
  return rows, measured

def main(argv: list[str]) -> None:
  args = _parse(argv)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  env = perf.environment()
  torch_device = "cpu"
  want_torch = not args.no_torch
  if want_torch:
    try:
      import torch  # lazy: heavy dependency torch
      torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
      want_torch = False
  model, hf, cfg = _build(args.preset, dtype, want_torch, torch_device)
  p_len, n_new = args.prompt_len, args.new_tokens
  bytes_per = 2 if dtype == jnp.bfloat16 else 4
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, ids, mask):
    m = nnx.merge(graphdef, state)
    logits, cache, _ = m(ids, attention_mask_bt=mask, kv_cache=m.init_cache(ids.shape[0], p_len + n_new),
                         logits="last")
    return logits, cache

  rows, records = [], []
  rs = np.random.RandomState(0)
  for b in [int(x) for x in args.batch.split(",")]:
    ids = rs.randint(3, cfg.vocab_size, (b, p_len)).astype(np.int32)
    mask = np.ones((b, p_len), np.int32)
    j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)
    t_pre = perf.time_fn(lambda: prefill(state, j_ids, j_mask), windows=args.windows, steps=args.steps)
    gen = lambda n: (lambda: decoding.generate(model, input_ids=j_ids, attention_mask=j_mask, max_new_tokens=n,
                                               eos_token_id=()).tokens)
    t_gen = perf.time_fn(gen(n_new), windows=args.windows, steps=args.steps)
    t_one = perf.time_fn(gen(1), windows=args.windows, steps=args.steps)
    results = {"jax": (t_pre, t_gen, t_one)}
    if hf is not None:
      import torch  # lazy: heavy dependency torch
      sync = perf.torch_sync(torch_device)
      t_ids = torch.tensor(ids, dtype=torch.long, device=torch_device)
      t_mask = torch.tensor(mask, dtype=torch.long, device=torch_device)

      def t_prefill():
        with torch.no_grad():
          return hf(t_ids, attention_mask=t_mask, use_cache=True, logits_to_keep=1).logits

      def t_generate(n, **kw):
        def run():
          with torch.no_grad():
            return hf.generate(t_ids, attention_mask=t_mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, **kw)
        return perf.time_fn(run, windows=args.windows, steps=args.steps, sync=sync)

      tp = perf.time_fn(t_prefill, windows=args.windows, steps=args.steps, sync=sync)
      results["torch eager"] = (tp, t_generate(n_new), t_generate(1))
      if args.torch_compile:
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
        results["torch static+compile"] = (tp, t_generate(n_new, cache_implementation="static"),
                                           t_generate(1, cache_implementation="static"))
        hf.forward = type(hf).forward.__get__(hf)
    new_rows, measured = decode_rows(results, b, p_len, n_new, cfg, bytes_per)
    rows.extend(new_rows)
    for side, fields in measured:
      records.append({"workload": "W6/W7 llama decoder", "side": side, "preset": args.preset, "dtype": args.dtype,
                      "batch": b, "prompt_len": p_len, "new_tokens": n_new, **fields, "weights": "random", **env})
  print(f"device: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)); jax {env['jax']}, "
        f"torch {env.get('torch', '-')} on {torch_device}; preset {args.preset}, {args.dtype}, random weights")
  print(perf.format_table(DECODE_HEADERS, rows))
  for r in records:
    perf.append_result(r, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
