"""grain input pipeline: per-epoch shuffling, per-host sharding, multi-worker decoding, checkpointable state.

Order of records (the contract tests rely on):

* Epoch ``e`` visits the source in the permutation ``default_rng([seed, e]).permutation(N)`` (identity when
  ``shuffle=False``), so every epoch is a fresh shuffle and covers every item once.
* The epoch is cut into *global* batches of ``global_batch_size`` consecutive permuted indices; with
  ``drop_remainder=True`` the last ``N % global_batch_size`` indices of each epoch are dropped, so batches never
  straddle epochs and ``steps_per_epoch = N // global_batch_size``.
* Host ``h`` of ``H`` (``shard_index``/``shard_count``, default the JAX process) takes the contiguous slice
  ``[h*B/H, (h+1)*B/H)`` of each global batch. The union over hosts of step ``s`` is exactly the single-host
  global batch ``s``: results do not depend on how many hosts read the data.

Implementation: a small ``grain.MapDataset`` whose element ``s`` is the int64 array of source indices of this
host's batch ``s``; ``.map`` loads the records, applies ``transform`` per record and stacks them into a dict of
numpy arrays. ``to_iter_dataset().mp_prefetch()`` then hands whole batches to ``worker_count`` processes, so a
batch's content does not depend on the worker count (grain slices *after* all ``MapDataset`` steps). Workers
re-import ``__main__``: scripts need an ``if __name__ == "__main__":`` guard.

Iterator state is a JSON-able dict (grain's own state plus the loader's settings, validated on restore), so it
goes into an orbax checkpoint as a JSON item: ``vlsafe_jax.checkpoint.Checkpointer.save(..., json={"data":
it.get_state()})`` or ``ocp.args.JsonSave(it.get_state())`` (``save_args``/``restore_args`` below).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags


def epoch_permutation(num_records: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """Order in which epoch ``epoch`` visits ``range(num_records)``: int64 (N,), a pure function of its arguments."""
  if not shuffle:
    return np.arange(num_records, dtype=np.int64)
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_records).astype(np.int64)


class HostBatchIndices(grain.MapDataset):
  """Element ``s`` = int64 (B/H,) source indices of this host's part of global batch ``s`` (see module doc)."""

  def __init__(self, num_records: int, global_batch_size: int, *, seed: int, shuffle: bool,
               num_epochs: int | None, shard_index: int, shard_count: int, drop_remainder: bool):
    super().__init__()
    if num_records <= 0:
      raise ValueError("the data source is empty")
    if global_batch_size <= 0 or global_batch_size % shard_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be positive and divisible by "
                       f"shard_count={shard_count} (each host takes an equal slice)")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
    if not drop_remainder and shard_count > 1 and num_records % global_batch_size:
      raise ValueError(f"drop_remainder=False with {shard_count} hosts needs num_records ({num_records}) divisible "
                       f"by global_batch_size ({global_batch_size}): hosts must get equal batches")
    if num_epochs is not None and num_epochs <= 0:
      raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    self.num_records, self.global_batch_size = num_records, global_batch_size
    self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
    self.shard_index, self.shard_count, self.drop_remainder = shard_index, shard_count, drop_remainder
    self.host_batch_size = global_batch_size // shard_count
    if drop_remainder:
      self.steps_per_epoch = num_records // global_batch_size
      if self.steps_per_epoch == 0:
        raise ValueError(f"global_batch_size={global_batch_size} exceeds the {num_records} records and "
                         "drop_remainder=True: no batch can be formed")
    else:
      self.steps_per_epoch = -(-num_records // global_batch_size)
    self._cache: tuple[int, np.ndarray] | None = None  # (epoch, permutation): one O(N) permutation per epoch

  def __len__(self) -> int:
    return sys.maxsize if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

  def __str__(self) -> str:
    return (f"HostBatchIndices(num_records={self.num_records}, global_batch_size={self.global_batch_size}, "
            f"seed={self.seed}, shuffle={self.shuffle}, num_epochs={self.num_epochs}, shard={self.shard_index}/"
            f"{self.shard_count}, drop_remainder={self.drop_remainder})")

  def __getitem__(self, step):
    if isinstance(step, slice):
      return self.slice(step)
    if step < 0 or step >= len(self):
      raise IndexError(f"step {step} out of range for {self}")
    epoch, s = divmod(int(step), self.steps_per_epoch)
    if self._cache is None or self._cache[0] != epoch:
      self._cache = (epoch, epoch_permutation(self.num_records, self.seed, epoch, self.shuffle))
    global_idx = self._cache[1][s * self.global_batch_size:(s + 1) * self.global_batch_size]
    if len(global_idx) < self.global_batch_size:  # partial last batch (drop_remainder=False, one host)
      return global_idx
    lo = self.shard_index * self.host_batch_size
    return global_idx[lo:lo + self.host_batch_size]


class LoadBatch:
  """Map step: source indices -> dict of stacked numpy arrays (records transformed one by one). Picklable."""

  def __init__(self, source: Any, transform: Callable[[Any], Mapping[str, Any]] | None):
    self.source, self.transform = source, transform

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = [self.source[int(i)] for i in indices]
    if self.transform is not None:
      records = [self.transform(r) for r in records]
    keys = [k for k, v in records[0].items() if _stackable(v)]
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


def _stackable(value: Any) -> bool:
  # Raw records carry strings (captions, keys, paths): keep them as numpy unicode arrays for inspection;
  # drop anything else non-array (e.g. nested scene descriptions).
  return isinstance(value, (np.ndarray, np.generic, int, float, str, bool))


class BatchIterator:
  """Iterator of numpy batch dicts with ``get_state``/``set_state`` (JSON-able) for checkpointing.

  Attributes:
    steps_per_epoch: global batches per epoch.
    step: batches produced so far (the position a restored iterator continues from).
  """

  def __init__(self, indices: HostBatchIndices, dataset: grain.IterDataset):
    self._indices, self._dataset = indices, dataset
    self._it = iter(dataset)
    self.step = 0
    self.steps_per_epoch = indices.steps_per_epoch

  @property
  def epoch(self) -> int:
    """Epoch of the next batch."""
    return self.step // self.steps_per_epoch

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self.step += 1
    return batch

  def _meta(self) -> dict[str, Any]:
    ix = self._indices
    return {"num_records": ix.num_records, "global_batch_size": ix.global_batch_size, "seed": ix.seed,
            "shuffle": ix.shuffle, "num_epochs": ix.num_epochs, "shard_index": ix.shard_index,
            "shard_count": ix.shard_count, "drop_remainder": ix.drop_remainder}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: the loader settings, the step, and grain's iterator state."""
    return {"loader": self._meta(), "step": self.step, "grain": self._it.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a ``get_state()`` dict; the loader settings must match (else a ValueError lists the differences).

    The host slot (``shard_index``/``shard_count``) is not compared: the position is a *global* step, identical on
    every host, and each host derives its slice from its own slot. So a state saved by any host (orbax writes
    JSON items from process 0 only) restores on every host, and with another number of hosts.
    """
    host_slot = ("shard_index", "shard_count")
    mismatch = {k: (v, state["loader"].get(k)) for k, v in self._meta().items()
                if k not in host_slot and state["loader"].get(k) != v}
    if mismatch:
      raise ValueError(f"data iterator state does not match this loader (key: (loader, state)): {mismatch}")
    self._it.set_state(state["grain"])
    self.step = int(state["step"])

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_loader(source: Any, global_batch_size: int, *, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, worker_count: int = 0, shard_index: int | None = None,
                shard_count: int | None = None, drop_remainder: bool = True,
                transform: Callable[[Any], Mapping[str, Any]] | None = None, worker_buffer_size: int = 2,
                read_threads: int = 0) -> BatchIterator:
  """Builds the grain pipeline over a random-access ``source`` and returns a checkpointable batch iterator.

  Args:
    source: anything with ``__len__``/``__getitem__`` returning record dicts (readers in ``visu``,
      ``synthetic.SyntheticQuadruplets``).
    global_batch_size: examples per step over all hosts; each host gets ``global_batch_size // shard_count``.
    seed: shuffle seed (32-bit non-negative int).
    shuffle: reshuffle every epoch (False: file order every epoch).
    num_epochs: stop after this many epochs (None: forever).
    worker_count: processes decoding batches (0: in this process). Batches are identical for any value.
    shard_index, shard_count: this host's slot (default ``jax.process_index()`` / ``jax.process_count()``).
    drop_remainder: drop the incomplete last global batch of each epoch.
    transform: per-record map (e.g. ``visu.QuadrupletTransform``); None yields raw records stacked.
    worker_buffer_size: batches prefetched per worker.
    read_threads: threads prefetching batches in-process (0: read on demand, the most predictable on few cores).

  Returns:
    A ``BatchIterator`` yielding ``dict[str, np.ndarray]`` with leading dimension ``global_batch_size //
    shard_count`` (smaller only for a last partial batch with ``drop_remainder=False``).
  """
  if shard_index is None or shard_count is None:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  indices = HostBatchIndices(len(source), global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                             shard_index=shard_index, shard_count=shard_count, drop_remainder=drop_remainder)
  ds = indices.map(LoadBatch(source, transform))
  read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(read_threads, 0) * 2)
  ids = ds.to_iter_dataset(read)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                       per_worker_buffer_size=worker_buffer_size))
  return BatchIterator(indices, ids)


def _ensure_absl_flags_parsed() -> None:
  # grain reads its options from absl flags when it starts workers; outside an absl app (pytest, notebooks, our
  # CLIs) the flags are unparsed and grain raises UnparsedFlagAccessError. Marking them parsed keeps the defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def save_args(iterator: BatchIterator):
  """Orbax item for the iterator state: ``ocp.args.JsonSave`` (use inside ``ocp.args.Composite``)."""
  return ocp.args.JsonSave(iterator.get_state())


def restore_args():
  """Orbax restore item matching ``save_args``; pass the restored dict to ``iterator.set_state``."""
  return ocp.args.JsonRestore()


__all__ = ["BatchIterator", "HostBatchIndices", "LoadBatch", "epoch_permutation", "make_loader", "restore_args",
           "save_args"]
