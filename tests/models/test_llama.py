"""vlsafe_jax.models.llama against HF transformers' torch Llama/Mistral causal LMs (tiny random weights).

Tolerance for every parity check against HF: rtol = atol = 1e-5 (float32 both sides, highest matmul precision,
HF eager attention). Observed errors are ~1e-7. Weights go through the real converter
(``save_pretrained`` -> ``Llama.from_pretrained``), so these tests also cover checkpoints_convert/llama.py.
"""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _llama_hf import HF_KWARGS, PAD, VOCAB, add_steering_hooks, build_hf, hf_positions, padded_batch
from vlsafe_jax import sharding
from vlsafe_jax.models import llama as L
from vlsafe_jax.models.hooks import Hooks

RTOL = ATOL = 1e-5

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  hf = build_hf(request.param, d)
  return request.param, hf, L.Llama.from_pretrained(d), d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama_only")
  return build_hf("llama", d), d


def _hf_forward(hf, ids, mask, **kw):
  import torch
  with torch.no_grad():
    return hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(hf_positions(mask)), **kw)


def test_config_from_hf_reads_model_fields(pair):
  name, hf, model, d = pair
  cfg = model.config
  kw = HF_KWARGS[name]
  assert cfg.model_type == name
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (
      kw["hidden_size"], kw["num_hidden_layers"], kw["num_key_value_heads"])
  assert cfg.head_dim == kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
  assert cfg.sliding_window == kw.get("sliding_window")
  assert cfg.tie_word_embeddings == kw.get("tie_word_embeddings", False)
  assert cfg.rope_theta == kw.get("rope_theta", 10000.0)
  assert hasattr(model, "lm_head") != cfg.tie_word_embeddings


def test_logits_parity_single_and_left_padded(pair):
  _, hf, model, _ = pair
  # Unpadded single sequence (length 13 > sliding window 3) and a left-padded batch; compare real positions.
  for lengths, total in (([13], 13), ([11, 6, 2], 11)):
    ids, mask = padded_batch(lengths, total, seed=total)
    ref = _hf_forward(hf, ids, mask).logits.numpy()
    logits, cache, _ = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask))
    assert cache is None
    chex.assert_shape(logits, (len(lengths), total, VOCAB))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], rtol=RTOL, atol=ATOL)


def test_hidden_states_match_hf_output_hidden_states(pair):
  _, hf, model, _ = pair
  ids, mask = padded_batch([9, 5], 9, seed=3)
  ref = _hf_forward(hf, ids, mask, output_hidden_states=True).hidden_states
  _, _, extras = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask), hooks=Hooks(output_hidden_states=True))
  hs = np.asarray(extras["hidden_states"])
  n_layers = model.config.num_hidden_layers
  assert hs.shape[0] == n_layers + 1 == len(ref)
  valid = mask.astype(bool)
  # HF: index 0 = embeddings, i = output of layer i, except that the last entry is after the final norm.
  for i in range(n_layers):
    np.testing.assert_allclose(hs[i][valid], ref[i].numpy()[valid], rtol=RTOL, atol=ATOL, err_msg=f"layer {i}")
  np.testing.assert_allclose(np.asarray(extras["last_hidden_state"])[valid], ref[-1].numpy()[valid],
                             rtol=RTOL, atol=ATOL)
  # The raw last residual is what normalises into last_hidden_state.
  normed = L.rms_norm(jnp.asarray(hs[-1]), model.model.norm.scale.get_value(), model.config.rms_norm_eps)
  np.testing.assert_allclose(np.asarray(normed), np.asarray(extras["last_hidden_state"]), rtol=1e-6, atol=1e-6)


