"""Two JAX processes x 4 CPU devices on localhost (``jax.distributed`` with its gloo CPU collectives) against one
process x 8 devices, both running ``_worker.py`` on the same global batches:

* data: over one epoch the two processes' loaders see every item exactly once, and step by step their slices
  are the halves of the one-process global batch;
* the HySAC train step (mesh data 8, 2 steps) and the TGA train step (mesh FSDP 8, parameters split across the
  processes, 1 step): same initial parameters, loss terms, gradient norms and parameters after the steps;
* checkpoints written by the 2 processes (orbax, each writing its shards, plus the loader position) restore
  exactly in 2 processes and in 1 process x 8 devices.

The three processes run at the same time (the 1-process reference waits on stdin before restoring the 2-process
checkpoint). Each process's stdout/stderr goes to a file that a failure prints.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vlsafe_jax.methods.hysac import losses

WORKER = Path(__file__).with_name("_worker.py")
REPO = Path(__file__).resolve().parents[2]
# Per phase; a loaded machine (many test workers on 2 cores) can need far longer than an idle one.
TIMEOUT_S = int(os.environ.get("VLSAFE_MULTIHOST_TIMEOUT_S", "900"))
ITEMS, BATCH = 48, 16     # _worker.HYSAC_ITEMS, HYSAC_BATCH

# 2 x 4 vs 1 x 8 devices: the same mesh shape and per-device programs; only the cross-device reductions differ
# (gloo between the processes, XLA's in-process all-reduce in one), so float32 sums may differ in their order.
# Tolerances as derived in tests/train/test_hysac_train.py and test_tga_train.py (u = 2^-24): losses and other
# O(1) means 1e-4 relative (a few reductions of ~1e3 terms); a parameter's change after SGD steps is lr x the
# gradient, compared per leaf to 1e-4 of the leaf's largest change (n u for ~1e3 summands on the longest path),
# the 0-d HySAC scalars to 1e-3 of the tree's largest change (their gradient is one sum of ~B^2 x 7 cancelling
# per-pair derivatives), plus the rounding of p + update (2 u |p| per step).
RTOL, GRAD_RTOL, SCALAR_RTOL = 1e-4, 1e-4, 1e-3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(local_devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  # LLVM optimisation off halves the CPU time of the three processes (mostly compiling); every side uses it, and
  # what is compared is the multi-process runtime, not the generated code.
  flags += [f"--xla_force_host_platform_device_count={local_devices}", "--xla_backend_optimization_level=0"]
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(local_devices), XLA_FLAGS=" ".join(flags),
             PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  env.update({k: str(v) for k, v in extra.items()})
  return env


class _Procs:
  """Started worker processes, each logging to ``<name>.log``; :meth:`fail` kills them all and shows the logs."""

  def __init__(self, tmp: Path):
    self.tmp, self.procs = tmp, {}

  def start(self, name: str, args: list[str], env: dict, stdin=None) -> subprocess.Popen:
    log = (self.tmp / f"{name}.log").open("w")
    self.procs[name] = subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=REPO, stdin=stdin,
                                        stdout=log, stderr=subprocess.STDOUT)
    return self.procs[name]

  def logs(self) -> str:
    return "\n".join(f"----- {n} (exit {p.poll()}) -----\n" + (self.tmp / f"{n}.log").read_text()[-6000:]
                     for n, p in self.procs.items())

  def fail(self, why: str):
    for p in self.procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
    pytest.fail(f"{why}\n{self.logs()}")

  def wait(self, names: list[str], deadline: float):
    for n in names:
      try:
        rc = self.procs[n].wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        self.fail(f"{n} still running after {TIMEOUT_S} s")
      if rc != 0:
        self.fail(f"{n} exited with {rc}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Launches 2 processes x 4 devices (``save``) and 1 x 8 (``reference``) together; returns their npz results."""
  tmp = tmp_path_factory.mktemp("multihost")
  ckpt = tmp / "ckpt_2proc"
  procs = _Procs(tmp)
  t0 = time.monotonic()
  ref = procs.start("reference", [str(tmp / "ref.npz"), str(ckpt), "reference"], _env(8), stdin=subprocess.PIPE)
  port = _free_port()
  for i in range(2):
    procs.start(f"process{i}", [str(tmp / f"p{i}.npz"), str(ckpt), "save"],
                _env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i))
  procs.wait(["process0", "process1"], t0 + TIMEOUT_S)
  ref.stdin.write(b"go\n")
  ref.stdin.close()
  procs.wait(["reference"], time.monotonic() + TIMEOUT_S)
  print(f"multi-host runs: {time.monotonic() - t0:.1f} s wall\n{procs.logs()}")
  load = lambda name: dict(np.load(tmp / name))
  return load("p0.npz"), load("p1.npz"), load("ref.npz")


