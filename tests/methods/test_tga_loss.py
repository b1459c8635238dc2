"""TGA loss (tga.md §4.2) against an independent NumPy float64 implementation of the formula; gradient routing
(stop_gradient on the caption / retrieved branches, torch_parity), the rho decay, the "tox" exclusion, and the
decoder's in-scan masked means against means over returned hidden states.

Tolerances: float32 JAX vs float64 NumPy, rtol 1e-5; in-scan vs returned hidden states (same float32 program
order differs) rtol = atol = 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlsafe_jax.methods.tga import loss as L
from vlsafe_jax.models.hooks import Hooks


def _np_terms(v, r, c, m, rho, cfg):
  """NumPy float64 (L_al, L_pw), written from the spec's equations."""
  v, r, c, m = (np.asarray(x, np.float64) for x in (v, r, c, m))

  def cos(a, b):
    return (a * b).sum(-1) / (np.maximum(np.linalg.norm(a, axis=-1), 1e-8) * np.maximum(np.linalg.norm(b, axis=-1),
                                                                                         1e-8))
  b, n_l = v.shape[:2]
  n = b if cfg.norm == "batch" else max(m.sum(), 1.0)
  al = pw = 0.0
  for i in range(b):
    if not m[i]:
      continue
    for l in range(n_l):
      al += np.exp(-cos(v[i, l], c[i, l]))
      pw += np.exp(cos(r[i, l], c[i, l]) - cos(v[i, l], c[i, l]))
  return (cfg.w_al * (1 - rho) ** cfg.decay_al * al / (n_l * n), cfg.w_pw * (1 - rho) ** cfg.decay_pw * pw / (n_l * n))


def _data(seed=0, b=5, n_l=3, d=7):
  rs = np.random.RandomState(seed)
  v, r, c = (rs.randn(b, n_l, d).astype(np.float32) for _ in range(3))
  m = np.array([1, 0, 1, 1, 0][:b], np.float32)
  return v, r, c, m


@pytest.mark.parametrize("norm", ["batch", "included"])
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5])
def test_aux_matches_numpy(norm, rho):
  v, r, c, m = _data()
  cfg = L.TGALossConfig(layers=(2, 3, 5), norm=norm)
  out = L.aux_losses(jnp.asarray(v), jnp.asarray(r), jnp.asarray(c), jnp.asarray(m), rho, cfg)
  al, pw = _np_terms(v, r, c, m, rho, cfg)
  np.testing.assert_allclose(float(out["align"]), al, rtol=1e-5)
  np.testing.assert_allclose(float(out["pairwise"]), pw, rtol=1e-5)


def test_excluded_rows_count_in_batch_norm():
  v, r, c, m = _data()
  cfg_b = L.TGALossConfig(layers=(1, 2, 3), norm="batch")
  cfg_i = L.TGALossConfig(layers=(1, 2, 3), norm="included")
  # An excluded row with garbage (NaN) values contributes nothing.
  v2 = v.copy()
  v2[1] = np.nan
  ob = L.aux_losses(jnp.asarray(v2), jnp.asarray(r), jnp.asarray(c), jnp.asarray(m), 0.0, cfg_b)
  oi = L.aux_losses(jnp.asarray(v2), jnp.asarray(r), jnp.asarray(c), jnp.asarray(m), 0.0, cfg_i)
  assert np.isfinite(float(ob["align"]))
  # batch divides by B = 5, included by sum(m) = 3.
  np.testing.assert_allclose(float(ob["align"]) * 5, float(oi["align"]) * 3, rtol=1e-6)
  # Only the included rows alone, normalised by B of the full batch, give the same value.
  keep = m > 0
  sub = L.aux_losses(jnp.asarray(v[keep]), jnp.asarray(r[keep]), jnp.asarray(c[keep]), jnp.ones(3), 0.0, cfg_b)
  np.testing.assert_allclose(float(ob["align"]), float(sub["align"]) * 3 / 5, rtol=1e-6)


def test_decay_weights():
  cfg = L.TGALossConfig()
  v, r, c, m = _data()
  args = (jnp.asarray(v), jnp.asarray(r), jnp.asarray(c), jnp.asarray(m))
  at0 = L.aux_losses(*args, 0.0, cfg)
  half = L.aux_losses(*args, 0.5, cfg)
  at1 = L.aux_losses(*args, 1.0, cfg)
  assert float(at1["align"]) == 0.0 and float(at1["pairwise"]) == 0.0
  np.testing.assert_allclose(float(half["align"]), 0.5 * float(at0["align"]), rtol=1e-6)
  np.testing.assert_allclose(float(half["pairwise"]), 0.25 * float(at0["pairwise"]), rtol=1e-6)
  np.testing.assert_allclose(float(at0["align"]), 0.25 * float(at0["align_raw"]), rtol=1e-6)
  np.testing.assert_allclose(float(at0["pairwise"]), 0.1 * float(at0["pairwise_raw"]), rtol=1e-6)


