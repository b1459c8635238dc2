"""Tests for HySAC losses and learned scalars: hysac.md §3.5 goldens, an independent NumPy float64 reference,
local/global negatives on 8 simulated devices, trace counts, gradient edge cases, scalar inits and clamps."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vlsafe_jax.geometry import lorentz as L
from vlsafe_jax.methods.hysac import losses as H
from vlsafe_jax.methods.hysac import scalars as S

# ---------------------------------------------------------------------------------------------------------------
# Goldens (hysac.md §3.5 [computed]).
# ---------------------------------------------------------------------------------------------------------------

VT = [[0.10, 0.20, 0.00], [0.00, -0.10, 0.20], [0.20, 0.00, -0.10]]
VI = [[0.20, 0.25, 0.05], [0.05, -0.15, 0.25], [0.25, 0.05, -0.15]]
VTU = [[0.35, 0.40, 0.30], [0.30, 0.25, 0.45], [0.45, 0.30, 0.25]]
VIU = [[0.50, 0.45, 0.40], [0.40, 0.35, 0.55], [0.55, 0.40, 0.35]]
GOLDEN_TERMS = {
    1.0: [0.06767448641672466, 0.4765116762965831, 0.9107322468187695, 1.0373530605658017, 0.0,
          0.061750119856289344, 0.616244106311065],
    10.0: [0.05636893645274973, 0.19899879220511624, 0.9303699304292478, 1.086267169460897, 0.5341663715664792,
           0.604842113139458, 1.4921000503967736],
}
GOLDEN_SUM = {1.0: 3.170265696265233, 10.0: 4.903113363650721}
GOLDEN_REF = {1.0: 0.06469929992378026, 10.0: 0.10006353803368818}


@pytest.mark.parametrize("c", [1.0, 10.0])
@pytest.mark.parametrize("x64", [True, False])
def test_loss_goldens(c, x64):
  dtype = jnp.float64 if x64 else jnp.float32
  rtol, atol = (1e-9, 1e-12) if x64 else (1e-4, 1e-5)
  with jax.enable_x64(x64):
    embs = [L.exp_map0(jnp.asarray(v, dtype), c) for v in (VI, VIU, VT, VTU)]
    s = 1 / 0.07
    ref_total, terms = H.hysac_loss(*embs, c, s, H.HySACLossConfig())
    sum_total, sum_terms = H.hysac_loss(*embs, c, s, H.HySACLossConfig(weighting="sum", negatives="global"))
    assert ref_total.dtype == dtype
    got = np.asarray([terms[k] for k in H.TERM_NAMES])
    np.testing.assert_allclose(got, GOLDEN_TERMS[c], rtol=rtol, atol=atol)
    # Default (local, one group) and global negatives coincide on one group (up to float32 reduction order).
    np.testing.assert_allclose(np.asarray([sum_terms[k] for k in H.TERM_NAMES]), got, rtol=1e-12 if x64 else 1e-6)
    np.testing.assert_allclose(float(sum_total), GOLDEN_SUM[c], rtol=rtol)
    np.testing.assert_allclose(float(ref_total), GOLDEN_REF[c], rtol=rtol)


def test_reference_weights():
  np.testing.assert_allclose(H.HySACLossConfig().weights(), [1 / 49] * 7, rtol=1e-15)
  np.testing.assert_allclose(H.HySACLossConfig(use_entailment=False).weights(), [1 / 28] * 4 + [0] * 3)
  np.testing.assert_allclose(H.HySACLossConfig(use_safety_entailment=False).weights(), [1 / 42] * 6 + [0])
  np.testing.assert_allclose(H.HySACLossConfig(weighting="sum", entailment_lambda=0.2).weights(),
                             [1, 1, 1, 1, 0.2, 0.2, 0.2])


# ---------------------------------------------------------------------------------------------------------------
# Independent NumPy float64 reference (written from hysac.md §1-§3, not calling the library).
# ---------------------------------------------------------------------------------------------------------------


def np_exp0(v, c, eps=1e-8):
  s = np.sqrt(c) * np.linalg.norm(v, axis=-1, keepdims=True)
  return np.sinh(np.clip(s, eps, np.arcsinh(2.0**15))) * v / np.maximum(s, eps)


def np_dist(x, y, c, eps=1e-8):
  x0 = np.sqrt(1 / c + np.sum(x * x, -1))
  y0 = np.sqrt(1 / c + np.sum(y * y, -1))
  inner = x @ y.T - x0[:, None] * y0[None, :]
  return np.arccosh(np.maximum(-c * inner, 1 + eps)) / np.sqrt(c)


def np_aperture(x, c, k=0.1, eps=1e-5):
  return np.arcsin(np.clip(2 * k / (np.sqrt(c) * np.linalg.norm(x, axis=-1) + eps), -1 + eps, 1 - eps))


def np_angle(x, y, c, eps=1e-5):
  x0 = np.sqrt(1 / c + np.sum(x * x, -1))
  y0 = np.sqrt(1 / c + np.sum(y * y, -1))
  ell = c * (np.sum(x * y, -1) - x0 * y0)
  num = y0 + ell * x0
  den = np.sqrt(np.maximum(ell**2 - 1, eps))
  return np.arccos(np.clip(num / (np.linalg.norm(x, axis=-1) * den + eps), -1 + eps, 1 - eps))


def np_ce(logits):
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
  return np.mean(lse - np.diag(logits))


def np_contrastive(a, z, c, s):
  logits = -s * np_dist(a, z, c)
  return 0.5 * (np_ce(logits) + np_ce(logits.T))


def np_hysac(ei, eiu, et, etu, c, s, eta=1.0, lam_e=1.0, weighting="reference", use_ent=True, use_sent=True,
             group=None):
  b = ei.shape[0]
  group = group or b
  pairs = [(ei, et), (eiu, etu), (eiu, et), (ei, etu)]
  terms = [np.mean([np_contrastive(a[g:g + group], z[g:g + group], c, s) for g in range(0, b, group)])
           for a, z in pairs]
  for p, q in [(et, ei), (etu, eiu), (ei, etu)]:
    terms.append(np.mean(np.maximum(0, np_angle(p, q, c) - eta * np_aperture(p, c))))
  lam = np.array([1, 1, 1, 1, lam_e * use_ent, lam_e * use_ent, lam_e * use_ent * use_sent], np.float64)
  if weighting == "reference":
    lam = lam / lam.sum() / 7
  return float(np.sum(lam * np.array(terms))), terms


def _random_embeddings(seed, b, d, c, scales=(0.3, 0.6, 0.4, 0.8)):
  """Four lifted (B, D) float64 sets with the T < I < T* < I* root-distance ordering of a trained model."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(b, d))
  out = []
  for sc in scales:
    v = sc * (base + 0.7 * rng.normal(size=(b, d))) / np.sqrt(d)
    out.append(np_exp0(v, c))
  return out


