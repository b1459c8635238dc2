"""HySAC training pipeline: the default job (smoke-sized), run-directory files, kill-and-resume, NaN stop, sharded
step vs single device (global / local negatives), one trace, what trains, weight-decay mask, in-step clamps, and
(slow) the synthetic benchmark's phenomena after the default run's settings."""
import json
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import sharding
from vlsafe_jax.jobs import hysac as hysac_job
from vlsafe_jax.methods.hysac import losses
from vlsafe_jax.methods.hysac import model as H
from vlsafe_jax.models import clip as C
from vlsafe_jax.train import __main__ as train_main
from vlsafe_jax.train import common, hysac_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from _clip_configs import TINY  # noqa: E402

# Timing fields differ between runs; everything else in metrics.jsonl must match exactly.
TIMING = ("examples_per_s", "examples_per_s_per_device", "mfu", "timed_steps")


def _run(workdir, *overrides, config="hysac_synthetic:smoke"):
  return train_main.main(["--config", config, "--workdir", str(workdir), "train.progress=False", *overrides])


# Every test using the module-scoped smoke run is in this xdist group, so that under -n 2 one worker builds it once.
SMOKE_RUN_GROUP = pytest.mark.xdist_group("hysac_smoke_run")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  summary = _run(workdir)
  return workdir, summary


def _records(path, stage=None):
  out = []
  for line in Path(path).read_text().splitlines():
    r = json.loads(line)
    if stage is None or r.get("stage") == stage:
      out.append({k: v for k, v in r.items() if k not in TIMING})
  return out


def test_default_job_is_hysac_synthetic():
  assert train_main.DEFAULT_CONFIG == "hysac_synthetic"
  assert train_main.JOBS["hysac"] is hysac_job.run
  assert "lorentz_demo" in train_main.JOBS


@SMOKE_RUN_GROUP
def test_smoke_run_writes_run_directory(smoke_run, capsys):
  workdir, summary = smoke_run
  for f in ("config.json", "metrics.jsonl", "eval.json", "bounds.json", "summary.json", "clip_base/config.json",
            "hysac/hysac/hysac_trainable.safetensors", "hysac/wo_ent/hysac_trainable.json",
            "hysac/wo_sent/hysac_trainable.json"):
    assert (workdir / f).is_file(), f
  assert list((workdir / "plots").glob("*.png"))
  for stage in ("clip", "hysac", "hysac_wo_ent", "hysac_wo_sent"):
    assert ckpt_lib.Checkpointer(workdir / "checkpoints" / stage).latest_step() is not None, stage
  bounds = json.loads((workdir / "bounds.json").read_text())
  assert set(bounds) == {"S", "U", "V", "G"} and set(bounds["S"]) == {"avg", "up_95", "low_05"}
  recs = _records(workdir / "metrics.jsonl", "hysac")
  need = {*losses.TERM_NAMES, "loss", "curvature", "alpha_image", "alpha_text", "logit_scale", "lr", "grad_norm",
          "sat_i", "sat_iu", "sat_t", "sat_tu", "root_i", "root_tu", "tu_behind_i", "curv_at_min", "alpha_text_at_max"}
  assert recs and need <= set(recs[-1])
  raw = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert raw["examples_per_s"] > 0
  # The base weights are referenced by path, not copied into the HySAC export.
  meta = json.loads((workdir / "hysac/hysac/hysac_trainable.json").read_text())
  assert Path(meta["base_path"]) == (workdir / "clip_base").resolve()
  tensors = load_file(workdir / "hysac/hysac/hysac_trainable.safetensors")
  assert all(k.split(".")[-1] in ("lora_a", "lora_b", "curv", "visual_alpha", "textual_alpha", "logit_scale")
             for k in tensors)
  assert set(summary) == {"clip", "hysac", "wo_ent", "wo_sent"}
  # A finished run prints its results again instead of training.
  capsys.readouterr()
  again = _run(workdir)
  assert again == summary
  assert "is finished" in capsys.readouterr().out


