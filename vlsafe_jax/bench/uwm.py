"""``python -m vlsafe_jax.bench uwm``: UWM vision-tower calibration + scoring + selection + edit, JAX vs PyTorch.

Both sides run in the same process on the same random HF ``CLIPModel`` (the JAX side loads it through
``CLIP.from_pretrained``) and the same calibration pairs (random pixels):
- JAX: ``methods.uwm.calibrate.calibrate`` (one jitted step per batch: forward of both sides + token statistics +
  rank-1 accumulator update, only ``(d_in, d_out)`` accumulators), then ``finalize`` + ``select_all`` +
  ``apply``;
- PyTorch: the REFERENCE algorithm (uwm.md §3-§5 as the official code computes it): forward hooks on every
  ``fc2`` capture the inputs, the per-weight ``N x d_out x d_in`` psi tensors of both sides are built per batch
  and their ratio summed; selection by ascending sort + cumsum ``> 1 - tau``; ``W * mask``.
Reported: calibration throughput (pairs/s, steady state: the JAX compile is timed separately), the time of
scoring + selection + edit, peak memory (device allocator on GPU; on CPU the peak process RSS growth of each phase
and the analytic size of the largest reference tensor), and the max relative difference of the two score sets.

Presets:
  small (default)  CPU-sized: 64 px / patch 16 (17 tokens), width 128, MLP 512, 4 layers, 256 pairs, batch 64.
  l14              CLIP ViT-L/14 vision tower (24 fc2 of 1024 x 4096, 257 tokens), 8192 pairs, batch 128: for a GPU.

Examples:
  python -m vlsafe_jax.bench uwm
  python -m vlsafe_jax.bench uwm --preset l14 --torch-device cuda
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from vlsafe_jax import perf
from vlsafe_jax.methods.uwm import calibrate as cal
from vlsafe_jax.methods.uwm import edit
from vlsafe_jax.models.clip import CLIP

PRESETS = {
    "small": dict(vision=dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=512,
                              num_hidden_layers=4, num_attention_heads=4), pairs=256, batch=64),
    "l14": dict(vision=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16), pairs=8192, batch=128),
}
TAU = 0.02


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _build(preset, tmp):
  import torch  # lazy: heavy dependency torch, transformers (imports torch)
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
  v = preset["vision"]
  cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              max_position_embeddings=16, bos_token_id=1,
                                              eos_token_id=2).to_dict(),
                   vision_config=CLIPVisionConfig(**v).to_dict(), projection_dim=32)
  torch.manual_seed(0)
  hf = CLIPModel(cfg).eval()
  hf.save_pretrained(tmp)
  return hf


def torch_reference(hf, px_s, px_u, batch, device, tau=TAU, eps=1e-8):
  """The reference algorithm with forward hooks and full N x d_out x d_in tensors; returns (R {name: (o, i)},
  masks, timings)."""
  import torch  # lazy: heavy dependency torch
  hf = hf.to(device)
  names = [f"vision_model.encoder.layers.{i}.mlp.fc2" for i in range(len(hf.vision_model.encoder.layers))]
  got = {}
  hooks = [hf.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n, a[0]))
           for n in names]
  w = {n: hf.get_submodule(n).weight.detach() for n in names}
  acc = {n: torch.zeros_like(w[n]) for n in names}

  def psi(x_btd, w_oi):
    a = x_btd.norm(dim=1)                                              # (B, d_in)
    s = x_btd.std(dim=1)                                               # unbiased
    o = (w_oi.abs()[None] * a[:, None, :]).sum(-1) / w_oi.shape[1]     # (B, d_out)
    inp = a * w_oi.abs().sum(0)[None] / w_oi.shape[0]                  # (B, d_in)
    return o[:, :, None] * inp[:, None, :] / (s[:, None, :] + eps)     # (B, d_out, d_in): the reference tensor

  sync = perf.torch_sync(device)
  t0 = time.perf_counter()
  with torch.inference_mode():
    for i in range(0, px_s.shape[0], batch):
      x = torch.from_numpy(np.concatenate([px_s[i:i + batch], px_u[i:i + batch]]).transpose(0, 3, 1, 2).copy())
      hf.get_image_features(pixel_values=x.to(device))
      b = x.shape[0] // 2
      for n in names:
        ps, pu = psi(got[n][:b].float(), w[n]), psi(got[n][b:].float(), w[n])
        acc[n] += (pu / ps).sum(0)
    sync(None)
    t_cal = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores, masks = {}, {}
    for n in names:
      r = acc[n] / px_s.shape[0]
      p = (r / r.sum()).flatten()
      srt, idx = torch.sort(p)
      sel = torch.zeros_like(p, dtype=torch.bool)
      sel[idx[torch.cumsum(srt, 0) > 1 - tau]] = True
      m = sel.reshape(r.shape)
      hf.get_submodule(n).weight.data = torch.where(m, -w[n], w[n])
      scores[n], masks[n] = r.cpu().numpy(), m.cpu().numpy()
    sync(None)
    t_edit = time.perf_counter() - t1
  for h in hooks:
    h.remove()
  return scores, masks, t_cal, t_edit


def run(vision: dict, pairs: int, batch: int, torch_device: str = "cpu", *, hf=None, hf_dir: str | None = None,
        with_torch: bool = True) -> dict:
  """Calibration of both sides on the same random CLIP and pairs; returns the record (see the module docstring).

  ``hf`` / ``hf_dir``: an HF ``CLIPModel`` (or its directory) whose vision tower has ``vision``'s shapes, to reuse;
  default: built here with a tiny text tower.
  """
  rng = np.random.RandomState(0)
  px_s = rng.randn(pairs, vision["image_size"], vision["image_size"], 3).astype(np.float32)
  px_u = (px_s + 0.5 * rng.randn(*px_s.shape)).astype(np.float32)
  with tempfile.TemporaryDirectory() as tmp:
    if hf_dir is None:
      hf_dir = tmp
      hf = _build({"vision": vision}, tmp)
    elif hf is None and with_torch:
      from transformers import CLIPModel  # lazy: heavy dependency transformers (imports torch)
      hf = CLIPModel.from_pretrained(hf_dir).eval()
    model = CLIP.from_pretrained(hf_dir)
  cfg = edit.UWMConfig()
  graphdef, state = nnx.split(model)
  enc = cal.clip_encode_fn(graphdef, "vision", ("mlp.fc2",))

  def batches():
    for i in range(0, pairs, batch):
      yield {"safe": px_s[i:i + batch], "unsafe": px_u[i:i + batch]}

  # ---- JAX: a first pass compiles (timed separately), the second is the steady-state measurement.
  rss0 = _rss_mb()
  t0 = time.perf_counter()
  cal.calibrate(enc, state, batches(), cfg.vision.targets, cfg.score_config("vision"), mesh=None)
  jax_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  res = cal.calibrate(enc, state, batches(), cfg.vision.targets, cfg.score_config("vision"), mesh=None)
  perf.block(res.scores)
  jax_cal = time.perf_counter() - t0
  for _ in range(2):   # the first call compiles select for each layer shape; report the second
    t1 = time.perf_counter()
    new_state, masks = cal.edit_params(state, res.scores, cfg.vision.tau, cfg.vision.alpha)
    perf.block(jax.tree.leaves(new_state))
    jax_edit = time.perf_counter() - t1
  stats = jax.devices()[0].memory_stats() or {}
  jax_peak = stats.get("peak_bytes_in_use")
  jax_mem = f"{jax_peak / 2**20:.0f} MiB device (process peak)" if jax_peak else f"+{_rss_mb() - rss0:.0f} MiB RSS"
  rec = {"pairs": pairs, "batch": batch, "jax_pairs_per_s": pairs / jax_cal, "jax_calibration_s": jax_cal,
         "jax_edit_s": jax_edit, "jax_first_pass_s": jax_first, "jax_memory": jax_mem, "jax_peak_bytes": jax_peak,
         "torch_device": torch_device}
  if not with_torch:
    return rec

  # ---- PyTorch reference.
  import torch  # lazy: heavy dependency torch
  rss1 = _rss_mb()
  if torch_device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
  t_scores, t_masks, t_cal, t_edit = torch_reference(hf, px_s, px_u, batch, torch_device)
  t_peak = torch.cuda.max_memory_allocated() if torch_device.startswith("cuda") else None
  d_in, d_out = vision["intermediate_size"], vision["hidden_size"]
  torch_mem = f"{t_peak / 2**20:.0f} MiB device" if t_peak else f"+{_rss_mb() - rss1:.0f} MiB RSS"
  # ---- agreement
  rel = max(float(np.max(np.abs(np.asarray(res.scores[k]).T - t_scores[k]) / np.abs(t_scores[k])))
            for k in t_scores)
  diff = sum(int(np.sum(np.asarray(masks[k]).T != t_masks[k])) for k in t_masks)
  rec.update(torch_pairs_per_s=pairs / t_cal, torch_calibration_s=t_cal, torch_edit_s=t_edit, torch_memory=torch_mem,
             torch_peak_bytes=t_peak, psi_tensor_mib=batch * d_out * d_in * 4 / 2**20, max_rel_score_diff=rel,
             mask_diff=diff)
  return rec


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench uwm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--pairs", type=int, default=None)
  p.add_argument("--batch", type=int, default=None, help="pairs per calibration step")
  p.add_argument("--torch-device", default="cpu")
  p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
  p.add_argument("--no-record", action="store_true", help="do not append to runs/bench/results.jsonl")
  a = p.parse_args(argv)
  import torch  # lazy: heavy dependency torch
  if a.torch_threads:
    torch.set_num_threads(a.torch_threads)
  preset = PRESETS[a.preset]
  n, bs = a.pairs or preset["pairs"], a.batch or preset["batch"]
  v = preset["vision"]
  rec = run(v, n, bs, a.torch_device)
  env = perf.environment()
  rows = [["JAX (jit, rank-1)", f"{rec['jax_pairs_per_s']:.1f}", f"{rec['jax_calibration_s']:.2f}",
           f"{rec['jax_edit_s']:.3f}", f"{rec['jax_first_pass_s']:.2f}", rec["jax_memory"]],
          [f"PyTorch reference ({a.torch_device}, N x d_out x d_in)", f"{rec['torch_pairs_per_s']:.1f}",
           f"{rec['torch_calibration_s']:.2f}", f"{rec['torch_edit_s']:.3f}", "-",
           f"{rec['torch_memory']} (psi tensor {rec['psi_tensor_mib']:.0f} MiB x2 per layer-batch)"]]
  print(f"UWM vision calibration: preset {a.preset}, {n} pairs, {bs} pairs/step, {v['num_hidden_layers']} fc2 "
        f"({v['hidden_size']} x {v['intermediate_size']}), tau {TAU}; device {env['device_kind']} ({env['platform']}), "
        f"torch threads {env.get('torch_threads')}")
  print(perf.format_table(["implementation", "pairs/s", "calibration s", "select+edit s", "first pass s (compile)",
                           "peak memory"], rows))
  print(f"speed-up (calibration): {rec['torch_calibration_s'] / rec['jax_calibration_s']:.2f}x; max rel. score "
        f"difference {rec['max_rel_score_diff']:.2e}; mask entries differing {rec['mask_diff']}")
  rec = {"bench": "uwm", "preset": a.preset, **rec, "env": env}
  if not a.no_record:
    perf.append_result(rec)
  return rec


if __name__ == "__main__":
  main()