CASES = [
    dict(c=1.0, s=1 / 0.07, cfg=H.HySACLossConfig(negatives="global")),
    dict(c=0.3, s=20.0, cfg=H.HySACLossConfig(eta=0.5, entailment_lambda=0.2, n_groups=2)),
    dict(c=4.0, s=50.0, cfg=H.HySACLossConfig(eta=1.5, weighting="sum", per_device_batch=3)),
    dict(c=1.7, s=14.0, cfg=H.HySACLossConfig(use_entailment=False, negatives="global")),
    dict(c=0.6, s=30.0, cfg=H.HySACLossConfig(eta=0.75, use_safety_entailment=False, weighting="sum",
                                              entailment_lambda=2.0, n_groups=3)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c['c']}")
def test_loss_matches_numpy_float64(case):
  c, s, cfg = case["c"], case["s"], case["cfg"]
  b, d = 6, 7
  embs = _random_embeddings(int(c * 10), b, d, c)
  group = None
  if cfg.negatives == "local":
    group = cfg.per_device_batch or b // (cfg.n_groups or 1)
  want_total, want_terms = np_hysac(*embs, c, s, eta=cfg.eta, lam_e=cfg.entailment_lambda, weighting=cfg.weighting,
                                    use_ent=cfg.use_entailment, use_sent=cfg.use_safety_entailment, group=group)
  # Sanity: the random sets exercise both sides of the hinge (some terms > 0).
  assert max(want_terms[4:]) > 0
  with jax.enable_x64(True):
    total, terms = jax.jit(H.hysac_loss, static_argnums=6)(*map(jnp.asarray, embs), jnp.float64(c),
                                                            jnp.float64(s), cfg)
    np.testing.assert_allclose([float(terms[k]) for k in H.TERM_NAMES], want_terms, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(total), want_total, rtol=1e-9)


def test_lift():
  f = jax.random.normal(jax.random.key(3), (5, 7), jnp.bfloat16)
  la = jnp.float32(S.alpha_init_value("inv_sqrt_embed_dim", 768))
  e = H.lift(f, la, 2.0)
  chex.assert_type(e, jnp.float32)
  chex.assert_trees_all_close(e, L.exp_map0(f.astype(jnp.float32) / math.sqrt(768), 2.0), rtol=1e-6)


def test_config_errors():
  with pytest.raises(ValueError, match="weighting"):
    H.HySACLossConfig(weighting="mean")
  with pytest.raises(ValueError, match="negatives"):
    H.HySACLossConfig(negatives="all")
  with pytest.raises(ValueError, match="not divisible by per_device_batch=4"):
    H.hysac_loss(*[jnp.zeros((6, 3))] * 4, 1.0, 10.0, H.HySACLossConfig(per_device_batch=4))
  with pytest.raises(ValueError, match="e_tu"):
    H.hysac_loss(*[jnp.zeros((6, 3))] * 3, jnp.zeros((5, 3)), 1.0, 10.0)


# ---------------------------------------------------------------------------------------------------------------
# Gradient edge cases.
# ---------------------------------------------------------------------------------------------------------------


def test_loss_gradients_finite_at_edge_cases():
  b, d = 4, 5
  rnd = np.asarray(_random_embeddings(7, b, d, 1.0)[0], np.float32)
  e_i = jnp.asarray(rnd).at[0].set(0.0)             # an image at the root
  e_t = e_i                                         # identical image/text points
  e_iu = jnp.asarray(rnd).at[1].set(2.0e3)          # far out (beyond the cap, angle/aperture clip regions)
  e_tu = jnp.zeros((b, d))                          # every unsafe text at the root
  cfg = H.HySACLossConfig(negatives="global")

  @jax.jit
  def grads(embs, log_c, log_s):
    return jax.grad(lambda e, lc, ls: H.hysac_loss(*e, jnp.exp(lc), jnp.exp(ls), cfg)[0],
                    argnums=(0, 1, 2))(embs, log_c, log_s)

  for log_c in (S.CURV_MIN, 0.0, S.CURV_MAX):
    g = grads((e_i, e_iu, e_t, e_tu), jnp.float32(log_c), jnp.float32(S.LOGIT_SCALE_MAX))
    chex.assert_tree_all_finite(g)
  # Through the lift from raw features with zero rows.
  f = jnp.zeros((b, d)).at[2].set(1.0)
  g = jax.jit(jax.grad(lambda la, f: H.hysac_loss(*[H.lift(f, la, 1.0)] * 4, 1.0, 10.0)[0], argnums=(0, 1)))(
      jnp.float32(-1.0), f)
  chex.assert_tree_all_finite(g)


def _contrastive_autodiff(a_bd, z_bd, curv, scale):
  """The contrastive term written as plain jnp (pairwise distances -> logits -> two cross-entropies), left to JAX's
  autodiff: the reference for the fused custom-VJP kernel."""
  logits_bm = -scale * L.pairwise_dist(a_bd, z_bd, curv)
  b = logits_bm.shape[-1]
  pos_b = jnp.diagonal(logits_bm, axis1=-2, axis2=-1)
  rows = jnp.sum(jax.nn.logsumexp(logits_bm, axis=-1) - pos_b, axis=-1)
  cols = jnp.sum(jax.nn.logsumexp(logits_bm, axis=-2) - pos_b, axis=-1)
  return 0.5 * (rows + cols) / b


@pytest.mark.parametrize("curv", [0.1, 1.0, 7.0])
def test_contrastive_kernel_matches_autodiff_float64(curv):
  # Two groups of 6 rows; row 0 of each group has identical image/text points (distance clamped at 1 + eps, where
  # the select VJP must give zero), row 1 is far out (large distances, the log-sum-exp shift matters).
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    a = rng.normal(size=(2, 6, 5)) * 0.6
    z = a + rng.normal(size=(2, 6, 5)) * 0.3
    z[:, 0] = a[:, 0]
    a[:, 1] *= 40.0
    a, z = jnp.asarray(a), jnp.asarray(z)
    c, s = jnp.float64(curv), jnp.float64(11.0)

    def total(fn, a, z, c, s):
      return jnp.sum(fn(a, z, c, s) * jnp.asarray([1.0, 2.5]))  # distinct cotangents per group

    want = jax.value_and_grad(lambda *x: total(_contrastive_autodiff, *x), argnums=(0, 1, 2, 3))(a, z, c, s)
    got = jax.jit(jax.value_and_grad(lambda *x: total(H.contrastive, *x), argnums=(0, 1, 2, 3)))(a, z, c, s)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-12)
    for name, g, w in zip(("a", "z", "curv", "scale"), got[1], want[1]):
      # 1e-9: the kernel's arccosh (log1p(t + sqrt(t(z + 1)))) and the library's differ by rounding only.
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-12, err_msg=name)
    # Make sure the clamp case is really exercised: -c <a_0, z_0>_L sits at or below 1 + eps.
    assert float(-c * L.elementwise_inner(a[:, 0], z[:, 0], c)[0]) <= 1.0 + L.EPS_DIST