def test_steering_zero_is_identity_and_nonzero_matches_hf_hooks(pair):
  name, hf, model, _ = pair
  cfg = model.config
  ids, mask = padded_batch([8, 5], 8, seed=5)
  base, _, base_ex = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask),
                           hooks=Hooks(output_hidden_states=True))
  zero, _, _ = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask),
                     hooks=Hooks(steer_vectors=jnp.zeros((cfg.num_hidden_layers, cfg.hidden_size)), steer_alpha=0.7))
  np.testing.assert_allclose(np.asarray(zero), np.asarray(base), rtol=1e-6, atol=1e-6)

  rs = np.random.RandomState(0)
  v_bld = rs.normal(size=(2, cfg.num_hidden_layers, cfg.hidden_size)).astype(np.float32)
  if name == "mistral":
    v_bld[1] = v_bld[0]              # exercise the shared (L, D) form; HF hooks get the broadcast copy
  steer_mask = mask.copy()
  steer_mask[:, -2:] = 0            # steer all real positions except the last two: the mask is honoured
  alpha = 0.6
  handles = add_steering_hooks(hf, v_bld, steer_mask, alpha)
  try:
    ref = _hf_forward(hf, ids, mask)
  finally:
    for h in handles:
      h.remove()
  logits, _, extras = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask),
                            hooks=Hooks(steer_vectors=v_bld[0] if name == "mistral" else v_bld,
                                        steer_mask_bt=jnp.asarray(steer_mask), steer_alpha=jnp.float32(alpha),
                                        output_hidden_states=True))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref.logits.numpy()[valid], rtol=RTOL, atol=ATOL)
  # (HF records hidden_states before user hooks run, so check layer 1's output against its definition.)
  want_h1 = np.asarray(base_ex["hidden_states"][1]) + alpha * steer_mask[..., None] * v_bld[:, 0][:, None, :]
  np.testing.assert_allclose(np.asarray(extras["hidden_states"][1])[valid], want_h1[valid], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(logits) - np.asarray(base))[valid].max() > 1e-2     # steering did something


def test_kv_cache_decode_equals_full_forward_every_step(pair):
  _, _, model, _ = pair
  prompt_len, steps = 7, 5
  p_ids, p_mask = padded_batch([7, 4], prompt_len, seed=7)          # left-padded prompts
  new_ids = np.random.RandomState(8).randint(3, VOCAB, (2, steps))
  full_ids = np.concatenate([p_ids, new_ids], axis=1)
  full_mask = np.concatenate([p_mask, np.ones((2, steps), np.int64)], axis=1)
  full, _, _ = model(jnp.asarray(full_ids), attention_mask_bt=jnp.asarray(full_mask))

  step = nnx.jit(lambda m, x, msk, c: m(x, attention_mask_bt=msk, kv_cache=c))
  cache = model.init_cache(2, prompt_len + steps)
  logits, cache, _ = step(model, jnp.asarray(p_ids), jnp.asarray(p_mask), cache)
  valid = p_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(full)[:, :prompt_len][valid], rtol=RTOL,
                             atol=ATOL)
  for s in range(steps):
    t = prompt_len + s
    logits, cache, _ = step(model, jnp.asarray(full_ids[:, t:t + 1]), jnp.ones((2, 1), jnp.int32), cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], np.asarray(full)[:, t], rtol=RTOL, atol=ATOL,
                               err_msg=f"decode step {s}")
  assert int(cache.index) == prompt_len + steps
  np.testing.assert_array_equal(np.asarray(cache.lengths_b), full_mask.sum(-1))


def test_captures_at_positions_and_masked_means_equal_hidden_states(pair):
  _, _, model, _ = pair
  ids, mask = padded_batch([9, 6], 9, seed=11)
  pos_bp = jnp.asarray([[8, 2], [8, 5]])
  masks_bmt = np.zeros((2, 2, 9), np.float32)
  masks_bmt[0, 0, 2:5] = 1
  masks_bmt[1, 0, 4:9] = 1
  masks_bmt[:, 1, -1] = 1
  _, _, ex = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask),
                   hooks=Hooks(output_hidden_states=True, hidden_positions_bp=pos_bp,
                               hidden_masks_bmt=jnp.asarray(masks_bmt)))
  hs = np.asarray(ex["hidden_states"])[1:]                                        # (L, B, T, D)
  n_layers = model.config.num_hidden_layers
  chex.assert_shape(ex["hidden_at_positions"], (2, n_layers, 2, model.config.hidden_size))
  for b in range(2):
    for j in range(2):
      np.testing.assert_array_equal(np.asarray(ex["hidden_at_positions"])[b, :, j], hs[:, b, int(pos_bp[b, j])])
  want = np.einsum("bmt,lbtd->blmd", masks_bmt, hs) / masks_bmt.sum(-1)[:, None, :, None]
  np.testing.assert_allclose(np.asarray(ex["hidden_masked_means"]), want, rtol=1e-5, atol=1e-6)
  # A truncated stack (TGA reference pass) returns the same layer outputs and no logits.
  logits, _, ex2 = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask),
                         hooks=Hooks(num_layers=1, hidden_masks_bmt=jnp.asarray(masks_bmt)))
  assert logits is None
  np.testing.assert_allclose(np.asarray(ex2["hidden_masked_means"]), want[:, :1], rtol=1e-5, atol=1e-6)


