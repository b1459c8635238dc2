"""Which layers and positions CMRM steers (``cmrm.md`` §4.2): pure NumPy masks shared by extraction and steering.

Their own module so that :mod:`~vlsafe_jax.methods.cmrm.shift` (extraction, which can steer while it extracts) and
:mod:`~vlsafe_jax.methods.cmrm.steer` (which builds on shift) both import them at the top, without a cycle.
"""
from __future__ import annotations

from typing import Any

import numpy as np

APPLY_MODES = ("all", "new_tokens")


def layer_mask(layers: Any, num_layers: int) -> np.ndarray:
  """(L,) float32 0/1 from ``"all"``, ``"a:b"`` (Python slice of 0-based layer indices) or a list of indices."""
  m = np.zeros((num_layers,), np.float32)
  if layers is None or layers == "all":
    m[:] = 1
    return m
  if isinstance(layers, str):
    if ":" not in layers:
      raise ValueError(f"cmrm.layers {layers!r}: expected 'all', 'a:b' or a list of layer indices")
    a, b = layers.split(":", 1)
    m[slice(int(a) if a else None, int(b) if b else None)] = 1
    return m
  for i in layers:
    if not -num_layers <= int(i) < num_layers:
      raise ValueError(f"cmrm.layers index {i} out of range for {num_layers} decoder layers")
    m[int(i)] = 1
  return m


def prompt_steer_mask(attention_mask_bt: np.ndarray, apply: str) -> np.ndarray:
  """(B, T) int32 prompt steering mask for left-padded prompts: all real tokens, or only the last column."""
  mask = np.asarray(attention_mask_bt, np.int32)
  if apply == "all":
    return mask
  if apply == "new_tokens":
    out = np.zeros_like(mask)
    out[:, -1] = mask[:, -1]
    return out
  raise ValueError(f"cmrm.apply {apply!r} unknown; expected one of {APPLY_MODES}")


__all__ = ["APPLY_MODES", "layer_mask", "prompt_steer_mask"]