# ---------------------------------------------------------------------------------------------------------------
# 8 simulated devices: local / global negatives, shard_map path, trace counts.
# ---------------------------------------------------------------------------------------------------------------


def test_multi_device_negatives():
  n_dev, per, d = 8, 2, 5
  b = n_dev * per
  mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  c, s = jnp.float32(1.3), jnp.float32(12.0)
  embs_host = [np.asarray(e, np.float32) for e in _random_embeddings(11, b, d, 1.3)]
  rows = NamedSharding(mesh, P("data", None))
  embs = [jax.device_put(e, rows) for e in embs_host]
  cfg_g = H.HySACLossConfig(negatives="global")
  cfg_l = H.HySACLossConfig(negatives="local", per_device_batch=per)

  def value_and_grads(loss_fn):
    # Loss and gradients w.r.t. all four embedding sets and both scalars.
    return jax.value_and_grad(lambda e, c, s: loss_fn(*e, c, s)[0], argnums=(0, 1, 2))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def global_jit(e, c, s):
    return value_and_grads(lambda *a: H.hysac_loss(*a, cfg_g))(e, c, s)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def local_jit(e, c, s):
    return value_and_grads(lambda *a: H.hysac_loss(*a, cfg_l))(e, c, s)

  sharded_g, sharded_l = H.hysac_loss_sharded(mesh, cfg_g), H.hysac_loss_sharded(mesh, cfg_l)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def shmap_global(e, c, s):
    return value_and_grads(sharded_g)(e, c, s)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def shmap_local(e, c, s):
    return value_and_grads(sharded_l)(e, c, s)

  # Single device, full batch, global negatives: the oracle for the global mode.
  one_dev = jax.jit(lambda e, c, s: value_and_grads(lambda *a: H.hysac_loss(*a, cfg_g))(e, c, s))
  ref_val, ref_grads = one_dev(tuple(jax.device_put(e, jax.devices()[0]) for e in embs_host), c, s)

  tol = dict(rtol=2e-5, atol=1e-6)
  for fn in (global_jit, shmap_global):
    val, grads = fn(tuple(embs), c, s)
    chex.assert_trees_all_close(val, ref_val, **tol)
    chex.assert_trees_all_close(grads, ref_grads, **tol)
    # Second call with new values must not retrace.
    fn(tuple(e * 1.01 for e in embs), c * 1.1, s)
  # Gradients w.r.t. embeddings stay sharded like the inputs (no silent gather in the shard_map path).
  assert shmap_global(tuple(embs), c, s)[1][0][0].sharding.is_equivalent_to(rows, 2)

  # Local negatives = mean over shards of the single-group loss of each shard (entailment terms are per-sample
  # means, so the per-shard totals average to the global-batch entailment mean).
  per_shard = [H.hysac_loss(*[e[k * per:(k + 1) * per] for e in embs_host], c, s, cfg_g)[0] for k in range(n_dev)]
  want_local = np.mean([float(v) for v in per_shard])
  val_l, grads_l = local_jit(tuple(embs), c, s)
  np.testing.assert_allclose(float(val_l), want_local, rtol=2e-5)
  assert abs(float(val_l) - float(ref_val)) > 1e-3  # local really differs from global on this batch
  val_sl, grads_sl = shmap_local(tuple(embs), c, s)
  chex.assert_trees_all_close((val_sl, grads_sl), (val_l, grads_l), **tol)
  # Gradient of local mode = mean of per-shard gradients (devices' gradients averaged).
  shard_grad = jax.jit(jax.grad(lambda e: H.hysac_loss(*e, c, s, cfg_g)[0]))
  g_parts = [shard_grad(tuple(jnp.asarray(e[k * per:(k + 1) * per]) for e in embs_host)) for k in range(n_dev)]
  want_g = [np.concatenate([np.asarray(gp[i]) for gp in g_parts]) / n_dev for i in range(4)]
  chex.assert_trees_all_close(tuple(np.asarray(g) for g in grads_l[0]), tuple(want_g), **tol)
  for fn in (local_jit, shmap_local):
    fn(tuple(e * 0.99 for e in embs), c, s * 1.05)


