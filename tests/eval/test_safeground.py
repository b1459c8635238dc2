"""SafeGround metrics (uwm.md §9.1): golden example, ties, per-item ANDs against a brute-force reference."""
import numpy as np
import pytest

from vlsafe_jax.eval import safeground

E1, E2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]


def _golden_sets():
  # (TS, TU, IS, IU) per quadruplet, uwm.md §9.1.
  quads = [
      (E1, E2, E1, E2),
      (E1, E1, E1, E1),
      (E1, [0.6, 0.8, 0.0], E1, [0.6, 0.0, 0.8]),
  ]
  return [np.array([q[k] for q in quads], np.float32) for k in range(4)]


def test_golden_indicators_and_metrics():
  ts, tu, is_, iu = _golden_sets()
  ind = np.asarray(safeground.indicators(ts, tu, is_, iu)).astype(int)
  np.testing.assert_array_equal(ind, [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
  m = safeground.safeground(ts, tu, is_, iu)
  want = {"P^t_s": 66.67, "P^t_u": 33.33, "P^v_s": 66.67, "P^v_u": 33.33, "Txt_s": 33.33, "Img_s": 33.33,
          "PS": 66.67, "PU": 33.33, "GS": 33.33}
  assert list(m) == list(safeground.METRICS)
  for k, v in want.items():
    assert m[k] == pytest.approx(v, abs=0.005), k


def test_ties_count_as_failures_even_after_scaling():
  # All four embeddings along the same direction but with different norms: every cosine is exactly 1.
  ts = np.array([[2.0, 0.0]], np.float32)
  m = safeground.safeground(ts, 3 * ts, 0.5 * ts, 7 * ts)
  assert all(v == 0.0 for v in m.values())


def _brute_force(ts, tu, is_, iu):
  def f(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
  rows = []
  for i in range(ts.shape[0]):
    pts = f(ts[i], is_[i]) > f(ts[i], iu[i])
    ptu = f(tu[i], is_[i]) > f(tu[i], iu[i])
    pvs = f(is_[i], ts[i]) > f(is_[i], tu[i])
    pvu = f(iu[i], ts[i]) > f(iu[i], tu[i])
    rows.append([pts, ptu, pvs, pvu, pvs and pvu, pts and ptu, pts and pvs, ptu and pvu,
                 pts and ptu and pvs and pvu])
  return dict(zip(safeground.METRICS, 100.0 * np.mean(np.array(rows, float), axis=0)))


def test_random_embeddings_match_brute_force():
  rng = np.random.default_rng(0)
  sets = [rng.normal(size=(37, 11)).astype(np.float32) for _ in range(4)]
  got = safeground.safeground(*sets)
  want = _brute_force(*[s.astype(np.float64) for s in sets])
  for k in safeground.METRICS:
    assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_bad_inputs_name_the_set():
  ts = np.ones((3, 4), np.float32)
  with pytest.raises(ValueError, match="IU"):
    safeground.safeground(ts, ts, ts, np.ones((2, 4), np.float32))
  zero = ts.copy()
  zero[1] = 0
  with pytest.raises(ValueError, match=r"TU.*rows \[1\]"):
    safeground.safeground(ts, zero, ts, ts)
