"""UWM pure math: saliency factorisation vs the naive per-weight formula, selection, editing (uwm.md §3-§5)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlsafe_jax import _compat, sharding
from vlsafe_jax.methods.uwm import edit, saliency

# --------------------------------------------------------------------------------------------------------------
# Independent float64 references, written plainly from uwm.md §3 (torch layout W: (d_out, d_in)).


def naive_scores(w_oi, xs_ntd, xu_ntd, eps, aggregation, prior, vs_nt=None, vu_nt=None):
  """Builds the full N x d_out x d_in psi tensors exactly as in uwm.md §3 and aggregates them.

  Pairs where either side has fewer than 2 valid tokens are excluded. Returns R in torch layout (d_out, d_in).
  """
  w = np.asarray(w_oi, np.float64)
  d_out, d_in = w.shape

  def psi(x_ntd, v_nt):
    out = []
    for n in range(x_ntd.shape[0]):
      x = np.asarray(x_ntd[n], np.float64)
      if v_nt is not None:
        x = x[np.asarray(v_nt[n], bool)]
      a = np.sqrt(np.sum(x ** 2, axis=0))                       # (d_in,)
      s = np.std(x, axis=0, ddof=1) if x.shape[0] >= 2 else np.full(d_in, np.nan)
      o = np.array([np.sum(np.abs(w[i, :]) * a) / d_in for i in range(d_out)])
      inp = np.array([a[j] * np.sum(np.abs(w[:, j])) / d_out for j in range(d_in)])
      phi = np.empty((d_out, d_in))
      for i in range(d_out):
        for j in range(d_in):
          phi[i, j] = o[i] * inp[j]
      out.append(phi / (s[None, :] + eps))
    return np.stack(out)

  ps, pu = psi(xs_ntd, vs_nt), psi(xu_ntd, vu_nt)
  keep = np.ones(ps.shape[0], bool)
  for v in (vs_nt, vu_nt):
    if v is not None:
      keep &= np.asarray(v).sum(-1) >= 2
  ps, pu = ps[keep], pu[keep]
  r = np.mean(pu / ps, axis=0) if aggregation == "mean_of_ratios" else pu.mean(0) / ps.mean(0)
  return np.abs(w) * r if prior else r


def numpy_select(r, tau):
  """Float64 reference of uwm.md §5: the smallest descending prefix whose share reaches tau."""
  p = np.ravel(np.asarray(r, np.float64))
  p = p / p.sum()
  order = np.argsort(-p, kind="stable")
  c = np.cumsum(p[order])
  m = 0 if tau <= 0 else min(int(np.searchsorted(c, tau, side="left")) + 1, p.size)
  mask = np.zeros(p.size, bool)
  mask[order[:m]] = True
  return mask.reshape(np.shape(r))


def run_scores(kernel_io, xs, xu, cfg, vs=None, vu=None, batch_sizes=None):
  """Accumulates through the jitted per-batch update (optionally in several batches) and finalizes."""
  n = xs.shape[0]
  batch_sizes = batch_sizes or [n]
  accs = saliency.init_accumulators({"l": kernel_io}, cfg.aggregation)
  start = 0
  for b in batch_sizes:
    sl = slice(start, start + b)
    vs_b = None if vs is None else jnp.asarray(vs[sl])
    vu_b = None if vu is None else jnp.asarray(vu[sl])
    keep = saliency.pairs_ok(vs_b, vu_b, b)
    accs = saliency.update(accs, {"l": saliency.layer_stats(xs[sl], vs_b)},
                           {"l": saliency.layer_stats(xu[sl], vu_b)}, {"l": kernel_io}, cfg,
                           keep_b=keep, offset=start)
    start += b
  return accs, saliency.finalize_all(accs, {"l": kernel_io}, cfg)["l"]


# --------------------------------------------------------------------------------------------------------------
# Golden example uwm.md §5.1

W_GOLD = np.array([[1, -2, 0.5], [0.25, 1, -1]])
XS_GOLD = np.array([[[1, 0, 2], [0, 1, 1], [2, 1, 0]], [[0.5, 1, 1], [1, 0, 2], [1.5, 2, 0.5]]], np.float32)
XU_GOLD = np.array([[[2, 0, 1], [1, 3, 0], [0, 1, 2]], [[1, 1, 0], [2, 0.5, 1], [0, 2, 3]]], np.float32)
R_MOR = [[1.1179069747343797, 1.4139804481782752, 1.169757088919602],
         [1.0673188385662085, 1.4055375191504864, 1.1229608582530721]]
R_ROM = [[0.9660708818070168, 1.4185442993520374, 1.075528458958376],
         [0.9524419449153811, 1.413908437991506, 1.056187373471561]]
R_MOR_PRIOR = [[1.1179069747343797, 2.8279608963565503, 0.584878544459801],
               [0.2668297096415521, 1.4055375191504864, 1.1229608582530721]]
SHARES = [[0.15319120763255997, 0.19376332496424922, 0.1602964335479879],
          [0.14625891554866463, 0.19260635705640494, 0.15388376125013334]]
SELECTIONS = {0.02: [[0, 1, 0], [0, 0, 0]], 0.3: [[0, 1, 0], [0, 1, 0]], 0.5: [[0, 1, 1], [0, 1, 0]]}


@pytest.mark.parametrize("aggregation,prior,golden", [
    ("mean_of_ratios", False, R_MOR), ("ratio_of_means", False, R_ROM), ("mean_of_ratios", True, R_MOR_PRIOR)])
def test_golden_scores(aggregation, prior, golden):
  cfg = saliency.ScoreConfig(aggregation, eps=1e-8, magnitude_prior=prior)
  _, r_io = run_scores(jnp.asarray(W_GOLD.T, jnp.float32), XS_GOLD, XU_GOLD, cfg)
  chex.assert_shape(r_io, (3, 2))
  assert r_io.dtype == jnp.float32
  # float32 computation vs float64 golden values.
  np.testing.assert_allclose(np.asarray(r_io).T, golden, rtol=2e-6)


def test_golden_shares_and_selection():
  r_io = jnp.asarray(np.array(R_MOR).T, jnp.float32)
  np.testing.assert_allclose(np.asarray(r_io / r_io.sum()).T, SHARES, rtol=1e-6)
  for tau, want in SELECTIONS.items():
    np.testing.assert_array_equal(np.asarray(edit.select(r_io, tau)).T, np.array(want, bool), err_msg=f"tau={tau}")
  # Also the ascending formulation of the reference (select c_asc > 1 - tau), in float64.
  for tau, want in SELECTIONS.items():
    p = np.ravel(np.array(R_MOR)) / np.sum(R_MOR)
    order = np.argsort(p)
    sel = np.zeros(p.size, bool)
    sel[order[np.cumsum(p[order]) > 1 - tau]] = True
    np.testing.assert_array_equal(sel.reshape(2, 3), np.array(want, bool))


# --------------------------------------------------------------------------------------------------------------
# Factorised == naive on random tiny layers with prime dims

D_IN, D_OUT, T, N = 13, 7, 5, 11


def _random_layer(seed, masked):
  rng = np.random.default_rng(seed)
  w_oi = rng.normal(size=(D_OUT, D_IN))
  xs = rng.normal(size=(N, T, D_IN)).astype(np.float32)
  xu = (rng.normal(size=(N, T, D_IN)) * 1.5 + 0.3).astype(np.float32)
  vs = vu = None
  if masked:
    # Right-padded text masks with 2..T valid tokens; pair 4 has a single valid unsafe token (dropped).
    len_s = rng.integers(2, T + 1, size=N)
    len_u = rng.integers(2, T + 1, size=N)
    len_u[4] = 1
    vs = np.arange(T)[None, :] < len_s[:, None]
    vu = np.arange(T)[None, :] < len_u[:, None]
  return w_oi, xs, xu, vs, vu


@pytest.mark.parametrize("aggregation", saliency.AGGREGATIONS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("prior", [False, True])
def test_factorised_matches_naive(aggregation, masked, prior):
  seed = 100 + 4 * saliency.AGGREGATIONS.index(aggregation) + 2 * masked + prior
  w_oi, xs, xu, vs, vu = _random_layer(seed, masked)
  eps = 0.0 if masked else 1e-8   # text setting (eps 0) with masks, vision setting without
  cfg = saliency.ScoreConfig(aggregation, eps=eps, magnitude_prior=prior)
  accs, r_io = run_scores(jnp.asarray(w_oi.T, jnp.float32), xs, xu, cfg, vs, vu)
  want = naive_scores(w_oi, xs, xu, eps, aggregation, prior, vs, vu)
  # float32 factorised vs float64 naive: relative 1e-5.
  np.testing.assert_allclose(np.asarray(r_io).T, want, rtol=1e-5)
  assert int(accs["l"].count) == N - (1 if masked else 0)
  assert int(accs["l"].dropped) == (1 if masked else 0)


def test_layer_stats_matches_numpy_and_accumulates_float32():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, T, D_IN)).astype(np.float32)
  valid = np.arange(T)[None, :] < np.array([5, 3, 2])[:, None]
  a, s = saliency.layer_stats(jnp.asarray(x, jnp.bfloat16), jnp.asarray(valid))
  assert a.dtype == s.dtype == jnp.float32
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
  for b in range(3):
    xv = xb[b][valid[b]]
    np.testing.assert_allclose(np.asarray(a[b]), np.linalg.norm(xv, axis=0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s[b]), np.std(xv, axis=0, ddof=1), rtol=1e-5)


def test_padding_tokens_are_ignored():
  w_oi, xs, xu, vs, vu = _random_layer(1, masked=True)
  cfg = saliency.ScoreConfig("mean_of_ratios", eps=0.0, magnitude_prior=True)
  k = jnp.asarray(w_oi.T, jnp.float32)
  _, r1 = run_scores(k, xs, xu, cfg, vs, vu)
  xs2, xu2 = xs.copy(), xu.copy()
  xs2[~vs] = 1e4
  xu2[~vu] = np.nan  # even NaN in padded positions must not leak
  _, r2 = run_scores(k, xs2, xu2, cfg, vs, vu)
  np.testing.assert_array_equal(np.asarray(r1), np.asarray(r2))


def test_batched_accumulation_equals_one_batch():
  w_oi, xs, xu, vs, vu = _random_layer(2, masked=True)
  for agg in saliency.AGGREGATIONS:
    cfg = saliency.ScoreConfig(agg, eps=0.0)
    k = jnp.asarray(w_oi.T, jnp.float32)
    a1, r1 = run_scores(k, xs, xu, cfg, vs, vu)
    a2, r2 = run_scores(k, xs, xu, cfg, vs, vu, batch_sizes=[4, 4, 3])
    np.testing.assert_allclose(np.asarray(r2), np.asarray(r1), rtol=1e-6)
    assert int(a1["l"].count) == int(a2["l"].count) and int(a1["l"].dropped) == int(a2["l"].dropped) == 1


def test_fused_calibration_step_matches_two_stage():
  w_oi, xs, xu, vs, vu = _random_layer(5, masked=True)
  cfg = saliency.ScoreConfig("mean_of_ratios", eps=0.0, magnitude_prior=True)
  k = jnp.asarray(w_oi.T, jnp.float32)
  _, want = run_scores(k, xs, xu, cfg, vs, vu)
  step = jax.jit(saliency.stats_and_update, static_argnames=("cfg",))
  accs = step(saliency.init_accumulators({"l": k}), {"l": xs}, {"l": xu}, {"l": k}, cfg,
              valid_safe_bt=vs, valid_unsafe_bt=vu)
  assert int(accs["l"].dropped) == 1
  np.testing.assert_allclose(np.asarray(saliency.finalize_all(accs, {"l": k}, cfg)["l"]), np.asarray(want),
                             rtol=1e-6)


def test_nonfinite_sample_raises_with_its_index():
  w_oi, xs, xu, _, _ = _random_layer(3, masked=False)
  xu = xu.copy()
  xu[7, :, 2] = 0.5   # a constant feature: std 0 and eps 0 (text) -> infinite psi^uns for dataset sample 7
  for agg in saliency.AGGREGATIONS:
    cfg = saliency.ScoreConfig(agg, eps=0.0)
    with pytest.raises(saliency.NonFiniteRatioError, match=r"'l'.*sample 7"):
      run_scores(jnp.asarray(w_oi.T, jnp.float32), xs, xu, cfg, batch_sizes=[4, 4, 3])
    # With the vision eps the same sample is finite.
    run_scores(jnp.asarray(w_oi.T, jnp.float32), xs, xu, saliency.ScoreConfig(agg, eps=1e-8))


def test_sharded_batch_gives_same_scores():
  rng = np.random.default_rng(4)
  n = 16
  w_oi = rng.normal(size=(D_OUT, D_IN))
  k = jnp.asarray(w_oi.T, jnp.float32)
  st_s = saliency.layer_stats(rng.normal(size=(n, T, D_IN)).astype(np.float32))
  st_u = saliency.layer_stats(rng.normal(size=(n, T, D_IN)).astype(np.float32))
  st_s, st_u = jax.tree.map(np.asarray, (st_s, st_u))
  for agg in saliency.AGGREGATIONS:
    cfg = saliency.ScoreConfig(agg)
    ref = saliency.update(saliency.init_accumulators({"l": k}, agg), {"l": st_s}, {"l": st_u}, {"l": k}, cfg)
    mesh = sharding.make_mesh(data=-1)
    sh_s, sh_u = sharding.shard_batch((st_s, st_u), mesh)
    assert len(sh_s[0].sharding.device_set) == 8
    out = saliency.update(saliency.init_accumulators({"l": k}, agg), {"l": sh_s}, {"l": sh_u}, {"l": k}, cfg)
    # The accumulators are sums over n x T = 80 rows, reduced per shard then across 8 devices: relative error
    # <= 80 u ~ 5e-6 for sums of positive terms, and the scores are ratios of two such sums.
    np.testing.assert_allclose(np.asarray(saliency.finalize_all(out, {"l": k}, cfg)["l"]),
                               np.asarray(saliency.finalize_all(ref, {"l": k}, cfg)["l"]), rtol=2e-5)


# --------------------------------------------------------------------------------------------------------------
# Selection


def test_tau_below_max_share_selects_only_argmax_and_zero_selects_nothing():
  r = jnp.asarray(np.random.default_rng(5).uniform(0.1, 2.0, size=(13, 7)), jnp.float32)
  p_max = float(jnp.max(r) / jnp.sum(r))
  for tau in (1e-9, 0.5 * p_max, p_max):
    m = np.asarray(edit.select(r, tau))
    assert m.sum() == 1 and m.ravel()[np.argmax(np.asarray(r))]
  assert not np.asarray(edit.select(r, 0.0)).any()
  assert np.asarray(edit.select(r, 1.0)).all()


@pytest.mark.parametrize("tau", [0.02, 0.085, 0.3])
def test_selected_share_reaches_tau_and_is_minimal(tau):
  r = np.random.default_rng(6).lognormal(size=(13, 7)).astype(np.float32)
  m = np.asarray(edit.select(jnp.asarray(r), tau))
  p = r.astype(np.float64) / r.astype(np.float64).sum()
  assert p[m].sum() >= tau
  # Minimal: dropping the smallest selected entry falls below tau; every selected entry outranks every other.
  assert p[m].sum() - p[m].min() < tau
  assert p[m].min() >= p[~m].max()
  np.testing.assert_array_equal(m, numpy_select(r, tau))


def test_selection_matches_float64_reference_on_a_big_layer():
  r = np.random.default_rng(7).lognormal(sigma=0.5, size=(512, 1021)).astype(np.float32)
  for tau in (0.02, 0.085):
    m = np.asarray(edit.select_all({"big": jnp.asarray(r)}, tau)["big"])
    want = numpy_select(r, tau)
    # uwm.md §5 precision note: a handful of boundary entries may differ between float32 and float64.
    assert np.sum(m != want) <= 4, (tau, np.sum(m != want))
    assert abs(int(m.sum()) - int(want.sum())) <= 4


def test_share_exactly_reaching_tau_stops_there():
  # Shares 0.25 each (exact in float32): tau = 0.5 is reached by exactly two entries, 0.5 + 1e-6 needs three.
  r = jnp.ones((2, 2), jnp.float32)
  assert int(edit.select(r, 0.5).sum()) == 2
  assert int(edit.select(r, 0.5 + 1e-6).sum()) == 3
  np.testing.assert_array_equal(np.asarray(edit.select(r, 0.5)), [[True, True], [False, False]])  # lower index first


def test_select_all_rejects_non_positive_scores():
  with pytest.raises(ValueError, match="'bad'"):
    edit.select_all({"bad": jnp.asarray([[1.0, 0.0], [2.0, 3.0]])}, 0.1)


# --------------------------------------------------------------------------------------------------------------
# Editing


class _Layer(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(5, 11, rngs=rngs)
    self.fc2 = nnx.Linear(11, 5, rngs=rngs)


class _Model(nnx.Module):
  """Mirrors HF paths: vision_model.encoder.layers.{i}.mlp.fc2."""

  def __init__(self, rngs):
    self.vision_model = nnx.Dict(encoder=nnx.Dict(layers=nnx.List(
        [nnx.Dict(mlp=_Layer(rngs)) for _ in range(3)])))


def _copy_tree(state):
  return jax.tree.map(lambda x: np.array(x, copy=True), nnx.to_pure_dict(state))


def _masks(state, density, seed):
  ks = edit.find_targets(state, edit.VISION_TARGETS)
  rng = np.random.default_rng(seed)
  return ks, {p: jnp.asarray(rng.random(k.shape) < density) for p, k in ks.items()}


def test_find_targets_default_patterns():
  state = nnx.state(_Model(nnx.Rngs(0)))
  ks = edit.find_targets(state, edit.VISION_TARGETS)
  assert list(ks) == [f"vision_model.encoder.layers.{i}.mlp.fc2" for i in range(3)]
  chex.assert_shape(list(ks.values()), (11, 5))
  # Suffix match: the same pattern finds a tower nested in a bigger model (LLaVA).
  nested = {"llava": {"vision_tower": nnx.to_pure_dict(state)}}
  assert len(edit.find_targets(nested, edit.VISION_TARGETS)) == 3
  with pytest.raises(ValueError, match="match no"):
    edit.find_targets(state, edit.TEXT_TARGETS)


def test_default_patterns_find_clip_targets():
  from vlsafe_jax.models import clip
  cfg = clip.CLIPConfig(
      text_config=clip.CLIPTextConfig(vocab_size=31, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=7, projection_dim=4),
      vision_config=clip.CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=8, intermediate_size=12,
                                          num_hidden_layers=3, num_attention_heads=2, projection_dim=4),
      projection_dim=4)
  state = nnx.state(_compat.eval_shape(lambda: clip.CLIP(cfg, rngs=nnx.Rngs(0))))
  ucfg = edit.UWMConfig()
  vis = edit.find_targets(state, ucfg.vision.targets)
  txt = edit.find_targets(state, ucfg.text.targets)
  assert list(vis) == [f"vision_model.encoder.layers.{i}.mlp.fc2" for i in range(3)]
  assert list(txt) == [f"text_model.encoder.layers.{i}.self_attn.out_proj" for i in range(2)]
  assert vis["vision_model.encoder.layers.0.mlp.fc2"].shape == (12, 8)


@pytest.mark.parametrize("alpha,density", [(1.0, 0.5), (-1.0, 0.0)])
def test_identity_edits_are_bit_identical(alpha, density):
  state = nnx.state(_Model(nnx.Rngs(1)))
  before = _copy_tree(state)
  _, masks = _masks(state, density, 0)
  out = edit.apply(state, masks, alpha)
  chex.assert_trees_all_equal(_copy_tree(out), before)
  assert jax.tree.structure(out) == jax.tree.structure(state)


def _node(tree, path):
  for part in path.split("."):
    tree = tree[int(part)] if part.isdigit() else tree[part]
  return tree


def test_apply_negates_selected_and_leaves_input_untouched():
  model = _Model(nnx.Rngs(2))
  state = nnx.state(model)
  before = _copy_tree(state)
  ks, masks = _masks(state, 0.3, 1)
  out = edit.apply(state, masks, -1.0)
  chex.assert_trees_all_equal(_copy_tree(state), before)             # input pytree unchanged
  chex.assert_trees_all_equal(_copy_tree(nnx.state(model)), before)  # and the model it came from
  # Expected: the original tree with only the masked kernel entries negated (biases, fc1 untouched).
  want = _copy_tree(state)
  for p in ks:
    k = _node(want, p)["kernel"]
    _node(want, p)["kernel"] = np.where(np.asarray(masks[p]), -k, k)
  chex.assert_trees_all_equal(_copy_tree(out), want)
  assert any(np.asarray(m).any() for m in masks.values())
  # Plain nested dicts give the same result.
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, edit.apply(nnx.to_pure_dict(state), masks, -1.0)), want)


def test_apply_rejects_unknown_layers_and_bad_shapes():
  state = nnx.state(_Model(nnx.Rngs(3)))
  with pytest.raises(KeyError, match="nope"):
    edit.apply(state, {"nope": jnp.zeros((11, 5), bool)})
  with pytest.raises(ValueError, match=r"layers\.0\.mlp\.fc2.*\(5, 11\)"):
    edit.apply(state, {"vision_model.encoder.layers.0.mlp.fc2": jnp.zeros((5, 11), bool)})


def test_masked_dense_matches_rewritten_kernel_and_sweeps_alpha():
  lin = nnx.Linear(11, 5, rngs=nnx.Rngs(4))
  mask = jnp.asarray(np.random.default_rng(8).random((11, 5)) < 0.2)
  md = edit.MaskedDense(lin, mask, alpha=-1.0)
  x = jnp.asarray(np.random.default_rng(9).normal(size=(3, 11)), jnp.float32)

  @nnx.jit
  def fwd(m, x):
    return m(x)

  for alpha in (-1.0, 0.0, 0.5):
    md.alpha.set_value(jnp.float32(alpha))
    k = edit.masked_kernel(lin.kernel.get_value(), mask, alpha)
    np.testing.assert_allclose(np.asarray(fwd(md, x)), np.asarray(x @ k + lin.bias.get_value()), rtol=1e-6)
  md.alpha.set_value(jnp.float32(1.0))
  np.testing.assert_allclose(np.asarray(fwd(md, x)), np.asarray(lin(x)), rtol=1e-6)
  # The wrapped layer's parameters are never rewritten.
  assert not isinstance(md.mask, nnx.Param)


def test_uwm_config_defaults():
  c = edit.UWMConfig()
  assert (c.vision.tau, c.vision.alpha, c.vision.eps, c.vision.magnitude_prior) == (0.02, -1.0, 1e-8, False)
  assert (c.text.tau, c.text.alpha, c.text.eps, c.text.magnitude_prior) == (0.02, -1.0, 0.0, True)
  assert c.aggregation == "mean_of_ratios"
  assert c.score_config("text") == saliency.ScoreConfig("mean_of_ratios", 0.0, True)
  assert edit.UWMConfig.llava().vision.tau == 0.085
  with pytest.raises(ValueError, match="aggregation"):
    edit.UWMConfig(aggregation="sum")
