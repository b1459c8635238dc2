"""CMRM analysis tool (``cmrm.md`` §1, §7.3): where do image+text inputs sit relative to text-only inputs, and
where does CMRM move them?

For N multimodal prompts (each with an image) the tool collects one hidden state per prompt and *input variant*
(cmrm.md §1):

* ``original``: the real image + query;
* ``blank``: the normalised all-zero image (the preprocessing mean colour; ``shift.corrupted_pixels``);
* ``noise``: i.i.d. N(0, 1) normalised pixels (seeded per sample, as extraction's ``noise``);
* ``caption``: the image span replaced by the tokens of the item's caption (segment ``SEG_CAPTION``); omitted,
  with a note in the results, when any item lacks a caption;
* ``text``: query only = the same token sequence with the image span deleted (cmrm.md §5, the text-only side of
  the shift vectors);

each once unsteered and once with CMRM on (``<variant>+cmrm``: a given (L, D) vector, alpha, layer subset and
apply mode, added during the prefill exactly as in generation).

**Which state.** The residual-stream output of the last decoder layer at the last prompt token (the position whose
logits give the first answer token), taken **before** the final RMSNorm: it is HF ``hidden_states[L]`` of the
spec's indexing (cmrm.md §3), the space in which the layer-L steering vector is defined and added, so a steered
state is literally ``h + alpha * v_L`` plus what the earlier layers' adds propagated; after the norm the per-token
rescaling would hide the norm part of the shift. The states come from :func:`shift.prompt_states` (the jitted
prefill-only extraction pass, ``mode="last"``), so they are the same numbers the vectors were built from.

**Outputs** (:func:`analyze`): a 2-D PCA fitted on the unsteered variants (steered points are projected into the
same plane so movement is visible in one frame), a scatter plot, the coordinates and explained variance
(``cmrm_analysis.npz`` / ``.json``), and a separation statistic readable without the plot: the distance from each
group's centroid to the **unsteered text-only centroid**, in full D and in the PCA plane, plus the mean paired
distance ``mean_i ||h_g(i) - h_text(i)||`` (same question in both), with and without steering. CMRM should shrink
the distances of ``original``/``blank``/``noise`` (a positive ``reduction``).

Shape legend: N prompts, L decoder layers, D decoder width, K principal components (2).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlsafe_jax.data.vlm_prompts import IMAGE_PLACEHOLDER, SEG_CAPTION, Prompt
from vlsafe_jax.methods.cmrm import shift, steer

VARIANTS = ("original", "blank", "noise", "caption", "text")
REFERENCE = "text"
STEERED_SUFFIX = "+cmrm"
_LABELS = {"original": "image + query", "blank": "blank image + query", "noise": "noise image + query",
           "caption": "caption + query", "text": "query only"}
_COLOURS = {"original": "tab:red", "blank": "tab:orange", "noise": "tab:purple", "caption": "tab:green",
            "text": "tab:blue"}


# --------------------------------------------------------------------------------------------------------------
# PCA and separation (pure numpy, float64)
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PCA:
  """A fitted PCA: ``mean_d`` (D,), ``components_kd`` (K, D) orthonormal rows, ``explained_variance_k`` (K,)
  (unbiased, divisor N - 1), ``explained_variance_ratio_k`` (K,) = variance / total variance; all float64."""
  mean_d: np.ndarray
  components_kd: np.ndarray
  explained_variance_k: np.ndarray
  explained_variance_ratio_k: np.ndarray

  def transform(self, x_nd) -> np.ndarray:
    """Coordinates (N, K) float64 of points (N, D) in this PCA's plane."""
    x = np.asarray(x_nd, np.float64)
    if x.ndim != 2 or x.shape[1] != self.mean_d.shape[0]:
      raise ValueError(f"points must be (N, {self.mean_d.shape[0]}), got shape {x.shape}")
    return (x - self.mean_d) @ self.components_kd.T


