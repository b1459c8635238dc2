"""Feature-detected shims for differences between jax 0.10.2 (CPU build) and 0.11.x (GPU machines).

Rule (platform.md §8.4): detect features, never compare version strings.
"""
from __future__ import annotations

import jax

# jax.shard_map is public from 0.8 on; keep one import site in case its home moves again.
shard_map = jax.shard_map


def enable_x64(enabled: bool = True):
  """Context manager turning on float64 (``jax.enable_x64`` exists in 0.10.2; the experimental one is gone)."""
  return jax.enable_x64(enabled)


def device_kind() -> str:
  return jax.devices()[0].device_kind