@SMOKE_RUN_GROUP
def test_rerun_with_different_config_is_refused(smoke_run):
  workdir, _ = smoke_run
  # The error names the differing key with both values.
  with pytest.raises(ValueError, match=r"different config \(hysac\.optim\.lr: .* -> 0\.5\)"):
    _run(workdir, "hysac.optim.lr=0.5")


def _hysac_only(base, *extra):
  return ("stages=('hysac',)", "ablations=()", f"base_path={base}", "train.checkpoint_every=2", *extra)


@SMOKE_RUN_GROUP
def test_kill_and_resume_equals_uninterrupted(smoke_run, tmp_path):
  base = smoke_run[0] / "clip_base"
  _run(tmp_path / "full", *_hysac_only(base))
  with pytest.raises(common.StopAfterSteps):
    _run(tmp_path / "killed", *_hysac_only(base, "train.max_steps_this_run=3"))
  # Killed after step 3; the latest checkpoint is step 2, so step 3 is redone from the restored data position.
  assert ckpt_lib.Checkpointer(tmp_path / "killed/checkpoints/hysac").latest_step() == 2
  _run(tmp_path / "killed", *_hysac_only(base))
  a = load_file(tmp_path / "full/hysac/hysac/hysac_trainable.safetensors")
  b = load_file(tmp_path / "killed/hysac/hysac/hysac_trainable.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert _records(tmp_path / "full/metrics.jsonl") == _records(tmp_path / "killed/metrics.jsonl")


class _NaNAfter:
  """Wraps a loader: batches after the first ``n`` carry NaN pixels (a corrupt input), state methods delegate."""

  def __init__(self, loader, n):
    self.loader, self.n = loader, n
    self.steps_per_epoch = loader.steps_per_epoch

  def __next__(self):
    batch = next(self.loader)
    if self.loader.step > self.n:
      batch = {**batch, "safe_image": np.full_like(batch["safe_image"], np.nan)}
    return batch

  def get_state(self):
    return self.loader.get_state()

  def set_state(self, s):
    self.loader.set_state(s)

  def close(self):
    self.loader.close()


@SMOKE_RUN_GROUP
def test_probe_cli_on_the_run_directory(smoke_run):
  """python -m vlsafe_jax.hysac_probe on the smoke run's stage-1 CLIP: writes probe/hysac.json whose final root
  distances are those of its own history's last record and whose ordering flag agrees with them."""
  from vlsafe_jax import hysac_probe
  workdir = smoke_run[0]
  final = hysac_probe.main(["--config", "hysac_synthetic:smoke", "--workdir", str(workdir), "probe.steps=6",
                            "probe.log_every=3"])
  report = json.loads((workdir / "probe/hysac.json").read_text())
  assert report["items"] == 32 and [r["step"] for r in report["history"]] == [3, 6]
  assert report["final"]["ordered"] == final["ordered"]
  means = [final[f"mean_{k}"] for k in ("t", "i", "tu", "iu")]
  assert final["ordered"] == all(a < b for a, b in zip(means, means[1:]))
  for k in ("t", "i", "tu", "iu"):      # the history's root_* are the same sets' means (float32 vs float64)
    assert report["history"][-1][f"root_{k}"] == pytest.approx(final[f"mean_{k}"], rel=1e-5)


@SMOKE_RUN_GROUP
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(smoke_run, tmp_path, monkeypatch):
  base = smoke_run[0] / "clip_base"
  make = common.make_train_loader
  monkeypatch.setattr(common, "make_train_loader", lambda *a, **k: _NaNAfter(make(*a, **k), 5))
  with pytest.raises(common.NonFiniteLossError, match="non-finite loss .* step 6"):
    _run(tmp_path, *_hysac_only(base, "hysac.steps=8"))
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints/hysac")
  assert ck.latest_step() == 4
  meta = ck.restore(4, arrays={}, json=("meta",))["meta"]
  assert meta["stage"] == "hysac"
  assert not (tmp_path / "checkpoints/hysac/done.json").exists()


# --------------------------------------------------------------------------------------------------------------
# The train step on 8 simulated devices

OPTIM = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.2, schedule="constant",
                                       warmup_steps=0))
