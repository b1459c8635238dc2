"""Stage bookkeeping for jobs whose steps are whole computations rather than optimizer steps (UWM, CMRM).

A stage's result (a JSON-ready dict) is stored in ``<workdir>/stages/<name>.json`` once it is complete, after its
records went to ``metrics.jsonl`` (each with ``"stage": name`` and ``"step"``: the record's index in the stage).
Re-running the job reloads completed stages instead of recomputing them; an incomplete stage (killed before its
JSON was written) is recomputed after its partial records are dropped from ``metrics.jsonl``, so a resumed run's
log equals an uninterrupted one. Large outputs (model directories, arrays) are written by the stage itself before
it returns; the stage JSON is the commit point.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vlsafe_jax.checkpoint import json_default, write_text_atomic
from vlsafe_jax.train.common import MetricsWriter


class Stages:
  """Completed-stage store of one run directory, with a progress bar over ``total`` stages.

  Args:
    workdir: the run directory. writer: its ``metrics.jsonl`` writer. job: the progress bar's label.
    total: how many stages this invocation plans (for the bar). progress: show the bar.
  """

  def __init__(self, workdir: Path, writer: MetricsWriter, job: str, total: int | None = None,
               progress: bool = True):
    self.dir = Path(workdir) / "stages"
    self.dir.mkdir(parents=True, exist_ok=True)
    self.writer, self.job = writer, job
    self.bar = tqdm(total=total, desc=job, unit="stage", disable=not progress)
    self.reloaded: list[str] = []

  def path(self, name: str) -> Path:
    return self.dir / f"{name}.json"

  def done(self, name: str) -> bool:
    return self.path(name).is_file()

  def load(self, name: str) -> dict[str, Any]:
    return json.loads(self.path(name).read_text())

  def save(self, name: str, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Writes ``records`` to ``metrics.jsonl`` (stage and step keys added), then the stage JSON (atomically).

    Returns the result as it reads back from the JSON (tuples become lists), so a computed stage and a reloaded one
    hand the same values to what follows."""
    for i, rec in enumerate(records):
      self.writer.write({"stage": name, "step": i, **rec})
    text = json.dumps(result, indent=2, default=json_default)
    write_text_atomic(self.path(name), text)
    return json.loads(text)

  def run(self, name: str, compute: Callable[[], tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]]
          ) -> dict[str, Any]:
    """The stored result of stage ``name``, or ``compute() -> (result, metrics records)`` stored now."""
    self.bar.set_postfix_str(name)
    if self.done(name):
      self.reloaded.append(name)
      out = self.load(name)
    else:
      self.writer.truncate(name, -1)      # records of an interrupted attempt at this stage
      result, records = compute()
      out = self.save(name, result, records)
    self.bar.update(1)
    return out

  def close(self) -> None:
    self.bar.close()


__all__ = ["Stages"]