def pca_fit(x_nd, k: int = 2) -> PCA:
  """PCA of points (N, D) by SVD of the centred float64 data.

  Sign convention (deterministic, independent of the SVD routine): each component is flipped so that its entry of
  largest absolute value is positive (the first such entry on ties). Needs N >= 2 and k <= min(N, D). Components
  beyond the data's rank have zero variance (their direction is then arbitrary but orthonormal).
  """
  x = np.asarray(x_nd, np.float64)
  if x.ndim != 2:
    raise ValueError(f"PCA input must be (N, D), got shape {x.shape}")
  n, d = x.shape
  if n < 2 or not 1 <= k <= min(n, d):
    raise ValueError(f"PCA of {n} points in {d} dims cannot give {k} components (need N >= 2, 1 <= k <= min(N, D))")
  if not np.all(np.isfinite(x)):
    raise ValueError("PCA input contains NaN or inf")
  mean = x.mean(0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  comps = vt[:k].copy()
  lead = np.argmax(np.abs(comps), axis=1)
  comps *= np.where(comps[np.arange(k), lead] < 0, -1.0, 1.0)[:, None]
  var = s ** 2 / (n - 1)
  total = var.sum()
  ratio = var[:k] / total if total > 0 else np.zeros(k)
  return PCA(mean, comps, var[:k], ratio)


def centroid_distances(states: Mapping[str, np.ndarray], reference: str = REFERENCE,
                       pca: PCA | None = None) -> dict[str, dict[str, float]]:
  """Per group: ``{"centroid": ||mean_g - mean_ref||, "paired": mean_i ||x_g[i] - x_ref[i]||}`` (float).

  ``states``: group -> (N, D) points (the same N prompts, in the same order, in every group, so row i of two
  groups is the same question). ``pca``: measure in its plane instead of full D. The reference group itself gets
  zeros.
  """
  if reference not in states:
    raise ValueError(f"reference group {reference!r} not among {sorted(states)}")
  proj = (lambda x: pca.transform(x)) if pca is not None else (lambda x: np.asarray(x, np.float64))
  ref = proj(states[reference])
  out = {}
  for g, x in states.items():
    p = proj(x)
    if p.shape != ref.shape:
      raise ValueError(f"group {g!r} has shape {p.shape}, reference {reference!r} {ref.shape}")
    out[g] = {"centroid": float(np.linalg.norm(p.mean(0) - ref.mean(0))),
              "paired": float(np.linalg.norm(p - ref, axis=1).mean())}
  return out


# --------------------------------------------------------------------------------------------------------------
# Input variants and state collection
# --------------------------------------------------------------------------------------------------------------

def with_caption(prompt: Prompt, caption_ids: Sequence[int], caption: str = "") -> Prompt:
  """``prompt`` with its (single, contiguous) image span replaced by ``caption_ids`` (segment ``SEG_CAPTION``).

  Every other position is kept exactly, so the caption variant differs from the text-only one
  (:meth:`Prompt.without_image`) only by the inserted caption tokens.
  """
  idx = np.flatnonzero(prompt.image_mask)
  if idx.size == 0:
    raise ValueError("with_caption: the prompt has no image span to replace")
  if idx[-1] - idx[0] + 1 != idx.size:
    raise ValueError("with_caption: the prompt's image positions are not one contiguous span")
  cap = np.asarray(caption_ids, np.int32).reshape(-1)
  a, b = idx[0], idx[-1] + 1
  ids = np.concatenate([prompt.input_ids[:a], cap, prompt.input_ids[b:]]).astype(np.int32)
  segs = np.concatenate([prompt.segment_ids[:a], np.full(cap.shape, SEG_CAPTION, np.int32),
                         prompt.segment_ids[b:]]).astype(np.int32)
  return Prompt(ids, segs, prompt.text.replace(IMAGE_PLACEHOLDER, caption, 1))


def variant_inputs(prompts: Sequence[Prompt], pixels: np.ndarray, image_size: int, *,
                   caption_ids: Sequence[Sequence[int]] | None = None, noise_seed: int = 0, start: int = 0
                   ) -> dict[str, tuple[list[Prompt], np.ndarray | None]]:
  """variant -> (prompts, pixels or None) for one batch of multimodal prompts and their real images (B, h, w, C).

  ``caption_ids``: one token list per prompt, or None (no ``caption`` variant). ``start``: the batch's first
  sample index (noise images are seeded per sample, as in extraction).
  """
  n = len(prompts)
  out = {"original": (list(prompts), np.asarray(pixels, np.float32)),
         "blank": (list(prompts), shift.corrupted_pixels(n, image_size, "blank")),
         "noise": (list(prompts), shift.corrupted_pixels(n, image_size, "noise", seed=noise_seed, start=start))}
  if caption_ids is not None:
    out["caption"] = ([with_caption(p, c) for p, c in zip(prompts, caption_ids)], None)
  out["text"] = ([p.without_image() for p in prompts], None)
  return out


def collect_states(model, tokenizer, items: Sequence[Any], *, vectors=None, alpha: float = 1.0,
                   layers: Any = "all", apply: str = "all", layer: int = -1, template: str = "llava_v1",
                   system: str | None = None, noise_seed: int = 0, batch_size: int = 16,
                   use_captions: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
  """Hidden states of every variant: ``({group: (N, D) float32}, notes)``.

  Args:
    model: a :class:`vlsafe_jax.models.llava.Llava`. tokenizer: the prompt tokenizer.
    items: :class:`vlsafe_jax.data.prompt_sets.SafetyItem` s, each with an image (``caption`` optional).
    vectors: (L, D) CMRM vectors; None = unsteered groups only. alpha / layers / apply: as ``steer.steer_kwargs``.
    layer: 0-based decoder layer whose residual output is collected (-1 = the last; before the final norm).
    use_captions: build the ``caption`` variant when every item has a caption.
  Groups: :data:`VARIANTS` (``caption`` possibly omitted, see ``notes``) and, with ``vectors``, the same names
  suffixed :data:`STEERED_SUFFIX`.
  """
  from vlsafe_jax.eval import vlm_safety as V
  if not items:
    raise ValueError("cmrm analysis needs at least one item")
  missing = [it.id for it in items if not it.has_image]
  if missing:
    raise ValueError(f"cmrm analysis items need an image; without one: {missing[:5]}")
  notes = []
  captions = use_captions and all(it.caption for it in items)
  if use_captions and not captions:
    notes.append("caption variant omitted: not every item has a caption "
                 f"({sum(not it.caption for it in items)} of {len(items)} without)")
  steer_v = None
  if vectors is not None:
    v = steer.dataset_vectors(vectors, model.config.text_config)
    steer_v = steer.steer_kwargs(v, alpha, layers=layers)["steer_vectors"]
    if apply not in steer.APPLY_MODES:
      raise ValueError(f"cmrm.apply {apply!r} unknown; expected one of {steer.APPLY_MODES}")
  size = model.config.vision_config.image_size
  groups: dict[str, list[np.ndarray]] = {}
  start = 0
  for batch in V.build_batches(items, tokenizer, model.config, batch_size=batch_size, template=template,
                               system=system, use_images=True):
    cap_ids = [list(tokenizer(it.caption, add_special_tokens=False)["input_ids"]) for it in batch.items] \
        if captions else None
    for name, (prompts, pix) in variant_inputs(batch.prompts, batch.pixels, size, caption_ids=cap_ids,
                                               noise_seed=noise_seed, start=start).items():
      h = shift.prompt_states(model, prompts, pix, mode="last")
      groups.setdefault(name, []).append(np.asarray(h[:, layer]))
      if steer_v is not None:
        h = shift.prompt_states(model, prompts, pix, mode="last", steer_vectors=steer_v, steer_alpha=alpha,
                                steer_apply=apply)
        groups.setdefault(name + STEERED_SUFFIX, []).append(np.asarray(h[:, layer]))
    start += len(batch.items)
  return {k: np.concatenate(v).astype(np.float32) for k, v in groups.items()}, notes


# --------------------------------------------------------------------------------------------------------------
# Plot and driver
# --------------------------------------------------------------------------------------------------------------

def scatter_plot(coords: Mapping[str, np.ndarray], path: str | os.PathLike, *, explained=None,
                 title: str = "CMRM: last-token final-layer hidden states (PCA)") -> Path:
  """Scatter of 2-D ``coords`` (group -> (N, 2)); steered groups hollow in their variant's colour, centroids
  as large markers with an arrow from each unsteered centroid to its steered one."""
  from vlsafe_jax.eval.plots import _plt, _save
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 6))
  cents = {}
  for g, c in coords.items():
    c = np.asarray(c, np.float64)
    base = g[:-len(STEERED_SUFFIX)] if g.endswith(STEERED_SUFFIX) else g
    colour = _COLOURS.get(base)
    steered = g.endswith(STEERED_SUFFIX)
    label = _LABELS.get(base, base) + (" + CMRM" if steered else "")
    if steered:
      ax.scatter(c[:, 0], c[:, 1], s=22, facecolors="none", edgecolors=colour, lw=1.0, label=label)
    else:
      ax.scatter(c[:, 0], c[:, 1], s=18, color=colour, alpha=0.75, label=label)
    cents[g] = c.mean(0)
    ax.scatter(*cents[g], s=160, marker="X" if not steered else "P", color=colour, edgecolors="black", lw=0.8)
  for g, m in cents.items():
    if g.endswith(STEERED_SUFFIX) and g[:-len(STEERED_SUFFIX)] in cents:
      a = cents[g[:-len(STEERED_SUFFIX)]]
      ax.annotate("", xy=m, xytext=a, arrowprops=dict(arrowstyle="->", color="black", lw=0.8))
  for i, set_label in enumerate((ax.set_xlabel, ax.set_ylabel)):
    set_label(f"PC{i + 1}" + ("" if explained is None else f" ({100 * explained[i]:.1f}% of variance)"))
  ax.set_title(title + "\nX: centroid, P: centroid with CMRM; PCA fitted on the unsteered points", fontsize=9)
  ax.legend(fontsize=7, ncol=2, loc="best")
  return _save(fig, path)