B = 16


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 50, size=(2, B, 7))
  ids[..., -1] = 52
  return {"safe_image": rng.normal(size=(B, 10, 10, 3)).astype(np.float32),
          "unsafe_image": rng.normal(size=(B, 10, 10, 3)).astype(np.float32),
          "safe_ids": ids[0].astype(np.int32), "unsafe_ids": ids[1].astype(np.int32)}


def _setup(mesh, negatives="global", per_device_batch=None, dropout=0.1, optim=OPTIM):
  clip = C.CLIP(TINY, rngs=nnx.Rngs(0))
  opts = H.HySACOptions(lora_rank=3, lora_dropout=dropout)
  lcfg = losses.HySACLossConfig(negatives=negatives, per_device_batch=per_device_batch)
  return hysac_trainer.build_hysac(clip, options=opts, loss_cfg=lcfg, optim=optim, total_steps=10, mesh=mesh)


def _one_device_mesh():
  return sharding.make_mesh(data=1, devices=jax.devices()[:1])


def _step(setup, n=1):
  state, metrics = setup.state, None
  for i in range(n):
    state, metrics = setup.step_fn(state, setup.frozen, sharding.shard_batch(_batch(i), setup.mesh),
                                   jax.random.key(3))
  return jax.device_get(state), jax.device_get(metrics)


# 8 simulated devices vs 1: the same global batch, the same dropout masks (one global key), but XLA sums in a
# different order (per-shard partial sums then a cross-device reduction) and may pick other SIMD widths, so float32
# results differ in the last bits. Tolerances, derived rather than fitted (u = 2^-24 = 6e-8, float32 rounding):
# - loss: a few reductions of O(B^2) = 256 O(1) terms: relative error <= ~256 u = 1.5e-5; LOSS_RTOL = 1e-4.
# - gradient tensors, per leaf: an element is a sum over the batch and over tokens/patches (16 x 7 rows per matmul)
#   carried back through 2 layers, LayerNorms and a softmax whose gradient p - y cancels, so an element near zero
#   has no meaningful relative error; the error is bounded relative to the leaf's scale, n u ~ 6e-5 of max|g| for
#   n ~ 1e3 summands on the longest path: GRAD_RTOL = 1e-4. (Measured here: <= 6e-7, whatever the XLA threading.)
#   A broken step is far outside it: sum instead of mean is 8x; image rows one shard off is ~1e-3.
# - the four 0-d scalars: see _assert_leafwise_close; SCALAR_RTOL = 1e-3 of the tree's largest gradient element
#   (a sum of ~B^2 x 7 = 1800 per-pair derivatives of that size: n u ~ 1e-4; measured 9e-5).
# - AdamW divides each update by its own RMS, so an element whose gradient is reduction-order noise moves by up to
#   lr in either direction: parameters after AdamW can only be compared to ~2 lr per step. The parameter check
#   therefore uses plain SGD (update linear in the gradient), where the error after n steps is lr x the gradient
#   error plus the rounding of p + update (the AdamW path of the same step function is covered by its metrics).
LOSS_RTOL, GRAD_RTOL, SCALAR_RTOL = 1e-4, 1e-4, 1e-3


