"""Tests for vlsafe_jax.geometry.lorentz: hysac.md §1.5 goldens, identities, dtypes, gradient edge cases."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlsafe_jax.geometry import lorentz as L

# hysac.md §1.5 [computed] golden values: v_i tangent vectors, x_i = exp0(v_i).
V = [[0.3, -0.4, 0.0], [1.0, 2.0, -2.0], [0.05, 0.0, 0.0]]
V_NORMS = [0.5, 3.0, 0.05]
OMEGA_MAX = 1.5663241871131188   # arcsin(1 - 1e-5)
PHI_MIN, PHI_MAX = 0.0044721396817777506, 3.1371205139080156
GOLDEN = {
    1.0: dict(
        x=[[0.3126571832962484, -0.41687624439499793, 0.0],
           [3.3392916424699677, 6.678583284939935, -6.678583284939935],
           [0.05002083593765502, 0.0, 0.0]],
        inner={(0, 1): -13.092646273926107, (0, 2): -1.113396417669565, (1, 2): -9.913215035881986},
        dist={(0, 1): 3.263736270623915, (0, 2): 0.47183859175785875, (1, 2): 2.9844621728466194},
        omega=[0.3939074993528307, 0.01996562044789057, OMEGA_MAX],
        phi={(0, 1): 2.3327229187910605, (1, 0): 3.103947424531903, (2, 1): 1.2787249706143944}),
    10.0: dict(
        x=[[0.44158809910907826, -0.5887841321454377, 0.0],
           [694.90903980962446, 1389.8180796192489, -1389.8180796192489],
           [0.050208593905063763, 0.0, 0.0]],
        dist={(0, 1): 3.378403670832188, (0, 2): 0.47296002831131956, (1, 2): 2.986959676450939},
        omega=[0.08603952106220028, 3.0337569136846976e-05, OMEGA_MAX],
        phi={(0, 1): 2.8526584352332525, (1, 0): PHI_MAX, (2, 1): 1.3834424119750086}),
    0.1: dict(
        x=[[0.30125156343038256, -0.4016687512405101, 0.0],
           [1.156896465771588, 2.313792931543176, -2.313792931543176],
           [0.05000208335937516, 0.0, 0.0]],
        dist={(0, 1): 3.2112433036977817, (0, 2): 0.4717131715961909, (1, 2): 2.9838114196130627},
        omega=[OMEGA_MAX, 0.18324986131589271, OMEGA_MAX],
        phi={(0, 1): 2.1007043191754784, (1, 0): 3.016423450621601, (2, 1): 1.2512901037265123}),
}


@jax.jit
def _golden_outputs(v, c):
  """Every op on the golden points in one compiled call (one compile per dtype keeps the file fast)."""
  x = L.exp_map0(v, c)
  root = jnp.zeros((1, 3), v.dtype)
  return dict(
      x=x, root_dist=L.pairwise_dist(root, x, c)[0], log=L.log_map0(x, c), pd=L.pairwise_dist(x, x, c),
      ed=L.elementwise_dist(x[jnp.array([0, 0, 1])], x[jnp.array([1, 2, 2])], c), pi=L.pairwise_inner(x, x, c),
      omega=L.half_aperture(x, c), phi=L.oxy_angle(x[jnp.array([0, 1, 2])], x[jnp.array([1, 0, 1])], c),
      pphi=L.pairwise_oxy_angle(x, x, c))


def _check_goldens(c, dtype, rtol, dist_atol):
  g = GOLDEN[c]
  out = _golden_outputs(jnp.asarray(V, dtype), jnp.asarray(c, dtype))
  assert out["x"].dtype == dtype
  out = {k: np.asarray(a) for k, a in out.items()}
  np.testing.assert_allclose(out["x"], g["x"], rtol=rtol, atol=1e-12)
  # Distance of exp0(v) from the root is ||v||; log0 recovers v.
  np.testing.assert_allclose(out["root_dist"], V_NORMS, rtol=rtol, atol=dist_atol)
  np.testing.assert_allclose(out["log"], V, rtol=rtol, atol=dist_atol)
  for k, ((i, j), want) in enumerate(g["dist"].items()):
    np.testing.assert_allclose(out["pd"][i, j], want, rtol=rtol, atol=dist_atol)
    np.testing.assert_allclose(out["ed"][k], want, rtol=rtol, atol=dist_atol)
  for (i, j), want in g.get("inner", {}).items():
    np.testing.assert_allclose(out["pi"][i, j], want, rtol=rtol)
  np.testing.assert_allclose(out["omega"], g["omega"], rtol=rtol)
  assert list(g["phi"]) == [(0, 1), (1, 0), (2, 1)]
  np.testing.assert_allclose(out["phi"], list(g["phi"].values()), rtol=rtol)
  for (i, j), want in g["phi"].items():
    np.testing.assert_allclose(out["pphi"][i, j], want, rtol=rtol)


@pytest.mark.parametrize("c", [1.0, 10.0, 0.1])
def test_goldens_float64(c):
  with jax.enable_x64(True):
    _check_goldens(c, jnp.float64, rtol=1e-9, dist_atol=1e-12)


@pytest.mark.parametrize("c", [1.0, 10.0, 0.1])
def test_goldens_float32(c):
  _check_goldens(c, jnp.float32, rtol=1e-5, dist_atol=1e-4)


def test_bf16_input_computes_in_float32():
  v = jnp.asarray(V, jnp.bfloat16)
  x = L.exp_map0(v, 1.0)
  chex.assert_type(x, jnp.float32)
  for out in (L.log_map0(x.astype(jnp.bfloat16), 1.0), L.pairwise_dist(x.astype(jnp.bfloat16), x, 1.0),
              L.half_aperture(v, 1.0), L.oxy_angle(v, x, 1.0), L.time_component(v, 1.0),
              L.elementwise_inner(v, v, 1.0), L.pairwise_oxy_angle(v, v, 1.0)):
    chex.assert_type(out, jnp.float32)
  # bf16 rounding of the inputs is the only error: the float32 result of the rounded input is reproduced.
  v32 = v.astype(jnp.float32)
  chex.assert_trees_all_close(L.exp_map0(v, 1.0), L.exp_map0(v32, 1.0), rtol=0, atol=0)


def _random_tangent(key, n, d, lo=0.1, hi=3.0):
  k1, k2 = jax.random.split(key)
  u = jax.random.normal(k1, (n, d))
  u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
  return u * jax.random.uniform(k2, (n, 1), minval=lo, maxval=hi)


@jax.jit
def _identity_outputs(v, c):
  n, d = v.shape
  x = L.exp_map0(v, c)
  root = jnp.zeros((1, d), v.dtype)
  ii, jj = jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij")
  return dict(
      log=L.log_map0(x, c), root_dist=L.pairwise_dist(root, x, c)[0], self_inner=L.elementwise_inner(x, x, c),
      time=L.time_component(x, c), x=x, dm=L.pairwise_dist(x, x, c), edm=L.elementwise_dist(x[ii], x[jj], c),
      pi=L.pairwise_inner(x, x, c), ei=L.elementwise_inner(x[ii], x[jj], c), pphi=L.pairwise_oxy_angle(x, x, c),
      bphi=L.oxy_angle(x[:, None, :], x[None, :, :], c), ephi=L.oxy_angle(x[ii], x[jj], c),
      omega=L.half_aperture(x, c))


@pytest.mark.parametrize("c", [0.3, 1.0, 7.0])
def test_identities_float64(c):
  with jax.enable_x64(True):
    n = 11
    v = np.asarray(_random_tangent(jax.random.key(0), n, 13), np.float64)
    o = {k: np.asarray(a) for k, a in _identity_outputs(jnp.asarray(v), jnp.float64(c)).items()}
  v_norm = np.linalg.norm(v, axis=-1)
  np.testing.assert_allclose(o["log"], v, rtol=1e-10, atol=1e-12)
  # d(0, x) = ||log0(x)|| = ||v||.
  np.testing.assert_allclose(o["root_dist"], np.linalg.norm(o["log"], axis=-1), rtol=1e-10)
  np.testing.assert_allclose(o["root_dist"], v_norm, rtol=1e-10)
  # <x, x>_L = -1/c; time component consistent.
  np.testing.assert_allclose(o["self_inner"], -1.0 / c, rtol=1e-10)
  np.testing.assert_allclose(o["time"] ** 2 - np.sum(o["x"] ** 2, -1), 1.0 / c, rtol=1e-9)
  dm = o["dm"]
  np.testing.assert_allclose(dm, dm.T, rtol=1e-12, atol=1e-12)
  # Pairwise vs elementwise forms agree. Off-diagonal only for distances: a self-distance is sqrt(rounding noise)
  # (hysac.md §1.4); angles of self-pairs likewise get an atol.
  off = ~np.eye(n, dtype=bool)
  np.testing.assert_allclose(o["edm"][off], dm[off], rtol=1e-10)
  np.testing.assert_allclose(o["ei"], o["pi"], rtol=1e-12, atol=1e-9)
  np.testing.assert_allclose(o["bphi"], o["pphi"], rtol=1e-10, atol=1e-8)
  np.testing.assert_allclose(o["ephi"], o["pphi"], rtol=1e-10, atol=1e-8)
  # Triangle inequality on every triple.
  tri = dm[:, :, None] + dm[None, :, :] - dm[:, None, :]
  assert tri.min() >= -1e-9
  # Ranges.
  assert np.all((o["omega"] > 0) & (o["omega"] <= OMEGA_MAX + 1e-15))
  assert o["pphi"].min() >= PHI_MIN - 1e-15 and o["pphi"].max() <= PHI_MAX + 1e-15


def test_identities_float32_and_shapes():
  v = _random_tangent(jax.random.key(1), 7, 13)
  c = 2.0
  x = L.exp_map0(v, c)
  chex.assert_shape(x, (7, 13))
  chex.assert_trees_all_close(L.log_map0(x, c), v, rtol=1e-4, atol=1e-5)
  chex.assert_shape(L.pairwise_dist(x[:5], x, c), (5, 7))
  chex.assert_shape(L.pairwise_dist(x[None, :5], x[None], c), (1, 5, 7))
  chex.assert_shape(L.pairwise_oxy_angle(x[:5], x, c), (5, 7))
  chex.assert_shape(L.half_aperture(x, c), (7,))
  # Distinct points only (hysac.md §1.4: float32 self-distance is rounding noise).
  dm = L.pairwise_dist(x, x, c)
  off = ~jnp.eye(7, dtype=bool)
  chex.assert_trees_all_close(jnp.where(off, dm, 0), jnp.where(off, dm.T, 0), rtol=1e-5)


def test_exp_map_sinh_cap_and_root():
  c = 4.0
  v = jnp.array([[30.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  x = L.exp_map0(v, c)
  # Output norm capped at 2^15 / sqrt(c); the root maps to the root.
  np.testing.assert_allclose(float(jnp.linalg.norm(x[0])), 2.0**15 / 2.0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(x[1]), 0.0)
  np.testing.assert_array_equal(np.asarray(L.log_map0(x[1:], c)), 0.0)
  # Apexes at the root get the widest cone.
  np.testing.assert_allclose(float(L.half_aperture(x[1], c)), OMEGA_MAX, rtol=1e-5)  # fp32 rounds 1 - 1e-5


def test_meru_eps_reachable():
  # eps only moves clamped values: MERU's 1e-8 widens the aperture cap to arcsin(1 - 1e-8).
  with jax.enable_x64(True):
    x = jnp.zeros((1, 3), jnp.float64)
    np.testing.assert_allclose(float(L.half_aperture(x, 1.0, eps=1e-8)[0]), np.arcsin(1 - 1e-8), rtol=1e-12)
    y = jnp.asarray([[0.01, 0.0, 0.0]], jnp.float64)
    d_heavy = float(jnp.linalg.norm(L.log_map0(y, 1.0, eps=1e-5)))
    d_meru = float(jnp.linalg.norm(L.log_map0(y, 1.0, eps=1e-8)))
    np.testing.assert_allclose(d_meru, np.arcsinh(0.01), rtol=1e-12)
    np.testing.assert_allclose(d_heavy, np.arcsinh(0.01), rtol=1e-12)  # above the 1e-5 floor too
    z = jnp.asarray([[1e-4, 0.0, 0.0]], jnp.float64)
    np.testing.assert_allclose(float(jnp.linalg.norm(L.log_map0(z, 1.0, eps=1e-5))),
                               np.arccosh(1 + 1e-5), rtol=1e-9)  # HySAC floor at arccosh(1 + eps)


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="pairwise_dist: feature sizes differ"):
    L.pairwise_dist(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 1.0)
  with pytest.raises(ValueError, match="exp_map0: argument 0 must have a feature axis"):
    L.exp_map0(jnp.zeros(()), 1.0)
  with pytest.raises(ValueError, match="curv must be a scalar"):
    L.log_map0(jnp.zeros((2, 3)), jnp.ones(2))
  with pytest.raises(ValueError, match="pairwise_inner: expects"):
    L.pairwise_inner(jnp.zeros(3), jnp.zeros((2, 3)), 1.0)


def _all_ops_scalar(v_nd, w_nd, c):
  """Scalar sum of every op, differentiable w.r.t. the tangent inputs and c."""
  x, y = L.exp_map0(v_nd, c), L.exp_map0(w_nd, c)
  return (jnp.sum(L.log_map0(x, c)) + jnp.sum(L.pairwise_dist(x, y, c)) + jnp.sum(L.elementwise_dist(x, y, c))
          + jnp.sum(L.pairwise_inner(x, y, c)) + jnp.sum(L.half_aperture(x, c)) + jnp.sum(L.oxy_angle(x, y, c))
          + jnp.sum(L.pairwise_oxy_angle(x, y, c)) + jnp.sum(L.time_component(x, c)))


def test_gradients_finite_at_edge_cases():
  d = 5
  rnd = _random_tangent(jax.random.key(2), 3, d)
  v = jnp.concatenate([
      jnp.zeros((1, d)),                    # the root
      rnd[:1],                              # paired with itself below: identical points
      jnp.full((1, d), 20.0),               # beyond the sinh cap
      jnp.full((1, d), 1e-3),               # aperture clip region (near root)
      rnd[1:],
  ])
  w = jnp.concatenate([jnp.zeros((1, d)), rnd[:1], -jnp.full((1, d), 20.0), jnp.full((1, d), 1e-3), rnd[1:][::-1]])
  grad_fn = jax.jit(jax.grad(_all_ops_scalar, argnums=(0, 1, 2)))
  for c in (0.1, 1.0, 10.0):
    gv, gw, gc = grad_fn(v, w, jnp.float32(c))
    chex.assert_tree_all_finite((gv, gw, gc))
  # Identical points straight into the distance / angle (not via exp0): float32 gives z == 1 exactly.
  x = L.exp_map0(rnd, 1.0)
  g = jax.grad(lambda a, b: jnp.sum(L.elementwise_dist(a, b, 1.0)) + jnp.sum(L.oxy_angle(a, b, 1.0))
               + jnp.sum(L.pairwise_dist(a, b, 1.0)), argnums=(0, 1))(x, x)
  chex.assert_tree_all_finite(g)
  # Angle clip region: apex far out, child behind it (phi at its upper clip), and at the root.
  far = jnp.array([[50.0, 0.0, 0.0]])
  back = jnp.array([[0.0, 0.0, 0.0]])
  g = jax.grad(lambda a, b: jnp.sum(L.oxy_angle(a, b, 10.0)), argnums=(0, 1))(far, back)
  chex.assert_tree_all_finite(g)


@pytest.mark.parametrize("c", [0.3, 1.0, 7.0])
def test_geodesic_stays_on_the_hyperboloid_and_splits_the_distance(c):
  """gamma(t) is a point (its Lorentz time component equals the combination of the end points'), d(x, gamma(t)) =
  t d(x, y) and d(gamma(t), y) = (1 - t) d(x, y): the curve is the geodesic, traversed at constant speed."""
  with jax.enable_x64(True):
    v = np.asarray(_random_tangent(jax.random.key(3), 2, 5), np.float64)
    x, y = L.exp_map0(jnp.asarray(v), jnp.float64(c))
    t = jnp.linspace(0.0, 1.0, 9, dtype=jnp.float64)
    g = L.geodesic(x, y, jnp.float64(c), t)
    d = float(L.elementwise_dist(x, y, c))
    g_time = np.asarray(L.time_component(g, c))
    theta = np.sqrt(c) * d
    w_a, w_b = np.sinh((1 - t) * theta) / np.sinh(theta), np.sinh(t * theta) / np.sinh(theta)
    combined_time = w_a * float(L.time_component(x, c)) + w_b * float(L.time_component(y, c))
    d_from_x = np.asarray(L.elementwise_dist(jnp.broadcast_to(x, g.shape), g, c))
    d_to_y = np.asarray(L.elementwise_dist(g, jnp.broadcast_to(y, g.shape), c))
  assert g.shape == (9, 5) and d > 0.5
  np.testing.assert_allclose(np.asarray(g[0]), np.asarray(x), atol=1e-12)
  np.testing.assert_allclose(np.asarray(g[-1]), np.asarray(y), atol=1e-12)
  np.testing.assert_allclose(g_time, combined_time, rtol=1e-10)
  np.testing.assert_allclose(d_from_x[1:], np.asarray(t)[1:] * d, rtol=1e-7)
  np.testing.assert_allclose(d_to_y[:-1], (1 - np.asarray(t)[:-1]) * d, rtol=1e-7)
  # Not the straight line of the space components (for points this far apart the geodesic bends to the root).
  assert np.abs(np.asarray(g[4]) - 0.5 * (np.asarray(x) + np.asarray(y))).max() > 1e-3


def test_geodesic_of_identical_points_and_bad_shapes():
  x = jnp.asarray([0.3, -0.2])
  g = L.geodesic(x, x, 1.0, jnp.linspace(0, 1, 4))
  np.testing.assert_allclose(np.asarray(g), np.tile(np.asarray(x), (4, 1)), rtol=1e-6)
  with pytest.raises(ValueError, match="lorentz.geodesic: expects x"):
    L.geodesic(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 1.0, jnp.linspace(0, 1, 4))
