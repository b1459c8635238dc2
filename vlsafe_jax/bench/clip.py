"""``python -m vlsafe_jax.bench clip``: CLIP image-tower and text-tower inference throughput, JAX vs PyTorch.

Both sides run in the same process on the same random weights: an HF ``CLIPModel`` is built in torch, saved to
a temporary directory and loaded with ``CLIP.from_pretrained`` (the real conversion path). The JAX side is one
``jax.jit`` of ``encode_image`` / ``encode_text`` over a split nnx state; the PyTorch side is
``get_image_features`` / ``get_text_features`` under ``torch.inference_mode`` (SDPA attention; with
``--torch-compile``, ``torch.compile``). Timing follows perf.md (compile timed separately, median of windows).

Presets:
  small (default)  CPU-sized: 224 px / patch 32, width 256, 4 layers per tower, 77 text tokens.
  l14              openai/clip-vit-large-patch14 shape (24 + 12 layers), bf16, torch.compile: for a GPU.
  l14_336          as l14 at 336 px (LLaVA's tower).
MFU (perf.md convention: analytic FLOPs, 2 per MAC) is printed only on GPUs with a known peak.

Examples:
  python -m vlsafe_jax.bench clip
  python -m vlsafe_jax.bench clip --preset l14 --batches 1,32,256 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlsafe_jax import perf
from vlsafe_jax.models import clip as C

PRESETS = {
    "small": dict(
        text=dict(vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=77, eos_token_id=2),
        vision=dict(image_size=224, patch_size=32, hidden_size=256, intermediate_size=1024,
                    num_hidden_layers=4, num_attention_heads=4),
        projection_dim=256, dtype="float32", batches="1,8,32", torch_compile=False),
    "l14": dict(
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, eos_token_id=2),
        vision=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16),
        projection_dim=768, dtype="bfloat16", batches="1,32,128,256", torch_compile=True),
}
PRESETS["l14_336"] = dict(PRESETS["l14"], vision=dict(PRESETS["l14"]["vision"], image_size=336))


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench clip", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: the preset's")
  p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the preset's)")
  p.add_argument("--towers", default="image,text")
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--attention-impl", default=None, help="jax.nn.dot_product_attention implementation "
                 "(None = XLA's choice; 'cudnn' on GPU)")
  p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--no-torch", action="store_true", help="time the JAX side only")
  p.add_argument("--out", default="runs/bench/results.jsonl", help="JSON-lines file to append ('' = none)")
  return p.parse_args(argv)


def _build(preset, args, workdir):
  """HF torch model with random weights, saved and re-loaded as our CLIP. Returns (hf or None, ours, cfg)."""
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
  p = PRESETS[preset]
  hcfg = CLIPConfig(text_config=CLIPTextConfig(projection_dim=p["projection_dim"], **p["text"]).to_dict(),
                    vision_config=CLIPVisionConfig(projection_dim=p["projection_dim"], **p["vision"]).to_dict(),
                    projection_dim=p["projection_dim"])
  torch.manual_seed(0)
  hf = CLIPModel(hcfg).eval()
  hf.save_pretrained(workdir)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  ours = C.CLIP.from_pretrained(workdir, dtype=dtype, param_dtype=dtype)
  if args.attention_impl:
    for tower in ("text_model", "vision_model"):
      for layer in getattr(ours, tower).encoder.layers:
        layer.self_attn.attention_impl = args.attention_impl
  return hf, ours, ours.config


def main(argv: list[str]) -> None:
  args = _parse(argv)
  preset = PRESETS[args.preset]
  args.dtype = args.dtype or preset["dtype"]
  batches = [int(b) for b in (args.batches or preset["batches"]).split(",")]
  torch_compile = preset["torch_compile"] if args.torch_compile is None else args.torch_compile
  towers = args.towers.split(",")
  env = perf.environment()
  on_gpu = env["platform"] == "gpu"
  with tempfile.TemporaryDirectory() as workdir:
    hf, ours, cfg = _build(args.preset, args, workdir)
  graphdef, state = nnx.split(ours)

  @jax.jit
  def jax_image(state, pixels):
    return nnx.merge(graphdef, state).encode_image(pixels)

  @jax.jit
  def jax_text(state, ids):
    return nnx.merge(graphdef, state).encode_text(ids)

  torch_side = None
  if not args.no_torch:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    hf = hf.to(device=device, dtype=tdtype)
    hf.config._attn_implementation = "sdpa"
    img_fn = lambda x: hf.get_image_features(pixel_values=x)
    txt_fn = lambda x: hf.get_text_features(input_ids=x)
    if torch_compile:
      img_fn, txt_fn = torch.compile(img_fn), torch.compile(txt_fn)
    torch_side = (torch, device, tdtype, img_fn, txt_fn)

  vc, tc = cfg.vision_config, cfg.text_config
  seq = tc.max_position_embeddings
  flops = {"image": C.clip_image_flops(vc, cfg.projection_dim),
           "text": C.clip_text_flops(tc, seq, cfg.projection_dim)}
  rows = []
  rng = np.random.RandomState(0)
  for tower in towers:
    for b in batches:
      if tower == "image":
        x_np = rng.randn(b, vc.image_size, vc.image_size, 3).astype(np.float32)
        x = jnp.asarray(x_np, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
        jfn = lambda: jax_image(state, x)
      else:
        x_np = rng.randint(0, tc.vocab_size - 1, size=(b, seq))
        x_np[:, -1] = tc.vocab_size - 1
        x = jnp.asarray(x_np)
        jfn = lambda: jax_text(state, x)
      tj = perf.time_fn(jfn, windows=args.windows, steps=args.steps)
      row = {"tower": tower, "batch": b, "jax_ms": tj.median * 1e3, "jax_per_s": b / tj.median,
             "jax_compile_s": tj.compile_s}
      if on_gpu:
        row["jax_mfu"] = perf.mfu(flops[tower] * b / tj.median)
      if torch_side is not None:
        torch, device, tdtype, img_fn, txt_fn = torch_side
        if tower == "image":
          tx = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device=device, dtype=tdtype)
          tfn = lambda: img_fn(tx)
        else:
          tx = torch.from_numpy(x_np).to(device)
          tfn = lambda: txt_fn(tx)
        with torch.inference_mode():
          tt = perf.time_fn(tfn, windows=args.windows, steps=args.steps, sync=perf.torch_sync(device))
        row.update(torch_ms=tt.median * 1e3, torch_per_s=b / tt.median, ratio=tt.median / tj.median)
        if on_gpu:
          row["torch_mfu"] = perf.mfu(flops[tower] * b / tt.median)
      rows.append(row)
      print(f"  {tower:5s} batch {b:4d}: jax {row['jax_ms']:.2f} ms"
            + (f", torch {row['torch_ms']:.2f} ms, ratio {row['ratio']:.2f}x" if "torch_ms" in row else ""),
            flush=True)

  unit = {"image": "img/s", "text": "txt/s"}
  headers = ["tower", "batch", "JAX ms", "JAX /s", "torch ms", "torch /s", "JAX speed-up"]
  if on_gpu:
    headers += ["JAX MFU", "torch MFU"]
  table = []
  for r in rows:
    line = [r["tower"], r["batch"], r["jax_ms"], f"{r['jax_per_s']:.1f} {unit[r['tower']]}",
            r.get("torch_ms", "-"), f"{r['torch_per_s']:.1f}" if "torch_per_s" in r else "-",
            f"{r['ratio']:.2f}x" if "ratio" in r else "-"]
    if on_gpu:
      line += [f"{r['jax_mfu']:.1%}" if r.get("jax_mfu") else "-",
               f"{r['torch_mfu']:.1%}" if r.get("torch_mfu") else "-"]
    table.append(line)
  print(f"\nCLIP inference, preset {args.preset}, dtype {args.dtype}, device {env['device_kind']} "
        f"({env['platform']}, {env['device_count']} device(s)), jax {env['jax']}, torch {env.get('torch', '-')}"
        f"{' + torch.compile' if torch_compile and torch_side else ''}; "
        f"{flops['image'] / 1e9:.2f} GFLOP/image, {flops['text'] / 1e9:.2f} GFLOP/text ({seq} tokens)")
  print(perf.format_table(headers, table))
  if args.out:
    for r in rows:
      perf.append_result({"bench": "clip", "preset": args.preset, "dtype": args.dtype, **r, "env": env,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, args.out)
