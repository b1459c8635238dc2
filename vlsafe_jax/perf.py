"""Timing, FLOP models and MFU (perf.md).

Conventions: 2 FLOP per multiply-accumulate; matmuls + attention, no causal discount; remat not counted.
Peaks are dense bf16 tensor-core numbers; fp32 runs report MFU against the same peak and say so.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np

# device_kind substring -> (dense bf16 TFLOP/s, HBM TB/s). perf.md §1.
PEAKS = (
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.4, 3.35),      # "NVIDIA H100 80GB HBM3" = SXM5
    ("H200", 989.4, 4.8),
    ("A100-SXM4-40GB", 312.0, 1.555),
    ("A100", 312.0, 2.039),
)


def device_peak(kind: str | None = None) -> tuple[float, float] | None:
  """(peak bf16 TFLOP/s, peak HBM TB/s) for a device kind, or None (CPU / unknown)."""
  kind = kind or jax.devices()[0].device_kind
  for key, tflops, tbs in PEAKS:
    if key.lower() in kind.lower():
      return tflops, tbs
  return None


def mfu(flops_per_s: float, kind: str | None = None) -> float | None:
  peak = device_peak(kind)
  return None if peak is None else flops_per_s / (peak[0] * 1e12)


# --------------------------------------------------------------------------------------------------------------
# Analytic models of the Llama/Mistral decoder. ``cfg`` is a ``vlsafe_jax.models.llama.LlamaConfig`` (read by
# field name: this utility module sits below models/ and imports none of it).
# --------------------------------------------------------------------------------------------------------------

def llama_param_count(cfg, *, include_embeddings: bool = True) -> int:
  """Number of parameters (untied LM head counted once more unless tied)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  n, k = cfg.num_attention_heads, cfg.num_key_value_heads
  per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d
  total = cfg.num_hidden_layers * per_layer + d
  if include_embeddings:
    total += cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
  return total


def llama_prefill_flops(cfg, seq_len: int) -> float:
  """Analytic forward FLOPs for one sequence of ``seq_len`` tokens (perf.md: 2/MAC, matmuls + attention
  ``QK^T`` and ``PV`` without causal discount, LM head over every position)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  n, k = cfg.num_attention_heads, cfg.num_key_value_heads
  t = seq_len
  macs = cfg.num_hidden_layers * (t * (d * n * h * 2 + d * k * h * 2 + 3 * d * f) + 2 * t * t * n * h)
  macs += t * d * cfg.vocab_size
  return 2.0 * macs


def llama_decode_bytes(cfg, context_len: int, bytes_per_param: int = 2, batch: int = 1) -> float:
  """Bytes read per decode step: every weight once (embedding rows ignored when untied) plus the K/V cache of
  ``context_len`` tokens for ``batch`` rows (perf.md §2: bandwidth, not MFU, for batch-1 decode)."""
  weights = llama_param_count(cfg) - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
  kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context_len * batch
  return float((weights + kv) * bytes_per_param)


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


@dataclasses.dataclass
class Timing:
  """Per-window seconds per call (median and spread) and compile/first-call seconds."""
  compile_s: float
  window_s: list[float]           # seconds per call, one entry per window

  @property
  def median(self) -> float:
    return statistics.median(self.window_s)

  @property
  def best(self) -> float:
    return min(self.window_s)

  @property
  def worst(self) -> float:
    return max(self.window_s)


def time_fn(fn: Callable[[], Any], *, windows: int = 5, steps: int = 20, min_window_s: float = 0.0,
            sync: Callable[[Any], Any] = block) -> Timing:
  """Times ``fn()`` (no arguments; close over inputs) under the perf.md protocol.

  The first call (compilation) is timed separately; then ``windows`` windows of ``steps`` calls each, with a
  host sync only at window boundaries. A window is extended until it lasts at least ``min_window_s``.
  """
  t0 = time.perf_counter()
  sync(fn())
  compile_s = time.perf_counter() - t0
  per_call = []
  for _ in range(windows):
    n, t0 = 0, time.perf_counter()
    out = None
    while True:
      for _ in range(steps):
        out = fn()
      n += steps
      sync(out)
      dt = time.perf_counter() - t0
      if dt >= min_window_s:
        break
    per_call.append(dt / n)
  return Timing(compile_s, per_call)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, windows: int = 15, steps: int = 5,
                     sync: Callable[[Any], Any] = block) -> dict[str, Timing]:
  """Times several variants of one workload in interleaved windows (A B C, B C A, C A B, ...).

  For overheads of a few percent (perf.md: steering vs unsteered) separate runs drift by more than the effect on a
  shared host (frequency, other jobs); rotating the cases through the same windows exposes them to the same drift.
  Pair the windows with :func:`paired_overhead`. Each case is compiled (first call) before any window.
  """
  names = list(fns)
  compile_s = {}
  for name in names:
    t0 = time.perf_counter()
    sync(fns[name]())
    compile_s[name] = time.perf_counter() - t0
  per_call: dict[str, list[float]] = {n: [] for n in names}
  for w in range(windows):
    for name in names[w % len(names):] + names[:w % len(names)]:
      t0 = time.perf_counter()
      out = None
      for _ in range(steps):
        out = fns[name]()
      sync(out)
      per_call[name].append((time.perf_counter() - t0) / steps)
  return {n: Timing(compile_s[n], per_call[n]) for n in names}


def paired_overhead(base: Timing, other: Timing) -> float:
  """Median over windows of ``other / base - 1`` in percent (windows from :func:`time_interleaved`)."""
  return 100.0 * statistics.median(o / b - 1.0 for b, o in zip(base.window_s, other.window_s))


def torch_sync(device: str) -> Callable[[Any], Any]:
  """A ``sync`` for :func:`time_fn` on the PyTorch side."""
  import torch  # bench-time only
  def sync(x):
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    return x
  return sync


def environment() -> dict[str, Any]:
  """Versions and device, recorded with every benchmark number."""
  env = {
      "device_kind": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "python": platform.python_version(),
      "host_cpus": __import__("os").cpu_count(),
  }
  try:
    import torch  # lazy: heavy dependency torch
    env["torch"] = torch.__version__
    env["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
      env["torch_device"] = torch.cuda.get_device_name(0)
  except ImportError:
    pass
  return env


def append_result(record: dict[str, Any], path: str | Path = "runs/bench/results.jsonl") -> None:
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  with p.open("a") as f:
    f.write(json.dumps(record, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)) + "\n")


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
  """A GitHub-markdown table (also readable in a terminal)."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  cells = [[fmt(v) for v in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
  line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
  return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
