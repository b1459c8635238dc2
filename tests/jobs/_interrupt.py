"""Simulated kills at a stage boundary for the stage-based jobs (``vlsafe_jax/jobs/stages.py``)."""
from vlsafe_jax.jobs import stages as stages_lib


class Interrupted(RuntimeError):
  """Raised right after a stage was stored (as if the process died there)."""


def stop_after_stages(monkeypatch, k: int) -> None:
  """Makes ``Stages.save`` raise :class:`Interrupted` once the ``k``-th stage of this process is stored."""
  save = stages_lib.Stages.save
  stored = []

  def save_then_stop(self, name, *args, **kwargs):
    out = save(self, name, *args, **kwargs)
    stored.append(name)
    if len(stored) == k:
      raise Interrupted(f"killed after stage {name!r}")
    return out

  monkeypatch.setattr(stages_lib.Stages, "save", save_then_stop)


def records(path, drop=()):
  """metrics.jsonl as dicts, without the ``drop`` keys (timings)."""
  import json
  return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in path.read_text().splitlines()]