def _assert_leafwise_close(a_tree, b_tree, what, atol_tree=None, factor=1.0):
  """Per leaf: max |a - b| <= factor x GRAD_RTOL x the leaf's max |b| (+ that leaf's ``atol_tree`` entry).

  The four 0-d scalars (curvature, alphas, logit scale) are the exception: each gradient is one sum over all B^2
  pairs and seven terms of per-pair derivatives that largely cancel (measured: curvature 1.2e-4 against a largest
  gradient element of 1e-2), so its rounding error scales with the summands, not with the sum; their bound is
  factor x SCALAR_RTOL x the largest element of the whole tree.
  """
  flat = jax.tree_util.tree_flatten_with_path(a_tree)[0]
  b_leaves = [np.asarray(b, np.float64) for b in jax.tree.leaves(b_tree)]
  tree_scale = max(np.abs(b).max() for b in b_leaves)
  atols = [0.0] * len(b_leaves) if atol_tree is None else jax.tree.leaves(atol_tree)
  for (path, a), b, atol in zip(flat, b_leaves, atols):
    a = np.asarray(a, np.float64)
    bound = SCALAR_RTOL * tree_scale if b.ndim == 0 else GRAD_RTOL * np.abs(b).max()
    assert bound > 0, (what, jax.tree_util.keystr(path), "all-zero leaf: the comparison would be vacuous")
    err = np.abs(a - b).max()
    assert err <= factor * bound + atol, (what, jax.tree_util.keystr(path), err, bound, atol)


def _nonzero_lora_b(params, seed=7):
  """``params`` with every LoRA B drawn from N(0, 0.05^2) instead of zeros, so that every LoRA A has a gradient."""
  rng = np.random.default_rng(seed)
  def one(path, x):
    x = np.asarray(x)
    if str(path[-1].key) == "lora_b":
      return rng.normal(scale=0.05, size=x.shape).astype(x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(one, jax.device_get(params))


def _loss_and_grads(setup, params, batch_seed=0, step=0):
  """The trainer's own objective and its gradients at ``params`` (placed like the state), on ``setup``'s mesh."""
  loss_fn = hysac_trainer.make_loss_fn(setup.graphdef, setup.loss_cfg)
  params = jax.device_put(params, setup.state_sh["params"])
  batch = sharding.shard_batch(_batch(batch_seed), setup.mesh)
  key = jax.random.fold_in(jax.random.key(3), step)
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      hysac_trainer.clamp_params(params), setup.frozen, batch, key)
  return float(loss), jax.device_get(grads)


def _sgd_steps(setup, params, lr, n):
  """``n`` steps of the trainer's jitted step with SGD instead of AdamW, from ``params``: (params, metrics, step)."""
  tx = optax.sgd(lr)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = common.train_state_shardings(tx, abstract, setup.state_sh["params"], setup.mesh)
  step_fn = hysac_trainer.make_train_step(setup.graphdef, setup.loss_cfg, tx, state_sh=state_sh, mesh=setup.mesh)
  state = common.init_train_state(tx, jax.device_put(params, setup.state_sh["params"]), state_sh)
  metrics = []
  for i in range(n):
    state, m = step_fn(state, setup.frozen, sharding.shard_batch(_batch(i), setup.mesh), jax.random.key(3))
    metrics.append(jax.device_get(m))
  return jax.device_get(state["params"]), metrics, step_fn


