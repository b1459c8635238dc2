"""UWM selection (adaptive cumulative-share threshold, ``uwm.md`` §5) and manipulation as pytree transforms.

Given a layer's score ``R`` (Flax layout ``(d_in, d_out)``, all entries positive), :func:`select` marks the smallest
set of top-scoring entries whose share of ``sum(R)`` reaches ``tau`` (the entry that crosses ``tau`` included);
:func:`apply` multiplies the selected kernel entries by ``alpha`` (default -1, negation) and returns a *new*
parameter pytree. :func:`masked_kernel` / :class:`MaskedDense` do the same at call time, for alpha/tau sweeps
without rewriting parameters.

Layers are addressed by dotted HF-style paths without the trailing ``.kernel`` (e.g.
``vision_model.encoder.layers.3.mlp.fc2``), matching ``vlsafe_jax.models.clip``'s parameter and capture names.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlsafe_jax.methods.uwm.saliency import AGGREGATIONS, Aggregation, ScoreConfig

# uwm.md §6: LLaVA-1.5's vision tower uses a larger share (code sparsity 0.915).
LLAVA_VISION_TAU = 0.085

VISION_TARGETS = (r"vision_model\.encoder\.layers\.{i}\.mlp\.fc2",)
TEXT_TARGETS = (r"text_model\.encoder\.layers\.{i}\.self_attn\.out_proj",)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """UWM options of one encoder (``uwm.md`` §6).

  Attributes:
    targets: regex patterns over dotted layer paths; ``{i}`` stands for a layer index (``\\d+``). A pattern
      matches a path that *ends* with it at a component boundary, so the same pattern finds the CLIP vision
      tower inside a larger model (LLaVA).
    tau: share of the layer's score mass to select, in [0, 1] (code parameter ``sparsity = 1 - tau``).
    alpha: factor applied to the selected weights (-1 negates, 0 zeroes, 1 is a no-op).
    eps: std offset of the variance normalisation.
    magnitude_prior: multiply scores by ``|W|``.
  """
  targets: tuple[str, ...]
  tau: float = 0.02
  alpha: float = -1.0
  eps: float = 1e-8
  magnitude_prior: bool = False

  def __post_init__(self):
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    if not 0.0 <= self.tau <= 1.0:
      raise ValueError(f"TowerConfig.tau must be in [0, 1], got {self.tau}")


@dataclasses.dataclass(frozen=True)
class UWMConfig:
  """UWM defaults for CLIP ViT-L/14 (``uwm.md`` §6). For LLaVA's vision tower use ``UWMConfig.llava()``."""
  vision: TowerConfig = TowerConfig(VISION_TARGETS, tau=0.02, alpha=-1.0, eps=1e-8, magnitude_prior=False)
  text: TowerConfig = TowerConfig(TEXT_TARGETS, tau=0.02, alpha=-1.0, eps=0.0, magnitude_prior=True)
  aggregation: Aggregation = "mean_of_ratios"

  def __post_init__(self):
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"UWMConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")

  def tower(self, name: str) -> TowerConfig:
    if name not in ("vision", "text"):
      raise ValueError(f"UWM tower must be 'vision' or 'text', got {name!r}")
    return getattr(self, name)

  def score_config(self, tower: str) -> ScoreConfig:
    """The static scoring options (aggregation, eps, prior) of ``tower``."""
    t = self.tower(tower)
    return ScoreConfig(aggregation=self.aggregation, eps=t.eps, magnitude_prior=t.magnitude_prior)

  @classmethod
  def llava(cls) -> "UWMConfig":
    """LLaVA-1.5 vision tower: tau 0.085, same fc2 targets (the text side is unused there)."""
    return cls(vision=dataclasses.replace(cls.vision, tau=LLAVA_VISION_TAU))


# --------------------------------------------------------------------------------------------------------------
# Selection

