"""The logical-axis table and mesh helpers, on the 8 simulated CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vlsafe_jax import sharding


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  mesh = sharding.make_mesh(data=-1, fsdp=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(data=4, fsdp=4)
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh(data=-1, fsdp=-1)


def test_logical_to_spec_drops_size_one_axes_and_undivisible_dims():
  mesh = sharding.make_mesh(data=2, fsdp=4, model=1)
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", None)
  # 37 is not divisible by fsdp=4: replicated rather than failing.
  assert sharding.logical_to_spec(("embed", "mlp"), (37, 64), mesh) == P(None, None)
  assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
  tp = sharding.make_mesh(data=1, fsdp=1, model=8)
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), tp) == P(None, "model")


def test_place_state_follows_annotations_and_keeps_values():
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
  layer = nnx.Linear(16, 24, kernel_init=init, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(data=1, fsdp=4, model=2)
  state = nnx.state(layer)
  placed = sharding.place_state(state, mesh)
  assert placed["kernel"].get_value().sharding.spec == P("fsdp", "model")
  assert placed["bias"].get_value().sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(placed["kernel"].get_value()), np.asarray(state["kernel"].get_value()))


def test_shard_batch_splits_leading_axis():
  mesh = sharding.make_mesh(data=-1)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  xs = sharding.shard_batch({"x": x}, mesh)["x"]
  assert xs.sharding.spec == P("data", None)
  assert len(xs.addressable_shards) == 8 and xs.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(xs), x)


def test_constrain_is_identity_in_value():
  mesh = sharding.make_mesh(data=-1)
  f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "act_embed")))
  with jax.set_mesh(mesh):
    y = f(jnp.ones((8, 4)))
  np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))
