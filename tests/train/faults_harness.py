"""The subprocess harness of the kill -9 tests (tests/train/test_faults.py: the main job; test_faults_jobs.py: the
TGA trainer, the UWM and the CMRM jobs).

Every run is a real subprocess of an entry point (``python -m <module> <args> --workdir DIR ...``) on a given number
of simulated CPU devices, optionally with an injected fault (``faults_sitecustomize.py``) or a SIGKILL after a
wall-clock delay. All the processes of a harness share one persistent JAX compilation cache (minimum compile time
0), so only the first run of a program pays its compilation.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


class Harness:
  """``harness(workdir, devices, *extra, fault=None, kill_after=None) -> (returncode, output, seconds)``.

  Args:
    base: a directory of the test session (the sitecustomize copy and the compilation cache live there).
    module: the entry point, run as ``python -m module``. args: its arguments before ``--workdir``; ``{workdir}``
      in one is replaced by the run directory (a job's side directory that must be per run, e.g. UWM's stage-1).
  """

  def __init__(self, base: Path, module: str, args: Sequence[str]):
    self.module, self.args = module, tuple(args)
    self.site = Path(base) / "site"
    self.site.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("faults_sitecustomize.py"), self.site / "sitecustomize.py")
    self.cache = Path(base) / "jax_cache"

  def __call__(self, workdir, devices: int, *extra, fault: str | None = None, kill_after: float | None = None
               ) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "VLSAFE_FAULT")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_NUM_CPU_DEVICES=str(devices), JAX_COMPILATION_CACHE_DIR=str(self.cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join([str(self.site), str(ROOT), env.get("PYTHONPATH", "")]))
    if fault:
      env["VLSAFE_FAULT"] = fault
    log = Path(workdir).with_name(Path(workdir).name + f".log{time.monotonic_ns()}")
    Path(workdir).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
      args = [a.replace("{workdir}", str(workdir)) for a in self.args]
      p = subprocess.Popen([sys.executable, "-m", self.module, *args, "--workdir", str(workdir), *extra],
                           cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
      try:
        rc = p.wait(timeout=kill_after)
      except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
    return rc, log.read_text(), time.perf_counter() - t0


def reference_runs(harness: Harness, base: Path, devices: int, check_equal: Callable[[Path, Path], None]
                   ) -> tuple[Path, float]:
  """The uninterrupted job, and its wall time with a warm compilation cache (the range of the random kill
  moments). Run twice: the first run fills the cache; the second, the reference, must equal it (``check_equal``:
  cached executables compute what freshly compiled ones do)."""
  rc, out, cold = harness(base / "cold", devices)
  assert rc == 0, out
  rc, out, warm = harness(base / "run", devices)
  assert rc == 0, out
  print(f"\nuninterrupted {harness.module} {' '.join(harness.args[:2])}: {cold:.1f} s with an empty compilation "
        f"cache, {warm:.1f} s with a warm one")
  check_equal(base / "cold", base / "run")
  return base / "run", warm


def random_kills(harness: Harness, first: Path, fresh_dir: Callable[[int], Path], n_kills: int, span: float,
                 check: Callable[[Path], None], *, devices: int = 1, seed: int = 0) -> tuple[int, list[Path]]:
  """kill -9 at ``n_kills`` seeded random moments in ``[0, span)`` s after a process starts, each rerun being the
  same command in the same run directory (starting with ``first``), then the same command once more, to the end.

  A restart redoes the import and the tracing, so a kill early in a process makes no progress and a late one lets
  the job finish; when a job finishes before its kill moment, it is checked (``check(workdir)``) and the remaining
  kills go to a fresh run of the same job (``fresh_dir(i)``). The duration is re-measured whenever a fresh run's
  first process finishes unkilled (the load of a shared machine changes), so the moments keep landing inside a run.
  Returns (kills, the run directories, every one of them checked).
  """
  rng = np.random.default_rng(seed)
  kills, runs, fresh = 0, [Path(first)], False
  while kills < n_kills:
    rc, out, seconds = harness(runs[-1], devices, kill_after=float(rng.uniform(0.0, span)))
    if rc == 0:
      check(runs[-1])
      if fresh:
        span = seconds
      runs.append(fresh_dir(len(runs)))
      fresh = True
      continue
    assert rc == -signal.SIGKILL, out
    kills, fresh = kills + 1, False
  rc, out, _ = harness(runs[-1], devices)
  assert rc == 0, out
  check(runs[-1])
  return kills, runs


def records(workdir: Path, timing: Sequence[str], stage: str | None = None) -> list[dict]:
  """``metrics.jsonl`` as dicts without the ``timing`` keys (those of ``stage`` only, if given)."""
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in timing} for r in rows if stage is None or r["stage"] == stage]


def assert_tree_equal(a: dict, b: dict, **tol) -> None:
  """Same keys and equal arrays: bit for bit, or within ``np.testing.assert_allclose(**tol)``."""
  assert a.keys() == b.keys()
  for k in a:
    if tol:
      np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_files_equal(a: Path, b: Path, names: Sequence[str]) -> None:
  """The files ``names`` (relative paths) of two run directories are byte-identical."""
  for n in names:
    assert (Path(a) / n).read_bytes() == (Path(b) / n).read_bytes(), n