def test_sharded_loss_errors():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="do not include 'batch'"):
    H.hysac_loss_sharded(mesh, axis_name="batch")
  fn = H.hysac_loss_sharded(mesh, H.HySACLossConfig(negatives="global"))
  with pytest.raises(ValueError, match="not divisible by the 8 shards"):
    fn(*[jnp.zeros((12, 3))] * 4, 1.0, 10.0)


# ---------------------------------------------------------------------------------------------------------------
# Learned scalars.
# ---------------------------------------------------------------------------------------------------------------


def test_scalar_inits_and_accessors():
  m = S.HyperbolicScalars()
  # hysac.md §1.5 "Other constants".
  np.testing.assert_allclose(float(m.curv[...]), 0.0)
  np.testing.assert_allclose(float(m.visual_alpha[...]), -3.321894866573836, rtol=1e-7)
  np.testing.assert_allclose(float(m.textual_alpha[...]), -3.321894866573836, rtol=1e-7)
  np.testing.assert_allclose(float(m.logit_scale[...]), 2.659260036932778, rtol=1e-7)
  np.testing.assert_allclose(float(m.curvature()), 1.0)
  np.testing.assert_allclose(float(m.scale()), 1 / 0.07, rtol=1e-6)
  np.testing.assert_allclose([float(a) for a in m.alphas()], [768**-0.5] * 2, rtol=1e-6)
  np.testing.assert_allclose(S.alpha_init_value("inv_sqrt_512", 768), -0.5 * math.log(512))
  np.testing.assert_allclose(S.alpha_init_value(0.25, 768), math.log(0.25))
  np.testing.assert_allclose(S.alpha_init_value("inv_sqrt_embed_dim", 16), math.log(0.25))
  with pytest.raises(ValueError, match="alpha_init"):
    S.alpha_init_value("inv_sqrt", 768)
  # Trainable filter: all four are HyperbolicScalar (an nnx.Param) by default.
  assert set(nnx.to_pure_dict(nnx.state(m, S.HyperbolicScalar))) == set(S.SCALAR_NAMES)
  frozen = S.HyperbolicScalars(learn_curv=False, freeze_logit_scale=True, embed_dim=512)
  assert set(nnx.to_pure_dict(nnx.state(frozen, nnx.Param))) == {"visual_alpha", "textual_alpha"}
  np.testing.assert_allclose(float(frozen.logit_scale[...]), 4.6052, rtol=1e-7)
  np.testing.assert_allclose(float(jnp.exp(frozen.logit_scale[...])), 100.00298144563507, rtol=1e-6)
  np.testing.assert_allclose(float(frozen.visual_alpha[...]), -0.5 * math.log(512), rtol=1e-7)


