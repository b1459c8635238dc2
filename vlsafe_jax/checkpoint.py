"""Orbax checkpointing for every trainer: array pytrees + JSON side-cars in one atomic step directory.

A checkpoint step holds named *items*: array pytrees (model/LoRA state, optimizer state, RNG keys) saved with
``StandardSave``, and JSON items (data-iterator state, run metadata) saved with ``JsonSave``, all committed
together by ``ocp.args.Composite``. Orbax writes into a temporary directory and renames on success, so a run
killed mid-save keeps its previous checkpoint intact; re-running the same command restores the latest step.

Restoring takes *abstract* targets (``jax.ShapeDtypeStruct`` trees, with shardings when the state is sharded), so
arrays go straight to their devices.

Integrity: every save also stores a JSON item ``fingerprint`` (one uint32 per array leaf, see :func:`fingerprint`);
:meth:`Checkpointer.restore_latest_good` recomputes it after restoring, because orbax restores a bit-flipped
(compressed) array file without any error. A step that fails to restore or to verify is moved aside to
``corrupt-<step>`` (never deleted) and the previous step is tried, with a message naming the step and what was wrong.
"""
from __future__ import annotations

import hashlib
import json as jsonlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

FINGERPRINT_ITEM = "fingerprint"


def json_default(o: Any) -> Any:
  """``json.dumps(default=...)`` for results holding numpy values: numpy scalars as Python scalars, arrays as lists,
  anything else as its ``str``."""
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
  """Writes ``text`` to ``path`` through a sibling temporary file and ``os.replace``: a kill mid-write leaves the
  old file (or none), never half of the new one. Used for the run directory's small files whose presence a rerun
  reads (``config.json``, ``summary.json``, stage results, a rewritten ``metrics.jsonl``)."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
  return path


def abstract_like(tree: Any) -> Any:
  """``ShapeDtypeStruct`` tree (keeping shardings) from a concrete or abstract pytree."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32 position-weighted sum of the bits of ``x`` (wrapping arithmetic: exact and order-free, so a sharded
  array on any device count gives the same value). Typed PRNG keys are hashed through their key data."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if width is None:
    raise TypeError(f"fingerprint: unsupported dtype {x.dtype} (itemsize {x.dtype.itemsize})")
  bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_fingerprint_jit = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprint(tree: Any) -> dict[str, int]:
  """``{"path/of/leaf": uint32 as int}`` for an array pytree: a checksum of the exact bits of every leaf.

  Computed on the devices (one small jitted reduction; only the scalars come to the host), so it costs no
  host copy of the state.
  """
  tree = jax.tree.map(jnp.asarray, tree)
  sums = jax.device_get(_fingerprint_jit(tree))
  return {jax.tree_util.keystr(k): int(v) for k, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def json_digest(obj: Any) -> str:
  """sha256 of the canonical JSON text of ``obj`` (keys sorted): the fingerprint of a JSON item."""
  return hashlib.sha256(jsonlib.dumps(obj, sort_keys=True).encode()).hexdigest()


class CorruptCheckpointError(RuntimeError):
  """Every checkpoint step in a directory failed to restore or verify; the run refuses to start over silently."""


def _error_summary(e: BaseException) -> str:
  """``Type: first line`` of an exception and of its innermost cause (orbax wraps tensorstore's ``DATA_LOSS`` /
  ``NOT_FOUND`` error, the informative one, in a generic "error while reading" whose text ends in a method repr)."""
  def line(x: BaseException) -> str:
    first = (str(x).strip().splitlines() or [""])[0]
    return f"{type(x).__name__}: {first.split(' See full TensorStore')[0][:300]}"
  root, seen = e, {id(e)}
  while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
    root = nxt
    seen.add(id(root))
  return line(e) if root is e else f"{line(e)} <- {line(root)}"


class Checkpointer:
  """Step-numbered checkpoints under ``directory`` with ``max_to_keep`` retention.

  Args:
    directory: e.g. ``runs/<name>/checkpoints``; created if missing.
    max_to_keep: number of step checkpoints kept (older ones deleted after a successful save).
    async_save: let orbax write in a background thread (``wait()`` blocks until finished).
  """

  def __init__(self, directory: str | Path, max_to_keep: int | None = 3, async_save: bool = False):
    self.directory = Path(directory).resolve()
    self._mngr = ocp.CheckpointManager(
        self.directory,
        # cleanup_tmp_directories: a process killed mid-save leaves an uncommitted ``<step>.orbax-checkpoint-tmp*``
        # directory, never listed as a step; the next run removes it.
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, arrays: Mapping[str, Any], json: Mapping[str, Any] | None = None,
           force: bool = True) -> None:
    """Saves array pytrees and JSON-serialisable dicts as one step, plus the arrays' ``fingerprint`` item."""
    if FINGERPRINT_ITEM in arrays or FINGERPRINT_ITEM in (json or {}):
      raise ValueError(f"item name {FINGERPRINT_ITEM!r} is reserved for the integrity check")
    items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
    items.update({k: ocp.args.JsonSave(v) for k, v in (json or {}).items()})
    sums = {k: fingerprint(v) for k, v in arrays.items()}
    sums.update({k: json_digest(v) for k, v in (json or {}).items()})
    items[FINGERPRINT_ITEM] = ocp.args.JsonSave(sums)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    self._mngr.wait_until_finished()

  def restore(self, step: int | None, arrays: Mapping[str, Any], json: tuple[str, ...] = ()) -> dict[str, Any]:
    """Restores ``step`` (default: latest) into the abstract ``arrays`` targets, plus the named JSON items."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {k: ocp.args.StandardRestore(abstract_like(v)) for k, v in arrays.items()}
    items.update({k: ocp.args.JsonRestore() for k in json})
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return {k: restored[k] for k in items}

  def verify(self, step: int, restored: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming the first item (and array leaf) of ``restored`` whose content differs from
    ``saved``, the step's ``fingerprint`` item (array items: per-leaf sums; JSON items: a digest)."""
    for item, value in restored.items():
      if item not in saved:
        continue
      where = self.directory / str(step) / item
      if isinstance(saved[item], str):
        if json_digest(value) != saved[item]:
          raise ValueError(f"JSON item {item!r} ({where}) does not match its saved digest")
        continue
      now = fingerprint(value)
      for leaf, expect in saved[item].items():
        if now.get(leaf) != expect:
          raise ValueError(f"array item {item!r} leaf {leaf}: checksum {now.get(leaf)} != saved {expect} (files "
                           f"under {where})")

  def _failing_item(self, step: int, arrays: Mapping[str, Any], json: tuple[str, ...]) -> str:
    """The first item of ``step`` that fails to restore on its own (to name it in the message), or ``"?"``."""
    for k in (*arrays, *json):
      arg = ocp.args.StandardRestore(abstract_like(arrays[k])) if k in arrays else ocp.args.JsonRestore()
      try:
        self._mngr.restore(step, args=ocp.args.Composite(**{k: arg}))
      except Exception:  # noqa: BLE001 -- the failure is the answer here; the caller reports it
        return str(self.directory / str(step) / k)
    return "?"

  def restore_latest_good(self, arrays: Mapping[str, Any], json: tuple[str, ...] = ()
                          ) -> tuple[int, dict[str, Any]] | None:
    """Restores the newest step that reads back and verifies; ``None`` when the directory holds no step.

    A step that fails (truncated or missing files, unreadable JSON, a checksum mismatch) is reported on stderr with
    its step, the failing item's path and the error, renamed to ``corrupt-<step>`` (kept for inspection, out of
    orbax's step list, so the resumed run can save that step number again), and the next older step is tried.
    Raises :class:`CorruptCheckpointError` when steps exist but none is good: never a silent fresh start.
    """
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      # Steps written before fingerprints existed restore unverified.
      has_fp = (self.directory / str(step) / FINGERPRINT_ITEM).exists()
      try:
        out = self.restore(step, arrays, tuple(json) + ((FINGERPRINT_ITEM,) if has_fp else ()))
      # Any failure of this step (orbax/tensorstore raise plain Exception, JSON a ValueError, ...) means "try the
      # previous one"; each is reported and the step is kept on disk, so nothing is swallowed.
      except Exception as e:  # noqa: BLE001
        what = f"{self._failing_item(step, arrays, json)}: {_error_summary(e)}"
      else:
        saved = out.pop(FINGERPRINT_ITEM, None)
        try:
          if saved is not None:
            self.verify(step, out, saved)
        except ValueError as e:
          what = str(e)
        else:
          return step, out
      msg = f"checkpoint step {step} is unusable ({what})"
      problems.append(msg)
      print(f"WARNING: {msg}; moved to {self._quarantine(step)}, trying the previous step", file=sys.stderr,
            flush=True)
    if problems:
      raise CorruptCheckpointError(f"no usable checkpoint in {self.directory} (refusing to start over):\n  "
                                   + "\n  ".join(problems))
    return None

  def _quarantine(self, step: int) -> Path:
    """Renames step directory ``step`` to ``corrupt-<step>`` (``-<n>`` appended if taken) and reloads the step list."""
    src = self.directory / str(step)
    dst = self.directory / f"corrupt-{step}"
    n = 1
    while dst.exists():
      dst, n = self.directory / f"corrupt-{step}-{n}", n + 1
    if jax.process_index() == 0:
      src.rename(dst)
    # Multi-host: the other processes wait until process 0 renamed it before re-listing the steps.
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint quarantine {step}")
    self._mngr.reload()
    return dst

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


__all__ = ["Checkpointer", "CorruptCheckpointError", "abstract_like", "fingerprint", "json_digest", "FINGERPRINT_ITEM"]
