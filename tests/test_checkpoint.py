"""Orbax wrapper: round trip of nnx + optax state with JSON side-cars, retention, sharded restore."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vlsafe_jax import sharding
from vlsafe_jax.checkpoint import Checkpointer


def _model():
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
  return nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))


def test_round_trip_and_retention(tmp_path):
  model = _model()
  tx = optax.adamw(1e-3)
  state = nnx.state(model)
  opt_state = tx.init(state)
  ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
  for step in (1, 2, 3):
    ck.save(step, {"params": state, "opt": opt_state}, {"data": {"next_index": step * 10}})
  assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
  out = Checkpointer(tmp_path / "ck").restore(None, {"params": state, "opt": opt_state}, json=("data",))
  assert out["data"] == {"next_index": 30}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               out["params"], state)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               out["opt"], opt_state)


def test_restore_into_sharded_targets(tmp_path):
  model = _model()
  state = nnx.state(model)
  ck = Checkpointer(tmp_path / "ck")
  ck.save(5, {"params": state})
  mesh = sharding.make_mesh(data=1, fsdp=4, model=2)
  target = sharding.place_state(state, mesh)
  out = ck.restore(5, {"params": target})["params"]
  kernel = out["kernel"].get_value()
  assert kernel.sharding.spec == target["kernel"].get_value().sharding.spec
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(state["kernel"].get_value()))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  import pytest
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(tmp_path / "empty").restore(None, {"x": jnp.zeros(3)})
