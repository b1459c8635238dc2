"""Index-aligned recall@K, union galleries and % safe against a numpy brute force; blocked == unblocked."""
import numpy as np
import pytest

from vlsafe_jax.eval import retrieval

KS = (1, 5, 10, 20)


def _np_cos(q, g):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  g = g / np.linalg.norm(g, axis=1, keepdims=True)
  return q @ g.T


def _np_lorentz(q, g, curv):
  qt = np.sqrt(1 / curv + np.sum(q ** 2, 1))
  gt = np.sqrt(1 / curv + np.sum(g ** 2, 1))
  return q @ g.T - np.outer(qt, gt)


def _brute(scores, ks, first_block=None):
  """R@K by rank of the ground truth: #items scoring strictly higher (+ lower-index ties) < K."""
  n = scores.shape[0]
  out = {}
  ranks = np.empty(n, int)
  top1 = np.empty(n, int)
  for i in range(n):
    order = np.argsort(-scores[i], kind="stable")
    ranks[i] = int(np.flatnonzero(order == i)[0])
    top1[i] = order[0]
  for k in ks:
    out[f"R@{k}"] = 100.0 * np.mean(ranks < k)
  if first_block is not None:
    out["%safe"] = 100.0 * np.mean(top1 < first_block)
  return out


def _data(n=53, d=17, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, d))
  # Correlated pairs so recall is neither 0 nor 100.
  q = (base + 0.9 * rng.normal(size=(n, d))).astype(np.float32)
  g = (base + 0.9 * rng.normal(size=(n, d))).astype(np.float32)
  other = (base + 0.9 * rng.normal(size=(n, d))).astype(np.float32)
  return q, g, other


def test_recall_matches_brute_force_single_gallery():
  q, g, _ = _data()
  got = retrieval.recall(q, g, KS)
  want = _brute(_np_cos(q.astype(np.float64), g.astype(np.float64)), KS)
  assert set(got) == set(want)
  for k in want:
    assert got[k] == pytest.approx(want[k]), k
  assert 0 < got["R@1"] < got["R@20"] < 100


def test_union_gallery_recall_and_percent_safe():
  q, g, other = _data(seed=1)
  got = retrieval.recall(q, [g, other], KS)
  gal = np.concatenate([g, other]).astype(np.float64)
  want = _brute(_np_cos(q.astype(np.float64), gal), KS, first_block=q.shape[0])
  for k in want:
    assert got[k] == pytest.approx(want[k]), k
  assert 0 < got["%safe"] < 100


@pytest.mark.parametrize("qb,gb", [(7, 11), (16, 29), (53, 4)])
def test_blocked_equals_unblocked(qb, gb):
  q, g, other = _data(seed=2)
  full = retrieval.topk_indices(q, np.concatenate([g, other]), 20, query_block=1 << 20, gallery_block=1 << 20)
  blk = retrieval.topk_indices(q, np.concatenate([g, other]), 20, query_block=qb, gallery_block=gb)
  np.testing.assert_array_equal(blk, full)


def test_ties_break_towards_lower_index_in_every_blocking():
  # Gallery of repeated items: every query ties between item i and its copy i + n.
  q, g, _ = _data(n=9, seed=3)
  gal = np.concatenate([g, g])
  for gb in (4, 5, 18):
    top = retrieval.topk_indices(q, gal, 5, gallery_block=gb)
    assert np.all(top[:, 0] < 9)
    np.testing.assert_array_equal(top, retrieval.topk_indices(q, gal, 5, gallery_block=18))


def test_hyperbolic_scores_and_precomputed_matrix():
  q, g, other = _data(seed=4)
  q, g, other = 0.3 * q, 0.3 * g, 0.3 * other
  curv = 0.7
  gal = np.concatenate([g, other])
  want = _brute(_np_lorentz(q.astype(np.float64), gal.astype(np.float64), curv), KS, first_block=q.shape[0])
  got_inner = retrieval.recall(q, [g, other], KS, score_fn=retrieval.lorentz_inner(curv), gallery_block=13)
  got_dist = retrieval.recall(q, [g, other], KS, score_fn=retrieval.neg_geodesic_distance(curv))
  top = retrieval.topk_from_scores(_np_lorentz(q, gal, curv), 20, query_block=8)
  got_pre = retrieval.metrics_from_topk(top, KS, first_block=q.shape[0])
  for k in want:
    assert got_inner[k] == pytest.approx(want[k]), k
    assert got_dist[k] == pytest.approx(want[k]), k
    assert got_pre[k] == pytest.approx(want[k]), k


def test_safe_clip_columns():
  ts, vs, _ = _data(seed=5)
  tu, vu, _ = _data(seed=6)
  cols = retrieval.safe_clip_columns(ts, tu, vs, vu, KS, gallery_block=32)
  f64 = lambda x: x.astype(np.float64)  # noqa: E731
  want = {
      "T_s-V_s": _brute(_np_cos(f64(ts), f64(vs)), KS),
      "V_s-T_s": _brute(_np_cos(f64(vs), f64(ts)), KS),
      "T_u-V_{u+s}": _brute(_np_cos(f64(tu), f64(np.concatenate([vs, vu]))), KS, first_block=53),
      "V_u-T_{u+s}": _brute(_np_cos(f64(vu), f64(np.concatenate([ts, tu]))), KS, first_block=53),
  }
  assert list(cols) == list(want)
  for col in want:
    for k in want[col]:
      assert cols[col][k] == pytest.approx(want[col][k]), (col, k)


def test_bad_shapes_are_named():
  q, g, _ = _data(n=5)
  with pytest.raises(ValueError, match="first gallery block"):
    retrieval.recall(q, [g[:4], g], (1,))
  with pytest.raises(ValueError, match="k=9"):
    retrieval.topk_indices(q, g, 9)
