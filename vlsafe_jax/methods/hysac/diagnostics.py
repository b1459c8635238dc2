"""Cone-collapse diagnostics of a HySAC embedding batch (pure functions; logged by the trainer and the probe).

Two failure modes end HySAC training without the safety hierarchy T < I < T* < I* (README, "HySAC on the synthetic
benchmark"; named "cone collapse" in arXiv 2603.23311, and the attractor of facebookresearch/meru#4):

* **saturated apertures**: where ``sqrt(c) ||x|| <= 2K`` (K = ``min_radius``), the half-aperture
  ``arcsin(2K / (sqrt(c) ||x||))`` is clipped at its widest (~pi/2), so each entailment hinge only asks the child not
  to lie behind its apex; every hinge is then satisfied near the root without any ordering of root distances.
* **T* behind I**: the unsafe caption sits on the safe image's ray on the root side, where the exterior angle
  ``phi(I, T*)`` is close to pi and its gradient mostly rotates T* around I instead of pushing it outwards.

Plus the four learned scalars sitting at their clamps (curvature 0.1 or 10, an alpha at 1). Inputs are the lifted
space components ``(B, D)`` of the four sets, in the loss's order (I, I*, T, T*); every output is a 0-d float32
array, so the dict can ride along the train step's metrics.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vlsafe_jax.geometry import lorentz
from vlsafe_jax.methods.hysac import scalars as scalars_lib
from vlsafe_jax.methods.hysac.model import root_distance

SETS = ("i", "iu", "t", "tu")            # metric-name suffixes of (I, I*, T, T*)
# phi(I, T*) above this counts as "T* behind I": within 45 degrees of pointing from I straight back to the root.
BEHIND_ANGLE = 0.75 * math.pi
# A share of saturated points above this in any set, or a curvature at its lower clamp, is reported as collapse.
COLLAPSE_SHARE = 0.5
# Relative slack for "at its clamp" (the step clamps before the forward pass, so values sit exactly on the bound).
CLAMP_RTOL = 1e-3


def saturated_share(x_bd: jax.Array, curv, min_radius: float = lorentz.MIN_RADIUS) -> jax.Array:
  """Share of rows with ``sqrt(c) ||x|| <= 2K``, where ``half_aperture`` is clipped at its widest (0-d float32)."""
  x = jnp.asarray(x_bd, jnp.float32)
  r = jnp.sqrt(jnp.asarray(curv, jnp.float32)) * jnp.linalg.norm(x, axis=-1)
  return jnp.mean((r <= 2.0 * min_radius).astype(jnp.float32))


def behind_share(apex_bd: jax.Array, child_bd: jax.Array, curv, angle: float = BEHIND_ANGLE) -> jax.Array:
  """Share of rows whose exterior angle ``phi(apex_b, child_b)`` exceeds ``angle`` (0-d float32)."""
  phi = lorentz.oxy_angle(jnp.asarray(apex_bd, jnp.float32), jnp.asarray(child_bd, jnp.float32), curv)
  return jnp.mean((phi > angle).astype(jnp.float32))


def embedding_diagnostics(e_i, e_iu, e_t, e_tu, curv, *, min_radius: float = lorentz.MIN_RADIUS
                          ) -> dict[str, jax.Array]:
  """Per-set saturated share (``sat_<set>``) and mean root distance (``root_<set>``), and ``tu_behind_i``.

  Args:
    e_i, e_iu, e_t, e_tu: ``(B, D)`` lifted space components of I, I*, T, T*.
    curv: curvature magnitude ``c`` (0-d).
    min_radius: the half-aperture's K.

  Returns:
    dict of 0-d float32 arrays.
  """
  out = {}
  for name, e in zip(SETS, (e_i, e_iu, e_t, e_tu)):
    out[f"sat_{name}"] = saturated_share(e, curv, min_radius)
    out[f"root_{name}"] = jnp.mean(root_distance(e, curv))
  out["tu_behind_i"] = behind_share(e_i, e_tu, curv)
  return out


def scalar_clamp_flags(curv, alpha_image, alpha_text, bounds: scalars_lib.ScalarBounds = scalars_lib.ScalarBounds()
                       ) -> dict[str, jax.Array]:
  """1.0 where a learned scalar sits at a clamp: ``curv_at_min`` / ``curv_at_max`` (c at 0.1 / 10) and
  ``alpha_image_at_max`` / ``alpha_text_at_max`` (alpha at 1); inputs are the clamped values (not logs)."""
  near = lambda v, bound: (jnp.abs(jnp.asarray(v, jnp.float32) - math.exp(bound))
                           <= CLAMP_RTOL * math.exp(bound)).astype(jnp.float32)
  return {"curv_at_min": near(curv, bounds.curv_min), "curv_at_max": near(curv, bounds.curv_max),
          "alpha_image_at_max": near(alpha_image, bounds.alpha_max),
          "alpha_text_at_max": near(alpha_text, bounds.alpha_max)}


def collapse_modes(metrics: Mapping[str, float]) -> dict[str, str]:
  """The failure modes present in host metrics (from :func:`embedding_diagnostics` and :func:`scalar_clamp_flags`):
  ``{"saturated" | "behind" | "curv_min": description}``, empty when neither dominates."""
  modes = {}
  sat = {s: metrics[f"sat_{s}"] for s in SETS if f"sat_{s}" in metrics}
  if sat and max(sat.values()) >= COLLAPSE_SHARE:
    modes["saturated"] = "saturated apertures (sqrt(c)|x| <= 2K) for " + ", ".join(
        f"{s} {v:.0%}" for s, v in sat.items())
  if metrics.get("tu_behind_i", 0.0) >= COLLAPSE_SHARE:
    modes["behind"] = f"T* behind I for {metrics['tu_behind_i']:.0%} of items (phi(I, T*) > 3pi/4)"
  if metrics.get("curv_at_min", 0.0) >= 1.0:
    modes["curv_min"] = "curvature at its lower clamp 0.1"
  return modes


def collapse_message(metrics: Mapping[str, float]) -> str | None:
  """A one-line "cone collapse" warning for host metrics, or None (see :func:`collapse_modes`)."""
  modes = collapse_modes(metrics)
  if not modes:
    return None
  return "cone collapse: " + "; ".join(modes.values()) + " (README: HySAC diagnostics)"


__all__ = ["SETS", "BEHIND_ANGLE", "COLLAPSE_SHARE", "saturated_share", "behind_share", "embedding_diagnostics",
           "scalar_clamp_flags", "collapse_modes", "collapse_message"]