def test_scalar_clamps():
  m = S.HyperbolicScalars()
  m.curv[...] = jnp.float32(5.0)
  m.visual_alpha[...] = jnp.float32(0.3)
  m.textual_alpha[...] = jnp.float32(-9.0)
  m.logit_scale[...] = jnp.float32(1.0)
  state = nnx.state(m)
  clamped = jax.jit(S.clamp_scalars)(state)
  want = {"curv": math.log(10.0), "visual_alpha": 0.0, "textual_alpha": -9.0, "logit_scale": math.log(1 / 0.07)}
  got = nnx.to_pure_dict(clamped)
  for k, v in want.items():
    np.testing.assert_allclose(float(got[k]), v, rtol=1e-7, err_msg=k)
  # Pure: the model is untouched; other bounds on the lower side; plain dicts nested in a larger tree work too.
  assert float(m.curv[...]) == 5.0
  tree = {"scalars": {"curv": jnp.float32(-7.0), "logit_scale": jnp.float32(9.0)}, "other": {"curv_x": 3.0}}
  out = S.clamp_scalars(tree)
  np.testing.assert_allclose(float(out["scalars"]["curv"]), math.log(0.1), rtol=1e-7)
  np.testing.assert_allclose(float(out["scalars"]["logit_scale"]), 4.6052, rtol=1e-7)
  assert out["other"]["curv_x"] == 3.0
  # Validation-style bounds (max only on the logit scale).
  out = S.clamp_scalars({"logit_scale": jnp.float32(1.0)}, S.ScalarBounds(logit_scale_min=None))
  assert float(out["logit_scale"]) == 1.0
  # In-place clamp after load.
  m.clamp_()
  np.testing.assert_allclose(float(m.curv[...]), math.log(10.0), rtol=1e-7)
  np.testing.assert_allclose(float(m.logit_scale[...]), math.log(1 / 0.07), rtol=1e-7)
  with pytest.raises(ValueError, match="curv_init"):
    S.HyperbolicScalars(curv_init=0.0)