def separation_table(summary: Mapping[str, Any]) -> str:
  """Text table of the distances to the unsteered text-only centroid (off / on / reduction) per variant."""
  from vlsafe_jax.perf import format_table
  rows = []
  for v, d in summary["distance_to_text"].items():
    rows.append([v, f"{d['full']['off']:.4g}", "-" if d['full']['on'] is None else f"{d['full']['on']:.4g}",
                 "-" if d['full']['reduction'] is None else f"{100 * d['full']['reduction']:+.1f}%",
                 f"{d['pca']['off']:.4g}", "-" if d['pca']['on'] is None else f"{d['pca']['on']:.4g}",
                 f"{d['paired']['off']:.4g}", "-" if d['paired']['on'] is None else f"{d['paired']['on']:.4g}"])
  return format_table(["variant", "centroid dist D (off)", "(CMRM on)", "reduction", "PCA plane (off)", "(on)",
                       "paired dist D (off)", "(on)"], rows)


def summarize(states: Mapping[str, np.ndarray]) -> tuple[PCA, dict[str, np.ndarray], dict[str, Any]]:
  """(PCA fitted on the unsteered groups, group -> (N, 2) coordinates, JSON-ready summary with distances)."""
  base = [g for g in VARIANTS if g in states]
  pca = pca_fit(np.concatenate([states[g] for g in base]), 2)
  coords = {g: pca.transform(x) for g, x in states.items()}
  full = centroid_distances(states)
  plane = centroid_distances(states, pca=pca)

  def pick(table, g, key="centroid"):
    return table[g][key] if g in table else None

  dist = {}
  for v in base:
    s = v + STEERED_SUFFIX
    off, on = full[v]["centroid"], pick(full, s)
    dist[v] = {"full": {"off": off, "on": on, "reduction": None if on is None or off == 0 else 1 - on / off},
               "pca": {"off": plane[v]["centroid"], "on": pick(plane, s)},
               "paired": {"off": full[v]["paired"], "on": pick(full, s, "paired")}}
  summary = {"reference": f"unsteered {REFERENCE!r} (query only) centroid", "groups": list(states),
             "n": int(next(iter(states.values())).shape[0]),
             "pca_fit_on": base, "explained_variance_ratio": pca.explained_variance_ratio_k.tolist(),
             "explained_variance": pca.explained_variance_k.tolist(), "distance_to_text": dist}
  return pca, coords, summary


