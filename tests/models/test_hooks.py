"""The decoder's hook pytree (models/hooks.py) on a tiny random Llama (no torch): steering one layer at chosen
positions is that layer's captured output plus ``alpha * v`` computed by hand, captures agree with each other, and
only the static fields (captures of every layer, truncation) change the compiled program."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlsafe_jax.models import decoding, llama as L
from vlsafe_jax.models.hooks import Hooks

# Deliberately odd sizes (style.md rule 8): 3 layers, width 24, batch 2, 7 tokens.
CFG = L.LlamaConfig(vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, pad_token_id=0)
B, T = 2, 7


@pytest.fixture(scope="module")
def model():
  return L.Llama(CFG, rngs=nnx.Rngs(0))


def _inputs():
  ids = np.random.RandomState(0).randint(1, CFG.vocab_size, (B, T))
  mask = np.ones((B, T), np.int32)
  mask[1, :2] = 0                                             # left padding on row 1
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("per_example", [False, True])
def test_steering_one_layer_at_positions_equals_adding_to_its_captured_output(model, per_example):
  ids, mask = _inputs()
  k, alpha = 1, 0.7                                           # steer layer k's output only
  rs = np.random.RandomState(1)
  v = np.zeros((B, CFG.num_hidden_layers, CFG.hidden_size), np.float32)
  v[:, k] = rs.normal(size=(B, CFG.hidden_size)) if per_example else rs.normal(size=CFG.hidden_size)
  s_mask = np.zeros((B, T), np.int32)
  s_mask[0, [2, 5]] = 1
  s_mask[1, 6] = 1
  _, _, base = model(ids, attention_mask_bt=mask, hooks=Hooks(output_hidden_states=True))
  hooks = Hooks(steer_vectors=jnp.asarray(v if per_example else v[0]), steer_mask_bt=jnp.asarray(s_mask),
                steer_alpha=alpha, output_hidden_states=True)
  _, _, st = model(ids, attention_mask_bt=mask, hooks=hooks)
  hb, hs = np.asarray(base["hidden_states"]), np.asarray(st["hidden_states"])   # (L + 1, B, T, D)
  # Embeddings and the layers before k are untouched; layer k's output gains alpha * v_k exactly where asked.
  np.testing.assert_array_equal(hs[:k + 1], hb[:k + 1])
  want = hb[k + 1] + alpha * s_mask[..., None] * v[:, k][:, None, :]
  np.testing.assert_allclose(hs[k + 1], want, rtol=1e-6, atol=1e-6)
  # Causal attention: the next layer still agrees before the first steered position, and differs after it.
  np.testing.assert_array_equal(hs[k + 2][0, :2], hb[k + 2][0, :2])
  assert np.abs(hs[k + 2][0, 2:] - hb[k + 2][0, 2:]).max() > 1e-3


def test_captures_agree_and_truncation_stops_early(model):
  ids, mask = _inputs()
  pos = jnp.asarray([[6, 3], [6, 4]])
  masks = np.zeros((B, 1, T), np.float32)
  masks[0, 0, 1:4] = 1
  masks[1, 0, 3:7] = 1
  logits, _, ex = model(ids, attention_mask_bt=mask, hooks=Hooks(output_hidden_states=True, hidden_positions_bp=pos,
                                                                   hidden_masks_bmt=jnp.asarray(masks)))
  hs = np.asarray(ex["hidden_states"])[1:]                   # (L, B, T, D)
  for b in range(B):
    for j in range(2):
      np.testing.assert_array_equal(np.asarray(ex["hidden_at_positions"])[b, :, j], hs[:, b, int(pos[b, j])])
  want = np.einsum("bmt,lbtd->blmd", masks, hs) / masks.sum(-1)[:, None, :, None]
  np.testing.assert_allclose(np.asarray(ex["hidden_masked_means"]), want, rtol=1e-5, atol=1e-6)
  assert logits.shape == (B, T, CFG.vocab_size)
  cut, _, ex2 = model(ids, attention_mask_bt=mask, hooks=Hooks(hidden_masks_bmt=jnp.asarray(masks), num_layers=2))
  assert cut is None
  np.testing.assert_allclose(np.asarray(ex2["hidden_masked_means"]), want[:, :2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ex2["last_hidden_state"]), hs[1], rtol=1e-6, atol=1e-6)   # no final norm


def test_only_static_fields_retrace(model):
  ids, mask = _inputs()
  traces = collections.Counter()

  @nnx.jit
  def fwd(m, hooks):
    traces["n"] += 1
    return m(ids, attention_mask_bt=mask, hooks=hooks, logits="none")[2]

  v = jnp.ones((CFG.num_hidden_layers, CFG.hidden_size))
  for alpha, scale in ((0.5, 1.0), (2.0, -3.0)):       # new vectors, alpha and masks: same program
    fwd(model, Hooks(steer_vectors=scale * v, steer_alpha=jnp.float32(alpha), steer_mask_bt=mask,
                     hidden_masks_bmt=jnp.ones((B, 1, T))))
  assert traces["n"] == 1
  fwd(model, Hooks(steer_vectors=v, steer_alpha=jnp.float32(1.0), steer_mask_bt=mask,
                   hidden_masks_bmt=jnp.ones((B, 1, T)), num_layers=2))
  assert traces["n"] == 2
  # Static fields are pytree structure, array fields are leaves.
  leaves = jax.tree.leaves(Hooks(steer_vectors=v, output_hidden_states=True, num_layers=2))
  assert len(leaves) == 3                                      # vectors, alpha, decode flag


def test_bad_hooks_raise_named_errors(model):
  ids, mask = _inputs()
  with pytest.raises(ValueError, match="steer_vectors must be"):
    model(ids, hooks=Hooks(steer_vectors=jnp.zeros((CFG.num_hidden_layers + 1, CFG.hidden_size))))
  with pytest.raises(ValueError, match="steer_mask shape"):
    model(ids, hooks=Hooks(steer_vectors=jnp.zeros((CFG.num_hidden_layers, CFG.hidden_size)),
                           steer_mask_bt=jnp.ones((B, T + 1))))
  with pytest.raises(ValueError, match="num_layers"):
    model(ids, hooks=Hooks(num_layers=CFG.num_hidden_layers + 1))
  # Generation returns no captures, so it refuses capture hooks instead of silently dropping them.
  with pytest.raises(ValueError, match="steering hooks only"):
    decoding.generate(model, input_ids=ids, attention_mask=mask, hooks=Hooks(output_hidden_states=True))
  with pytest.raises(ValueError, match="steering mask"):
    decoding.generate_text(model, [[3, 4, 5]], hooks=Hooks(steer_vectors=jnp.zeros((3, 24)),
                                                           steer_mask_bt=np.ones((1, 3))))