def test_sharded_step_equals_single_device_global_negatives():
  assert jax.device_count() == 8
  s8 = _setup(sharding.make_mesh(data=8))
  s1 = _setup(_one_device_mesh())
  # Loss and every gradient leaf (dropout on, 0.1: the masks come from one global key, so they do not depend on
  # the device count), at a point where LoRA B is non-zero so that no leaf's gradient is trivially zero.
  params = _nonzero_lora_b(s1.state["params"])
  (l8, g8), (l1, g1) = _loss_and_grads(s8, params), _loss_and_grads(s1, params)
  np.testing.assert_allclose(l8, l1, rtol=LOSS_RTOL)
  _assert_leafwise_close(g8, g1, "gradients")
  # The trainer's step (make_update_fn: clamp, gradients, update, metrics) with SGD (lr 0.1), two steps from the
  # same point. Each SGD update is lr x gradient, then rounded into the parameter: besides lr x the gradient error,
  # the two runs may round p + update to neighbouring floats, one ulp of |p| (<= 2 u |p|) per step.
  p8, m8, step8 = _sgd_steps(s8, params, 0.1, 2)
  p1, m1, _ = _sgd_steps(s1, params, 0.1, 2)
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=GRAD_RTOL)    # norm of the whole tree
  delta = lambda p: jax.tree.map(lambda x, x0: np.asarray(x, np.float64) - x0, p, params)
  ulps = jax.tree.map(lambda x0: 2 * 2 * 2.0 ** -24 * np.abs(x0).max(), params)
  # Two steps: the second gradient is taken where the parameters already differ by lr x the first one's error.
  _assert_leafwise_close(delta(p8), delta(p1), "SGD updates after 2 steps", ulps, factor=2)
  assert step8._cache_size() == 1        # one trace/compilation for repeated steps


def test_local_negatives_are_mean_of_per_shard_losses():
  mesh = sharding.make_mesh(data=8)
  setup = _setup(mesh, "local", per_device_batch=B // 8, dropout=0.0)
  params0 = jax.device_get(setup.state["params"])
  _, m = _step(setup)
  model = hysac_trainer.eval_model(setup, params0)
  e = model.embed_quadruplet({k: jnp.asarray(v) for k, v in _batch(0).items()})
  c, s = model.curvature(), model.logit_scale()
  one = losses.HySACLossConfig(negatives="global")
  shard_totals = [losses.hysac_loss(*(x[g * 2:(g + 1) * 2] for x in e), c, s, one)[0] for g in range(8)]
  np.testing.assert_allclose(m["loss"], np.mean(shard_totals), rtol=2e-5)
  glob = losses.hysac_loss(*e, c, s, one)[0]
  assert abs(float(glob) - m["loss"]) > 1e-3    # global negatives give a different loss on this batch


def _host(tree):
  key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if key(x) else x), tree)


def test_only_lora_and_scalars_change_and_clamp_in_step():
  setup = _setup(_one_device_mesh())
  frozen_before = _host(setup.frozen)
  p0 = jax.tree.map(np.asarray, jax.device_get(setup.state["params"]))
  leaf_names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(p0)[0]}
  assert leaf_names == {"lora_a", "lora_b", "curv", "visual_alpha", "textual_alpha", "logit_scale"}
  # An out-of-range log-curvature is clamped to log 10 before the forward pass (inside the jitted step).
  state = dict(setup.state)
  state["params"] = {**state["params"], "scalars": {**state["params"]["scalars"], "curv": jnp.float32(7.0)}}
  new, m = setup.step_fn(state, setup.frozen, sharding.shard_batch(_batch(), setup.mesh), jax.random.key(0))
  assert float(m["curvature"]) == pytest.approx(10.0, rel=1e-6)
  p1 = jax.device_get(new["params"])
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p0)[0], jax.tree.leaves(p1)):
    assert not np.array_equal(a, b), path    # every trainable leaf moved (lora_b from zeros, scalars by Adam)
  chex.assert_trees_all_equal(frozen_before, _host(setup.frozen))


def test_scalar_lr_multiplier_scales_only_the_scalars():
  """hysac.optim.scalar_lr_multiplier m: the scalars' AdamW update is m times the m = 1 update (same gradients, same
  moments, no weight decay on them); LoRA updates are unchanged."""
  mesh = _one_device_mesh()
  half = ml_collections.ConfigDict(dict(OPTIM.to_dict(), scalar_lr_multiplier=0.25))
  p0 = jax.device_get(_setup(mesh).state["params"])
  full, _ = _step(_setup(mesh))
  quarter, _ = _step(_setup(mesh, optim=half))
  for name in p0["scalars"]:
    d_full = float(full["params"]["scalars"][name]) - float(p0["scalars"][name])
    d_quarter = float(quarter["params"]["scalars"][name]) - float(p0["scalars"][name])
    assert abs(d_full) > 1e-4, name
    assert d_quarter == pytest.approx(0.25 * d_full, rel=1e-4, abs=1e-7), name
  chex.assert_trees_all_close(full["params"]["clip"], quarter["params"]["clip"], rtol=1e-6, atol=1e-7)


