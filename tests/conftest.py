"""Test-suite set-up: 8 simulated CPU devices, fp32 matmuls, offline HF, a session-wide XLA compilation cache, and
the xdist schedule (``-n 2``: the longest tests start first; tests sharing an expensive fixture share a worker).

The device count must be fixed before JAX initialises its backend, so this runs before any test module
imports jax-using code (pytest imports conftest.py first).
"""
import atexit
import collections
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Both spellings: the flag works on every jax version; JAX_NUM_CPU_DEVICES on recent ones.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite's time is mostly XLA compilation, and many tests compile the same programs again (every trainer run jits
# fresh closures: a resumed run, the same job with other output paths, the same tower forward in several stages). A
# persistent cache keyed on the optimized program (plus backend, flags and devices) turns those repeats into a
# load of the same executable: results are those of a fresh compile, only the compile is skipped. It lives in a
# temporary directory of this session, created by the first process (the xdist controller, or the only process) and
# removed when it exits; each process (xdist worker) writes its own subdirectory, because jax writes entries without
# a lock unless a size bound is set, and a bound makes every write list the whole cache (quadratic in the ~1e3-1e4
# entries of a session). A directory the user sets in JAX_COMPILATION_CACHE_DIR is used as is and kept.
_CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if not _CACHE_DIR:
  if "VLSAFE_TEST_XLA_CACHE" not in os.environ:      # the first process; xdist workers inherit the variable
    os.environ["VLSAFE_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="vlsafe_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["VLSAFE_TEST_XLA_CACHE"], ignore_errors=True)
  _CACHE_DIR = os.path.join(os.environ["VLSAFE_TEST_XLA_CACHE"], os.environ.get("PYTEST_XDIST_WORKER", "main"))

import jax  # noqa: E402
import pytest  # noqa: E402
from _pytest.nodeid import NodeId  # noqa: E402  (pytest >= 9.2: see _tag_xdist_groups)

# Parity tests compare against float32 PyTorch; default CPU matmuls are already fp32, but be explicit.
jax.config.update("jax_default_matmul_precision", "highest")

jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
# Cache every program: the repeats are mostly many small compiles (0.1-1 s each on 2 cores), not a few big ones.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
  if getattr(config, "workerinput", {}).get("vlsafe_loadgroup"):
    config.option.loadgroup = True     # read by xdist's worker when it reports the collected node ids
  assert jax.device_count() == 8, (
      f"expected 8 simulated CPU devices, got {jax.device_count()}: was JAX initialised before conftest.py?")


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


HAS_TORCH = _has_torch()


def _tag_xdist_groups(config, items):
  """Worker side of the loadgroup schedule: node id ``<id>@<group>`` for tests marked ``xdist_group``.

  xdist 3.8 does this by assigning ``item._nodeid``, which pytest 9.2 no longer reads (a node's id is now the
  ``NodeId`` in ``item._id``), so every group was silently split over both workers and its module fixtures built
  twice (measured: the multihost and smoke-run fixtures, ~100 s each, built on both workers). The id is re-made
  here the same way where the suffix is missing."""
  if not getattr(config.option, "loadgroup", False):     # absent under -p no:xdist
    return
  for item in items:
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    if names and "@" not in item.nodeid:
      item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")


@pytest.hookimpl(trylast=True)     # after xdist's own hook, so that its suffix (where it works) is seen
def pytest_collection_modifyitems(config, items):
  _tag_xdist_groups(config, items)
  # Tests marked `torch` need the [test] extra; they are skipped (visibly, with -ra) only when torch is
  # absent, which never happens in CI (the README install includes torch==2.13.0).
  if HAS_TORCH:
    return
  skip = pytest.mark.skip(reason="torch not installed (pip install -e .[test])")
  for item in items:
    if "torch" in item.keywords:
      item.add_marker(skip)


# --------------------------------------------------------------------------------------------------------------
# xdist schedule (pytest -n 2). Plain `--dist load` hands each worker tests in collection order, so a module-scoped
# fixture used by tests that land on both workers is built twice, and a long test picked up late leaves the other
# worker idle at the end. Under -n (when no other --dist is asked for) the controller below schedules like
# `--dist loadgroup` (tests marked @pytest.mark.xdist_group(name) run on one worker, in one go) and hands out the
# known-long work first. It is set here rather than in pytest's addopts so that `-p no:xdist` still parses.

