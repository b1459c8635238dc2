"""Tests for the grain input pipeline (vlsafe_jax.data.pipeline)."""
import json

import numpy as np
import pytest

from vlsafe_jax.checkpoint import Checkpointer
from vlsafe_jax.data import pipeline, synthetic


class RangeSource:
  """Trivial random-access source: record i is {"index": i} (index logic without rendering cost)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"index": np.int32(i), "twice": np.int32(2 * i)}


def _indices(it, n):
  return [next(it)["index"].tolist() for _ in range(n)]


def _loader(n=26, batch=8, **kw):
  kw.setdefault("seed", 5)
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  return pipeline.make_loader(RangeSource(n), batch, **kw)


def test_per_epoch_reshuffle_covers_all_items():
  it = _loader(n=26, batch=8, num_epochs=3)  # 3 steps per epoch, 2 records dropped per epoch
  assert it.steps_per_epoch == 3
  epochs = [sum(_indices(it, 3), []) for _ in range(3)]
  with pytest.raises(StopIteration):
    next(it)
  for e in epochs:
    assert len(e) == len(set(e)) == 24 and set(e) <= set(range(26))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  full = sum(_indices(_loader(n=24, batch=8, num_epochs=2), 6), [])
  assert sorted(full[:24]) == sorted(full[24:]) == list(range(24)) and full[:24] != full[24:]
  fixed = sum(_indices(_loader(n=24, batch=8, shuffle=False, num_epochs=2), 6), [])
  assert fixed == list(range(24)) * 2
  # A different seed gives a different order; the transform-free batch stacks every numeric field.
  assert sum(_indices(_loader(n=24, seed=6), 3), []) != full[:24]
  b = next(_loader())
  np.testing.assert_array_equal(b["twice"], 2 * b["index"])


def test_no_drop_remainder_gives_partial_last_batch():
  it = _loader(n=10, batch=4, drop_remainder=False, num_epochs=1)
  sizes = [len(b["index"]) for b in it]
  assert sizes == [4, 4, 2]


def test_two_hosts_get_disjoint_halves_of_the_global_batch():
  single = _indices(_loader(n=30, batch=6), 10)  # crosses an epoch boundary (5 steps/epoch)
  h0 = _indices(_loader(n=30, batch=6, shard_index=0, shard_count=2), 10)
  h1 = _indices(_loader(n=30, batch=6, shard_index=1, shard_count=2), 10)
  for g, a, b in zip(single, h0, h1):
    assert len(a) == len(b) == 3 and not set(a) & set(b)
    assert a + b == g  # the union over hosts is the single-host global batch, in order
  with pytest.raises(ValueError, match="divisible by shard_count"):
    _loader(batch=7, shard_index=0, shard_count=2)


def test_a_host_state_restores_on_any_host_and_host_count():
  # orbax writes JSON items from process 0 only, so every host (and a run with another host count) restores
  # host 0's state: the position is a global step, and each loader keeps its own slice.
  h0 = _loader(n=30, batch=6, shard_index=0, shard_count=2)
  _indices(h0, 3)
  state = json.loads(json.dumps(h0.get_state()))
  want = _indices(_loader(n=30, batch=6), 5)[3:]          # the single-host global batches 3 and 4
  for index, count in ((1, 2), (0, 2), (0, 1)):
    other = _loader(n=30, batch=6, shard_index=index, shard_count=count)
    other.set_state(state)
    per = 6 // count
    assert _indices(other, 2) == [g[index * per:(index + 1) * per] for g in want], (index, count)


def test_restored_iterator_continues_exactly(tmp_path):
  src = synthetic.SyntheticQuadruplets("train", size=19)
  kw = dict(seed=11, shard_index=0, shard_count=1, transform=synthetic.default_transform())
  ref = pipeline.make_loader(src, 4, **kw)
  ref_batches = [next(ref) for _ in range(7)]  # 4 steps per epoch: crosses into epoch 1
  it = pipeline.make_loader(src, 4, **kw)
  for _ in range(3):
    next(it)
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(3, arrays={"dummy": np.zeros(2, np.float32)}, json={"data": it.get_state()})
  next(it)  # advancing the saved iterator must not affect the checkpoint
  restored_state = ckpt.restore(None, arrays={"dummy": np.zeros(2, np.float32)}, json=("data",))["data"]
  fresh = pipeline.make_loader(src, 4, **kw)
  fresh.set_state(json.loads(json.dumps(restored_state)))
  assert fresh.step == 3 and fresh.epoch == 0
  for want in ref_batches[3:]:
    got = next(fresh)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert fresh.epoch == 1
  other = pipeline.make_loader(src, 4, **{**kw, "seed": 12})
  with pytest.raises(ValueError, match="seed"):
    other.set_state(restored_state)


def test_two_workers_give_the_same_batches_and_resume():
  src = synthetic.SyntheticQuadruplets("val", size=24)
  kw = dict(seed=2, shard_index=0, shard_count=1, transform=synthetic.default_transform())
  inproc = [next(it) for it in [pipeline.make_loader(src, 4, **kw)] for _ in range(5)]
  mp = pipeline.make_loader(src, 4, worker_count=2, **kw)
  try:
    got = [next(mp) for _ in range(3)]
    state = mp.get_state()
  finally:
    mp.close()
  mp2 = pipeline.make_loader(src, 4, worker_count=2, **kw)
  try:
    mp2.set_state(json.loads(json.dumps(state)))
    got += [next(mp2) for _ in range(2)]
  finally:
    mp2.close()
  for a, b in zip(inproc, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
