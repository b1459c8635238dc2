"""Declarative HF <-> nnx weight mapping: name templates + named layout transforms + shape checks.

A :class:`Rule` pairs an HF key template with an nnx state-path template (paths joined by ``.``), e.g.
``Rule("{tower}.encoder.layers.{i}.{lin}.weight", "{tower}.encoder.layers.{i}.{lin}.kernel", LINEAR)``;
placeholders are regexes shared by a :class:`KeyMap`, so one table serves both directions (import and export).

Importing (:func:`load_state`) checks everything before moving a byte: each checkpoint key must match exactly
one rule (or an ignore pattern such as ``*.position_ids`` buffers), land on a path the abstract model has, and
have the shape the transform predicts; every model path must be covered. All problems go into ONE
:class:`ConversionError` listing missing, unexpected, mis-shaped, ambiguous and duplicate tensors with names and
shapes (style.md rule 3). Then tensors stream one at a time, are transformed, cast and optionally placed with
a target sharding (big models load straight into a sharded state).
"""
from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The error type, the flat-state helpers and tensor placement are shared with the native format (model_io);
# re-exported here because the HF tables and their users know them under this module.
from vlsafe_jax.model_io import (ConversionError, contiguous, fill_state, flat_abstract, is_float, path_str,
                                 placement)


