"""Lorentz-model (hyperboloid) operations on space components (``hysac.md`` §1).

Conventions, fixed once for the whole module:

* ``curv`` is the curvature *magnitude* ``c > 0``: the hyperboloid ``{(x_0, x) : -x_0^2 + ||x||^2 = -1/c,
  x_0 > 0}`` has sectional curvature ``-c``. Pass ``c`` itself (not ``log c``); a Python float or a 0-d array.
* A point is stored by its **space components only**, ``x in R^D``. The time component is recomputed when needed,
  ``x_0 = sqrt(1/c + ||x||^2)`` (:func:`time_component`). The root (origin) is the zero space vector.
* Tangent vectors live at the root; their time component is 0, so they are plain ``R^D`` vectors too.
* Shape letters: ``b``/``n``/``m`` = batch (rows), ``d`` = embedding dimension. Elementwise functions take any
  matching (broadcastable) leading dims; pairwise functions take ``(..., n, d)`` and ``(..., m, d)`` and return
  ``(..., n, m)``.
* Every computation runs in ``float32`` or wider, whatever dtype comes in (``bfloat16``/``float16``/int inputs are
  promoted to ``float32``); ``float64`` inputs stay ``float64`` when x64 is enabled. Outputs have that compute
  dtype. Matmuls use ``precision=HIGHEST``: ``x.y - x_0 y_0`` cancels and TF32 visibly perturbs distances.
* ``eps=`` keywords default to the HySAC values (1e-8 for ``exp_map0`` and distances, 1e-5 for ``log_map0``,
  ``half_aperture``, ``oxy_angle``); ``eps=1e-8`` everywhere gives MERU's values.

Gradients are finite everywhere the HySAC defaults are used, including ``v = 0`` (the root), identical points,
inputs beyond the ``sinh`` cap and inputs in the clip regions of the aperture and the angle. Two devices make that
true: norms are computed with a zero-safe square root, and every clamp is a ``jnp.where`` select whose VJP is a
select too (``max``/``clip`` VJPs *multiply* the cotangent by a 0/0.5/1 mask, and ``0 * inf`` from ``arccosh'(1)`` or
``arcsin'(1)`` is NaN). A side effect: at an exact tie with a bound the full gradient passes, like ``torch.clamp``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST

# asinh(2^15): exp_map0 caps sinh's argument here so the output norm stays <= 2^15 / sqrt(c).
SINH_CAP = math.asinh(2.0**15)

EPS_EXP = 1e-8
EPS_LOG = 1e-5
EPS_DIST = 1e-8
EPS_APERTURE = 1e-5
EPS_ANGLE = 1e-5
MIN_RADIUS = 0.1


# ----------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------


def compute_dtype(*xs) -> jnp.dtype:
  """The dtype hyperbolic math runs in: the inputs' common float type, at least ``float32``."""
  return jnp.result_type(*[jnp.asarray(x).dtype for x in xs], jnp.float32)


def _prepare(name: str, *xs):
  """Casts arrays to the compute dtype and checks they are at least 1-D with one feature size."""
  arrs = [jnp.asarray(x) for x in xs]
  for i, a in enumerate(arrs):
    if a.ndim < 1:
      raise ValueError(f"lorentz.{name}: argument {i} must have a feature axis (shape (..., D)), got shape {a.shape}")
  if len({a.shape[-1] for a in arrs}) > 1:
    raise ValueError(f"lorentz.{name}: feature sizes differ: shapes {[a.shape for a in arrs]}")
  dt = compute_dtype(*arrs)
  return dt, [a.astype(dt) for a in arrs]


def _curv(name: str, curv, dt):
  c = jnp.asarray(curv)
  if c.ndim != 0:
    raise ValueError(f"lorentz.{name}: curv must be a scalar (positive curvature magnitude c), got shape {c.shape}")
  return c.astype(dt)


def _safe_norm(x_nd: jax.Array) -> jax.Array:
  """``||x||_2`` over the last axis with a finite (zero) gradient at ``x = 0``.

  Double-where: the square root only ever sees positive values, so its infinite slope at 0 never enters the VJP.
  """
  sq_n = jnp.sum(x_nd * x_nd, axis=-1)
  pos = sq_n > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq_n, 1.0)), 0.0)