def _group(res: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in res.items() if k.startswith(prefix)}


pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]   # one worker builds the module fixture


def test_one_epoch_sees_every_item_once_across_processes(runs):
  p0, p1, ref = runs
  a, b = p0["data/epoch"], p1["data/epoch"]
  assert a.shape == b.shape == (ITEMS // BATCH, BATCH // 2)
  np.testing.assert_array_equal(np.sort(np.concatenate([a.ravel(), b.ravel()])), np.arange(ITEMS))
  # Step by step the two slices are the halves of the one-process global batch, in order.
  np.testing.assert_array_equal(np.concatenate([a, b], axis=1), ref["data/epoch"])


def test_each_process_holds_one_block_of_the_batch(runs):
  p0, p1, ref = runs
  assert p0["mesh/data8_block"].tolist() == [0, 2] and p1["mesh/data8_block"].tolist() == [1, 2]
  assert ref["mesh/data8_block"].tolist() == [0, 1]
  assert p0["mesh/model8_refused"] and p1["mesh/model8_refused"] and not ref["mesh/model8_refused"]


def _assert_params_close(two: dict, one: dict, init: dict, what: str, n_steps: int, lr_scalars=True):
  """Per leaf: |delta_2 - delta_1| <= rtol x max|delta_1| + 2 u |p0| per step (delta = change from ``init``)."""
  assert two.keys() == one.keys() == init.keys() and two
  deltas = {k: np.asarray(one[k], np.float64) - init[k] for k in one}
  tree_scale = max(np.abs(d).max() for d in deltas.values())
  assert tree_scale > 0, f"{what}: nothing moved, the comparison would be vacuous"
  for k, d1 in deltas.items():
    d2 = np.asarray(two[k], np.float64) - init[k]
    bound = (SCALAR_RTOL * tree_scale if d1.ndim == 0 and lr_scalars else GRAD_RTOL * np.abs(d1).max())
    bound += n_steps * 2 * 2.0 ** -24 * np.abs(init[k]).max()
    err = np.abs(d2 - d1).max()
    assert err <= bound, (what, k, err, bound)


@pytest.mark.parametrize("method,n_steps,metrics", [
    ("hysac", 2, ("loss", "grad_norm", *losses.TERM_NAMES)),
    ("tga", 1, ("loss", "grad_norm", "ce", "align", "pairwise")),
])
def test_train_step_two_processes_equals_one(runs, method, n_steps, metrics):
  p0, p1, ref = runs
  # The same initial parameters everywhere (deterministic init, placed from every process).
  for res in (p1, ref):
    for k, v in _group(p0, f"{method}/p0/").items():
      np.testing.assert_array_equal(_group(res, f"{method}/p0/")[k], v, err_msg=k)
  # Both processes fetched the same global values.
  for k, v in _group(p0, f"{method}/").items():
    np.testing.assert_array_equal(p1[f"{method}/{k}"], v, err_msg=k)
  for i in range(n_steps):
    for m in metrics:
      got, want = p0[f"{method}/m{i}/{m}"], ref[f"{method}/m{i}/{m}"]
      np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7, err_msg=f"step {i} {m}")
    assert p0[f"{method}/m{i}/finite"] == 1.0
  assert ref[f"{method}/m0/loss"] > 0
  init = {k: np.asarray(v, np.float64) for k, v in _group(ref, f"{method}/p0/").items()}
  _assert_params_close(_group(p0, f"{method}/p/"), _group(ref, f"{method}/p/"), init, method, n_steps,
                       lr_scalars=method == "hysac")


@pytest.mark.parametrize("method,step", [("hysac", 2), ("tga", 1)])
def test_two_process_checkpoint_restores_in_two_and_in_one_process(runs, method, step):
  p0, p1, ref = runs
  saved = _group(p0, f"{method}/p/")
  for name, res in (("2 processes", p0), ("2 processes (process 1)", p1), ("1 process x 8", ref)):
    got = _group(res, f"restored/{method}/")
    assert int(got.pop("step")) == step, name
    assert got.keys() == saved.keys()
    for k, v in saved.items():
      np.testing.assert_array_equal(got[k], v, err_msg=f"{name}: {k}")


def test_two_process_loader_position_restores_in_two_and_in_one_process(runs):
  p0, p1, ref = runs
  for res in (p0, p1):
    assert res["data/next"].shape == (BATCH // 2,)
    np.testing.assert_array_equal(res["data/restored_next"], res["data/next"])
  # One process continues with the global batch whose halves the two processes would read next.
  np.testing.assert_array_equal(ref["data/restored_next"], np.concatenate([p0["data/next"], p1["data/next"]]))
