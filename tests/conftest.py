"""Test-suite set-up: 8 simulated CPU devices, fp32 matmuls, offline HF.

The device count must be fixed before JAX initialises its backend, so this runs before any test module
imports jax-using code (pytest imports conftest.py first).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Both spellings: the flag works on every jax version; JAX_NUM_CPU_DEVICES on recent ones.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare against float32 PyTorch; default CPU matmuls are already fp32, but be explicit.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  assert jax.device_count() == 8, (
      f"expected 8 simulated CPU devices, got {jax.device_count()}: was JAX initialised before conftest.py?")


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


HAS_TORCH = _has_torch()


def pytest_collection_modifyitems(config, items):
  # Tests marked `torch` need the [test] extra; they are skipped (visibly, with -ra) only when torch is
  # absent, which never happens in CI (the README install includes torch==2.13.0).
  if HAS_TORCH:
    return
  skip = pytest.mark.skip(reason="torch not installed (pip install -e .[test])")
  for item in items:
    if "torch" in item.keywords:
      item.add_marker(skip)
