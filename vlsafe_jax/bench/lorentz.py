"""``python -m vlsafe_jax.bench lorentz``: the HySAC loss block, forward + backward, JAX vs PyTorch (perf.md W4).

One call = the seven-term HySAC loss (four B x B Lorentzian contrastive terms: pairwise distances + two-way
cross-entropy; three entailment terms: half-apertures and exterior angles) on four float32 ``(B, D)`` embedding
sets with global negatives, plus its gradient w.r.t. the four embedding sets, the log-curvature and the log
logit-scale. JAX: one ``jax.jit`` of ``value_and_grad(hysac_loss)``. PyTorch: the same equations written below as
plain torch functions (same clamps and eps), eager and ``torch.compile`` (inductor), ``loss.backward()`` each call.
Both run in this process on the same inputs; a parity check (small batch) runs first. Timing follows perf.md:
compile / first call timed separately, median over windows of ``steps`` calls.

The sides run in interleaved windows (JAX, eager, compile, then rotated; ``perf.time_interleaved``), so drift of a
shared host hits all of them alike, and the ratios are medians of per-window ratios. CPU defaults stay within a few
minutes: windows x steps is 7 x 3 at B = 256, 5 x 1 at 1024 and 3 x 1 at 4096 (``--windows`` / ``--steps`` set them
for every batch instead).

Examples:
  python -m vlsafe_jax.bench lorentz
  python -m vlsafe_jax.bench lorentz --batches 256,2048 --no-compile
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlsafe_jax import perf
from vlsafe_jax.geometry import lorentz
from vlsafe_jax.methods.hysac import losses as H

# (windows, steps) per batch size when not given on the command line (CPU-sized).
_AUTO_TIMING = {256: (7, 3), 1024: (5, 1)}
_AUTO_TIMING_LARGE = (3, 1)


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m vlsafe_jax.bench lorentz", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", default="256,1024,4096", help="comma-separated batch sizes B")
  p.add_argument("--dim", type=int, default=768, help="embedding dimension D")
  p.add_argument("--windows", type=int, default=None, help="timing windows (default: per batch, see above)")
  p.add_argument("--steps", type=int, default=None, help="calls per window (default: per batch, see above)")
  p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
  p.add_argument("--no-torch", action="store_true", help="time the JAX side only")
  p.add_argument("--sequential", action="store_true",
                 help="time the sides one after the other instead of in interleaved windows")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default: torch's own; 1 resists CPU oversubscription on shared hosts)")
  p.add_argument("--out", default="runs/bench/results.jsonl", help="JSON-lines file to append ('' = none)")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# PyTorch reference of the same equations (hysac.md §1-§3); torch imported lazily.
# ------------------------------------------------------------------------------------------------------------


def torch_loss_fn():
  """Returns ``loss(e_i, e_iu, e_t, e_tu, log_c, log_s) -> (total, terms)`` in plain torch (reference weights)."""
  import torch  # lazy: heavy dependency torch
  import torch.nn.functional as F

  def time_comp(x, c):
    return torch.sqrt(1 / c + torch.sum(x * x, dim=-1))

  def pairwise_dist(x, y, c, eps=1e-8):
    inner = x @ y.T - time_comp(x, c)[:, None] * time_comp(y, c)[None, :]
    return torch.acosh(torch.clamp(-c * inner, min=1 + eps)) / torch.sqrt(c)

  def half_aperture(x, c, k=0.1, eps=1e-5):
    return torch.asin(torch.clamp(2 * k / (torch.sqrt(c) * torch.linalg.vector_norm(x, dim=-1) + eps),
                                  -1 + eps, 1 - eps))

  def oxy_angle(x, y, c, eps=1e-5):
    x0, y0 = time_comp(x, c), time_comp(y, c)
    ell = c * (torch.sum(x * y, dim=-1) - x0 * y0)
    num = y0 + ell * x0
    den = torch.sqrt(torch.clamp(ell * ell - 1, min=eps))
    return torch.acos(torch.clamp(num / (torch.linalg.vector_norm(x, dim=-1) * den + eps), -1 + eps, 1 - eps))

  def contrastive(a, z, c, s):
    logits = -s * pairwise_dist(a, z, c)
    tgt = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))

  def entail(p, q, c, eta=1.0):
    return torch.mean(torch.relu(oxy_angle(p, q, c) - eta * half_aperture(p, c)))

  def loss(e_i, e_iu, e_t, e_tu, log_c, log_s):
    c, s = torch.exp(log_c), torch.exp(log_s)
    terms = [contrastive(e_i, e_t, c, s), contrastive(e_iu, e_tu, c, s), contrastive(e_iu, e_t, c, s),
             contrastive(e_i, e_tu, c, s), entail(e_t, e_i, c), entail(e_tu, e_iu, c), entail(e_i, e_tu, c)]
    return sum(terms) / 49.0, terms

  return loss


def inputs(b, d, seed=0):
  """Four float32 (B, D) sets (e_i, e_iu, e_t, e_tu) lifted like CLIP features (norm ~15, alpha = 1/sqrt(768)).

  Root distances ~0.3-0.8 with the trained ordering T < I < T* < I*, so every term is active.
  """
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(b, d)).astype(np.float32)
  out = []
  for scale in (0.8, 1.4, 0.6, 1.0):
    f = scale * (base + 0.5 * rng.normal(size=(b, d)).astype(np.float32)) * 0.5
    out.append(np.asarray(lorentz.exp_map0(jnp.asarray(f) / math.sqrt(768.0), 1.0), np.float32))
  return out


# Scalars of the timed calls: log-curvature and log logit-scale at HySAC's initial values.
LOG_C0, LOG_S0 = 0.3, math.log(1 / 0.07)


@functools.lru_cache(maxsize=1)
def jax_step():
  """``step(e_i, e_iu, e_t, e_tu, log_c, log_s) -> (loss, grads of all six)``: one jit of value_and_grad (one
  object per process, so parity, timing and memory analysis share its compilations)."""
  cfg = H.HySACLossConfig(negatives="global")

  def jax_loss(e_i, e_iu, e_t, e_tu, log_c, log_s):
    return H.hysac_loss(e_i, e_iu, e_t, e_tu, jnp.exp(log_c), jnp.exp(log_s), cfg)[0]
  return jax.jit(jax.value_and_grad(jax_loss, argnums=(0, 1, 2, 3, 4, 5)))


def jax_inputs(arrays):
  return [jnp.asarray(a) for a in arrays] + [jnp.float32(LOG_C0), jnp.float32(LOG_S0)]


def torch_inputs(arrays, device: str):
  """Leaf tensors (requires_grad) for the four sets and the two log-scalars."""
  import torch  # bench-time only
  ts = [torch.tensor(a, device=device, requires_grad=True) for a in arrays]
  return ts + [torch.tensor(v, dtype=torch.float32, device=device, requires_grad=True) for v in (LOG_C0, LOG_S0)]


def torch_steps(baselines=("eager", "compile")) -> dict:
  """``{baseline: step(tensors) -> loss}`` running forward + ``backward()``; ``"compile"`` = ``torch.compile``
  (inductor) of the loss, compiled on the first call."""
  import torch  # bench-time only
  t_loss = torch_loss_fn()
  fns = {"eager": lambda *a: t_loss(*a)[0]}
  if "compile" in baselines:
    fns["compile"] = torch.compile(lambda *a: t_loss(*a)[0])

  def make(fn):
    def step(tensors):
      for t in tensors:
        t.grad = None
      total = fn(*tensors)
      total.backward()
      return total
    return step
  return {k: make(v) for k, v in fns.items() if k in baselines}


def parity(dim: int, device: str, *, batch: int = 64) -> dict:
  """Loss, every term and every gradient of both sides on one small batch (float32).

  Returns ``{"ok", "loss_rel_err", "term_abs_err", "grad_rel_err"}``; ok = 1e-4 / 1e-4 / 1e-3.
  """
  cfg = H.HySACLossConfig(negatives="global")
  small = inputs(batch, dim, seed=1)
  j_in = jax_inputs(small)
  jv, jg = jax_step()(*j_in)
  _, j_terms = H.hysac_loss(*j_in[:4], jnp.exp(j_in[4]), jnp.exp(j_in[5]), cfg)
  t_loss = torch_loss_fn()
  ts = torch_inputs(small, device)
  tv = torch_steps(("eager",))["eager"](ts)
  _, t_terms = t_loss(*ts)
  loss_err = abs(float(tv.detach()) - float(jv)) / max(abs(float(jv)), 1e-12)
  term_err = max(abs(float(t_terms[i].detach()) - float(j_terms[k])) for i, k in enumerate(H.TERM_NAMES))
  grad_err = max(float(np.max(np.abs(ts[i].grad.cpu().numpy() - np.asarray(jg[i])))) /
                 max(float(np.max(np.abs(np.asarray(jg[i])))), 1e-12) for i in range(6))
  ok = loss_err < 1e-4 and term_err < 1e-4 and grad_err < 1e-3
  return {"ok": ok, "loss_rel_err": loss_err, "term_abs_err": term_err, "grad_rel_err": grad_err}


def measure(b: int, dim: int, *, windows: int, steps: int, baselines=("eager", "compile"), device: str = "cpu",
            interleave: bool = True, with_torch: bool = True) -> dict[str, perf.Timing]:
  """Timings of one batch size: ``{"jax": ..., "torch eager": ..., "torch.compile": ...}``.

  ``interleave``: all sides in rotating windows (perf.time_interleaved) so that host drift hits them alike; else
  each side alone (a GPU's per-side peak memory stays its own).
  """
  j_step, j_in = jax_step(), jax_inputs(inputs(b, dim))
  fns = {"jax": (lambda: j_step(*j_in))}
  if with_torch:
    ts = torch_inputs(inputs(b, dim), device)
    names = {"eager": "torch eager", "compile": "torch.compile"}
    for k, step in torch_steps(baselines).items():
      fns[names[k]] = (lambda step=step: step(ts))
  t_sync = perf.torch_sync(device) if with_torch else None
  sync = lambda x: perf.block(x) if isinstance(x, (jax.Array, tuple)) else t_sync(x)
  if interleave:
    return perf.time_interleaved(fns, windows=windows, steps=steps, sync=sync)
  return {k: perf.time_fn(f, windows=windows, steps=steps, sync=sync) for k, f in fns.items()}


def main(argv: list[str]) -> None:
  args = _parse(argv)
  batches = [int(b) for b in args.batches.split(",")]
  device = "cpu"
  if not args.no_torch:
    import torch  # bench-time only
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    par = parity(args.dim, device)
    print(f"parity (B=64, D={args.dim}, float32): loss rel err {par['loss_rel_err']:.2e}, max term abs err "
          f"{par['term_abs_err']:.2e}, max grad rel err {par['grad_rel_err']:.2e} -> "
          f"{'OK' if par['ok'] else 'MISMATCH'}", flush=True)
  env = perf.environment()  # after set_num_threads so the record shows the thread count used
  baselines = ("eager",) if args.no_compile else ("eager", "compile")
  rows = []
  for b in batches:
    windows, steps = _AUTO_TIMING.get(b, _AUTO_TIMING_LARGE)
    windows, steps = args.windows or windows, args.steps or steps
    t = measure(b, args.dim, windows=windows, steps=steps, baselines=baselines, device=device,
                interleave=not args.sequential, with_torch=not args.no_torch)
    tj = t["jax"]
    row = {"batch": b, "dim": args.dim, "windows": windows, "steps": steps, "interleaved": not args.sequential,
           "jax_ms": tj.median * 1e3, "jax_ms_min": tj.best * 1e3, "jax_ms_max": tj.worst * 1e3,
           "jax_windows_ms": [w * 1e3 for w in tj.window_s], "jax_compile_s": tj.compile_s}
    if "torch eager" in t:
      te = t["torch eager"]
      row.update(torch_eager_ms=te.median * 1e3, torch_eager_windows_ms=[w * 1e3 for w in te.window_s],
                 eager_over_jax=_paired_ratio(te, tj, not args.sequential))
    if "torch.compile" in t:
      tc = t["torch.compile"]
      row.update(torch_compile_ms=tc.median * 1e3, torch_compile_windows_ms=[w * 1e3 for w in tc.window_s],
                 torch_compile_first_s=tc.compile_s, compile_over_jax=_paired_ratio(tc, tj, not args.sequential))
    rows.append(row)
    print(f"  B={b}: jax {row['jax_ms']:.2f} ms" +
          (f", torch eager {row['torch_eager_ms']:.2f} ms" if "torch_eager_ms" in row else "") +
          (f", torch.compile {row['torch_compile_ms']:.2f} ms" if "torch_compile_ms" in row else ""), flush=True)

  fmt = lambda r, k: r[k] if k in r else "-"
  ratio = lambda r, k: f"{r[k]:.2f}x" if k in r else "-"
  spread = lambda r: f"{r['jax_ms_min']:.4g}-{r['jax_ms_max']:.4g}"
  headers = ["batch", "JAX ms/call", "JAX min-max", "torch eager ms", "torch.compile ms", "eager/JAX", "compile/JAX",
             "windows x steps"]
  table = [[r["batch"], r["jax_ms"], spread(r), fmt(r, "torch_eager_ms"), fmt(r, "torch_compile_ms"),
            ratio(r, "eager_over_jax"), ratio(r, "compile_over_jax"), f"{r['windows']}x{r['steps']}"] for r in rows]
  print(f"\nHySAC loss block fwd+bwd (7 terms, global negatives), D={args.dim}, float32; device "
        f"{env['device_kind']} ({env['platform']}, {env['device_count']} device(s), {env['host_cpus']} host CPUs), "
        f"jax {env['jax']}, flax {env['flax']}, torch {env.get('torch', '-')} "
        f"({env.get('torch_device', 'cpu')}, {env.get('torch_threads', '-')} threads); "
        f"{'interleaved windows' if not args.sequential else 'sides timed one after the other'}")
  print(perf.format_table(headers, table))
  # Shared CPUs make torch's OpenMP threads especially noisy; the load average tells readers how busy the host was.
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  print("ratios > 1 mean JAX is faster (interleaved: median of per-window ratios)." +
        (f" host load average (1/5/15 min): {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}" if load else ""))
  if args.out:
    for r in rows:
      perf.append_result({"bench": "lorentz", **r, "env": env, "load_avg": load,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, args.out)


def _paired_ratio(other: perf.Timing, jax_t: perf.Timing, paired: bool) -> float:
  """other / JAX time: the median of per-window ratios when the windows were interleaved, else of medians."""
  if paired:
    return 1.0 + perf.paired_overhead(jax_t, other) / 100.0
  return other.median / jax_t.median