def test_rope_config_forms_and_llama3_inv_freq_match_hf():
  import torch  # noqa: F401
  import transformers
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=37, vocab_size=11,
              max_position_embeddings=131072)
  llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
  # Hub form (top-level rope_theta + rope_scaling with legacy "type") and transformers-5 rope_parameters.
  hub = dict(base, model_type="llama", rope_theta=500000.0,
                rope_scaling={"type": "llama3", **{k: v for k, v in llama3.items() if k != "rope_type"}})
  v5 = transformers.LlamaConfig(**base, rope_parameters=dict(llama3, rope_theta=500000.0))
  c_hub, c_v5 = L.LlamaConfig.from_hf(hub), L.LlamaConfig.from_hf(v5)
  assert c_hub == c_v5
  assert (c_v5.rope_type, c_v5.rope_factor, c_v5.rope_theta) == ("llama3", 8.0, 500000.0)
  ref, _ = ROPE_INIT_FUNCTIONS["llama3"](v5, "cpu")
  np.testing.assert_allclose(L.rope_inv_freq(c_v5), ref.numpy(), rtol=1e-6, atol=0)
  # The blend region is actually exercised (some frequencies are neither kept nor fully divided).
  plain = L.rope_inv_freq(L.LlamaConfig.from_hf(dict(base, rope_theta=500000.0)))
  ratio = L.rope_inv_freq(c_v5) / plain
  assert np.any((ratio > 1 / 8 + 1e-6) & (ratio < 1 - 1e-6))

  lin = transformers.LlamaConfig(**base, rope_parameters=dict(rope_type="linear", factor=2.5, rope_theta=1000.0))
  ref_lin, _ = ROPE_INIT_FUNCTIONS["linear"](lin, "cpu")
  np.testing.assert_allclose(L.rope_inv_freq(L.LlamaConfig.from_hf(lin)), ref_lin.numpy(), rtol=1e-6, atol=0)
  dflt = transformers.LlamaConfig(**base)
  hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(dflt)
  np.testing.assert_allclose(L.rope_inv_freq(L.LlamaConfig.from_hf(dflt)), hf_rope.inv_freq.numpy(), rtol=1e-6)

  with pytest.raises(ValueError, match="dynamic"):
    L.LlamaConfig.from_hf(dict(base, model_type="llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
  with pytest.raises(ValueError, match="not a multiple"):
    L.LlamaConfig(hidden_size=40, num_attention_heads=4, num_key_value_heads=3)


def test_converter_fails_loud_on_missing_and_misshaped(tmp_path, llama_dir):
  _, d = llama_dir
  from checkpoints_convert.mapping import ConversionError
  from checkpoints_convert.safetensors_io import SafetensorsFile, save_safetensors
  src = SafetensorsFile(d / "model.safetensors")
  tensors = {k: src.get(k) for k in src.shapes()}
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.2.self_attn.k_proj.weight"] = tensors["model.layers.2.self_attn.k_proj.weight"][:, :7]
  tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
  bad = tmp_path / "bad"
  bad.mkdir()
  save_safetensors(bad / "model.safetensors", tensors, metadata={"format": "pt"})
  (bad / "config.json").write_text((d / "config.json").read_text())
  with pytest.raises(ConversionError) as e:
    L.Llama.from_pretrained(bad)
  msg = str(e.value)
  assert "model.layers.1.mlp.up_proj.kernel" in msg                     # missing, by our path
  assert "model.layers.2.self_attn.k_proj.weight" in msg and "(20, 7)" in msg     # mis-shaped, with shape
  assert "model.layers.0.extra.weight" in msg                            # unexpected


def test_export_roundtrip_equals_hf_state_dict(tmp_path, pair):
  _, hf, model, _ = pair
  from checkpoints_convert import llama as conv
  from checkpoints_convert.safetensors_io import SafetensorsFile
  conv.export_hf(model, tmp_path)
  out = SafetensorsFile(tmp_path / "model.safetensors")
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  if model.config.tie_word_embeddings:
    sd.pop("lm_head.weight")
  assert set(out.shapes()) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(out.get(k), v, err_msg=k)


@pytest.mark.multidevice
def test_sharded_fsdp_tp_forward_equals_single_device(llama_dir):
  model = L.Llama.from_pretrained(llama_dir[1])
  ids, mask = padded_batch([8, 5, 8, 3], 8, seed=13)
  want, _, _ = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask))
  mesh = sharding.make_mesh(data=1, fsdp=4, model=2)
  graphdef, state = nnx.split(model)
  placed = sharding.place_state(state, mesh)
  # q_proj kernel (L, D=40, N*H=40): embed over fsdp (40 % 4 == 0), heads over model (40 % 2 == 0).
  spec = placed["model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value().sharding.spec
  assert tuple(spec) == (None, "fsdp", "model")

  @jax.jit
  def fwd(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask_bt=mask)[0]

  with jax.set_mesh(mesh):
    got = fwd(placed, sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_float32(llama_dir):
  d = llama_dir[1]
  model = L.Llama.from_pretrained(d)
  ids, mask = padded_batch([10, 7], 10, seed=17)
  ref, _, _ = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask))
  m16 = L.Llama.from_pretrained(d, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert m16.model.layers.mlp.up_proj.kernel.get_value().dtype == jnp.float32
  got, cache, ex = m16(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask), kv_cache=m16.init_cache(2, 12))
  assert got.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
  assert ex["last_hidden_state"].dtype == jnp.bfloat16
  valid = mask.astype(bool)
  p = jax.nn.log_softmax(ref[valid])
  q = jax.nn.log_softmax(got[valid])
  kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
  assert kl < 0.015, kl                        # perf.md bf16 bound