def _sq_norm(x_nd: jax.Array) -> jax.Array:
  return jnp.sum(x_nd * x_nd, axis=-1)


def _floor(x, lo):
  """``max(x, lo)`` with a select VJP (gradient 0 below ``lo``, full at and above it)."""
  return jnp.where(x < lo, jnp.asarray(lo, x.dtype), x)


def _clip(x, lo, hi):
  """``clip(x, lo, hi)`` with a select VJP (gradient 0 outside the interval, full inside and at ties)."""
  return jnp.where(x < lo, jnp.asarray(lo, x.dtype), jnp.where(x > hi, jnp.asarray(hi, x.dtype), x))


def time_component(x, curv):
  """Time component of points on the hyperboloid.

  Args:
    x: ``(..., D)`` space components.
    curv: curvature magnitude ``c > 0``.

  Returns:
    ``(...)`` array ``x_0 = sqrt(1/c + ||x||^2) >= 1/sqrt(c)``.
  """
  dt, (x,) = _prepare("time_component", x)
  c = _curv("time_component", curv, dt)
  return jnp.sqrt(1.0 / c + _sq_norm(x))


# ----------------------------------------------------------------------------------------------------------
# Maps at the root.
# ----------------------------------------------------------------------------------------------------------


def exp_map0(v, curv, eps: float = EPS_EXP):
  """Exponential map at the root: tangent vector -> point (space components).

  ``exp0(v) = sinh(clip(s, eps, asinh(2^15))) * v / max(s, eps)`` with ``s = sqrt(c) ||v||``; mathematically
  ``sinh(sqrt(c)||v||) v / (sqrt(c)||v||)``, whose geodesic distance from the root is ``||v||``.

  Args:
    v: ``(..., D)`` tangent vectors at the root.
    curv: curvature magnitude ``c > 0``.
    eps: lower clamp of ``s`` (HySAC/MERU 1e-8).

  Returns:
    ``(..., D)`` points; output norm at most ``2^15 / sqrt(c)`` (the sinh cap).
  """
  dt, (v,) = _prepare("exp_map0", v)
  c = _curv("exp_map0", curv, dt)
  s = jnp.sqrt(c) * _safe_norm(v)
  # Lower clip: sinh(s)/s -> 1 at the root; upper clip: sinh overflows float32 beyond ~89 and the reference caps
  # the output norm at 2^15/sqrt(c).
  s_sinh = _clip(s, eps, SINH_CAP)
  # Denominator floor: v = 0 maps to the root instead of 0/0.
  s_den = _floor(s, eps)
  return (jnp.sinh(s_sinh) / s_den)[..., None] * v


def log_map0(x, curv, eps: float = EPS_LOG):
  """Logarithmic map at the root: point -> tangent vector (inverse of :func:`exp_map0`).

  ``log0(x) = arccosh(max(sqrt(1 + c||x||^2), 1 + eps)) x / max(sqrt(c)||x||, eps)``.

  ``arccosh(sqrt(1 + s^2)) = asinh(s)`` exactly and ``arccosh`` is increasing, so the clamped distance is
  evaluated as ``max(asinh(s), arccosh(1 + eps))``: the same clamp, without the float32 cancellation of
  ``sqrt(1 + s^2)`` near 1.

  Args:
    x: ``(..., D)`` points (space components).
    curv: curvature magnitude ``c > 0``.
    eps: clamp of the arccosh argument and of the denominator (HySAC 1e-5, MERU 1e-8).

  Returns:
    ``(..., D)`` tangent vectors; their norm is the geodesic distance from the root, ``asinh(sqrt(c)||x||)/sqrt(c)``,
    floored at ``arccosh(1 + eps)/sqrt(c)`` (so points within ~``sqrt(2 eps / c)`` of the root are not inverted
    exactly, as in the reference).
  """
  dt, (x,) = _prepare("log_map0", x)
  c = _curv("log_map0", curv, dt)
  s = jnp.sqrt(c) * _safe_norm(x)
  # arccosh(1 + eps) computed in float64 on the host: 1 + 1e-5 is not exact in float32.
  d_min = math.log1p(eps + math.sqrt(eps * (2.0 + eps)))
  # Floor at arccosh(1 + eps) (reference clamp): keeps arccosh away from its infinite slope at 1.
  d0 = _floor(jnp.arcsinh(s), d_min)
  # Denominator floor: x = 0 maps to the zero tangent vector instead of 0/0.
  return (d0 / _floor(s, eps))[..., None] * x


