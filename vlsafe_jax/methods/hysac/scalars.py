"""HySAC's four learned scalars: log-curvature, log-alphas of both towers, log logit-scale (``hysac.md`` §2).

All four are 0-d float32 values stored in log space:

  ============== ================================ ============================== =====================
  name           init                             per-step clamp                 used as
  ============== ================================ ============================== =====================
  curv           log 1 = 0                        [log 0.1, log 10]              c = exp(curv)
  visual_alpha   log(embed_dim^-1/2)              <= 0 (alpha <= 1)              f_I * exp(visual_alpha)
  textual_alpha  log(embed_dim^-1/2)              <= 0                           f_T * exp(textual_alpha)
  logit_scale    log(1/0.07)                      [log(1/0.07), 4.6052]          s = exp(logit_scale)
  ============== ================================ ============================== =====================

The trainer clamps them with the pure :func:`clamp_scalars` inside the jitted step *before* the forward pass, then
returns the updated (possibly slightly out-of-range) values, like the reference's in-place clamp; the optimizer
moments are untouched. After loading a checkpoint the same clamps are applied once (a no-op when in range).

Trainable scalars are :class:`HyperbolicScalar` variables (an ``nnx.Param`` subtype, so the HySAC trainable filter
is ``nnx.Any(nnx.LoRAParam, HyperbolicScalar)`` and weight decay can exclude them by type). Frozen ones
(``learn_curv=False``, ``freeze_logit_scale=True``) are :class:`FrozenScalar` variables, which no ``nnx.Param``
filter selects. Being 0-d, they carry no logical sharding annotation (they are replicated).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

SCALAR_NAMES = ("curv", "visual_alpha", "textual_alpha", "logit_scale")

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)  # 2.659260036932778
LOGIT_SCALE_MAX = 4.6052                  # s <= 100.003 (CLIP's cap)
CURV_MIN = math.log(0.1)                  # -2.3025850929940455
CURV_MAX = math.log(10.0)
ALPHA_MAX = 0.0                           # alpha <= 1


class HyperbolicScalar(nnx.Param):
  """A learned HySAC scalar (stored in log space; weight decay 0; clamped every step)."""


class FrozenScalar(nnx.Variable):
  """A HySAC scalar held constant (``learn_curv=False`` or ``freeze_logit_scale=True``): not an ``nnx.Param``."""


@dataclasses.dataclass(frozen=True)
class ScalarBounds:
  """Clamp intervals, in log space (``hysac.md`` §2). ``None`` = no bound on that side.

  ``logit_scale_min`` is HySAC's training-loop lower clamp (MERU and HySAC's validation have none).
  """
  curv_min: float | None = CURV_MIN
  curv_max: float | None = CURV_MAX
  alpha_max: float | None = ALPHA_MAX
  logit_scale_min: float | None = LOGIT_SCALE_INIT
  logit_scale_max: float | None = LOGIT_SCALE_MAX

  def interval(self, name: str) -> tuple[float | None, float | None]:
    """``(lo, hi)`` for one of :data:`SCALAR_NAMES`."""
    if name == "curv":
      return self.curv_min, self.curv_max
    if name in ("visual_alpha", "textual_alpha"):
      return None, self.alpha_max
    if name == "logit_scale":
      return self.logit_scale_min, self.logit_scale_max
    raise KeyError(f"unknown HySAC scalar {name!r}; expected one of {SCALAR_NAMES}")


def alpha_init_value(alpha_init: str | float, embed_dim: int) -> float:
  """Initial ``log alpha`` for the ``hysac.scalars.alpha_init`` option.

  Args:
    alpha_init: ``"inv_sqrt_embed_dim"`` (reference code: ``1/sqrt(embed_dim)``), ``"inv_sqrt_512"`` (paper and
      MERU) or a positive float ``alpha`` (not its log).
    embed_dim: projection width (768 for CLIP ViT-L/14).

  Returns:
    ``log alpha`` as a Python float (``-3.321894866573836`` for the default with ``embed_dim = 768``).
  """
  if alpha_init == "inv_sqrt_embed_dim":
    if not (isinstance(embed_dim, int) and embed_dim > 0):
      raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
    return -0.5 * math.log(embed_dim)
  if alpha_init == "inv_sqrt_512":
    return -0.5 * math.log(512)
  if isinstance(alpha_init, (int, float)) and not isinstance(alpha_init, bool) and alpha_init > 0:
    return math.log(float(alpha_init))
  raise ValueError(f"alpha_init must be 'inv_sqrt_embed_dim', 'inv_sqrt_512' or a positive float, got {alpha_init!r}")


def clamp_value(x: jax.Array, lo: float | None, hi: float | None) -> jax.Array:
  """``clip(x, lo, hi)`` with optional sides (pure; the parameter value, not its gradient, is clamped)."""
  if lo is not None:
    x = jnp.maximum(x, lo)
  if hi is not None:
    x = jnp.minimum(x, hi)
  return x


def _leaf_name(path) -> str | None:
  """The attribute/key name a leaf is stored under, skipping nnx's trailing ``.value``."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    else:
      names.append(None)
  if names and names[-1] == "value":
    names = names[:-1]
  return names[-1] if names else None


