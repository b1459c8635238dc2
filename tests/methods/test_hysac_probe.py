"""Cone-collapse diagnostics (against hand-built hyperboloid points) and the free-embedding probe (runs, respects
frozen scalars, satisfies its entailment hinges, rejects bad input)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from vlsafe_jax.geometry import lorentz
from vlsafe_jax.methods.hysac import diagnostics, losses, probe


def _points(radii, curv, dim=5, seed=0):
  """Rows with sqrt(c)|x| = radii exactly, random directions."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(len(radii), dim))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  return (u * np.asarray(radii)[:, None] / math.sqrt(curv)).astype(np.float32)


def test_saturated_share_counts_the_clipped_aperture_zone():
  c = 0.5
  x = _points([0.05, 0.15, 0.19, 0.21, 0.5, 2.0], c)      # 2K = 0.2
  assert float(diagnostics.saturated_share(x, c)) == pytest.approx(3 / 6)
  # The zone is exactly where half_aperture sits at its clip (~pi/2).
  omega = np.asarray(lorentz.half_aperture(jnp.asarray(x), c))
  np.testing.assert_allclose(omega[:3], np.arcsin(1 - lorentz.EPS_APERTURE), rtol=1e-5)   # float32 arcsin
  assert np.all(omega[3:] < 1.5)


def test_behind_share_on_rays():
  apex = _points([1.0] * 4, 1.0, seed=1)
  child = np.concatenate([0.5 * apex[:2], 2.0 * apex[2:]])     # rows 0-1 behind the apex (root side), 2-3 beyond
  assert float(diagnostics.behind_share(apex, child, 1.0)) == pytest.approx(0.5)
  phi = np.asarray(lorentz.oxy_angle(jnp.asarray(apex), jnp.asarray(child), 1.0))
  assert np.all(phi[:2] > diagnostics.BEHIND_ANGLE) and np.all(phi[2:] < 0.1)


def test_embedding_diagnostics_root_distances_and_clamp_flags():
  c = 2.0
  xs = [_points([r] * 3, c, seed=k) for k, r in enumerate((0.1, 0.4, 0.3, 0.8))]
  d = diagnostics.embedding_diagnostics(*xs, c)
  for name, r in zip(diagnostics.SETS, (0.1, 0.4, 0.3, 0.8)):
    assert float(d[f"root_{name}"]) == pytest.approx(math.asinh(r) / math.sqrt(c), rel=1e-5)
    assert float(d[f"sat_{name}"]) == (1.0 if r <= 0.2 else 0.0)
  flags = diagnostics.scalar_clamp_flags(0.1, 0.3, 1.0)
  assert {k: float(v) for k, v in flags.items()} == {"curv_at_min": 1.0, "curv_at_max": 0.0,
                                                      "alpha_image_at_max": 0.0, "alpha_text_at_max": 1.0}


def test_collapse_message():
  ok = {"sat_i": 0.1, "sat_iu": 0.0, "sat_t": 0.2, "sat_tu": 0.0, "tu_behind_i": 0.1, "curv_at_min": 0.0}
  assert diagnostics.collapse_message(ok) is None
  msg = diagnostics.collapse_message({**ok, "sat_t": 0.9})
  assert msg.startswith("cone collapse") and "t 90%" in msg
  assert "T* behind I" in diagnostics.collapse_message({**ok, "tu_behind_i": 0.7})
  assert "lower clamp" in diagnostics.collapse_message({**ok, "curv_at_min": 1.0})


def test_hierarchy_stats():
  rng = np.random.default_rng(0)
  d = {"T": 1 + 0.1 * rng.normal(size=200), "I": 2 + 0.1 * rng.normal(size=200),
       "T*": 3 + 0.3 * rng.normal(size=200), "I*": 4 + 0.3 * rng.normal(size=200)}
  s = probe.hierarchy_stats(d)
  assert s["ordered"]
  gap = d["I"].mean() - d["T"].mean()
  assert s["gap_t_i"] == pytest.approx(gap)
  assert s["sep_t_i"] == pytest.approx(gap / (0.5 * (d["T"].std() + d["I"].std())))
  assert s["tu_below_i_share"] == pytest.approx(np.mean(d["T*"] < d["I"]))
  assert not probe.hierarchy_stats({**d, "T*": d["T*"] - 2.5})["ordered"]


def _features(n=96, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, dim))
  hazard = rng.normal(size=(7, dim))[rng.integers(0, 7, n)]
  f = {"I": base + 0.3 * rng.normal(size=(n, dim)), "T": base + 0.3 * rng.normal(size=(n, dim))}
  f["I*"], f["T*"] = f["I"] + hazard, f["T"] + hazard
  return {k: (4 * v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32) for k, v in f.items()}


@pytest.fixture(scope="module")
def probed():
  cfg = probe.ProbeConfig(steps=150, batch_size=32, lr=5e-3, log_every=25)
  return probe.run_probe(_features(), losses.HySACLossConfig(negatives="global"), cfg)


def test_probe_records_and_satisfies_its_hinges(probed):
  h = probed.history
  assert [r["step"] for r in h] == [25, 50, 75, 100, 125, 150]
  for key in ("loss", *losses.TERM_NAMES, "curvature", "sat_i", "root_tu", "tu_behind_i", "curv_at_min"):
    assert key in h[-1], key
  assert h[-1]["loss"] < h[0]["loss"]
  # The per-modality cone hinges E(T, I), E(T*, I*) are easy for free embeddings: they fall by 4x or more. (E(I, T*)
  # is the hard one: from this start T lies nearer the root than I, T* next to T, i.e. behind I.)
  for name in ("entail_t_i", "entail_tu_iu"):
    assert h[-1][name] < 0.25 * h[0][name], (name, h[0][name], h[-1][name])
  assert set(probed.root_distance) == set(probe.KEYS) and probed.root_distance["I"].shape == (96,)
  assert probed.final["mean_t"] == pytest.approx(float(probed.root_distance["T"].mean()))


def test_probe_frozen_curvature_and_errors():
  feats = _features(n=32)
  r = probe.run_probe(feats, losses.HySACLossConfig(negatives="global"),
                      probe.ProbeConfig(steps=5, batch_size=16, log_every=5, learn_curv=False, curv_init=2.0))
  assert r.history[-1]["curvature"] == pytest.approx(2.0, rel=1e-6)
  with pytest.raises(ValueError, match="batch_size 64"):
    probe.run_probe(feats, cfg=probe.ProbeConfig(batch_size=64))
  with pytest.raises(ValueError, match="set 'T\\*' has shape"):
    probe.run_probe({**feats, "T*": feats["T*"][:5]}, cfg=probe.ProbeConfig(batch_size=16))