class Transform(enum.Enum):
  """Named HF -> nnx layout transforms (platform.md §4.1); each has an exact inverse for export."""
  IDENTITY = "identity"
  LINEAR = "linear"          # torch Linear weight [out, in] -> nnx kernel [in, out]
  CONV2D = "conv2d"          # torch Conv2d weight OIHW -> nnx kernel HWIO

  def forward(self, x: np.ndarray) -> np.ndarray:
    if self is Transform.LINEAR:
      return x.T
    if self is Transform.CONV2D:
      return x.transpose(2, 3, 1, 0)
    return x

  def inverse(self, x: np.ndarray) -> np.ndarray:
    if self is Transform.LINEAR:
      return x.T
    if self is Transform.CONV2D:
      return x.transpose(3, 2, 0, 1)
    return x

  def forward_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The nnx shape a tensor of HF ``shape`` becomes; None-free, rank-checked by the caller."""
    shape = tuple(shape)
    if self is Transform.LINEAR and len(shape) == 2:
      return shape[::-1]
    if self is Transform.CONV2D and len(shape) == 4:
      return (shape[2], shape[3], shape[1], shape[0])
    return shape

  def rank(self) -> int | None:
    return {Transform.LINEAR: 2, Transform.CONV2D: 4}.get(self)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str                      # HF key template, e.g. "{tower}.encoder.layers.{i}.{lin}.weight"
  ours: str                    # nnx path template with the same placeholders
  transform: Transform = Transform.IDENTITY


def _compile(template: str, placeholders: Mapping[str, str]) -> re.Pattern:
  out, pos = [], 0
  for m in re.finditer(r"\{(\w+)\}", template):
    out.append(re.escape(template[pos:m.start()]))
    name = m.group(1)
    if name not in placeholders:
      raise KeyError(f"template {template!r} uses undefined placeholder {{{name}}}")
    out.append(f"(?P<{name}>{placeholders[name]})")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("".join(out) + r"\Z")


class KeyMap:
  """A rule table plus placeholder regexes and ignore patterns, usable in both directions."""

  def __init__(self, rules: Sequence[Rule], placeholders: Mapping[str, str], ignore: Sequence[str] = ()):
    self.rules = tuple(rules)
    self._hf = [_compile(r.hf, placeholders) for r in self.rules]
    self._ours = [_compile(r.ours, placeholders) for r in self.rules]
    self._ignore = [re.compile(p) for p in ignore]

  def ignored(self, hf_key: str) -> bool:
    return any(p.search(hf_key) for p in self._ignore)

  def to_ours(self, hf_key: str) -> list[tuple[str, Transform]]:
    """Every (nnx path, transform) whose HF template matches ``hf_key`` (exactly one is expected)."""
    out = []
    for rule, rx in zip(self.rules, self._hf):
      m = rx.match(hf_key)
      if m:
        out.append((rule.ours.format(**m.groupdict()), rule.transform))
    return out

  def to_hf(self, path: str) -> list[tuple[str, Transform]]:
    out = []
    for rule, rx in zip(self.rules, self._ours):
      m = rx.match(path)
      if m:
        out.append((rule.hf.format(**m.groupdict()), rule.transform))
    return out


def plan_import(keymap: KeyMap, source_shapes: Mapping[str, tuple[tuple[int, ...], str]],
                targets: Mapping[str, tuple[int, ...]], source_name: str) -> list[tuple[str, str, Transform]]:
  """Matches checkpoint keys to model paths; raises one ConversionError with every problem found.

  Args:
    source_shapes: {hf_key: (shape, dtype name)} from a tensor source.
    targets: {nnx path: expected shape} of the abstract model.
  Returns: [(hf_key, nnx path, transform)] in checkpoint order.
  """
  plan, unexpected, misshaped, ambiguous = [], [], [], []
  by_target: dict[str, list[str]] = {}
  for key, (shape, _) in source_shapes.items():
    if keymap.ignored(key):
      continue
    hits = keymap.to_ours(key)
    if not hits:
      unexpected.append((key, shape, "no rule matches"))
      continue
    if len(hits) > 1:
      ambiguous.append((key, [h[0] for h in hits]))
      continue
    path, tf = hits[0]
    if path not in targets:
      unexpected.append((key, shape, f"maps to {path}, which this model does not have"))
      continue
    by_target.setdefault(path, []).append(key)
    want = tuple(targets[path])
    got = tf.forward_shape(shape)
    if (tf.rank() is not None and len(shape) != tf.rank()) or got != want:
      misshaped.append((key, tuple(shape), path, got, want))
      continue
    plan.append((key, path, tf))
  duplicate = [(p, ks) for p, ks in by_target.items() if len(ks) > 1]
  missing = [(p, tuple(s)) for p, s in targets.items() if p not in by_target]
  if missing or unexpected or misshaped or ambiguous or duplicate:
    raise ConversionError(source_name, missing, unexpected, misshaped, ambiguous, duplicate)
  return plan


def load_state(keymap: KeyMap, source, abstract_state: nnx.State, *, source_name: str,
               param_dtype: Any = None, shardings: nnx.State | None = None,
               progress: Callable[[str], None] | None = None) -> nnx.State:
  """Fills ``abstract_state`` (from ``nnx.split(nnx.eval_shape(...))``) with checkpoint tensors.

  Args:
    source: a tensor source (``shapes()``, ``get(key)``; see safetensors_io).
    param_dtype: cast every floating tensor to it; None keeps the checkpoint dtype (bf16 stays bf16).
    shardings: optional State of ``jax.sharding.Sharding`` with the structure of ``abstract_state``
      (e.g. ``vlsafe_jax.sharding.state_shardings``): each tensor is placed as soon as it is read.
  Returns: a concrete nnx State (same structure) ready for ``nnx.merge``.
  """
  targets = {p: tuple(v.get_value().shape) for p, (_, v) in flat_abstract(abstract_state).items()}
  plan = plan_import(keymap, source.shapes(), targets, source_name)

  def tensors():
    for key, path, tf in plan:
      yield path, tf.forward(source.get(key))
      if progress:
        progress(key)

  return fill_state(abstract_state, tensors(), param_dtype=param_dtype, shardings=shardings)


def export_tensors(keymap: KeyMap, state: nnx.State, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF key, numpy array in HF layout) for every tensor of a concrete nnx State.

  Raises one ConversionError naming every state path that no rule (or several) maps back.
  """
  flat = flat_abstract(state)
  plan, unexpected, ambiguous = [], [], []
  for path, (_, var) in flat.items():
    hits = keymap.to_hf(path)
    shape = tuple(np.shape(var.get_value()))
    if not hits:
      unexpected.append((path, shape, "no rule maps this model tensor to an HF key"))
    elif len(hits) > 1:
      ambiguous.append((path, [h[0] for h in hits]))
    else:
      plan.append((path, *hits[0]))
  if unexpected or ambiguous:
    raise ConversionError("export", unexpected=unexpected, ambiguous=ambiguous)
  for path, key, tf in plan:
    arr = np.asarray(jax.device_get(flat[path][1].get_value()))
    if dtype is not None and is_float(arr.dtype):
      arr = arr.astype(dtype)
    yield key, contiguous(tf.inverse(arr))


def dtype_from_name(name: str | None):
  """A CLI dtype name (``float32`` / ``bfloat16`` / ``float16``) -> ``jnp.bfloat16`` or a numpy dtype; None (keep
  the stored dtype) stays None."""
  if name is None:
    return None
  return jnp.bfloat16 if name == "bfloat16" else np.dtype(name)


__all__ = ["dtype_from_name", "placement", "Transform", "Rule", "KeyMap", "ConversionError", "plan_import",
           "load_state", "export_tensors", "flat_abstract", "path_str"]
