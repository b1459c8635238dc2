"""vlsafe_jax.models.lora.dropout_mask / apply_dropout: the hashed LoRA dropout is Bernoulli(1 - p) inverted dropout.

Oracles are statistical (binomial standard deviations computed here from p and the sample size, 6-sigma bounds so a
correct generator fails with probability < 1e-8 per check) and exact ones (numpy formula for kept entries,
identity at p = 0, the same mask however the array is sharded over the 8 simulated devices).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlsafe_jax.models import lora as L

SHAPE = (7, 13, 257)          # odd, prime-ish dims: 23,387 entries per mask
N = int(np.prod(SHAPE))


def _within(observed: float, p: float, n: int, sigmas: float = 6.0) -> bool:
  return abs(observed - p) <= sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_independence(rate):
  keys = jax.random.split(jax.random.key(3), 4)
  masks = [np.asarray(L.dropout_mask(k, SHAPE, rate)) for k in keys]
  q = 1.0 - rate
  for m in masks:
    assert m.shape == SHAPE and m.dtype == np.bool_
    assert _within(m.mean(), q, N), m.mean()
    # Neighbours along the last axis and across rows are independent: P(both kept) = q^2.
    assert _within((m[..., 1:] & m[..., :-1]).mean(), q * q, m[..., 1:].size)
    assert _within((m[1:] & m[:-1]).mean(), q * q, m[1:].size)
    # No row or column structure: per-slice keep rates stay within 6 sigma of q.
    per_row = m.reshape(-1, SHAPE[-1]).mean(axis=1)
    assert np.all(np.abs(per_row - q) <= 6 * np.sqrt(q * (1 - q) / SHAPE[-1]))
  # Different keys (sites / steps) give independent masks: P(kept in both) = q^2.
  for a, b in ((0, 1), (0, 2), (2, 3)):
    assert not np.array_equal(masks[a], masks[b])
    assert _within((masks[a] & masks[b]).mean(), q * q, N)
  # Same key, same mask (a pure function of key and position).
  np.testing.assert_array_equal(masks[0], np.asarray(L.dropout_mask(keys[0], SHAPE, rate)))


def test_apply_dropout_values():
  x = jnp.asarray(np.random.RandomState(0).rand(*SHAPE).astype(np.float32) + 0.5)   # strictly positive
  key = jax.random.key(11)
  y = np.asarray(L.apply_dropout(x, key, 0.25))
  keep = np.asarray(L.dropout_mask(key, SHAPE, 0.25))
  np.testing.assert_allclose(y[keep], np.asarray(x)[keep] / 0.75, rtol=1e-6)
  assert np.all(y[~keep] == 0)
  assert y.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(L.apply_dropout(x, key, 0.0)), np.asarray(x))


def test_mask_is_sharding_invariant():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:8])
  shape = (8, 5, 3)
  key = jax.random.key(5)
  ref = np.asarray(L.dropout_mask(key, shape, 0.1))
  sharded = jax.jit(lambda k: L.dropout_mask(k, shape, 0.1), out_shardings=NamedSharding(mesh, P("data")))(key)
  np.testing.assert_array_equal(np.asarray(sharded), ref)


def test_mask_rejects_oversized_counter():
  with pytest.raises(ValueError, match="exceed the 2\\^32 counter range"):
    L.dropout_mask(jax.random.key(0), (2 ** 16, 2 ** 16 + 1), 0.1)
