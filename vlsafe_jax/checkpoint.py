"""Orbax checkpointing for every trainer: array pytrees + JSON side-cars in one atomic step directory.

A checkpoint step holds named *items*: array pytrees (model/LoRA state, optimizer state, RNG keys) saved with
``StandardSave``, and JSON items (data-iterator state, run metadata) saved with ``JsonSave``, all committed
together by ``ocp.args.Composite``. Orbax writes into a temporary directory and renames on success, so a run
killed mid-save keeps its previous checkpoint intact; re-running the same command restores the latest step.

Restoring takes *abstract* targets (``jax.ShapeDtypeStruct`` trees, with shardings when the state is sharded), so
arrays go straight to their devices.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree: Any) -> Any:
  """``ShapeDtypeStruct`` tree (keeping shardings) from a concrete or abstract pytree."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


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
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, arrays: Mapping[str, Any], json: Mapping[str, Any] | None = None,
           force: bool = True) -> None:
    """Saves array pytrees and JSON-serialisable dicts as one step."""
    items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
    items.update({k: ocp.args.JsonSave(v) for k, v in (json or {}).items()})
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

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


__all__ = ["Checkpointer", "abstract_like"]