# ---------------------------------------------------------------------------------------------------------------
# The radial-hinge option (not in the paper).
# ---------------------------------------------------------------------------------------------------------------


def test_root_distance_matches_float64_and_has_a_finite_gradient_at_the_root():
  x = np.random.default_rng(0).normal(size=(5, 7)) * np.asarray([0.0, 1e-4, 0.3, 2.0, 30.0])[:, None]
  for c in (0.1, 1.0, 7.0):
    # Independent form: arccosh of sqrt(c) times the time component x0 = sqrt(1/c + |x|^2).
    want = np.arccosh(np.sqrt(c) * np.sqrt(1 / c + np.sum(x * x, -1))) / np.sqrt(c)
    got = np.asarray(L.root_distance(jnp.asarray(x, jnp.float32), c), np.float64)
    np.testing.assert_allclose(got[1:], want[1:], rtol=2e-6)
    assert got[0] == 0.0
  g = jax.grad(lambda v: L.root_distance(v, 1.0))(jnp.zeros(4))
  chex.assert_tree_all_finite(g)


def test_radial_hinge_is_implied_by_a_cone_narrower_than_pi_over_2():
  # The option's premise (losses.HySACLossConfig.radial): a child strictly inside the cone of an apex whose
  # half-aperture is < pi/2 is farther from the root (the triangle root-P-Q is obtuse at P). Sampled, not assumed.
  rng = np.random.default_rng(1)
  c = 0.7
  p = rng.normal(size=(4000, 3)) * rng.uniform(0.1, 3.0, size=(4000, 1))
  # Children near the apex's ray, on both sides of it radially and off it laterally.
  q = p * rng.uniform(0.3, 3.0, size=(4000, 1)) + rng.normal(size=(4000, 3)) * 0.05
  p, q = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
  omega = L.half_aperture(p, c)
  inside = (L.oxy_angle(p, q, c) < omega) & (omega < math.pi / 2 - 1e-3)
  assert int(inside.sum()) > 100
  d_p, d_q = L.root_distance(p, c), L.root_distance(q, c)
  assert bool(jnp.all(d_q[inside] > d_p[inside]))
  # ... so the margin-0 hinge is zero wherever the exact cone is satisfied with a non-saturated aperture.
  assert float(jnp.max(H.radial_hinge_per_sample(p, q, c)[inside])) == 0.0


def test_radial_option_adds_the_hinge_to_each_entailment_term():
  rng = np.random.default_rng(2)
  embs = [jnp.asarray(rng.normal(size=(6, 5)) * s, jnp.float32) for s in (0.3, 0.5, 0.2, 0.4)]  # i, iu, t, tu
  c, s = jnp.float32(0.8), jnp.float32(10.0)
  base_total, base = H.hysac_loss(*embs, c, s, H.HySACLossConfig())
  _, got = H.hysac_loss(*embs, c, s, H.HySACLossConfig(radial="hinge", radial_margin=0.05))
  d0 = [np.asarray(L.root_distance(e, c), np.float64) for e in embs]
  pairs = {"entail_t_i": (2, 0), "entail_tu_iu": (3, 1), "entail_i_tu": (0, 3)}
  assert set(pairs) <= set(H.TERM_NAMES)
  for name, (a, z) in pairs.items():
    extra = np.mean(np.maximum(0.0, 0.05 + d0[a] - d0[z]))
    assert extra > 0
    np.testing.assert_allclose(float(got[name]), float(base[name]) + extra, rtol=1e-5)
  for name in H.TERM_NAMES[:4]:
    assert float(got[name]) == float(base[name])
  with pytest.raises(ValueError, match="radial"):
    H.HySACLossConfig(radial="margin")
  with pytest.raises(ValueError, match="radial_margin"):
    H.HySACLossConfig(radial="hinge", radial_margin=-0.1)
