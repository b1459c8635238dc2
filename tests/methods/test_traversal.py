"""Safety traversal (hysac.md §7.4 goldens, both variants, both modes, per-query masks) and the root traversal tool
(§7.6) against a numpy brute force. float64 goldens to rtol 1e-12; float32 to rtol 1e-5."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlsafe_jax.geometry import lorentz
from vlsafe_jax.methods.hysac import traversal as T

V = np.array([[0.3, -0.4, 0.0], [1.0, 2.0, -2.0], [0.05, 0.0, 0.0]])
X1 = {  # §1.5 points, c = 1 and c = 10
    1.0: np.array([[0.3126571832962484, -0.41687624439499793, 0.0],
                   [3.3392916424699677, 6.678583284939935, -6.678583284939935],
                   [0.05002083593765502, 0.0, 0.0]]),
    10.0: np.array([[0.44158809910907826, -0.5887841321454377, 0.0],
                    [694.90903980962446, 1389.8180796192489, -1389.8180796192489],
                    [0.050208593905063763, 0.0, 0.0]]),
}
TAU = {1.0: 2.5799489622552247, 10.0: 2.2399786803111637}
UPPER = {  # (c, variant) -> new x1, new root distance
    (1.0, "code"): ([0.8599829874184083, 1.7199659748368166, -1.7199659748368166], 1.6765209619952752),
    (1.0, "paper"): ([2.1867811255368976, 4.373562251073795, -4.373562251073795], 2.5799489622552247),
    (10.0, "code"): ([0.7466595601037211, 1.4933191202074423, -1.4933191202074423], 0.8398540815665314),
    (10.0, "paper"): ([62.826805435194672, 125.65361087038934, -125.65361087038934], 2.2399786803111637),
}


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_goldens_upper_and_lower(dtype, rtol):
  with jax.enable_x64(dtype == np.float64):
    fn = jax.jit(T.safety_traversal, static_argnames=("variant", "mode"))
    for c in (1.0, 10.0):
      x = jnp.asarray(X1[c], dtype)
      np.testing.assert_allclose(float(T.traversal_tau(jnp.asarray(1.2, dtype), c)), TAU[c], rtol=rtol)
      for variant in ("code", "paper"):
        y, moved = fn(x, jnp.asarray(c, dtype), jnp.asarray(1.2, dtype), variant=variant, mode="upper")
        assert y.dtype == dtype
        np.testing.assert_array_equal(np.asarray(moved), [False, True, False])
        want, d_want = UPPER[(c, variant)]
        np.testing.assert_allclose(np.asarray(y[1]), want, rtol=rtol)
        np.testing.assert_array_equal(np.asarray(y)[[0, 2]], np.asarray(x)[[0, 2]])   # untouched rows exact
        np.testing.assert_allclose(float(T.root_distance(y[1], c)), d_want, rtol=10 * rtol)
    x = jnp.asarray(X1[1.0], dtype)
    y, moved = fn(x, jnp.asarray(1.0, dtype), jnp.asarray(1.2, dtype), variant="code", mode="lower")
    np.testing.assert_array_equal(np.asarray(moved), [True, False, True])
    np.testing.assert_allclose(np.asarray(y[0]), [1.5479693773531347, -2.0639591698041797, 0.0], rtol=rtol,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(y[2]), [2.579948962255225, 0.0, 0.0], rtol=rtol, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(y[1]), np.asarray(x[1]))


def test_per_query_bounds_masks_batching_and_kappa():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(13, 7)).astype(np.float32) * rng.uniform(0.05, 1.5, size=(13, 1)).astype(np.float32)
  x[4] = 0.0   # the root: no direction, never moves
  c = 1.7
  b = rng.uniform(0.2, 1.5, size=13).astype(np.float32)
  active = rng.uniform(size=13) > 0.3
  y, moved = T.safety_traversal(x, c, b, variant="paper", mode="upper", kappa=0.5, active_n=active)
  # numpy reference, one query at a time
  d = np.arcsinh(np.sqrt(c) * np.linalg.norm(x, axis=1)) / np.sqrt(c)
  tau = b + np.tanh((b - 0.8) / 0.5) + 1
  for i in range(13):
    should = bool(d[i] > tau[i] and active[i] and np.linalg.norm(x[i]) > 0)
    assert bool(moved[i]) == should, i
    if should:
      u = x[i] / np.linalg.norm(x[i])
      want = np.sinh(np.sqrt(c) * tau[i]) / np.sqrt(c) * u
      np.testing.assert_allclose(np.asarray(y[i]), want, rtol=2e-5)
    else:
      np.testing.assert_array_equal(np.asarray(y[i]), x[i])
  assert 0 < int(moved.sum()) < 13
  # batching: a (2, 13, 7) batch equals two separate calls
  y2, m2 = T.safety_traversal(np.stack([x, 2 * x]), c, 1.0, variant="code", mode="lower")
  for j, s in enumerate((1, 2)):
    yj, mj = T.safety_traversal(s * x, c, 1.0, variant="code", mode="lower")
    np.testing.assert_array_equal(np.asarray(y2[j]), np.asarray(yj))
    np.testing.assert_array_equal(np.asarray(m2[j]), np.asarray(mj))
  assert np.isfinite(np.asarray(y2)).all()
  with pytest.raises(ValueError, match="variant"):
    T.safety_traversal(x, c, 1.0, variant="euclid")
  with pytest.raises(ValueError, match="mode"):
    T.safety_traversal(x, c, 1.0, mode="sideways")


def _np_inner(p, q, c):
  return p @ q.T - np.outer(np.sqrt(1 / c + (p ** 2).sum(1)), np.sqrt(1 / c + (q ** 2).sum(1)))


def _np_angle(x, y, c):
  """phi(x, y) for all pairs (apex x), hysac.md §1.2 with eps = 1e-5."""
  eps = 1e-5
  x0 = np.sqrt(1 / c + (x ** 2).sum(1))[:, None]
  y0 = np.sqrt(1 / c + (y ** 2).sum(1))[None, :]
  ell = c * (x @ y.T - x0 * y0)
  num = y0 + ell * x0
  den = np.sqrt(np.maximum(ell ** 2 - 1, eps))
  return np.arccos(np.clip(num / (np.linalg.norm(x, axis=1)[:, None] * den + eps), -1 + eps, 1 - eps))


def test_hysac_traverse_against_numpy():
  rng = np.random.default_rng(3)
  c = 1.3
  img = np.asarray(lorentz.exp_map0(rng.normal(size=(5, 7)) * 0.9, c), np.float64)
  # pool: captions along the images' own rays (so cones contain parts of the path) plus random ones
  dirs = img[rng.integers(0, 5, 11)]
  pool = np.concatenate([dirs * rng.uniform(0.05, 0.6, size=(11, 1)), rng.normal(size=(6, 7)) * 0.4])
  res = T.hysac_traverse(img, pool, c, steps=9, image_block=2)
  assert res.index_ns.shape == (5, 9)
  assert np.all(np.diff(res.root_distance_ns, axis=1) <= 1e-6)          # image -> root
  np.testing.assert_allclose(res.root_distance_ns[:, -1], 0.0, atol=1e-6)
  omega = np.arcsin(np.clip(2 * 0.1 / (np.sqrt(c) * np.linalg.norm(pool, axis=1) + 1e-5), -1 + 1e-5, 1 - 1e-5))
  n_clear = 0
  for n in range(5):
    v = np.asarray(lorentz.log_map0(img[n], c), np.float64)
    pts = np.asarray(lorentz.exp_map0(res.weights_s[:, None] * v[None], c), np.float64)
    s = _np_inner(pts, pool, c)
    s[(_np_angle(pool, pts, c) > omega[:, None]).T] = -np.inf
    root = -np.sqrt(1 / c + (pts ** 2).sum(1)) / np.sqrt(c)
    want = np.argmax(np.concatenate([s, root[:, None]], 1), 1)
    # float32 cone tests of (nearly) collinear points are noisy near phi = omega: compare only where every
    # caption is clearly inside or outside its cone (|phi - omega| > 0.05; arccos near 1 amplifies float32 rounding to ~0.01 rad)
    clear = ~np.any(np.abs(_np_angle(pool, pts, c) - omega[:, None]) < 0.05, axis=0)
    n_clear += int(clear.sum())
    np.testing.assert_array_equal(res.index_ns[n][clear], want[clear])
  assert n_clear >= 30, n_clear
  labels = res.labels([f"cap{i}" for i in range(len(pool))])
  assert labels[0][-1] == T.ROOT_LABEL                                    # the root point is [ROOT]
  assert {j for row in res.index_ns for j in row} - {len(pool)}           # some caption wins somewhere
  no_root = T.hysac_traverse(img, pool, c, steps=9, include_root=False)
  assert (no_root.index_ns < len(pool)).all()
  assert (no_root.index_ns[res.index_ns < len(pool)] == res.index_ns[res.index_ns < len(pool)]).all()
