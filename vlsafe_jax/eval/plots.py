"""Evaluation plots (matplotlib, Agg backend: files only, no display).

* :func:`root_distance_histogram` - distance from the root of the four sets T, I, T*, I* (paper Figure 2).
* :func:`recall_bars` - R@K per retrieval task for several models (with / without traversal).
* :func:`training_curves` - loss terms, learned scalars, lr and throughput from a ``metrics.jsonl``.
* :func:`paired_scatter` - 2-D point groups and their treated twins (CMRM's PCA of input variants, off / on).

Every function writes one PNG (``training_curves`` one per metric group) and returns its path(s).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# (label, colour) per set: safe = blue/green, unsafe = orange/red, text solid, image hatched.
_SET_STYLE = {"T": ("T (safe text)", "tab:blue"), "I": ("I (safe image)", "tab:green"),
              "T*": ("T* (unsafe text)", "tab:orange"), "I*": ("I* (unsafe image)", "tab:red")}


def _plt():
  import matplotlib  # lazy: matplotlib is heavy (plots only)
  matplotlib.use("Agg", force=True)   # never open a window, whatever the environment says
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path) -> Path:
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(p, dpi=110, bbox_inches="tight")
  _plt().close(fig)
  return p


def root_distance_histogram(dists: Mapping[str, np.ndarray], path: str | os.PathLike, *, bins: int = 50,
                            title: str = "Distance from the root") -> Path:
  """Overlaid histograms of ``d(0, x)`` per set with the means marked (paper Figure 2).

  Args:
    dists: ``{"T"|"I"|"T*"|"I*": (N,) root distances}`` (any subset).
    path: output PNG.
  """
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  vals = [np.asarray(v, np.float64) for v in dists.values()]
  lo, hi = min(v.min() for v in vals), max(v.max() for v in vals)
  edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
  for k, v in dists.items():
    label, colour = _SET_STYLE.get(k, (k, None))
    ax.hist(np.asarray(v), bins=edges, alpha=0.45, color=colour, label=f"{label}, mean {np.mean(v):.3f}")
    ax.axvline(float(np.mean(v)), color=colour, lw=1.5, ls="--")
  ax.set_xlabel("geodesic distance from the root  d(0, x)")
  ax.set_ylabel("count")
  ax.set_title(title)
  ax.legend(fontsize=8)
  return _save(fig, path)


def recall_bars(models: Mapping[str, Mapping], path: str | os.PathLike, *, k: int = 1,
                tasks: Sequence[str] | None = None) -> Path:
  """Grouped bars of R@k per task; a model with traversal results gets a second, hatched bar (no traversal).

  Args:
    models: name -> result dict with ``"tasks"`` (from ``hysac_eval.retrieval_tasks`` / ``evaluate``).
  """
  plt = _plt()
  tasks = list(tasks or next(iter(models.values()))["tasks"].keys())
  series = []   # (label, values, hatch)
  for name, res in models.items():
    tr = res["tasks"]
    has_trav = any("traversal" in tr.get(t, {}) for t in tasks)
    if has_trav:
      series.append((f"{name} (traversal)", [tr[t].get("traversal", tr[t]["plain"])[f"R@{k}"] for t in tasks], ""))
      series.append((f"{name} (no traversal)", [tr[t]["plain"][f"R@{k}"] for t in tasks], "//"))
    else:
      series.append((name, [tr[t]["plain"][f"R@{k}"] if t in tr else np.nan for t in tasks], ""))
  fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(tasks)), 4))
  x = np.arange(len(tasks))
  w = 0.8 / max(1, len(series))
  for i, (label, vals, hatch) in enumerate(series):
    ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=label, hatch=hatch, edgecolor="black", lw=0.4)
  ax.set_xticks(x)
  ax.set_xticklabels(tasks, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel(f"R@{k} (%)")
  ax.set_ylim(0, 105)
  ax.set_title(f"Retrieval R@{k} (ground truth in the first gallery block)")
  ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
  return _save(fig, path)


# Metric groups for the training-curve figures: (file stem, title, regex over metric names).
CURVE_GROUPS = (
    ("train_loss", "Loss terms", r"(loss|contrastive|entail|^C\(|^E\()"),
    ("train_scalars", "Learned scalars", r"(curv|alpha|logit_scale|^c$|^s$|temperature)"),
    ("train_lr", "Learning rate", r"(^lr$|learning_rate)"),
    ("train_throughput", "Throughput", r"(per_s|/s$|throughput|mfu)"),
)


def _read_jsonl(path: Path) -> list[dict]:
  rows = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i}: malformed JSON line ({e})") from e
  return rows


def training_curves(metrics_jsonl: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
  """One PNG per metric group (:data:`CURVE_GROUPS`) found in a ``metrics.jsonl``.

  Each line is a JSON object; numeric fields are curves over ``step`` (or the line number). Nested dicts are
  flattened with ``/`` (``{"loss": {"total": 1}}`` -> ``loss/total``). Groups without any matching numeric field
  are skipped; lines from other phases (e.g. an ``"epoch"`` validation record) simply add their own curves.
  """
  path = Path(metrics_jsonl)
  rows = _read_jsonl(path)
  series: dict[str, tuple[list[float], list[float]]] = {}

  def flat(d, prefix=""):
    for k, v in d.items():
      name = f"{prefix}{k}"
      if isinstance(v, dict):
        yield from flat(v, name + "/")
      elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield name, float(v)

  for i, row in enumerate(rows):
    step = row.get("step", i)
    for name, v in flat(row):
      if name in ("step", "epoch"):
        continue
      xs, ys = series.setdefault(name, ([], []))
      xs.append(float(step))
      ys.append(v)
  plt = _plt()
  files = []
  used: set[str] = set()
  for stem, title, pattern in CURVE_GROUPS:
    names = [n for n in series if n not in used and re.search(pattern, n)]
    if not names:
      continue
    used.update(names)
    names = sorted(names)
    if stem == "train_loss":
      fig, ax = plt.subplots(figsize=(7, 4))
      for n in names:
        ax.plot(*series[n], label=n, lw=1.2)
      if all(min(series[n][1]) > 0 for n in names):
        ax.set_yscale("log")
      ax.set_xlabel("step")
      ax.legend(fontsize=7, ncol=2)
    else:
      # Scalars live on unrelated scales (log c ~ 1, log alpha ~ -3): one small panel each.
      fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.6 * len(names) + 0.6), sharex=True, squeeze=False)
      for ax, n in zip(axes[:, 0], names):
        ax.plot(*series[n], lw=1.2)
        ax.set_ylabel(n, fontsize=8)
      axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{title} ({path.name})")
    files.append(_save(fig, Path(out_dir) / f"{stem}.png"))
  return files


def paired_scatter(coords: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                   styles: Mapping[str, tuple[str, str]], suffix: str, suffix_label: str, explained=None,
                   title: str = "", note: str = "") -> Path:
  """Scatter of 2-D point groups ``coords`` (group -> (N, 2)) where a group named ``<base><suffix>`` is the
  treated twin of group ``<base>`` (e.g. CMRM on / off).

  Untreated groups are filled, treated ones hollow in the same colour (``styles[base] = (label, colour)``;
  unknown bases get matplotlib's next colour and their own name). Centroids are large markers (X untreated,
  P treated) with an arrow from each untreated centroid to its treated one. ``explained``: the two axes' share
  of variance (PCA coordinates), shown in the axis labels.
  """
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 6))
  cents = {}
  for g, c in coords.items():
    c = np.asarray(c, np.float64)
    treated = g.endswith(suffix)
    base = g[:-len(suffix)] if treated else g
    label, colour = styles.get(base, (base, None))
    if treated:
      ax.scatter(c[:, 0], c[:, 1], s=22, facecolors="none", edgecolors=colour, lw=1.0, label=label + suffix_label)
    else:
      ax.scatter(c[:, 0], c[:, 1], s=18, color=colour, alpha=0.75, label=label)
    cents[g] = c.mean(0)
    ax.scatter(*cents[g], s=160, marker="P" if treated else "X", color=colour, edgecolors="black", lw=0.8)
  for g, m in cents.items():
    if g.endswith(suffix) and g[:-len(suffix)] in cents:
      ax.annotate("", xy=m, xytext=cents[g[:-len(suffix)]], arrowprops=dict(arrowstyle="->", color="black", lw=0.8))
  for i, set_label in enumerate((ax.set_xlabel, ax.set_ylabel)):
    set_label(f"PC{i + 1}" + ("" if explained is None else f" ({100 * explained[i]:.1f}% of variance)"))
  ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
  ax.legend(fontsize=7, ncol=2, loc="best")
  return _save(fig, path)


__all__ = ["root_distance_histogram", "recall_bars", "training_curves", "paired_scatter", "CURVE_GROUPS"]