def test_weight_decay_skips_scalars():
  setup = _setup(_one_device_mesh())
  cfg = ml_collections.ConfigDict(dict(OPTIM.to_dict(), lr=1.0, weight_decay=0.5))
  params = jax.device_get(setup.state["params"])
  tx, _ = common.make_optimizer(cfg, 10, H.trainable_mask_wd(nnx.state(hysac_trainer.eval_model(setup), H.TRAINABLE)))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for name, u in updates["scalars"].items():
    assert float(u) == 0.0, name
  a = params["clip"]["vision_model"]["embeddings"]["patch_embedding"]["lora_a"]
  ua = updates["clip"]["vision_model"]["embeddings"]["patch_embedding"]["lora_a"]
  np.testing.assert_allclose(ua, -0.5 * a, rtol=1e-6)


def test_early_stopping_rule_and_persistence(tmp_path):
  """hysac.md §5.3: patience resets when recall OR loss improves, counts down when neither does, stops at 0; each
  improvement saves its best checkpoint; the counter survives a restart (resume)."""
  state = {"w": jnp.arange(3.0)}
  stop = hysac_trainer.EarlyStopping(tmp_path, patience=2)
  assert not stop.update(1, state, {"val_recall_sum": 10.0, "val_loss": 5.0})      # both improve
  assert not stop.update(2, state, {"val_recall_sum": 9.0, "val_loss": 4.0})       # loss improves: reset
  assert stop.s["left"] == 2
  assert not stop.update(3, state, {"val_recall_sum": 9.0, "val_loss": 6.0})       # neither: 1 left
  stop.close()
  resumed = hysac_trainer.EarlyStopping(tmp_path, patience=2)
  assert resumed.s == {"best_recall": 10.0, "best_loss": 4.0, "left": 1}
  assert resumed.update(4, state, {"val_recall_sum": 10.0, "val_loss": 4.0})       # ties do not improve: stop
  assert resumed.best["best_recall"].latest_step() == 1
  assert resumed.best["best_validation_loss"].latest_step() == 2
  resumed.close()
  never = hysac_trainer.EarlyStopping(tmp_path / "off", patience=0)                  # patience 0: never stops
  assert not any(never.update(i, state, {"val_recall_sum": 0.0, "val_loss": 9.0}) for i in range(1, 4))
  never.close()


def test_validation_runs_each_epoch_and_early_stop_ends_the_stage(tmp_path):
  """train.validate: one validation record per epoch in metrics.jsonl; with patience 1 and a learning rate of 0
  nothing can improve after epoch 1, so the stage stops after epoch 2 with an early_stop event."""
  _run(tmp_path, "train.validate=True", "train.early_stopping_patience=1", "hysac.optim.lr=0.0", "hysac.epochs=4",
       "ablations=()", 'stages=("clip", "hysac")', "clip_stage.epochs=1")
  recs = _records(tmp_path / "metrics.jsonl", "hysac")
  val = [r for r in recs if "val_loss" in r]
  assert [r["epoch"] for r in val] == [1, 2], val
  assert all(np.isfinite(r["val_loss"]) and 0.0 <= r["val_recall_sum"] <= 600.0 for r in val)
  assert val[0]["val_loss"] == val[1]["val_loss"]                                   # lr 0: nothing moved
  assert any(r.get("event") == "early_stop" for r in recs)
  assert max(r["step"] for r in recs) < 4 * max(r["step"] for r in val[:1])