def select(r_io: jax.Array, tau: float | jax.Array) -> jax.Array:
  """Adaptive top-share selection of one layer (``uwm.md`` Eq. 11).

  Args:
    r_io: positive scores, any shape (Flax layout ``(d_in, d_out)`` for kernels).
    tau: share in [0, 1]; may be traced (sweeps do not recompile).

  Returns:
    Bool mask of ``r_io``'s shape selecting the ``m*`` largest entries, ``m* = min{m : sum_top_m p >= tau}``
    with ``p = R / sum(R)``; ``tau = 0`` selects nothing, any ``0 < tau <= max p`` selects only the argmax.
    Ties at the boundary are broken by flat index (lower first).

  Precision: the shares are sorted *descending* and cumulated from the top in float32, so the partial sums that
  decide the boundary stay small and accurate (an ascending cumsum over 4 M entries drifts by ~1e-4).
  """
  flat = jnp.ravel(r_io).astype(jnp.float32)
  p = flat / jnp.sum(flat)
  # Stable sort of -p: descending values, lower flat index first among equals.
  order = jnp.argsort(-p, stable=True)
  c = jnp.cumsum(p[order])
  tau = jnp.asarray(tau, jnp.float32)
  # c is non-decreasing, so #{m >= 1 : c_m < tau} + [c_0 = 0 < tau] is the first m with c_m >= tau.
  m_star = jnp.minimum(jnp.sum(c < tau) + (tau > 0), flat.size)
  ranked = jnp.arange(flat.size) < m_star
  mask = jnp.zeros(flat.shape, bool).at[order].set(ranked)
  return mask.reshape(r_io.shape)


_select_jit = jax.jit(select)


def select_all(scores: Mapping[str, jax.Array], tau: float) -> dict[str, jax.Array]:
  """:func:`select` per layer (``{path: R_io}`` -> ``{path: mask_io}``), validating the scores first.

  Raises:
    ValueError: naming the layer, if a score is non-finite or not strictly positive (shares need ``R > 0``).
  """
  if not 0.0 <= float(tau) <= 1.0:
    raise ValueError(f"UWM tau must be in [0, 1], got {tau}")
  out = {}
  for name, r in scores.items():
    r = jnp.asarray(r)
    ok = bool(jnp.all(jnp.isfinite(r)) & jnp.all(r > 0))
    if not ok:
      raise ValueError(f"UWM layer {name!r}: scores must be finite and > 0 (min {float(jnp.min(r))}, "
                       f"non-finite {int(jnp.sum(~jnp.isfinite(r)))}) of shape {r.shape}")
    out[name] = _select_jit(r, tau)
  return out


# --------------------------------------------------------------------------------------------------------------
# Manipulation

def masked_kernel(kernel: jax.Array, mask: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """``W * where(mask, alpha, 1)`` in ``kernel``'s dtype; unselected entries are returned bit-exactly.

  Args:
    kernel: Flax kernel ``(d_in, d_out)`` (or any shape).
    mask: bool, same shape.
    alpha: scalar factor (may be traced).
  """
  if mask.shape != kernel.shape:
    raise ValueError(f"UWM mask shape {mask.shape} != kernel shape {kernel.shape}")
  return jnp.where(mask, kernel * jnp.asarray(alpha, kernel.dtype), kernel)


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
  return ".".join(_key_str(k) for k in path)


def _value(x):
  return x.get_value() if _is_var(x) else x


def compile_patterns(patterns: str | Sequence[str]) -> list[re.Pattern]:
  """Compiles layer-path patterns; ``{i}`` means a layer index, a pattern matches a path *suffix*."""
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  return [re.compile(r"(?:^|\.)(?:" + p.replace("{i}", r"\d+") + r")$") for p in patterns]


def find_targets(params: Any, patterns: str | Sequence[str], leaf: str = "kernel") -> dict[str, jax.Array]:
  """Finds target kernels in a parameter pytree by layer-path patterns.

  Args:
    params: nested dict, ``nnx.State`` (leaves may be ``nnx.Variable``) or any pytree with named keys.
    patterns: regexes over dotted layer paths, see :class:`TowerConfig`.
    leaf: the parameter name under a matched layer (``kernel``).

  Returns:
    ``{layer_path: kernel}`` in tree order, layer paths without the trailing ``.kernel``.

  Raises:
    ValueError: if no pattern matches anything (the message lists a few available layer paths).
  """
  regs = compile_patterns(patterns)
  out: dict[str, jax.Array] = {}
  layers = []
  for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]:
    p = _path_str(path)
    if p.endswith(".value") and not _is_var(x):  # nnx.State flattened without is_leaf
      p = p[: -len(".value")]
    if not p.endswith("." + leaf):
      continue
    layer = p[: -len(leaf) - 1]
    layers.append(layer)
    if any(r.search(layer) for r in regs):
      out[layer] = _value(x)
  if not out:
    raise ValueError(f"UWM targets {list(patterns) if not isinstance(patterns, str) else [patterns]} match no "
                     f"'{leaf}' in the parameter tree; available layers include {layers[:8]}")
  return out