# Durations (seconds, setup + call, measured on an idle 2-core host before the compilation cache; the group: its
# tests' sum, estimated) of the longest work units: an xdist_group by its name, any other test by its node id. Only
# the order of hand-out depends on them; a test missing here (or renamed) starts in collection order after these.
LONG_FIRST = {
    "tests/train/test_hysac_train.py::test_synthetic_phenomena": 319,
    "multihost": 300,          # tests/multihost: module fixture (3 processes) + 7 tests, measured 2026-12-03
    "hysac_smoke_run": 440,    # 270 + the HySAC notebook (tests/notebooks, same group: shared XLA cache), 2026-12-03
    "tests/notebooks/test_notebooks.py::test_notebook_executes[real_checkpoints]": 145,
    "tests/notebooks/test_notebooks.py::test_notebook_executes[uwm]": 100,
    "tests/notebooks/test_notebooks.py::test_notebook_executes[tga]": 95,
    "tests/notebooks/test_notebooks.py::test_notebook_executes[cmrm]": 90,   # uwm/tga/cmrm: ~83 s of CPU each, 2026-12-03
    "faults": 385,             # tests/train/test_faults.py: reference runs + 12 kills + 8->4->1 devices (clip:
                               # 245; the HySAC stage's 8->4->1 call measured 141 s on a loaded host, 2026-12-03)
    # tests/train/test_faults_jobs.py, one group per job (reference runs + 10 kills), measured 2026-12-04 with -n 2
    "faults_tga": 202,
    "faults_cmrm": 222,
    "faults_uwm": 105,
    "tests/methods/test_uwm_e2e.py::test_uwm_smoke_run_on_synthetic_benchmark": 163,
    "tests/bench/test_suite.py::test_cpu_smoke_suite_end_to_end": 116,
    "tests/train/test_hysac_train.py::test_validation_runs_each_epoch_and_early_stop_ends_the_stage": 112,
    "tests/train/test_hysac_train.py::test_sharded_step_equals_single_device_global_negatives": 86,
    "tests/train/test_tga_train.py::test_aux_terms_reach_projector_and_parity_mode": 55,
    "tests/methods/test_cmrm_synthetic.py::test_cmrm_synthetic_smoke": 50,
    "tests/train/test_hysac_train.py::test_local_negatives_are_mean_of_per_shard_losses": 50,
    "tests/train/test_tga_train.py::test_reference_pass_has_no_gradient_and_in_scan_means": 47,
    "tests/train/test_hysac_train.py::test_only_lora_and_scalars_change_and_clamp_in_step": 39,
    "tests/train/test_tga_aot.py::test_tga_7b_finetune_step_compiles_fsdp8_and_fits_80gb": 39,
    "tests/train/test_tga_train.py::test_smoke_run_reduces_loss_and_killed_run_resumes_bit_identically": 37,
}


def _uses_default_load_dist(config) -> bool:
  return config.getvalue("dist") == "load"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  # Controller -> worker: tag grouped tests' node ids with "@group" (xdist's loadgroup convention) when collecting.
  if _uses_default_load_dist(node.config):
    node.workerinput["vlsafe_loadgroup"] = True


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if not _uses_default_load_dist(config):
    return None        # an explicit --dist other than load: xdist's own scheduler
  # Lazy: pytest-xdist is needed only under -n; a plain `pytest` without it installed must still load this file.
  from xdist.scheduler import LoadGroupScheduling

  class LongFirstLoadGroup(LoadGroupScheduling):
    """loadgroup, with the work queue re-ordered once (stably) by LONG_FIRST before the first hand-out."""

    ordered = False

    def _assign_work_unit(self, node):
      if not self.ordered:
        units = sorted(self.workqueue.items(), key=lambda kv: -LONG_FIRST.get(kv[0], 0))
        self.workqueue = collections.OrderedDict(units)
        self.ordered = True
      super()._assign_work_unit(node)

  return LongFirstLoadGroup(config, log)
