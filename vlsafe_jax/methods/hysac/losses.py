"""HySAC's seven-term loss: hyperbolic contrastive and entailment-cone terms (``hysac.md`` §3).

A batch holds B quadruplets (safe image I, unsafe image I*, safe caption T, unsafe caption T*), lifted onto the
hyperboloid with :func:`lift` to space components ``e_i, e_iu, e_t, e_tu`` (``u`` = unsafe), each ``(B, D)``.

* Contrastive ``C(A, Z) = 1/2 [CE(L, arange B) + CE(L^T, arange B)]`` with logits ``L_bm = -s d(A_b, Z_m)``.
* Entailment ``E(P, Q) = mean_b max(0, phi(P_b, Q_b) - eta omega(P_b))`` (apex P, child Q).
* Terms, in this order: ``C(I,T), C(I*,T*), C(I*,T), C(I,T*), E(T,I), E(T*,I*), E(I,T*)`` with weights
  ``lambda = [1, 1, 1, 1, le, le, le]``. ``weighting="reference"``: ``L = sum(lambda/sum(lambda) * term) / 7`` (1/49
  each by default); ``"sum"``: ``L = sum(lambda * term)``. Ablations zero lambdas with the same formula: "w/o Ent"
  drops the three E terms, "w/o S-Ent" drops ``E(I,T*)``.

Negatives (``hysac.md`` §3.4): ``"global"`` contrasts every row against the whole (global) batch; ``"local"``
splits the batch into groups of ``per_device_batch`` consecutive rows (= the data shards of a batch sharded over
``data``) and averages the per-group contrastive terms. Entailment terms are per-sample means in both modes, and the
loss is a mean over the global batch, so gradients are averaged across devices under ``jit``.
:func:`hysac_loss` does this with global arrays (XLA partitions it); :func:`hysac_loss_sharded` is the explicit
``jax.shard_map`` version (``all_gather`` of embeddings for global negatives, shard-only for local), exact with
respect to the same formula.

All math runs in float32 or wider (``geometry/lorentz.py``). Shape letters: b, m = batch rows; d = embedding dim;
g = groups.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from vlsafe_jax.geometry import lorentz

TERM_NAMES = (
    "contrastive_i_t",     # C(I, T)    safe pair
    "contrastive_iu_tu",   # C(I*, T*)  unsafe pair
    "contrastive_iu_t",    # C(I*, T)   safe caption <-> its unsafe image
    "contrastive_i_tu",    # C(I, T*)   unsafe caption <-> its safe image
    "entail_t_i",          # E(T, I)    safe text entails safe image
    "entail_tu_iu",        # E(T*, I*)  unsafe text entails unsafe image
    "entail_i_tu",         # E(I, T*)   safety entailment: safe image entails unsafe text
)
N_TERMS = len(TERM_NAMES)


@dataclasses.dataclass(frozen=True)
class HySACLossConfig:
  """Static loss options (hashable; ``hysac.loss.*`` and ``hysac.geometry.eps_*`` config keys).

  Attributes:
    eta: aperture scale of the entailment hinge (paper's eta; 1.0).
    entailment_lambda: weight ``le`` of the three entailment terms before normalisation.
    weighting: ``"reference"`` (normalise lambdas, divide by 7 again: 1/49 each) or ``"sum"`` (plain weighted sum).
    use_entailment: False = ablation "w/o Ent" (all three E terms weighted 0).
    use_safety_entailment: False = ablation "w/o S-Ent" (``E(I,T*)`` weighted 0).
    negatives: ``"local"`` (contrastive inside groups of ``per_device_batch`` rows) or ``"global"``.
    per_device_batch: local group size; or give ``n_groups``; neither = one group (the whole batch).
    n_groups: number of local groups (alternative to ``per_device_batch``).
    min_radius: ``K`` of the half-aperture.
    eps_dist, eps_aperture, eps_angle: geometry eps (HySAC defaults; MERU = 1e-8).
    radial: ``"none"`` (the paper's loss) or ``"hinge"``: each entailment term also gets, per row,
      ``max(0, radial_margin + d(0, P) - d(0, Q))`` (apex P, child Q; root distances). Not in the paper; an option
      against cone collapse (README, "HySAC on the synthetic benchmark"). With margin 0 it demands nothing the
      exact cone does not already imply: a child strictly inside a cone of half-aperture < pi/2 makes the
      triangle root-P-Q obtuse at P, so d(0, Q) > d(0, P). It bites only where the cone cannot pull, i.e. where the
      aperture is clipped at its maximum (sqrt(c)|P| <= 2K) or the child sits behind the apex (phi ~ pi, where the
      angle's gradient vanishes).
    radial_margin: the hinge's margin, in root-distance units (``"hinge"`` only; >= 0).
  """
  eta: float = 1.0
  entailment_lambda: float = 1.0
  weighting: Literal["reference", "sum"] = "reference"
  use_entailment: bool = True
  use_safety_entailment: bool = True
  negatives: Literal["local", "global"] = "local"
  per_device_batch: int | None = None
  n_groups: int | None = None
  min_radius: float = lorentz.MIN_RADIUS
  eps_dist: float = lorentz.EPS_DIST
  eps_aperture: float = lorentz.EPS_APERTURE
  eps_angle: float = lorentz.EPS_ANGLE
  radial: Literal["none", "hinge"] = "none"
  radial_margin: float = 0.0

  def __post_init__(self):
    if self.radial not in ("none", "hinge"):
      raise ValueError(f"HySACLossConfig.radial must be 'none' or 'hinge', got {self.radial!r}")
    if not self.radial_margin >= 0:
      raise ValueError(f"HySACLossConfig.radial_margin must be >= 0, got {self.radial_margin!r}")
    if self.weighting not in ("reference", "sum"):
      raise ValueError(f"HySACLossConfig.weighting must be 'reference' or 'sum', got {self.weighting!r}")
    if self.negatives not in ("local", "global"):
      raise ValueError(f"HySACLossConfig.negatives must be 'local' or 'global', got {self.negatives!r}")
    if self.per_device_batch is not None and self.n_groups is not None:
      raise ValueError("HySACLossConfig: give per_device_batch or n_groups, not both")
    for key in ("per_device_batch", "n_groups"):
      v = getattr(self, key)
      if v is not None and not (isinstance(v, int) and v > 0):
        raise ValueError(f"HySACLossConfig.{key} must be a positive int or None, got {v!r}")
    if not self.entailment_lambda >= 0:
      raise ValueError(f"HySACLossConfig.entailment_lambda must be >= 0, got {self.entailment_lambda!r}")

  def lambdas(self) -> tuple[float, ...]:
    """Un-normalised per-term weights, in :data:`TERM_NAMES` order (ablations as zeros)."""
    le = self.entailment_lambda if self.use_entailment else 0.0
    le_safety = le if self.use_safety_entailment else 0.0
    return (1.0, 1.0, 1.0, 1.0, le, le, le_safety)

  def weights(self) -> tuple[float, ...]:
    """Final per-term weights of the total (``hysac.md`` §3.3)."""
    lam = self.lambdas()
    if self.weighting == "sum":
      return lam
    total = sum(lam)
    return tuple(l / total / N_TERMS for l in lam)

  def group_size(self, batch: int) -> int:
    """Rows per local-negatives group for a global batch of ``batch`` rows."""
    if self.per_device_batch is not None:
      size = self.per_device_batch
    elif self.n_groups is not None:
      if batch % self.n_groups:
        raise ValueError(f"HySAC loss: batch {batch} is not divisible by n_groups={self.n_groups}")
      size = batch // self.n_groups
    else:
      return batch
    if batch % size:
      raise ValueError(f"HySAC loss: batch {batch} is not divisible by per_device_batch={size}")
    return size


# ----------------------------------------------------------------------------------------------------------
# Lifting and the two term types.
# ----------------------------------------------------------------------------------------------------------


def lift(features, log_alpha, curv) -> jax.Array:
  """Lifts encoder outputs onto the hyperboloid: ``exp0_c(exp(log_alpha) * f)`` (``hysac.md`` §2.1).

  Args:
    features: ``(..., D)`` projected CLIP embeddings (un-normalised), any float dtype.
    log_alpha: 0-d ``log alpha`` (``visual_alpha`` or ``textual_alpha``).
    curv: curvature magnitude ``c > 0`` (``exp(curv)`` of the learned log-curvature).

  Returns:
    ``(..., D)`` space components, float32 (float64 for float64 input under x64).
  """
  f = jnp.asarray(features)
  f = f.astype(lorentz.compute_dtype(f))
  return lorentz.exp_map0(jnp.exp(jnp.asarray(log_alpha, f.dtype)) * f, curv)


def _softmax_ce_diag(logits_bm: jax.Array, offset=0) -> jax.Array:
  """Sum over rows of ``-log softmax(logits)[b, b + offset]`` (target of row b is column ``b + offset``)."""
  b = logits_bm.shape[-2]
  idx = jnp.arange(b) + offset
  pos_b = logits_bm[..., jnp.arange(b), idx]
  return jnp.sum(jax.nn.logsumexp(logits_bm, axis=-1) - pos_b, axis=-1)


# The contrastive terms are the loss block's only O(B^2) work. Written as plain jnp (pairwise_dist -> logits -> two
# cross-entropies) and differentiated by JAX, the compiled step (XLA:CPU, B = 1024) materialises 65 B x B float32
# buffers and evaluates 36 B x B transcendentals per step: the arccosh/exp intermediates have several consumers
# across forward and backward, so XLA does not fuse them, every reduction (max, sum) reads a materialised input, and
# all of these loop fusions run on one thread while the matmuls use every core. The fused term below does the same
# math with a hand-written VJP: the forward pass also forms the ``B x B`` "unit gradient" (everything the backward
# needs except the incoming cotangent, a scalar per term), arccosh is evaluated once per element through a square
# root it shares with its derivative, and the log-sum-exp shifts come from the matmul output (no transcendental
# pass). The README (Benchmarks, Lorentz loss block) records the HLO counts before and after.

# Distances saturate at arccosh(_Z_MAX) ~ 42.1 / sqrt(c) so that (z - 1)(z + 1) cannot overflow float32; that needs
# points ~1e9 / sqrt(c) from the root, far beyond exp_map0's cap (2^15 / sqrt(c)).
_Z_MAX = 1e18


def _augment(x_bd: jax.Array, c: jax.Array, sign: float) -> jax.Array:
  """``[x, sign * x_0]`` (..., B, D + 1): Lorentzian inner products become one plain matmul of augmented rows."""
  x0 = jnp.sqrt(1.0 / c + jnp.sum(x_bd * x_bd, axis=-1, keepdims=True))
  return jnp.concatenate([x_bd, sign * x0], axis=-1)


def _arccosh_parts(z, eps):
  """``(arccosh(clip(z, 1 + eps, _Z_MAX)), sqrt(z'^2 - 1))`` with ``z'`` the clipped z: one sqrt and one log1p.

  ``arccosh(z) = log1p(t + sqrt(t (z + 1)))``, ``t = z - 1``, is exact-to-rounding near z = 1 (where the distances
  of positive pairs live) and its square root is ``1 / arccosh'(z)``.
  """
  zc = jnp.clip(z, 1.0 + eps, _Z_MAX)
  t = zc - 1.0
  sq = jnp.sqrt(t * (zc + 1.0))
  return jnp.log1p(t + sq), sq


def _contrastive_parts(a_aug, z_aug, c_l, s_l, eps, with_grad: bool):
  """Forward of :func:`contrastive` on augmented rows; with ``with_grad`` also the backward's residuals.

  ``c_l``, ``s_l``: curvature and logit scale broadcast to the leading (group) shape of ``a_aug``.
  """
  inner_bm = jnp.matmul(a_aug, jnp.swapaxes(z_aug, -1, -2), precision=lorentz._HIGHEST)
  b = inner_bm.shape[-1]
  c, s = c_l[..., None, None], s_l[..., None, None]
  rc = jax.lax.rsqrt(c)
  acosh_bm, sq_bm = _arccosh_parts(-c * inner_bm, eps)
  d_bm = acosh_bm * rc
  logits_bm = -s * d_bm
  # Stable log-sum-exp shifts: the largest logit of a row / column belongs to its largest inner product (the
  # distance increases with -c <x, y>_L), so the max is taken on the matmul output and mapped through arccosh.
  m_r = (-s * rc * _arccosh_parts(-c * jnp.max(inner_bm, axis=-1, keepdims=True), eps)[0])[..., 0]
  m_c = (-s * rc * _arccosh_parts(-c * jnp.max(inner_bm, axis=-2, keepdims=True), eps)[0])[..., 0, :]
  lse_r = m_r + jnp.log(jnp.sum(jnp.exp(logits_bm - m_r[..., :, None]), axis=-1))
  lse_c = m_c + jnp.log(jnp.sum(jnp.exp(logits_bm - m_c[..., None, :]), axis=-2))
  pos_b = jnp.diagonal(logits_bm, axis1=-2, axis2=-1)
  ce = 0.5 * (jnp.sum(lse_r - pos_b, axis=-1) + jnp.sum(lse_c - pos_b, axis=-1)) / b
  if not with_grad:
    return ce, None
  # d ce / d logits = (softmax over the row + softmax over the column - 2 one-hot(diagonal)) / (2B).
  eye = jnp.eye(b, dtype=inner_bm.dtype)
  u_bm = (0.5 / b) * (jnp.exp(logits_bm - lse_r[..., :, None]) + jnp.exp(logits_bm - lse_c[..., None, :]) - 2.0 * eye)
  # d logits / d inner = s sqrt(c) / sqrt(z^2 - 1), and 0 where the clamp at 1 + eps (or _Z_MAX) is active: the
  # select VJP of lorentz._dist_from_inner.
  z_bm = -c * inner_bm
  active = (z_bm > 1.0 + eps) & (z_bm < _Z_MAX)
  unit_bm = jnp.where(active, u_bm * (s / rc) / jnp.where(active, sq_bm, 1.0), 0.0)
  # sum(u * d) per term gives the scalars' gradients without another B x B pass in the backward.
  ud = jnp.sum(u_bm * d_bm, axis=(-2, -1))
  return ce, (a_aug, z_aug, c_l, s_l, unit_bm, ud)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _contrastive_fused(a_aug, z_aug, c_l, s_l, eps):
  return _contrastive_parts(a_aug, z_aug, c_l, s_l, eps, with_grad=False)[0]


def _contrastive_fused_fwd(a_aug, z_aug, c_l, s_l, eps):
  return _contrastive_parts(a_aug, z_aug, c_l, s_l, eps, with_grad=True)


def _contrastive_fused_bwd(eps, res, g):
  del eps
  a_aug, z_aug, c_l, s_l, unit_bm, ud = res
  # inner = a z^T and d ce / d inner = g * unit.
  da = jnp.matmul(unit_bm, z_aug, precision=lorentz._HIGHEST) * g[..., None, None]
  dz = jnp.matmul(jnp.swapaxes(unit_bm, -1, -2), a_aug, precision=lorentz._HIGHEST) * g[..., None, None]
  # Explicit dependence on the scalars (the time components' dependence on c flows through a_aug / z_aug):
  #   d/ds = -g sum(u d);  d/dc = g sum(unit * inner) / c + s / (2c) g sum(u d),  and g sum(unit * inner) =
  #   sum(da * a_aug) since inner = a z^T.
  gud = g * ud
  dc = jnp.sum(da * a_aug, axis=(-2, -1)) / c_l + s_l / (2.0 * c_l) * gud
  return da, dz, dc.astype(c_l.dtype), (-gud).astype(s_l.dtype)


_contrastive_fused.defvjp(_contrastive_fused_fwd, _contrastive_fused_bwd)


def contrastive(a_bd, z_bd, curv, scale, eps: float = lorentz.EPS_DIST) -> jax.Array:
  """Lorentzian contrastive term ``C(A, Z)`` on one group of B aligned rows.

  Equal to ``0.5 [CE(L, arange B) + CE(L^T, arange B)] / B`` summed over rows with ``L = -s pairwise_dist(A, Z)``
  (same clamps; gradients equal to differentiating that formula, select VJPs included), computed by a fused
  custom-VJP kernel (see the comment above).

  Args:
    a_bd: ``(..., B, D)`` image-side points; row b is paired with ``z_bd[b]``.
    z_bd: ``(..., B, D)`` text-side points.
    curv: curvature magnitude ``c``.
    scale: logit scale ``s = exp(logit_scale)`` (> 0).
    eps: distance clamp.

  Returns:
    ``(...)`` mean of the image->text and text->image cross-entropies on logits ``-s d`` (``>= 0``), in the compute
    dtype (float32 or wider).
  """
  dt, (a, z) = lorentz._prepare("contrastive", a_bd, z_bd)
  if a.ndim < 2 or a.shape != z.shape:
    raise ValueError(f"contrastive: expects two (..., B, D) arrays of one shape, got {a.shape} and {z.shape}")
  c = lorentz._curv("contrastive", curv, dt)
  s = jnp.asarray(scale, dt)
  a_aug, z_aug = _augment(a, c, 1.0), _augment(z, c, -1.0)
  # The scalars enter the kernel broadcast to the group shape *through the data* (0 * a row entry), so that under
  # jax.shard_map they vary over the same mesh axes as the embeddings and the kernel's cotangents for them have the
  # type JAX expects; autodiff of this broadcast then sums (and psums) them back onto the 0-d scalars.
  zero_l = 0.0 * a_aug[..., 0, 0]
  return _contrastive_fused(a_aug, z_aug, c + zero_l, s + zero_l, float(eps))


def entailment_per_sample(p_bd, q_bd, curv, eta: float = 1.0, *, min_radius: float = lorentz.MIN_RADIUS,
                          eps_aperture: float = lorentz.EPS_APERTURE,
                          eps_angle: float = lorentz.EPS_ANGLE) -> jax.Array:
  """``max(0, phi(P_b, Q_b) - eta omega(P_b))`` per row (``(..., D)`` x2 -> ``(...)``, in ``[0, pi)``)."""
  phi = lorentz.oxy_angle(p_bd, q_bd, curv, eps=eps_angle)
  omega = lorentz.half_aperture(p_bd, curv, min_radius=min_radius, eps=eps_aperture)
  return jax.nn.relu(phi - eta * omega)


def entailment(p_bd, q_bd, curv, eta: float = 1.0, **kw) -> jax.Array:
  """Entailment term ``E(P, Q) = mean_b max(0, phi(P_b, Q_b) - eta omega(P_b))``; apex P, child Q.

  Args:
    p_bd: ``(B, D)`` apexes (more general concepts).
    q_bd: ``(B, D)`` children.
    curv: curvature magnitude ``c``.
    eta: aperture scale.
    **kw: ``min_radius``, ``eps_aperture``, ``eps_angle``.

  Returns:
    0-d mean hinge, ``>= 0``.
  """
  return jnp.mean(entailment_per_sample(p_bd, q_bd, curv, eta, **kw))


# ----------------------------------------------------------------------------------------------------------
# The seven-term loss.
# ----------------------------------------------------------------------------------------------------------

# (image set, text set) for the 4 contrastive terms and (apex, child) for the 3 entailment terms, as indices into
# (e_i, e_iu, e_t, e_tu).
_I, _IU, _T, _TU = range(4)
_CONTRASTIVE_PAIRS = ((_I, _T), (_IU, _TU), (_IU, _T), (_I, _TU))
_ENTAIL_PAIRS = ((_T, _I), (_TU, _IU), (_I, _TU))


# The paper's ablations (hysac.md §3.3) as HySACLossConfig overrides, keyed by the variant names runs use.
ABLATIONS = {
    "hysac": {},
    "wo_ent": {"use_entailment": False},            # paper "w/o Ent": no entailment terms
    "wo_sent": {"use_safety_entailment": False},    # paper "w/o S-Ent": no E(I, T*)
}


def _check_embeddings(embs: Sequence[jax.Array]) -> None:
  names = ("e_i", "e_iu", "e_t", "e_tu")
  shapes = [jnp.shape(e) for e in embs]
  if any(len(s) != 2 for s in shapes) or len(set(shapes)) != 1:
    raise ValueError(f"hysac_loss: expects four (B, D) embedding arrays of one shape, got "
                     f"{dict(zip(names, shapes))}")


def _combine(terms: Sequence[jax.Array], config: HySACLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted total (zero-weight terms are logged but kept out of the total and its gradient)."""
  total = sum(w * t for w, t in zip(config.weights(), terms) if w != 0.0)
  return jnp.asarray(total, terms[0].dtype), dict(zip(TERM_NAMES, terms))


def radial_hinge_per_sample(p_bd, q_bd, curv, margin: float = 0.0) -> jax.Array:
  """``max(0, margin + d(0, P_b) - d(0, Q_b))`` per row: the child at least ``margin`` farther from the root."""
  return jax.nn.relu(margin + lorentz.root_distance(p_bd, curv) - lorentz.root_distance(q_bd, curv))


def _entailment_terms(embs, curv, config: HySACLossConfig, reduce: Callable = jnp.mean):
  kw = dict(min_radius=config.min_radius, eps_aperture=config.eps_aperture, eps_angle=config.eps_angle)
  terms = []
  for p, q in _ENTAIL_PAIRS:
    per_row = entailment_per_sample(embs[p], embs[q], curv, config.eta, **kw)
    if config.radial == "hinge":
      per_row = per_row + radial_hinge_per_sample(embs[p], embs[q], curv, config.radial_margin)
    terms.append(reduce(per_row))
  return terms


def hysac_loss(e_i, e_iu, e_t, e_tu, curv, scale,
               config: HySACLossConfig = HySACLossConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The seven-term HySAC loss on global ``(B, D)`` arrays (sharded or not).

  Args:
    e_i, e_iu, e_t, e_tu: ``(B, D)`` lifted embeddings of safe images, unsafe images, safe captions, unsafe
      captions; row b of each belongs to quadruplet b.
    curv: curvature magnitude ``c = exp(curv_param)`` (0-d).
    scale: logit scale ``s = exp(logit_scale_param)`` (0-d).
    config: loss options (static).

  Returns:
    ``(total, terms)``: 0-d total and a dict of the seven 0-d terms keyed by :data:`TERM_NAMES`.
  """
  embs = [jnp.asarray(e) for e in (e_i, e_iu, e_t, e_tu)]
  _check_embeddings(embs)
  b, d = embs[0].shape
  eps = config.eps_dist
  if config.negatives == "global":
    c_terms = [contrastive(embs[a], embs[z], curv, scale, eps) for a, z in _CONTRASTIVE_PAIRS]
  else:
    gs = config.group_size(b)
    # (B, D) -> (G, b, D): groups of consecutive rows are exactly the data shards of a batch split over `data`,
    # so under jit each device's group stays on that device.
    grouped = [e.reshape(b // gs, gs, d) for e in embs]
    c_terms = [jnp.mean(contrastive(grouped[a], grouped[z], curv, scale, eps)) for a, z in _CONTRASTIVE_PAIRS]
  return _combine(c_terms + _entailment_terms(embs, curv, config), config)


def hysac_loss_sharded(mesh: Mesh, config: HySACLossConfig = HySACLossConfig(),
                       axis_name: str | tuple[str, ...] = "data"):
  """An explicit ``jax.shard_map`` version of :func:`hysac_loss` over the batch axis ``axis_name`` of ``mesh``.

  Each device holds ``B / n`` consecutive rows. ``"local"`` computes the contrastive terms on its own shard only
  and averages over devices (``per_device_batch``, if set, must equal the shard size). ``"global"`` all-gathers
  the embeddings; each device then computes the cross-entropy rows of its own samples against the whole batch in
  both directions (``b x B`` blocks; targets offset by the shard index) and the row sums are summed over devices:
  exactly the single-device formula. Entailment terms are per-shard means averaged over devices (equal shards).
  The total is replicated; gradients w.r.t. the embeddings come back sharded like them.

  Args:
    mesh: device mesh containing ``axis_name``.
    config: loss options (static).
    axis_name: mesh axis (or tuple of axes) the batch is split over.

  Returns:
    ``fn(e_i, e_iu, e_t, e_tu, curv, scale) -> (total, terms)`` with the same semantics as :func:`hysac_loss`.
  """
  axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"hysac_loss_sharded: mesh axes {tuple(mesh.shape)} do not include {a!r}")
  n_shards = math.prod(mesh.shape[a] for a in axes)
  ax = axes[0] if len(axes) == 1 else axes
  eps = config.eps_dist

  def local_fn(e_i, e_iu, e_t, e_tu, curv, scale):
    embs = [e_i, e_iu, e_t, e_tu]
    b = e_i.shape[0]
    if config.negatives == "local":
      if config.per_device_batch not in (None, b) or (config.n_groups not in (None, n_shards)):
        raise ValueError(f"hysac_loss_sharded: local shard holds {b} rows, but config asks per_device_batch="
                         f"{config.per_device_batch}, n_groups={config.n_groups} ({n_shards} shards)")
      c_terms = [jax.lax.pmean(contrastive(embs[a], embs[z], curv, scale, eps), ax) for a, z in _CONTRASTIVE_PAIRS]
    else:
      full = [jax.lax.all_gather(e, ax, tiled=True) for e in embs]
      offset = jax.lax.axis_index(ax) * b
      n_total = b * n_shards
      c_terms = []
      for a, z in _CONTRASTIVE_PAIRS:
        # Rows of this shard's images against all texts, and this shard's texts against all images.
        ce_img = _softmax_ce_diag(-scale * lorentz.pairwise_dist(embs[a], full[z], curv, eps=eps), offset)
        ce_txt = _softmax_ce_diag(-scale * lorentz.pairwise_dist(embs[z], full[a], curv, eps=eps), offset)
        c_terms.append(0.5 * jax.lax.psum(ce_img + ce_txt, ax) / n_total)
    e_terms = _entailment_terms(embs, curv, config, reduce=lambda x: jax.lax.pmean(jnp.mean(x), ax))
    return _combine(c_terms + e_terms, config)

  spec_b = P(ax, None)
  sharded = jax.shard_map(local_fn, mesh=mesh, in_specs=(spec_b,) * 4 + (P(), P()), out_specs=(P(), P()))

  def fn(e_i, e_iu, e_t, e_tu, curv, scale):
    embs = [jnp.asarray(e) for e in (e_i, e_iu, e_t, e_tu)]
    _check_embeddings(embs)
    if embs[0].shape[0] % n_shards:
      raise ValueError(f"hysac_loss_sharded: batch {embs[0].shape[0]} is not divisible by the {n_shards} shards of "
                       f"mesh axis {axis_name!r}")
    dt = lorentz.compute_dtype(*embs)
    embs = [e.astype(dt) for e in embs]
    return sharded(*embs, jnp.asarray(curv, dt), jnp.asarray(scale, dt))

  return fn


__all__ = [
    "TERM_NAMES", "N_TERMS", "ABLATIONS", "HySACLossConfig", "lift", "contrastive", "entailment",
    "entailment_per_sample",
    "radial_hinge_per_sample", "hysac_loss", "hysac_loss_sharded",
]
