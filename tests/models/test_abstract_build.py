"""Abstract models (shapes only): ``vlsafe_jax._compat.eval_shape``, ``nnx.eval_shape`` in linear time."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe

from vlsafe_jax import _compat
from vlsafe_jax.models.clip import CLIP

from _clip_configs import TINY  # tests/models is on sys.path (pytest prepends this file's folder)

def _make():
  return CLIP(TINY, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _count_origin_walks(monkeypatch) -> list[int]:
  """Counts the calls of the equation walk behind a tracer's AttributeError message."""
  calls = [0]
  original = pe.JaxprStackFrame.find_progenitors

  def counted(self, tracer):
    calls[0] += 1
    return original(self, tracer)
  monkeypatch.setattr(pe.JaxprStackFrame, "find_progenitors", counted)
  return calls


def test_same_abstract_state_as_nnx_eval_shape_without_walking_the_trace(monkeypatch):
  calls = _count_origin_walks(monkeypatch)
  want = nnx.state(nnx.eval_shape(_make))
  plain_calls, calls[0] = calls[0], 0
  got = nnx.state(_compat.eval_shape(_make))
  # One walk per parameter initialisation in plain nnx.eval_shape on jax 0.10.2 (0 once jax drops the walk);
  # none through the shim.
  print(f"equation walks: nnx.eval_shape {plain_calls}, _compat.eval_shape {calls[0]}")
  assert calls[0] == 0
  flat = lambda s: {k: (v.get_value().shape, v.get_value().dtype) for k, v in nnx.to_flat_state(s)}
  assert flat(got) == flat(want) and flat(got)
  assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in nnx.to_flat_state(got))


def test_the_patch_is_undone_after_the_block_and_on_errors():
  before = vars(pe.DynamicJaxprTracer)["_origin_msg"]

  def broken():
    _make()
    raise RuntimeError("boom")
  with pytest.raises(RuntimeError, match="boom"):
    _compat.eval_shape(broken)
  assert vars(pe.DynamicJaxprTracer)["_origin_msg"] is before

  # Outside the block, a tracer's missing attribute still explains where the tracer came from.
  @jax.jit
  def f(x):
    with pytest.raises(AttributeError, match="sharding"):
      x.sharding
    return x
  f(jnp.ones(2))