def analyze(model, tokenizer, items: Sequence[Any], out_dir: str | os.PathLike, *, vectors=None,
            alpha: float = 1.0, layers: Any = "all", apply: str = "all", template: str = "llava_v1",
            system: str | None = None, noise_seed: int = 0, batch_size: int = 16,
            meta: Mapping[str, Any] | None = None, stem: str = "cmrm_analysis") -> dict[str, Any]:
  """Collects the variant states, fits the PCA, writes ``<stem>.png``, ``<stem>.npz`` (``coords_<group>`` (N, 2),
  ``components`` (2, D), ``mean`` (D,), ``explained_variance_ratio`` (2,)) and ``<stem>.json``; returns the
  summary (with ``table``, the printable separation table)."""
  states, notes = collect_states(model, tokenizer, items, vectors=vectors, alpha=alpha, layers=layers,
                                 apply=apply, template=template, system=system, noise_seed=noise_seed,
                                 batch_size=batch_size)
  pca, coords, summary = summarize(states)
  tc = model.config.text_config
  summary.update(
      notes=notes, state=(f"residual output of decoder layer {tc.num_hidden_layers} (last) at the last prompt "
                          "token, before the final RMSNorm"),
      steering=None if vectors is None else {"alpha": float(alpha), "layers": layers, "apply": apply},
      item_ids=[it.id for it in items], meta=dict(meta or {}))
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / f"{stem}.npz", components=pca.components_kd, mean=pca.mean_d,
           explained_variance_ratio=pca.explained_variance_ratio_k,
           **{f"coords_{g.replace(STEERED_SUFFIX, '_cmrm')}": c for g, c in coords.items()})
  summary["table"] = separation_table(summary)
  (out / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str))
  scatter_plot(coords, out / f"{stem}.png", explained=pca.explained_variance_ratio_k)
  summary["files"] = [str(out / f"{stem}.{e}") for e in ("png", "npz", "json")]
  return summary


__all__ = ["VARIANTS", "REFERENCE", "STEERED_SUFFIX", "PCA", "pca_fit", "centroid_distances", "with_caption",
           "variant_inputs", "collect_states", "scatter_plot", "separation_table", "summarize", "analyze"]