def test_bad_inputs_raise_named_errors(pair):
  _, _, model, _ = pair
  cfg = model.config
  with pytest.raises(ValueError, match="exactly one"):
    model()
  with pytest.raises(ValueError, match="attention_mask shape"):
    model(jnp.zeros((2, 5), jnp.int32), attention_mask_bt=jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="steer_vectors must be"):
    model(jnp.zeros((2, 5), jnp.int32),
          hooks=Hooks(steer_vectors=jnp.zeros((cfg.num_hidden_layers + 1, cfg.hidden_size))))
  with pytest.raises(ValueError, match="model_type"):
    L.LlamaConfig.from_hf({"model_type": "clip"})


def test_remat_gives_identical_gradients():
  cfg = L.LlamaConfig(vocab_size=31, hidden_size=24, intermediate_size=19, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 31, (2, 7)))

  def grads(remat):
    import dataclasses
    model = L.Llama(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0))

    @nnx.jit
    def g(m):
      return nnx.grad(lambda m: jnp.mean(jax.nn.log_softmax(m(ids)[0])[..., 0]))(m)
    return g(model)

  a, b = grads(False), grads(True)
  # Remat recomputes the forward inside the backward pass, where XLA may fuse (and so round) differently: compare
  # each leaf relative to its own scale, 1e-5 ~ 170 u for a 2-layer, 24-wide model (a wrong recompute is O(1)).
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * np.abs(y).max())
  assert float(jnp.abs(a["model"]["layers"]["mlp"]["up_proj"]["kernel"].get_value()).max()) > 0


# llama3 RoPE with a tiny original context (16) so that a 40-token sequence runs well past it. head_dim 10, theta
# 1e4: wavelengths 2*pi/inv_freq ~ 6.3, 40, 251, 1580, 9952 against the band edges 16/4 = 4 (high) and 16/1 = 16
# (low): frequency 0 falls in the blend band, frequencies 1-4 are divided by the factor 8, none is kept as is.
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16, rope_theta=10000.0)


def test_llama3_scaled_rope_full_forward_matches_hf(tmp_path):
  """Logits of a llama3-RoPE model (converted from the saved HF checkpoint) equal HF's, RTOL = ATOL = 1e-5.

  Seen to fail: the same weights loaded with the rope scaling removed from config.json differ from HF by ~3e-3
  (about 300x the tolerance; the tiny random model's logits are O(0.1)), checked at the end of the test."""
  hf = build_hf("llama", tmp_path, rope_parameters=dict(LLAMA3_ROPE), max_position_embeddings=128)
  model = L.Llama.from_pretrained(tmp_path)
  assert (model.config.rope_type, model.config.rope_factor) == ("llama3", 8.0)
  np.testing.assert_allclose(L.rope_inv_freq(model.config), hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  ids, mask = padded_batch([40, 29], 40, seed=23)
  ref = _hf_forward(hf, ids, mask).logits.numpy()
  logits, _, _ = model(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], rtol=RTOL, atol=ATOL)
  # The oracle would catch an unscaled RoPE: drop the scaling from the checkpoint and the logits move far away.
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.pop("rope_scaling", None)
  cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  plain = L.Llama.from_pretrained(tmp_path)
  assert plain.config.rope_type == "default"
  unscaled, _, _ = plain(jnp.asarray(ids), attention_mask_bt=jnp.asarray(mask))
  assert np.abs(np.asarray(unscaled)[valid] - ref[valid]).max() > 100 * ATOL
