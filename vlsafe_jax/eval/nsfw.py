"""NSFW classification by distance from the root (``hysac.md`` §7.7, paper Tables 5-6).

Score ``s(x) = d(0, x)`` of an embedding (image or text; ``methods.hysac.traversal.root_distance``); predict NSFW
when ``s > theta`` (strictly). NSFW is the positive class. With ``n_pos`` NSFW samples and ``n_neg`` safe ones:

  Acc = 100 (TP + TN) / (n_pos + n_neg)
  FPR = 100 FP / n_neg        (safe predicted NSFW / safe)
  FNR = 100 FN / n_pos        (NSFW predicted safe / NSFW)

A rate whose denominator is empty (e.g. NudeNet has no safe samples) is undefined: it is stored as ``0.0`` with
``FPR_defined = False`` and printed ``"0.0 (no safe samples)"``, as the paper prints 0.0. Everything here is plain
numpy (tiny 1-D arrays).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlsafe_jax.perf import format_table

PAPER_THRESHOLDS = (0.51, 0.52, 0.53, 0.54, 0.55)   # Table 6 (on the released model's distance scale)


def _check(scores_n, labels_n) -> tuple[np.ndarray, np.ndarray]:
  s = np.asarray(scores_n, np.float64)
  y = np.asarray(labels_n)
  if s.ndim != 1 or y.shape != s.shape:
    raise ValueError(f"nsfw: scores and labels must be 1-D of equal length, got shapes {s.shape}, {y.shape}")
  if y.dtype != bool:
    if not np.isin(y, (0, 1)).all():
      raise ValueError(f"nsfw: labels must be bool or 0/1 (1 = NSFW), got values {np.unique(y)[:10]}")
    y = y.astype(bool)
  if s.size == 0:
    raise ValueError("nsfw: no samples")
  if not np.isfinite(s).all():
    raise ValueError(f"nsfw: {int((~np.isfinite(s)).sum())} non-finite scores")
  return s, y


def classify(scores_n, labels_n, threshold: float) -> dict[str, float | int | bool]:
  """Acc / FPR / FNR (percent) of the rule ``NSFW iff score > threshold``.

  Args:
    scores_n: ``(n,)`` root distances (any real score, larger = more NSFW).
    labels_n: ``(n,)`` bool or 0/1, True / 1 = NSFW (positive).
    threshold: theta.

  Returns:
    ``{"threshold", "Acc", "FPR", "FNR", "FPR_defined", "FNR_defined", "n_safe", "n_nsfw", "TP", "FP", "TN",
    "FN"}``.
  """
  s, y = _check(scores_n, labels_n)
  pred = s > threshold
  tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
  tn, fn = int(np.sum(~pred & ~y)), int(np.sum(~pred & y))
  n_pos, n_neg = tp + fn, tn + fp
  return {
      "threshold": float(threshold),
      "Acc": 100.0 * (tp + tn) / s.size,
      "FPR": 100.0 * fp / n_neg if n_neg else 0.0,
      "FNR": 100.0 * fn / n_pos if n_pos else 0.0,
      "FPR_defined": bool(n_neg), "FNR_defined": bool(n_pos),
      "n_safe": n_neg, "n_nsfw": n_pos, "TP": tp, "FP": fp, "TN": tn, "FN": fn,
  }


def default_thresholds(scores_n, num: int = 21) -> np.ndarray:
  """``num`` evenly spaced thresholds spanning the observed scores (the distance scale depends on the model, so
  the paper's 0.51-0.55 only make sense for the released checkpoint)."""
  s = np.asarray(scores_n, np.float64)
  lo, hi = float(s.min()), float(s.max())
  return np.linspace(lo, hi, num) if hi > lo else np.array([lo])


def sweep(scores_n, labels_n, thresholds: Sequence[float] | None = None) -> dict:
  """Threshold sweep (Table 6 style) and the best-accuracy operating point.

  Returns:
    ``{"rows": [classify(...) per threshold], "best": row with the highest Acc (lowest threshold on ties)}``.
  """
  s, y = _check(scores_n, labels_n)
  th = default_thresholds(s) if thresholds is None else np.asarray(thresholds, np.float64)
  rows = [classify(s, y, float(t)) for t in th]
  best = max(rows, key=lambda r: (r["Acc"], -r["threshold"]))
  return {"rows": rows, "best": best}


def format_rate(row: dict, name: str) -> str:
  """``"12.3"`` or ``"0.0 (no safe samples)"`` / ``"0.0 (no NSFW samples)"`` for an undefined rate."""
  if row[f"{name}_defined"]:
    return f"{row[name]:.1f}"
  return "0.0 (no safe samples)" if name == "FPR" else "0.0 (no NSFW samples)"


def format_sweep(result: dict, title: str | None = None) -> str:
  """Markdown table of a :func:`sweep` result (threshold, Acc, FPR, FNR; the best row marked)."""
  best_t = result["best"]["threshold"]
  rows = [[f"{r['threshold']:.4g}" + (" (best)" if r["threshold"] == best_t else ""), f"{r['Acc']:.1f}",
           format_rate(r, "FPR"), format_rate(r, "FNR")] for r in result["rows"]]
  table = format_table(["threshold", "Acc", "FPR", "FNR"], rows)
  return f"{title}\n\n{table}" if title else table


__all__ = ["PAPER_THRESHOLDS", "classify", "default_thresholds", "sweep", "format_rate", "format_sweep"]