def _grads(cfg, which):
  v, r, c, m = (jnp.asarray(x) for x in _data(1))

  def f(v, r, c):
    out = L.aux_losses(v, r, c, m, 0.2, cfg)
    return out["align"] + out["pairwise"] if which == "both" else out[which]
  return jax.grad(f, argnums=(0, 1, 2))(v, r, c)


def test_gradient_routing():
  gv, gr, gc = _grads(L.TGALossConfig(layers=(1, 2, 3)), "both")
  assert float(jnp.abs(gv).max()) > 0
  assert float(jnp.abs(gc).max()) == 0.0          # caption branch: always stop_gradient
  assert float(jnp.abs(gr).max()) == 0.0          # retrieved branch stopped by default
  _, gr2, gc2 = _grads(L.TGALossConfig(layers=(1, 2, 3), stop_grad_retrieved=False), "pairwise")
  assert float(jnp.abs(gr2).max()) > 0 and float(jnp.abs(gc2).max()) == 0.0
  # Excluded rows get no gradient.
  m = _data(1)[3]
  assert float(jnp.abs(gv[m == 0]).max()) == 0.0 and float(jnp.abs(gv[m > 0]).max()) > 0


def test_torch_parity_same_values_zero_grads():
  v, r, c, m = (jnp.asarray(x) for x in _data(2))
  d = L.aux_losses(v, r, c, m, 0.1, L.TGALossConfig(layers=(1, 2, 3)))
  p = L.aux_losses(v, r, c, m, 0.1, L.TGALossConfig(layers=(1, 2, 3), mode="torch_parity"))
  assert float(d["align"]) == float(p["align"]) and float(d["pairwise"]) == float(p["pairwise"])
  gv, gr, gc = _grads(L.TGALossConfig(layers=(1, 2, 3), mode="torch_parity", stop_grad_retrieved=False), "both")
  for g in (gv, gr, gc):
    assert float(jnp.abs(g).max()) == 0.0


def test_lm_loss_matches_numpy():
  rs = np.random.RandomState(3)
  logits = rs.randn(2, 6, 11).astype(np.float32)
  labels = np.full((2, 6), -100, np.int32)
  labels[0, 3:5] = [4, 9]
  labels[1, 1:6] = [1, 2, 3, 0, 10]
  ce, n, correct = L.lm_loss(jnp.asarray(logits), jnp.asarray(labels))
  nll, hits, cnt = 0.0, 0, 0
  for b in range(2):
    for t in range(5):
      y = labels[b, t + 1]
      if y == -100:
        continue
      z = logits[b, t].astype(np.float64)
      nll += np.log(np.exp(z - z.max()).sum()) + z.max() - z[y]
      hits += int(np.argmax(z) == y)
      cnt += 1
  np.testing.assert_allclose(float(ce), nll / cnt, rtol=1e-5)
  assert float(n) == cnt and float(correct) == hits


def test_config_errors():
  with pytest.raises(ValueError, match="mode"):
    L.TGALossConfig(mode="exact")
  with pytest.raises(ValueError, match="norm"):
    L.TGALossConfig(norm="mean")
  with pytest.raises(ValueError, match="layers"):
    L.TGALossConfig(layers=(0, 1))
  with pytest.raises(ValueError, match="captured decoder layers"):
    L.select_layers(jnp.zeros((1, 3, 2, 4)), (2, 4))


def test_scan_masked_means_equal_returned_hidden_states():
  from vlsafe_jax.models.llama import Llama, LlamaConfig
  from flax import nnx
  cfg = LlamaConfig(vocab_size=23, hidden_size=12, intermediate_size=19, num_hidden_layers=3, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=64)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(0)
  ids = rs.randint(0, 23, (2, 9))
  att = np.ones((2, 9), np.int32)
  att[1, 7:] = 0                                     # right padding
  masks = np.zeros((2, 2, 9), np.float32)
  masks[0, 0, 1:3] = 1
  masks[0, 1, 4:8] = 1
  masks[1, 0, 2:4] = 1
  masks[1, 1, 3:7] = 1
  _, _, ex = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(att),
                   hooks=Hooks(output_hidden_states=True, hidden_masks_bmt=jnp.asarray(masks)))
  hs = ex["hidden_states"]                           # (L + 1, B, T, D)
  got = ex["hidden_masked_means"]                    # (B, L, M, D)
  for k in (1, 2, 3):
    for j in range(2):
      want = L.masked_mean(hs[k], jnp.asarray(masks[:, j]))
      np.testing.assert_allclose(np.asarray(L.select_layers(got, (k,))[:, 0, j]), np.asarray(want), rtol=1e-5,
                                 atol=1e-5)


def test_empty_spans_give_finite_gradients():
  # Text-only rows have all-zero means (empty image / retrieved / caption spans); they are excluded (m = 0) and
  # must not turn the kept rows' gradient into NaN.
  v, r, c, m = (jnp.asarray(x) for x in _data(4))
  v = v.at[1].set(0.0)
  c = c.at[1].set(0.0)
  g = jax.grad(lambda v: L.aux_losses(v, r, c, m, 0.0, L.TGALossConfig(layers=(1, 2, 3)))["align"])(v)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[0]).max()) > 0