def clamp_scalars(tree: Any, bounds: ScalarBounds = ScalarBounds()) -> Any:
  """Clamps every HySAC scalar found in a pytree (pure; use inside the jitted train step and after load).

  A leaf is treated as a scalar when the key it is stored under is one of :data:`SCALAR_NAMES` (an
  ``nnx.State`` of :class:`HyperbolicScalars`, of a whole model holding one, or a plain dict). Other leaves pass
  through unchanged.

  Args:
    tree: pytree (``nnx.State``, dict, ...) holding the log-space scalars.
    bounds: clamp intervals; the default is HySAC's training clamp.

  Returns:
    A tree of the same structure with the four scalars clamped.
  """
  def one(path, x):
    name = _leaf_name(path)
    if name in SCALAR_NAMES:
      lo, hi = bounds.interval(name)
      return clamp_value(x, lo, hi)
    return x
  return jax.tree_util.tree_map_with_path(one, tree)


class HyperbolicScalars(nnx.Module):
  """Holds HySAC's log-space curvature, image/text alphas and logit scale (``hysac.md`` §2).

  Attributes:
    curv, visual_alpha, textual_alpha, logit_scale: 0-d float32 variables (:class:`HyperbolicScalar`, or
      :class:`FrozenScalar` when frozen).
  """

  def __init__(self, *, embed_dim: int = 768, alpha_init: str | float = "inv_sqrt_embed_dim",
               curv_init: float = 1.0, logit_scale_init: float = 1.0 / 0.07, learn_curv: bool = True,
               freeze_logit_scale: bool = False, bounds: ScalarBounds = ScalarBounds()):
    """Builds the scalars.

    Args:
      embed_dim: projection width used by ``alpha_init="inv_sqrt_embed_dim"``.
      alpha_init: see :func:`alpha_init_value`.
      curv_init: initial curvature ``c`` (not its log), > 0.
      logit_scale_init: initial ``s = 1/tau`` (not its log), > 0.
      learn_curv: curvature trains (``HyperbolicScalar``) or stays constant (``FrozenScalar``).
      freeze_logit_scale: replace the logit scale by the constant ``log s = 4.6052`` (reference option).
      bounds: the clamp intervals used by :meth:`clamp_`.
    """
    if not curv_init > 0:
      raise ValueError(f"curv_init must be > 0 (curvature magnitude c), got {curv_init!r}")
    if not logit_scale_init > 0:
      raise ValueError(f"logit_scale_init must be > 0 (s = 1/temperature), got {logit_scale_init!r}")
    self.bounds = bounds
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    log_alpha = alpha_init_value(alpha_init, embed_dim)
    self.curv = (HyperbolicScalar if learn_curv else FrozenScalar)(f32(math.log(curv_init)))
    self.visual_alpha = HyperbolicScalar(f32(log_alpha))
    self.textual_alpha = HyperbolicScalar(f32(log_alpha))
    if freeze_logit_scale:
      self.logit_scale = FrozenScalar(f32(LOGIT_SCALE_MAX))
    else:
      self.logit_scale = HyperbolicScalar(f32(math.log(logit_scale_init)))

  def curvature(self) -> jax.Array:
    """``c = exp(curv)`` (float32, 0-d)."""
    return jnp.exp(self.curv[...])

  def scale(self) -> jax.Array:
    """Contrastive logit scale ``s = exp(logit_scale)`` (float32, 0-d)."""
    return jnp.exp(self.logit_scale[...])

  def alphas(self) -> tuple[jax.Array, jax.Array]:
    """``(alpha_I, alpha_T) = (exp(visual_alpha), exp(textual_alpha))``."""
    return jnp.exp(self.visual_alpha[...]), jnp.exp(self.textual_alpha[...])

  def values(self) -> dict[str, jax.Array]:
    """The four log-space values by name (for logging)."""
    return {n: getattr(self, n)[...] for n in SCALAR_NAMES}

  def clamp_(self) -> None:
    """Clamps the stored values in place (eager use, e.g. right after loading a checkpoint)."""
    for name in SCALAR_NAMES:
      var = getattr(self, name)
      var[...] = clamp_value(var[...], *self.bounds.interval(name))


__all__ = [
    "SCALAR_NAMES", "LOGIT_SCALE_INIT", "LOGIT_SCALE_MAX", "CURV_MIN", "CURV_MAX", "ALPHA_MAX", "HyperbolicScalar",
    "FrozenScalar", "ScalarBounds", "alpha_init_value", "clamp_value", "clamp_scalars", "HyperbolicScalars",
]
