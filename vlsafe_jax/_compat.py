"""Feature-detected shims for differences between jax 0.10.2 (CPU build) and 0.11.x (GPU machines), and for
performance traps of the pinned versions.

Rule (platform.md §8.4): detect features, never compare version strings.
"""
from __future__ import annotations

import contextlib

import jax

# jax.shard_map is public from 0.8 on; keep one import site in case its home moves again.
shard_map = jax.shard_map


def enable_x64(enabled: bool = True):
  """Context manager turning on float64 (``jax.enable_x64`` exists in 0.10.2; the experimental one is gone)."""
  return jax.enable_x64(enabled)


def device_kind() -> str:
  return jax.devices()[0].device_kind


@contextlib.contextmanager
def _cheap_tracer_probes():
  """Within the block, probing a missing attribute of a tracer (``getattr(tracer, "sharding", None)``) costs O(1).

  In jax 0.10.2 ``Tracer.sharding`` raises an AttributeError whose message walks every equation traced so far
  (``DynamicJaxprTracer._origin_msg``), and flax.nnx's ``Variable.set_value`` probes ``value.sharding`` on each
  assignment (each ``rngs.params()`` call increments a counter that way). Building a model under ``nnx.eval_shape``
  was therefore quadratic in its parameter count: CLIP ViT-L/14 with LoRA took 27 s to trace on 2 CPU cores, 2.2 s
  with this block (upstream: jax-ml/jax#40041 removes that part of the message). Only the message text changes; the
  error itself and every traced value are the same. Where jax has no such method, nothing is changed.
  """
  try:
    from jax._src.interpreters import partial_eval as pe
  except ImportError:            # jax's internals moved: the trap is gone or elsewhere; nothing to do
    yield
    return
  cls = getattr(pe, "DynamicJaxprTracer", None)
  original = vars(cls).get("_origin_msg") if cls is not None else None
  if original is None:
    yield
    return
  cls._origin_msg = lambda self: ""
  try:
    yield
  finally:
    cls._origin_msg = original


def eval_shape(fn):
  """``nnx.eval_shape(fn)`` (an abstract model: shapes and dtypes, no memory, no FLOPs) in time linear in the
  model's size (:func:`_cheap_tracer_probes`). Not thread-safe with respect to error messages: another thread
  tracing at the same time also gets the short AttributeError text."""
  from flax import nnx
  with _cheap_tracer_probes():
    return nnx.eval_shape(fn)
