"""``python -m vlsafe_jax.bench clip``: CLIP image-tower and text-tower inference throughput, JAX vs PyTorch.

Both sides run in the same process on the same random weights: an HF ``CLIPModel`` is built in torch, saved to
a temporary directory and loaded with ``CLIP.from_pretrained`` (the real conversion path). The JAX side is one
``jax.jit`` of ``encode_image`` / ``encode_text`` over a split nnx state; the PyTorch side is
``get_image_features`` / ``get_text_features`` under ``torch.inference_mode`` (SDPA attention), eager and under
``torch.compile`` (both columns by default, ``--torch-baselines``). Timing follows perf.md (compile timed
separately, median of windows); on a CPU the sides run in interleaved windows (``perf.time_interleaved``).

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
        projection_dim=256, dtype="float32", batches="1,8,32"),
    "l14": dict(
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, eos_token_id=2),
        vision=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16),
        projection_dim=768, dtype="bfloat16", batches="1,32,128,256"),
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
  p.add_argument("--attention-impl", default=None, help="attention_impl of both towers (default: the config's "
                 "'auto': cuDNN flash attention on GPU when the shapes allow, XLA otherwise)")
  p.add_argument("--torch-baselines", default="eager,compile",
                 help="PyTorch columns: any of eager, compile (torch.compile of the HF feature functions)")
  p.add_argument("--no-torch", action="store_true", help="time the JAX side only")
  p.add_argument("--out", default="runs/bench/results.jsonl", help="JSON-lines file to append ('' = none)")
  return p.parse_args(argv)


def write_hf(spec: dict, directory: str, seed: int = 0):
  """Random-weight HF ``CLIPModel`` of ``spec``'s shapes saved to ``directory``; returns it (eval mode, float32)."""
  import torch  # lazy: heavy dependency torch, transformers (imports torch)
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
  p = spec["projection_dim"]
  hcfg = CLIPConfig(text_config=CLIPTextConfig(projection_dim=p, **spec["text"]).to_dict(),
                    vision_config=CLIPVisionConfig(projection_dim=p, **spec["vision"]).to_dict(), projection_dim=p)
  torch.manual_seed(seed)
  hf = CLIPModel(hcfg).eval()
  hf.save_pretrained(directory)
  return hf


def load_jax(directory: str, dtype_name: str, attention_impl: str | None = None) -> C.CLIP:
  """Our CLIP from an HF directory, parameters and compute in ``dtype_name``; optional attention override."""
  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  ours = C.CLIP.from_pretrained(directory, dtype=dtype, param_dtype=dtype)
  if attention_impl:
    for tower in ("text_model", "vision_model"):
      for layer in getattr(ours, tower).encoder.layers:
        layer.self_attn.attention_impl = attention_impl
  return ours


def jax_encoders(ours: C.CLIP):
  """``({"image": f(pixels NHWC), "text": f(ids (B, T))}, {tower: jitted(state, x)}, state)``: one jit per tower
  over the split nnx state (the jitted functions too, for XLA's memory analysis)."""
  graphdef, state = nnx.split(ours)
  image = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode_image(x))
  text = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode_text(x))
  fns = {"image": (lambda x: image(state, x)), "text": (lambda x: text(state, x))}
  return fns, {"image": image, "text": text}, state


def torch_encoders(hf, device: str, dtype_name: str, compile_: bool):
  """HF feature functions on ``device`` in ``dtype_name`` (weights cast, SDPA); ``compile_`` = torch.compile."""
  import torch  # lazy: heavy dependency torch
  tdtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
  hf = hf.to(device=device, dtype=tdtype)
  hf.config._attn_implementation = "sdpa"
  # transformers 5 returns a model output whose pooler_output holds the projected features (4.x: the tensor).
  feats = lambda out: getattr(out, "pooler_output", out)
  fns = {"image": lambda x: feats(hf.get_image_features(pixel_values=x)),
         "text": lambda x: feats(hf.get_text_features(input_ids=x))}
  if compile_:
    fns = {k: torch.compile(f) for k, f in fns.items()}
  return fns


def make_input(cfg: C.CLIPConfig, tower: str, b: int, rng: np.random.RandomState, dtype_name: str, device: str):
  """Random input of one tower: ``(jax array, torch tensor maker)`` (NHWC pixels / (B, 77) ids ending in EOT)."""
  vc, tc = cfg.vision_config, cfg.text_config
  if tower == "image":
    x_np = rng.randn(b, vc.image_size, vc.image_size, 3).astype(np.float32)
    x = jnp.asarray(x_np, jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32)

    def to_torch():
      import torch  # lazy: heavy dependency torch
      return torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(
          device=device, dtype=torch.bfloat16 if dtype_name == "bfloat16" else torch.float32)
    return x, to_torch
  seq = tc.max_position_embeddings
  x_np = rng.randint(0, tc.vocab_size - 1, size=(b, seq))
  x_np[:, -1] = tc.vocab_size - 1

  def to_torch_ids():
    import torch  # lazy: heavy dependency torch
    return torch.from_numpy(x_np).to(device)
  return jnp.asarray(x_np), to_torch_ids


