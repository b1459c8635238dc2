"""HySAC inference-time traversal on the hyperboloid (``hysac.md`` §7.3, §7.4, §7.6).

Two tools, both pure functions on embeddings (space components, ``geometry/lorentz.py`` conventions, ``curv`` = c):

* :func:`safety_traversal` moves queries along the ray to the root so that unsafe (far) queries are redirected
  towards the safe, more general region (mode ``"upper"``), or safe queries are pushed out towards unsafe content
  (mode ``"lower"``). Per-query trigger masks, fully vectorised (the reference handles one query at a time).

    tau = b + tanh((b - alpha_t) / kappa) + 1          b = bounds[KEY][STAT], alpha_t = 0.8, kappa = c

  ``upper`` acts on queries with ``d(0, q) > tau``, ``lower`` on those with ``d(0, q) < tau``; others are returned
  unchanged. Variants:

  ========= ========= ========================================================================================
  variant   STAT      rescale of a triggered query
  ========= ========= ========================================================================================
  ``code``  up_95     ``q' = tau q / ||q||``: the *Euclidean* norm of the space components becomes tau (geodesic
                      distance ``asinh(sqrt(c) tau)/sqrt(c) < tau``); the trigger compares the *geodesic* distance.
                      This mismatch is the reference code's behaviour, kept for parity.
  ``paper`` avg       ``q* = exp0(tau log0(q) / ||log0(q)||)``: along the geodesic, ``d(0, q*) = tau``.
  ========= ========= ========================================================================================

* :func:`hysac_traverse` is the qualitative root traversal of §7.6: points interpolated from each image
  embedding to the root in the tangent space, each labelled with the best caption of a pool whose entailment cone
  contains it (``[ROOT]`` entails everything).

Shape letters: n = queries/images, d = embedding dim, p = caption pool, s = steps along the traversal.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from vlsafe_jax.geometry import lorentz
# d(0, x) = asinh(sqrt(c)||x||)/sqrt(c), closed form (no log_map0 eps floor); owned by the model module.
from vlsafe_jax.methods.hysac.model import root_distance

VARIANTS = ("code", "paper")
MODES = ("upper", "lower")
# STAT each variant reads from bounds.json by default (§7.4).
DEFAULT_STAT = {"code": "up_95", "paper": "avg"}
ALPHA_T = 0.8
ROOT_LABEL = "[ROOT]"


def traversal_tau(bound, curv, alpha_t: float = ALPHA_T, kappa=None) -> jax.Array:
  """Target radius ``tau = b + tanh((b - alpha_t)/kappa) + 1`` (§7.4).

  Args:
    bound: ``b`` (scalar or per-query ``(n,)``), a root-distance statistic from ``bounds.json``.
    curv: curvature c (used as kappa when ``kappa`` is None, the reference's choice).
    alpha_t: ``alpha_t`` (0.8 in the paper and the reference).
    kappa: temperature of the tanh; None = ``curv``.
  """
  b = jnp.asarray(bound, lorentz.compute_dtype(bound))
  k = jnp.asarray(curv if kappa is None else kappa, b.dtype)
  return b + jnp.tanh((b - alpha_t) / k) + 1.0


def safety_traversal(x_nd: jax.Array, curv, bound, *, variant: Literal["code", "paper"] = "code",
                     mode: Literal["upper", "lower"] = "upper", alpha_t: float = ALPHA_T, kappa=None,
                     active_n: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Batched safety traversal with per-query trigger masks (§7.4).

  Args:
    x_nd: ``(n, D)`` (or any ``(..., D)``) query embeddings (hyperboloid space components).
    curv: curvature c > 0 (scalar).
    bound: ``b``, scalar or broadcastable to the leading dims (per-query bounds).
    variant: ``"code"`` (Euclidean-norm rescale) or ``"paper"`` (geodesic rescale); see the module docstring.
    mode: ``"upper"`` (act where ``d(0, q) > tau``) or ``"lower"`` (act where ``d(0, q) < tau``).
    alpha_t, kappa: see :func:`traversal_tau`.
    active_n: optional bool ``(...)``: only these queries may move (e.g. only unsafe queries of a mixed batch).

  Returns:
    ``(x_new_nd, moved_n)``: the traversed points (same shape, compute dtype) and the bool mask of queries that
    moved. A query exactly at the root (zero vector) has no direction and never moves.
  """
  if variant not in VARIANTS:
    raise ValueError(f"traversal variant must be one of {VARIANTS}, got {variant!r}")
  if mode not in MODES:
    raise ValueError(f"traversal mode must be one of {MODES}, got {mode!r}")
  dt = lorentz.compute_dtype(x_nd)
  x = jnp.asarray(x_nd, dt)
  if x.ndim < 1:
    raise ValueError(f"safety_traversal: x must have shape (..., D), got {x.shape}")
  c = jnp.asarray(curv, dt)
  tau = traversal_tau(jnp.asarray(bound, dt), c, alpha_t, kappa)
  d0 = root_distance(x, c)
  norm = jnp.linalg.norm(x, axis=-1)
  trigger = d0 > tau if mode == "upper" else d0 < tau
  moved = trigger & (norm > 0)
  if active_n is not None:
    moved = moved & jnp.asarray(active_n, bool)
  # Zero rows get a dummy unit norm: they never move, and the select below keeps NaN out of the result.
  safe_norm = jnp.where(norm > 0, norm, 1.0)
  direction = x / safe_norm[..., None]
  tau_b = jnp.broadcast_to(tau, norm.shape)
  if variant == "code":
    target = tau_b[..., None] * direction
  else:
    # log0(q)/||log0(q)|| is the unit direction of q (log0 is a positive rescale), so the geodesic target is
    # exp0(tau * q/||q||); evaluating it this way avoids log_map0's eps floor near the root.
    target = lorentz.exp_map0(tau_b[..., None] * direction, c)
  return jnp.where(moved[..., None], target, x), moved


# --------------------------------------------------------------------------------------------------------------
# Qualitative root traversal (§7.6)

@dataclasses.dataclass
class TraversalResult:
  """Output of :func:`hysac_traverse`.

  Attributes:
    weights_s: ``(s,)`` interpolation weights, 1 (the image) down to 0 (the root).
    index_ns: ``(n, s)`` int: best pool index per point; ``p`` (= pool size) means ``[ROOT]``, ``-1`` means no
      caption's cone contains the point (only possible with ``include_root=False``).
    score_ns: ``(n, s)`` float: the winner's Lorentzian inner product with the point (``-inf`` when none).
    root_distance_ns: ``(n, s)`` float: ``d(0, point)`` (decreasing along each row).
  """
  weights_s: np.ndarray
  index_ns: np.ndarray
  score_ns: np.ndarray
  root_distance_ns: np.ndarray

  def labels(self, captions: Sequence[str]) -> list[list[str]]:
    """Caption strings per image and step (``[ROOT]`` / ``""`` for the special indices)."""
    p = len(captions)
    return [[ROOT_LABEL if j == p else ("" if j < 0 else captions[j]) for j in row] for row in self.index_ns]

  def deduplicated(self, captions: Sequence[str]) -> list[list[str]]:
    """Per image, the sequence of distinct consecutive labels (how the paper's figures list them)."""
    out = []
    for row in self.labels(captions):
      seq = []
      for lab in row:
        if not seq or seq[-1] != lab:
          seq.append(lab)
      out.append(seq)
    return out


@jax.jit
def _traverse_block(img_nd, pool_pd, curv, weights_s, include_root):
  """Best pool index per traversal point for one block of images; see :func:`hysac_traverse`."""
  n, d = img_nd.shape
  s = weights_s.shape[0]
  v_nd = lorentz.log_map0(img_nd, curv)
  pts = lorentz.exp_map0(weights_s[None, :, None] * v_nd[:, None, :], curv).reshape(n * s, d)
  score = lorentz.pairwise_inner(pts, pool_pd, curv)                         # (n s, p)
  phi = lorentz.pairwise_oxy_angle(pool_pd, pts, curv)                       # (p, n s): apex = caption
  omega = lorentz.half_aperture(pool_pd, curv)                               # (p,)
  inside = (phi <= omega[:, None]).T
  score = jnp.where(inside, score, -jnp.inf)
  # [ROOT] = the zero vector: its cone is everything (phi is undefined at the root), and <pt, 0>_L = -x_0(pt)/sqrt(c).
  root_score = -lorentz.time_component(pts, curv) / jnp.sqrt(curv)
  root_score = jnp.where(include_root, root_score, -jnp.inf)
  full = jnp.concatenate([score, root_score[:, None]], axis=1)
  best = jnp.argmax(full, axis=1)
  best_score = jnp.max(full, axis=1)
  best = jnp.where(jnp.isfinite(best_score), best, -1)
  return best.reshape(n, s), best_score.reshape(n, s), root_distance(pts, curv).reshape(n, s)


def hysac_traverse(image_nd, pool_pd, curv, *, steps: int = 50, include_root: bool = True,
                   image_block: int = 64) -> TraversalResult:
  """Root traversal of image embeddings with cone-restricted caption retrieval (§7.6), batched over images.

  For each image embedding ``e``: ``steps`` points ``exp0(w log0(e))`` for ``w`` from 1 (the image) to 0 (the
  root); each point gets the pool caption ``t`` with the highest ``<t, point>_L`` among those whose cone contains
  it (``phi(t, point) <= omega(t)``); ``[ROOT]`` (the zero vector) is always eligible.

  Args:
    image_nd: ``(n, D)`` image embeddings (hyperboloid points).
    pool_pd: ``(p, D)`` caption-pool embeddings (e.g. safe + unsafe test captions, "a photo of a {}." prompts).
    curv: curvature c.
    steps: points per image (50 in the paper's figures).
    include_root: add the ``[ROOT]`` entry (index ``p``).
    image_block: images per jitted block (memory ~ image_block * steps * p floats).

  Returns:
    A :class:`TraversalResult`.
  """
  img = np.asarray(image_nd, np.float32)
  pool = np.asarray(pool_pd, np.float32)
  if img.ndim != 2 or pool.ndim != 2 or img.shape[1] != pool.shape[1]:
    raise ValueError(f"hysac_traverse: images {img.shape} and caption pool {pool.shape} must be (n, D), (p, D)")
  if steps < 2:
    raise ValueError(f"hysac_traverse: steps must be >= 2, got {steps}")
  w = np.linspace(1.0, 0.0, steps, dtype=np.float32)
  n = img.shape[0]
  blk = max(1, min(image_block, n))
  pad = (-n) % blk
  img_p = np.concatenate([img, np.zeros((pad, img.shape[1]), np.float32)]) if pad else img
  outs = [_traverse_block(jnp.asarray(img_p[i:i + blk]), jnp.asarray(pool), jnp.float32(curv), jnp.asarray(w),
                          jnp.asarray(include_root)) for i in range(0, img_p.shape[0], blk)]
  idx, sc, rd = (np.concatenate([np.asarray(o[j]) for o in outs])[:n] for j in range(3))
  return TraversalResult(weights_s=w, index_ns=idx, score_ns=sc, root_distance_ns=rd)


__all__ = [
    "VARIANTS", "MODES", "DEFAULT_STAT", "ALPHA_T", "ROOT_LABEL", "root_distance", "traversal_tau",
    "safety_traversal", "TraversalResult", "hysac_traverse",
]
