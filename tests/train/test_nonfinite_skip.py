"""``train.nonfinite="skip"`` in the shared loop (vlsafe_jax/train/common.py) on a toy least-squares model.

A step whose loss is NaN (a NaN input row), or whose loss is finite but whose gradient is not (``0 * sqrt(z)`` at
``z = 0``: value 0, derivative 0 * inf = NaN), must leave the parameters and the AdamW moments bit-identical and
write ``skipped`` = 1 to ``metrics.jsonl``; a normal step writes ``skipped`` = 0 and moves the parameters.
One device, 3 parameters: a few seconds, most of it orbax.
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import sharding
from vlsafe_jax.train import common

OPTIM = ml_collections.ConfigDict(dict(lr=0.1, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, schedule="constant",
                                       warmup_steps=0))
B = 4


def _loss(params, frozen, batch, key):
  del frozen, key
  err = batch["x"] @ params["w"] - batch["y"]
  # Adds exactly 0 to the loss; d/dw sqrt(z (1 + w0^2)) = inf * 0 = NaN where z == 0, finite where z == 1.
  kink = jnp.sum(0.0 * jnp.sqrt(batch["z"] * (1.0 + params["w"][0] ** 2)))
  return jnp.mean(err ** 2) + kink, {}


def _batch(kind):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, 3)).astype(np.float32)
  b = {"x": x, "y": x @ np.float32([1.0, -2.0, 0.5]), "z": np.ones((B,), np.float32)}
  if kind == "nan_loss":
    b["x"] = b["x"].copy()
    b["x"][1, 0] = np.nan
  elif kind == "nan_grad":
    b["z"] = np.zeros((B,), np.float32)
  return b


def _setup(nonfinite):
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  tx, lr = common.make_optimizer(OPTIM, total_steps=10)
  params = {"w": jnp.zeros((3,), jnp.float32)}
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = common.train_state_shardings(tx, abstract, {"w": repl}, mesh)
  state = common.init_train_state(tx, params, state_sh)
  step = common.make_update_fn(_loss, tx, state_sh=state_sh, mesh=mesh, lr_fn=lr, nonfinite=nonfinite)
  return mesh, state, step


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad"])
def test_skipped_step_keeps_params_and_optimizer_state(kind):
  mesh, state, step = _setup("skip")
  key = jax.random.key(0)
  state, m0 = step(state, None, sharding.shard_batch(_batch("ok"), mesh), key)
  assert float(m0["skipped"]) == 0.0 and float(m0["finite"]) == 1.0
  before = _host(state)
  state, m1 = step(state, None, sharding.shard_batch(_batch(kind), mesh), key)
  after = _host(state)
  assert float(m1["skipped"]) == 1.0 and float(m1["finite"]) == 0.0
  if kind == "nan_grad":
    assert np.isfinite(float(m1["loss"]))          # the loss alone would not have caught it
  for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt"]),
                  jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt"])):
    np.testing.assert_array_equal(a, b)
  assert int(after["step"]) == int(before["step"]) + 1      # the schedule and data position move on
  state, m2 = step(state, None, sharding.shard_batch(_batch("ok"), mesh), key)
  assert float(m2["skipped"]) == 0.0
  assert np.all(np.isfinite(_host(state)["params"]["w"]))
  assert not np.array_equal(_host(state)["params"]["w"], after["params"]["w"])


def test_raise_mode_never_skips_and_updates():
  mesh, state, step = _setup("raise")
  state, m = step(state, None, sharding.shard_batch(_batch("nan_loss"), mesh), jax.random.key(0))
  assert float(m["skipped"]) == 0.0 and float(m["finite"]) == 0.0
  assert np.isnan(_host(state)["params"]["w"]).any()        # the host loop is what stops a "raise" run


class _ListLoader:
  """The loop's loader interface over a fixed list of host batches."""

  def __init__(self, batches):
    self.batches, self.i, self.steps_per_epoch = batches, 0, len(batches)

  def __next__(self):
    self.i += 1
    return self.batches[self.i - 1]

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def test_run_loop_logs_skipped_to_metrics_jsonl(tmp_path):
  mesh, state, step = _setup("skip")
  kinds = ["ok", "nan_loss", "ok", "nan_grad", "ok"]
  train_cfg = ml_collections.ConfigDict(dict(log_every=1, checkpoint_every=2, nonfinite="skip", progress=False))
  writer = common.MetricsWriter(tmp_path / "metrics.jsonl")
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  state = common.run_loop(stage="toy", step_fn=step, state=state, frozen=None,
                          loader=_ListLoader([_batch(k) for k in kinds]), mesh=mesh, rng=jax.random.key(0),
                          total_steps=len(kinds), ckpt=ckpt, writer=writer, meta={}, train_cfg=train_cfg,
                          batch_size=B)
  ckpt.wait()
  ckpt.close()
  recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
  assert [r["skipped"] for r in recs] == [0.0, 1.0, 0.0, 1.0, 0.0]
  assert [r["finite"] for r in recs] == [1.0, 0.0, 1.0, 0.0, 1.0]
  assert np.all(np.isfinite(_host(state)["params"]["w"]))
