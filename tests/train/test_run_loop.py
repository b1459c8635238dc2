"""The shared loop ``common.run_loop`` on a toy least-squares model (one device): throughput records leave out the
compiling first step, the step runs under a transfer guard, the non-finite check stops before a save, and
``MetricsWriter.truncate`` drops a torn last line and a killed run's records."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import sharding
from vlsafe_jax.train import common

B = 4
OPTIM = ml_collections.ConfigDict(dict(lr=0.1, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, schedule="constant",
                                       warmup_steps=0))


def _loss(params, frozen, batch, key):
  del key
  return jnp.mean((batch["x"] @ (params["w"] * frozen["scale"]) - batch["y"]) ** 2), {}


class _Loader:
  steps_per_epoch = 100

  def __init__(self, nan_from=None):
    self.i, self.nan_from = 0, nan_from

  def __next__(self):
    self.i += 1
    x = np.random.default_rng(self.i).normal(size=(B, 3)).astype(np.float32)
    if self.nan_from is not None and self.i >= self.nan_from:
      x[0, 0] = np.nan
    return {"x": x, "y": x @ np.float32([1.0, -2.0, 0.5])}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def _run(tmp_path, frozen=None, loader=None, total=5, **train):
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tx, lr = common.make_optimizer(OPTIM, total_steps=total)
  params = {"w": jnp.zeros((3,), jnp.float32)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = common.train_state_shardings(tx, abstract, {"w": repl}, mesh)
  state = common.init_train_state(tx, params, state_sh)
  step = common.make_update_fn(_loss, tx, state_sh=state_sh, mesh=mesh, lr_fn=lr)
  frozen = jax.device_put({"scale": np.float32(1.0)}, repl) if frozen is None else frozen
  cfg = ml_collections.ConfigDict(dict(log_every=1, checkpoint_every=100, nonfinite="raise", progress=False))
  cfg.update(train)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt")
  common.run_loop(stage="toy", step_fn=step, state=state, frozen=frozen, loader=loader or _Loader(), mesh=mesh,
                  rng=jax.random.key(0), total_steps=total, ckpt=ckpt, writer=common.MetricsWriter(
                      tmp_path / "metrics.jsonl"), meta={}, train_cfg=cfg, batch_size=B)
  return ckpt, [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_throughput_leaves_out_the_compiling_step(tmp_path):
  _, recs = _run(tmp_path)
  assert [r["timed_steps"] for r in recs] == [0, 1, 1, 1, 1]
  assert "examples_per_s" not in recs[0]     # step 1 compiled: nothing timed, no rate
  assert all(r["examples_per_s"] > 0 and r["examples_per_s_per_device"] > 0 for r in recs[1:])


def test_implicit_transfer_in_the_step_is_an_error(tmp_path):
  # `frozen` left on the host: the jitted step would copy it to the device on every call, silently.
  with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
    _run(tmp_path, frozen={"scale": np.float32(1.0)})


def test_nonfinite_stops_before_the_checkpoint_of_that_step(tmp_path):
  # Records only every 10 steps, a checkpoint every 2: the NaN of step 4 is caught at its save, not at step 10.
  with pytest.raises(common.NonFiniteLossError, match="non-finite loss nan .* at step 4"):
    _run(tmp_path, loader=_Loader(nan_from=3), total=10, log_every=10, checkpoint_every=2)
  assert ckpt_lib.Checkpointer(tmp_path / "ckpt").all_steps() == [2]


def test_truncate_drops_torn_line_and_later_records(tmp_path):
  w = common.MetricsWriter(tmp_path / "metrics.jsonl")
  for stage, step in (("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)):
    w.write({"stage": stage, "step": step})
  with w.path.open("a") as f:
    f.write('{"stage": "b", "st')                 # a kill in the middle of an append
  w.truncate("b", 2)
  assert [(r["stage"], r["step"]) for r in map(json.loads, w.path.read_text().splitlines())] == [
      ("a", 1), ("a", 2), ("b", 1), ("b", 2)]
  w.truncate("b", 0)                             # no checkpoint yet: the stage starts over
  assert [(r["stage"], r["step"]) for r in map(json.loads, w.path.read_text().splitlines())] == [("a", 1), ("a", 2)]