# ----------------------------------------------------------------------------------------------------------
# Inner products and distances.
# ----------------------------------------------------------------------------------------------------------


def pairwise_inner(x, y, curv):
  """Lorentzian inner products between two sets of points.

  ``<x, y>_L = x.y - x_0 y_0 <= -1/c`` (no clamp, no eps).

  Args:
    x: ``(..., N, D)`` points.
    y: ``(..., M, D)`` points.
    curv: curvature magnitude ``c > 0``.

  Returns:
    ``(..., N, M)`` inner products.
  """
  dt, (x, y) = _prepare("pairwise_inner", x, y)
  if x.ndim < 2 or y.ndim < 2:
    raise ValueError(f"lorentz.pairwise_inner: expects (..., N, D) and (..., M, D), got {x.shape} and {y.shape}")
  c = _curv("pairwise_inner", curv, dt)
  xy_nm = jnp.matmul(x, jnp.swapaxes(y, -1, -2), precision=_HIGHEST)
  x0_n = jnp.sqrt(1.0 / c + _sq_norm(x))
  y0_m = jnp.sqrt(1.0 / c + _sq_norm(y))
  return xy_nm - x0_n[..., :, None] * y0_m[..., None, :]


def elementwise_inner(x, y, curv):
  """Row-wise Lorentzian inner products ``<x_i, y_i>_L`` (shapes broadcast over leading dims).

  Args:
    x: ``(..., D)`` points.
    y: ``(..., D)`` points, broadcastable against ``x``.
    curv: curvature magnitude ``c > 0``.

  Returns:
    ``(...)`` inner products ``<= -1/c``.
  """
  dt, (x, y) = _prepare("elementwise_inner", x, y)
  c = _curv("elementwise_inner", curv, dt)
  x0 = jnp.sqrt(1.0 / c + _sq_norm(x))
  y0 = jnp.sqrt(1.0 / c + _sq_norm(y))
  return jnp.sum(x * y, axis=-1) - x0 * y0


def _dist_from_inner(inner, c, eps):
  """``arccosh(max(-c <x,y>_L, 1 + eps)) / sqrt(c)``."""
  z = -c * inner
  # Floor at 1 + eps (reference clamp): rounding can push -c<x,y>_L below 1, outside arccosh's domain. In float32
  # 1 + 1e-8 == 1.0 and arccosh'(1) = inf; the select VJP drops that inf instead of multiplying it by 0.
  # The tie z == 1 + eps (identical points in float32) also takes the constant branch: arccosh' is infinite there.
  lo = 1.0 + eps
  return jnp.arccosh(jnp.where(z <= lo, jnp.asarray(lo, z.dtype), z)) / jnp.sqrt(c)


def pairwise_dist(x, y, curv, eps: float = EPS_DIST):
  """Geodesic distances between two sets of points.

  ``d(x, y) = arccosh(max(-c <x, y>_L, 1 + eps)) / sqrt(c)``.

  Args:
    x: ``(..., N, D)`` points.
    y: ``(..., M, D)`` points.
    curv: curvature magnitude ``c > 0``.
    eps: clamp of the arccosh argument (HySAC/MERU 1e-8; rounds to 0 in float32, see ``hysac.md`` §1.4).

  Returns:
    ``(..., N, M)`` distances ``>= 0``. For identical points float32 gives rounding noise (~1e-4), not 0.
  """
  dt, (x, y) = _prepare("pairwise_dist", x, y)
  c = _curv("pairwise_dist", curv, dt)
  return _dist_from_inner(pairwise_inner(x, y, c), c, eps)