def apply(params: Any, masks: Mapping[str, jax.Array], alpha: float | jax.Array = -1.0, leaf: str = "kernel") -> Any:
  """Returns a new parameter pytree with ``W <- W * where(mask, alpha, 1)`` on every masked layer.

  The input pytree is not modified (new containers, new ``nnx.Variable`` objects; jax arrays are immutable).
  Biases and every unmasked layer are passed through unchanged.

  Args:
    params: nested dict / ``nnx.State`` as in :func:`find_targets`.
    masks: ``{layer_path: bool mask_io}`` (Flax layout, the kernel's shape).
    alpha: the UWM factor (-1 negation).

  Raises:
    KeyError: a mask names a layer that has no ``kernel`` in ``params``.
    ValueError: a mask's shape differs from its kernel's.
  """
  seen = set()

  def one(path, x):
    p = _path_str(path)
    if p.endswith(".value") and not _is_var(x):
      p = p[: -len(".value")]
    layer = p[: -len(leaf) - 1] if p.endswith("." + leaf) else None
    if layer is None or layer not in masks:
      # Still copy Variables so the returned tree shares no mutable object with the input.
      return x.replace(x.get_value()) if _is_var(x) else x
    seen.add(layer)
    k = _value(x)
    m = jnp.asarray(masks[layer])
    if m.shape != k.shape:
      raise ValueError(f"UWM mask for {layer!r} has shape {m.shape}, kernel has {k.shape} (Flax (d_in, d_out))")
    new = masked_kernel(k, m, alpha)
    return x.replace(new) if _is_var(x) else new

  out = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_var)
  missing = sorted(set(masks) - seen)
  if missing:
    raise KeyError(f"UWM masks name layers without a '{leaf}' in the parameter tree: {missing}")
  return out


class UWMMask(nnx.Variable):
  """A UWM selection mask: state of a :class:`MaskedDense`, never a trainable ``nnx.Param``."""


class UWMAlpha(nnx.Variable):
  """The UWM factor of a :class:`MaskedDense` (a variable so sweeps change it without retracing)."""


class MaskedDense(nnx.Module):
  """Call-time UWM on a wrapped ``nnx.Linear``: ``y = x @ masked_kernel(K, mask, alpha) + b``.

  The wrapped layer's parameters stay untouched, so alpha (``self.alpha.set_value``) and the mask
  (``self.mask.set_value``) can be swept without rewriting weights or recompiling.
  """

  def __init__(self, linear: nnx.Linear, mask_io: jax.Array | None = None, alpha: float = -1.0):
    kshape = linear.kernel.get_value().shape
    mask_io = jnp.zeros(kshape, bool) if mask_io is None else jnp.asarray(mask_io, bool)
    if mask_io.shape != kshape:
      raise ValueError(f"MaskedDense mask shape {mask_io.shape} != kernel shape {kshape}")
    self.linear = linear
    self.mask = UWMMask(mask_io)
    self.alpha = UWMAlpha(jnp.asarray(alpha, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    k = masked_kernel(self.linear.kernel.get_value(), self.mask.get_value(), self.alpha.get_value())
    dtype = self.linear.dtype or jnp.result_type(x, k)
    y = jnp.dot(x.astype(dtype), k.astype(dtype), precision=self.linear.precision)
    if self.linear.bias is not None:
      y = y + self.linear.bias.get_value().astype(dtype)
    return y


__all__ = [
    "LLAVA_VISION_TAU", "VISION_TARGETS", "TEXT_TARGETS", "TowerConfig", "UWMConfig", "select", "select_all",
    "masked_kernel", "compile_patterns", "find_targets", "apply", "UWMMask", "UWMAlpha", "MaskedDense",
]