def test_stage1_logit_scale_options():
  """clip_model.logit_scale_init reaches the stage-1 CLIP; clip_stage.logit_scale_max caps it before each step."""
  from vlsafe_jax.train import clip_trainer
  from configs import hysac_synthetic
  cfg = hysac_synthetic.get_config("smoke")
  assert clip_trainer.synthetic_clip_config(cfg.clip_model, cfg.data).logit_scale_init_value == pytest.approx(2.6592)
  cfg.clip_model.logit_scale_init = 4.6052
  assert clip_trainer.synthetic_clip_config(cfg.clip_model, cfg.data).logit_scale_init_value == pytest.approx(4.6052)
  clamp = clip_trainer.clamp_logit_scale(3.0)
  assert float(clamp({"logit_scale": jnp.float32(5.0)})["logit_scale"]) == 3.0
  assert float(clamp({"logit_scale": jnp.float32(-1.0)})["logit_scale"]) == 0.0
  assert float(clamp({"logit_scale": jnp.float32(2.0)})["logit_scale"]) == 2.0


# --------------------------------------------------------------------------------------------------------------
# The synthetic benchmark's phenomena (the default run's settings)

@pytest.mark.slow
def test_synthetic_phenomena(tmp_path):
  """What the default job robustly shows on the synthetic test split (512 items): the default stage-1 CLIP and HySAC
  for the default 5 epochs, without the ablations to fit CI (~1.5 min on 2 cores).

  Asserted (observed, issue 5): plain CLIP is fooled by unsafe queries (T*->I u I* top-1 is an unsafe image for
  ~70 % of queries: %safe 26.8 on one device, 30.7 here); HySAC's cross-safety contrastive terms redirect them
  (default run on one device: R@1 0.4 -> 7.0, %safe 26.8 -> 46.3; here 0.6 -> 3.1 and 30.7 -> 46.3). The R@1 gain
  varies a lot between runs that differ only in float reduction order (8 simulated devices vs 1: +2.5 vs +6.6) or in
  the dropout stream (a 3-epoch cut: +3.1 with jax.random masks, +1.2 with the hashed ones), so it is asserted at
  +1 (and the %safe gain, +15.6 / +19.5, at +8).

  NOT reached (measured, see configs/hysac_synthetic.py and the README's "Further measurements"): the paper's
  root-distance ordering T < I < T* < I* (every setting tried ends at the clipped-aperture radius 2K, or, where that
  is prevented, with T* just behind I on the flat phi ~ pi side of I's cone), an R@1 gain of +10 over CLIP, and any
  win over the "w/o Ent" ablation (default run: 7.6 vs HySAC 7.0). Traversal moves no query because all root
  distances stay below tau. The four mean root distances differ by < 0.03 (here T 0.293, I 0.309, T* 0.300,
  I* 0.312; on one device 0.291 / 0.313 / 0.298 / 0.317), which is not an ordering worth asserting; even MERU's
  d(0,T) < d(0,I), true in every run so far, is not asserted because its margin was 0.0009 in an earlier run.
  """
  # The test session simulates 8 devices: 8 x 8 quadruplets with global negatives is the CLI's one-device step
  # (64 quadruplets, one local group of 64).
  summary = _run(tmp_path, "train.checkpoint_every=1000", "eval.plots=False", "ablations=()",
                 "hysac.batch_size_per_device=8", "hysac.loss.negatives=global", config="hysac_synthetic")
  h, clip = summary["hysac"], summary["clip"]
  print(json.dumps(summary, indent=1))
  assert clip["T*->I u I* %safe"] < 50.0, clip
  assert h["T*->I u I* R@1 traversal"] >= clip["T*->I u I* R@1"] + 1.0, (h, clip)
  assert h["T*->I u I* %safe traversal"] >= clip["T*->I u I* %safe"] + 8.0, (h, clip)