def elementwise_dist(x, y, curv, eps: float = EPS_DIST):
  """Row-wise geodesic distances ``d(x_i, y_i)`` (shapes broadcast over leading dims).

  Args:
    x: ``(..., D)`` points.
    y: ``(..., D)`` points, broadcastable against ``x``.
    curv: curvature magnitude ``c > 0``.
    eps: clamp of the arccosh argument (1e-8).

  Returns:
    ``(...)`` distances ``>= 0``.
  """
  dt, (x, y) = _prepare("elementwise_dist", x, y)
  c = _curv("elementwise_dist", curv, dt)
  return _dist_from_inner(elementwise_inner(x, y, c), c, eps)


def geodesic(x, y, curv, t):
  """Points ``gamma(t)`` on the geodesic from ``x`` (``t = 0``) to ``y`` (``t = 1``).

  On the hyperboloid (time components included), with ``theta = sqrt(c) d(x, y) = arccosh(-c <x, y>_L)``:
  ``gamma(t) = (sinh((1 - t) theta) x + sinh(t theta) y) / sinh(theta)``; the space components combine the same
  way. ``d(x, gamma(t)) = t d(x, y)``. For ``theta`` below 1e-4 (nearly identical points) the weights are the
  linear ones, their limit.

  Args:
    x, y: ``(D,)`` end points (space components).
    curv: curvature magnitude ``c > 0``.
    t: ``(S,)`` positions along the geodesic (0 and 1 are the end points; values outside extend it).

  Returns:
    ``(S, D)`` points (space components).
  """
  dt, (x, y) = _prepare("geodesic", x, y)
  c = _curv("geodesic", curv, dt)
  t = jnp.asarray(t, dt)
  if x.ndim != 1 or y.shape != x.shape or t.ndim != 1:
    raise ValueError(f"lorentz.geodesic: expects x (D,), y (D,), t (S,); got {x.shape}, {y.shape}, {t.shape}")
  z = -c * elementwise_inner(x, y, c)
  theta = jnp.arccosh(jnp.maximum(z, 1.0))
  small = theta < 1e-4
  th = jnp.where(small, 1.0, theta)        # a safe denominator; the small branch uses the linear weights
  wa = jnp.where(small, 1.0 - t, jnp.sinh((1.0 - t) * th) / jnp.sinh(th))
  wb = jnp.where(small, t, jnp.sinh(t * th) / jnp.sinh(th))
  return wa[:, None] * x[None, :] + wb[:, None] * y[None, :]


# ----------------------------------------------------------------------------------------------------------
# Entailment cones.
# ----------------------------------------------------------------------------------------------------------


def root_distance(x, curv):
  """Geodesic distance from the root, ``d(0, x) = asinh(sqrt(c) ||x||) / sqrt(c)`` (= ``||log0(x)||``).

  Args:
    x: ``(..., D)`` space components.
    curv: curvature magnitude ``c > 0``.

  Returns:
    ``(...)`` distances ``>= 0`` in the compute dtype. The closed form needs no arccosh clamp, so it is exact near
    the root, and its gradient at ``x = 0`` is finite (zero).
  """
  dt, (x,) = _prepare("root_distance", x)
  rc = jnp.sqrt(_curv("root_distance", curv, dt))
  return jnp.arcsinh(rc * _safe_norm(x)) / rc


def half_aperture(x, curv, min_radius: float = MIN_RADIUS, eps: float = EPS_APERTURE):
  """Half-aperture of the entailment cone with apex ``x``.

  ``omega(x) = arcsin(clip(2K / (sqrt(c)||x|| + eps), -1 + eps, 1 - eps))``, ``K = min_radius``.

  Args:
    x: ``(..., D)`` cone apexes (points).
    curv: curvature magnitude ``c > 0``.
    min_radius: ``K``; points closer than ~``2K/sqrt(c)`` (in ``sqrt(c)||x||``) to the root get the widest cone.
    eps: denominator offset and clip margin (HySAC 1e-5, MERU 1e-8).

  Returns:
    ``(...)`` half-apertures in ``(0, arcsin(1 - eps)]`` (``1.5663241871131188`` for eps = 1e-5).
  """
  dt, (x,) = _prepare("half_aperture", x)
  c = _curv("half_aperture", curv, dt)
  ratio = 2.0 * min_radius / (jnp.sqrt(c) * _safe_norm(x) + eps)
  # Clip inside arcsin's domain; the 1 - eps margin keeps arcsin' finite (eps = 1e-8 rounds to 1 in float32).
  return jnp.arcsin(_clip(ratio, -1.0 + eps, 1.0 - eps))