def tower_flops(cfg: C.CLIPConfig, tower: str) -> float:
  """Analytic forward FLOPs per image / per 77-token text (perf.md §3)."""
  if tower == "image":
    return C.clip_image_flops(cfg.vision_config, cfg.projection_dim)
  return C.clip_text_flops(cfg.text_config, cfg.text_config.max_position_embeddings, cfg.projection_dim)


def embedding_cosine(a, b) -> float:
  """Smallest row-wise cosine between two (B, P) embedding sets (float64 on the host)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
  return float(np.min(cos))


def main(argv: list[str]) -> None:
  args = _parse(argv)
  preset = PRESETS[args.preset]
  args.dtype = args.dtype or preset["dtype"]
  batches = [int(b) for b in (args.batches or preset["batches"]).split(",")]
  towers = args.towers.split(",")
  baselines = [] if args.no_torch else [b for b in args.torch_baselines.split(",") if b]
  env = perf.environment()
  on_gpu = env["platform"] == "gpu"
  with tempfile.TemporaryDirectory() as workdir:
    hf = write_hf(preset, workdir)
    ours = load_jax(workdir, args.dtype, args.attention_impl)
  cfg = ours.config
  jfns, _, _ = jax_encoders(ours)
  device = "cpu"
  torch_fns = {}
  if baselines:
    import torch  # lazy: heavy dependency torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in baselines:
      torch_fns[name] = torch_encoders(hf, device, args.dtype, name == "compile")
  flops = {t: tower_flops(cfg, t) for t in ("image", "text")}
  rows = []
  rng = np.random.RandomState(0)
  label = {"eager": "torch eager", "compile": "torch.compile"}
  for tower in towers:
    for b in batches:
      x, to_torch = make_input(cfg, tower, b, rng, args.dtype, device)
      fns = {"jax": (lambda x=x: jfns[tower](x))}
      if torch_fns:
        import torch  # lazy: heavy dependency torch
        tx = to_torch()
        for name, tf in torch_fns.items():
          fns[label[name]] = (lambda tf=tf: tf[tower](tx))
        t_sync = perf.torch_sync(device)
        # Interleaved windows on a CPU host (drift hits every side alike); one side at a time on a GPU.
        with torch.inference_mode():
          sync = lambda o: perf.block(o) if isinstance(o, jax.Array) else t_sync(o)
          t = (perf.time_interleaved(fns, windows=args.windows, steps=args.steps, sync=sync) if not on_gpu else
               {k: perf.time_fn(f, windows=args.windows, steps=args.steps, sync=sync) for k, f in fns.items()})
      else:
        t = {"jax": perf.time_fn(fns["jax"], windows=args.windows, steps=args.steps)}
      tj = t["jax"]
      row = {"tower": tower, "batch": b, "jax_ms": tj.median * 1e3, "jax_per_s": b / tj.median,
             "jax_compile_s": tj.compile_s}
      if on_gpu:
        row["jax_mfu"] = perf.mfu(flops[tower] * b / tj.median)
      for name in torch_fns:
        tt = t[label[name]]
        row.update({f"torch_{name}_ms": tt.median * 1e3, f"torch_{name}_per_s": b / tt.median,
                    f"ratio_{name}": tt.median / tj.median, f"torch_{name}_first_s": tt.compile_s})
        if on_gpu:
          row[f"torch_{name}_mfu"] = perf.mfu(flops[tower] * b / tt.median)
      rows.append(row)
      print(f"  {tower:5s} batch {b:4d}: jax {row['jax_ms']:.2f} ms" +
            "".join(f", {label[n]} {row[f'torch_{n}_ms']:.2f} ms ({row[f'ratio_{n}']:.2f}x)" for n in torch_fns),
            flush=True)

  unit = {"image": "img/s", "text": "txt/s"}
  headers = ["tower", "batch", "JAX ms", "JAX /s"]
  for n in torch_fns:
    headers += [f"{label[n]} ms", f"JAX / {label[n]}"]
  if on_gpu:
    headers += ["JAX MFU"] + [f"{label[n]} MFU" for n in torch_fns]
  table = []
  for r in rows:
    line = [r["tower"], r["batch"], r["jax_ms"], f"{r['jax_per_s']:.1f} {unit[r['tower']]}"]
    for n in torch_fns:
      line += [r[f"torch_{n}_ms"], f"{r[f'ratio_{n}']:.2f}x"]
    if on_gpu:
      pct = lambda v: f"{v:.1%}" if v else "-"
      line += [pct(r.get("jax_mfu"))] + [pct(r.get(f"torch_{n}_mfu")) for n in torch_fns]
    table.append(line)
  print(f"\nCLIP inference, preset {args.preset}, dtype {args.dtype}, device {env['device_kind']} "
        f"({env['platform']}, {env['device_count']} device(s)), jax {env['jax']}, torch {env.get('torch', '-')}; "
        f"PyTorch = HF get_*_features, SDPA, weights in {args.dtype}; "
        f"{'interleaved windows' if not on_gpu else 'sides timed one after the other'}; "
        f"{flops['image'] / 1e9:.2f} GFLOP/image, {flops['text'] / 1e9:.2f} GFLOP/text "
        f"({cfg.text_config.max_position_embeddings} tokens)")
  print(perf.format_table(headers, table))
  if args.out:
    for r in rows:
      perf.append_result({"bench": "clip", "preset": args.preset, "dtype": args.dtype, **r, "env": env,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, args.out)
