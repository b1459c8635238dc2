"""Orbax wrapper: round trip of nnx + optax state with JSON side-cars, retention, sharded restore; fingerprints and
the fall-back from a truncated / corrupted latest step."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import sharding
from vlsafe_jax.checkpoint import Checkpointer, CorruptCheckpointError, fingerprint


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
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(tmp_path / "empty").restore(None, {"x": jnp.zeros(3)})


# --------------------------------------------------------------------------------------------------------------
# Truncated / corrupted latest checkpoint: fall back to the previous good step, loudly, never start over


def _three_steps(directory):
  ck = Checkpointer(directory, max_to_keep=3)
  trees = {s: {"w": jnp.arange(256, dtype=jnp.float32) * s, "n": jnp.full((4,), s, jnp.int32)} for s in (1, 2, 3)}
  for s, t in trees.items():
    ck.save(s, {"state": t}, {"data": {"next_index": s * 10}})
  return ck, trees


def _array_files(step_dir):
  return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()),
                key=lambda p: p.stat().st_size)


def _flip(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(data)


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["flip_array_bytes", "truncate_array_file", "truncate_json_item",
                                    "edit_json_value", "delete_item"])
def test_corrupt_latest_step_falls_back_to_previous(tmp_path, capsys, damage):
  ck, trees = _three_steps(tmp_path / "ck")
  step3 = tmp_path / "ck" / "3"
  if damage == "flip_array_bytes":
    _flip(_array_files(step3)[-1])                 # orbax alone restores this without any error
  elif damage == "truncate_array_file":
    _truncate(_array_files(step3)[-1])
  elif damage == "truncate_json_item":
    _truncate(step3 / "data" / "metadata")
  elif damage == "edit_json_value":                # still valid JSON: only the digest notices
    p = step3 / "data" / "metadata"
    p.write_text(p.read_text().replace("30", "20"))
  else:
    shutil.rmtree(step3 / "state")
  target = {"state": jax.tree.map(jnp.zeros_like, trees[3])}
  step, out = Checkpointer(tmp_path / "ck").restore_latest_good(target, json=("data",))
  assert step == 2 and out["data"] == {"next_index": 20}
  jax.tree.map(np.testing.assert_array_equal, out["state"], trees[2])
  err = capsys.readouterr().err
  assert "checkpoint step 3 is unusable" in err, err
  item = "data" if "json" in damage else "state"
  assert str(tmp_path / "ck" / "3" / item) in err, err
  # The bad step is kept aside (not deleted), out of the step list; steps 1 and 2 are untouched.
  assert (tmp_path / "ck" / "corrupt-3").is_dir()
  again = Checkpointer(tmp_path / "ck")
  assert again.all_steps() == [1, 2]
  # The resumed run can write step 3 again.
  again.save(3, {"state": trees[3]}, {"data": {"next_index": 30}})
  assert again.restore_latest_good(target, json=("data",))[0] == 3


def test_all_steps_corrupt_is_an_error_not_a_fresh_start(tmp_path):
  ck, trees = _three_steps(tmp_path / "ck")
  for s in (1, 2, 3):
    _flip(_array_files(tmp_path / "ck" / str(s))[-1])
  with pytest.raises(CorruptCheckpointError, match=r"refusing to start over(.|\n)*step 3(.|\n)*step 2(.|\n)*step 1"):
    Checkpointer(tmp_path / "ck").restore_latest_good({"state": trees[3]})
  assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["corrupt-1", "corrupt-2", "corrupt-3"]


def test_empty_directory_restores_nothing(tmp_path):
  assert Checkpointer(tmp_path / "ck").restore_latest_good({"state": {"w": jnp.zeros(3)}}) is None


def test_fingerprint_sees_every_bit_and_ignores_sharding():
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
  base = fingerprint({"x": x})
  bumped = x.at[3, 5].set(jnp.nextafter(x[3, 5], jnp.inf))           # one ulp
  swapped = x.at[0, 1].set(x[1, 0]).at[1, 0].set(x[0, 1])              # same values, other places
  assert fingerprint({"x": bumped}) != base and fingerprint({"x": swapped}) != base
  mesh = sharding.make_mesh(data=1, fsdp=4, model=2)
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "model")))
  assert fingerprint({"x": sharded}) == base
  assert set(fingerprint({"k": jax.random.key(0), "b": jnp.ones(2, bool), "h": jnp.ones(2, jnp.bfloat16)}))


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
  """A failure between writing the temporary file and the rename leaves the old file intact, never a mix."""
  p = tmp_path / "summary.json"
  ckpt_lib.write_text_atomic(p, '{"a": 1}')
  assert p.read_text() == '{"a": 1}'

  def boom(src, dst):
    raise KeyboardInterrupt("killed before the rename")
  monkeypatch.setattr(ckpt_lib.os, "replace", boom)
  with pytest.raises(KeyboardInterrupt):
    ckpt_lib.write_text_atomic(p, '{"a": 2, "b": "' + "x" * 10000 + '"}')
  assert p.read_text() == '{"a": 1}'