def _angle(x, y, xy, c, eps):
  """Shared body of the angle functions; ``xy`` is ``x.y`` with the output's shape."""
  x_sq, y_sq = _sq_norm(x), _sq_norm(y)
  x0 = jnp.sqrt(1.0 / c + x_sq)
  y0 = jnp.sqrt(1.0 / c + y_sq)
  x_norm = _safe_norm(x)
  if xy.ndim == x0.ndim + 1:  # pairwise: (..., N) and (..., M) against (..., N, M)
    x0, x_norm, y0 = x0[..., :, None], x_norm[..., :, None], y0[..., None, :]
  ell = c * (xy - x0 * y0)  # = c <x, y>_L <= -1
  num = y0 + ell * x0
  # Floor at eps (reference): ell^2 - 1 is 0 for identical points and may round negative.
  den = jnp.sqrt(_floor(ell * ell - 1.0, eps))
  # Clip to [-1 + eps, 1 - eps]: rounding can leave arccos's domain; the margin keeps arccos' finite.
  return jnp.arccos(_clip(num / (x_norm * den + eps), -1.0 + eps, 1.0 - eps))


def oxy_angle(x, y, curv, eps: float = EPS_ANGLE):
  """Exterior angle at ``x`` of the geodesic triangle (root, ``x``, ``y``); broadcasts like ``x * y``.

  With ``x_0, y_0`` the time components and ``l = c (x.y - x_0 y_0)``:
  ``phi = arccos(clip((y_0 + l x_0) / (||x|| sqrt(max(l^2 - 1, eps)) + eps), -1 + eps, 1 - eps))``.
  ``x`` is the cone apex (the more general concept); ``y`` lies in the cone iff ``phi(x, y) <= omega(x)``.
  Broadcasting ``x[:, None, :]`` against ``y[None, :, :]`` gives all pairs (see :func:`pairwise_oxy_angle` for a
  matmul version that does not materialise ``(N, M, D)``).

  Args:
    x: ``(..., D)`` apexes.
    y: ``(..., D)`` points, broadcastable against ``x``.
    curv: curvature magnitude ``c > 0``.
    eps: used three times as in the reference: floor of ``l^2 - 1``, denominator offset, clip margin (HySAC 1e-5).

  Returns:
    ``(...)`` angles in ``[arccos(1 - eps), pi - arccos(1 - eps)]`` (``[0.0044721…, 3.1371205…]`` for eps = 1e-5).
  """
  dt, (x, y) = _prepare("oxy_angle", x, y)
  c = _curv("oxy_angle", curv, dt)
  x, y = jnp.broadcast_arrays(x, y)
  return _angle(x, y, jnp.sum(x * y, axis=-1), c, eps)


def pairwise_oxy_angle(x, y, curv, eps: float = EPS_ANGLE):
  """:func:`oxy_angle` for all pairs: apexes ``(..., N, D)`` against points ``(..., M, D)`` -> ``(..., N, M)``.

  Same formula and clamps; ``x.y`` comes from one HIGHEST-precision matmul.
  """
  dt, (x, y) = _prepare("pairwise_oxy_angle", x, y)
  if x.ndim < 2 or y.ndim < 2:
    raise ValueError(f"lorentz.pairwise_oxy_angle: expects (..., N, D) and (..., M, D), got {x.shape} and {y.shape}")
  c = _curv("pairwise_oxy_angle", curv, dt)
  xy_nm = jnp.matmul(x, jnp.swapaxes(y, -1, -2), precision=_HIGHEST)
  return _angle(x, y, xy_nm, c, eps)


__all__ = [
    "SINH_CAP", "compute_dtype", "time_component", "exp_map0", "log_map0", "pairwise_inner", "elementwise_inner",
    "pairwise_dist", "elementwise_dist", "geodesic", "root_distance", "half_aperture", "oxy_angle",
    "pairwise_oxy_angle",
]
