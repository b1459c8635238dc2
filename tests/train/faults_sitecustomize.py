"""Fault injection for tests/train/test_faults.py, installed as ``sitecustomize`` on a subprocess's PYTHONPATH.

``VLSAFE_FAULT=<kind>:<n>`` makes the process SIGKILL itself at the n-th occurrence of

* ``checkpoint_commit``: an orbax step commit, after every item of the step is in its temporary directory and
  before the rename that publishes the step (a kill in the middle of writing a checkpoint);
* ``metrics_append``: a ``metrics.jsonl`` append, after half of the line reached the file (a torn record).

Nothing in the library knows about this: the wrappers are monkeypatched from here, before the job's code runs.
"""
import json
import os
import signal

_SPEC = os.environ.get("VLSAFE_FAULT", "")


def _install(kind: str, n: int) -> None:
  calls = [0]

  def due() -> bool:
    calls[0] += 1
    return calls[0] == n

  def die():
    os.kill(os.getpid(), signal.SIGKILL)

  if kind == "checkpoint_commit":
    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    finalize = cls.finalize

    async def killing_finalize(self, *args, **kwargs):
      # Each item (state, data, ...) is finalized inside the step's temporary directory first; count the step.
      if self._final_path.name.isdigit() and due():
        die()
      return await finalize(self, *args, **kwargs)
    cls.finalize = killing_finalize
  elif kind == "metrics_append":
    from vlsafe_jax.train import common
    write = common.MetricsWriter.write

    def killing_write(self, record):
      if due():
        line = json.dumps({k: (float(v) if hasattr(v, "dtype") else v) for k, v in record.items()})
        with self.path.open("a") as f:
          f.write(line[: len(line) // 2])
        die()
      return write(self, record)
    common.MetricsWriter.write = killing_write
  else:
    raise ValueError(f"VLSAFE_FAULT kind must be checkpoint_commit or metrics_append, got {kind!r}")


if _SPEC:
  _kind, _n = _SPEC.split(":")
  _install(_kind, int(_n))
