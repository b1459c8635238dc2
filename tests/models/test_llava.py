"""vlsafe_jax.models.llava against HF ``LlavaForConditionalGeneration`` (tiny random Llama and Mistral variants).

Tolerance for every parity check against HF: rtol = atol = 1e-5 (float32 both sides, highest matmul precision,
HF eager attention); observed errors are ~1e-7. Weights go through checkpoints_convert/llava.py
(``save_pretrained`` -> ``Llava.from_pretrained``). Generation must be token-identical to HF greedy ``generate``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _llava_hf import IMAGE_SIZE, IMAGE_TOKEN, N_IMG, PAD, VOCAB, build_hf, hf_positions, nchw, pad_rows, prompt
from vlsafe_jax import sharding
from vlsafe_jax.models import decoding
from vlsafe_jax.models import llava as LV
from vlsafe_jax.models.hooks import Hooks

RTOL = ATOL = 1e-5

pytestmark = pytest.mark.torch


_BUILT = {}
_DIRS = {}                      # name -> the saved HF checkpoint directory (for loads onto a mesh)


def _get(name, tmp_path_factory):
  # One build per variant per session, shared by the parametrised and the Llama-only fixtures.
  if name not in _BUILT:
    d = tmp_path_factory.mktemp(f"llava_{name}")
    hf = build_hf(name, d, seed=1 if name == "llama" else 2)
    _DIRS[name] = d
    _BUILT[name] = (name, hf, LV.Llava.from_pretrained(d))
  return _BUILT[name]


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request, tmp_path_factory):
  return _get(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
  return _get("llama", tmp_path_factory)


def _batch(seed=0):
  """Three prompts: image+text, text-only, image+text (different lengths); two images."""
  rs = np.random.RandomState(seed)
  rows = [prompt(rs, 4, 5, True), prompt(rs, 7, 3, False), prompt(rs, 2, 2, True)]
  pixels = rs.randn(2, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  return rows, pixels


def _hf_logits(hf, ids, mask, pixels, positions=True, **kw):
  import torch
  extra = {"position_ids": torch.tensor(hf_positions(mask))} if positions else {}
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=nchw(pixels),
              **extra, **kw)


def test_config_from_hf(pair):
  name, hf, model = pair
  cfg = model.config
  assert cfg.num_image_tokens == N_IMG and cfg.image_token_index == IMAGE_TOKEN
  assert cfg.text_config.model_type == name and cfg.vision_config.num_hidden_layers == 3
  assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
  assert cfg.text_config.sliding_window == (7 if name == "mistral" else None)


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_hf_mixed_padded_batch(pair, side):
  _, hf, model = pair
  rows, pixels = _batch()
  ids, mask = pad_rows(rows, side)
  # HF's forward numbers positions 0..T-1 (right padding); left padding needs generate's cumsum positions.
  ref = _hf_logits(hf, ids, mask, pixels, positions=side == "left").logits.numpy()
  logits, _, _ = model(jnp.asarray(ids), jnp.asarray(pixels), attention_mask_bt=jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], rtol=RTOL, atol=ATOL)
  # A text-only prompt alone (no pixels at all) equals its row in the mixed batch.
  one_ids, one_mask = pad_rows([rows[1]], side)
  alone, _, _ = model(jnp.asarray(one_ids), None, attention_mask_bt=jnp.asarray(one_mask))
  np.testing.assert_allclose(np.asarray(alone)[0][one_mask[0] > 0], ref[1][valid[1]], rtol=RTOL, atol=ATOL)


def test_greedy_generation_matches_hf(pair):
  import torch
  _, hf, model = pair
  rows, pixels = _batch(seed=5)
  ids, mask = pad_rows(rows, "left")
  n_new = 24
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=nchw(pixels),
                      max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=PAD)
  ref = ref[:, ids.shape[1]:].numpy()
  out = LV.generate(model, rows, jnp.asarray(pixels), max_new_tokens=n_new, eos_token_id=())
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
  # The same batch given as a right-padded array gives the same tokens (re-padded on the left).
  r_ids, r_mask = pad_rows(rows, "right")
  out_r = LV.generate(model, r_ids, pixels, r_mask, max_new_tokens=n_new, eos_token_id=())
  np.testing.assert_array_equal(np.asarray(out_r.tokens), ref)


def test_hidden_states_and_zero_steering(pair):
  _, hf, model = pair
  rows, pixels = _batch(seed=2)
  ids, mask = pad_rows(rows, "left")
  ref = _hf_logits(hf, ids, mask, pixels, output_hidden_states=True).hidden_states
  last = np.full((len(rows), 1), ids.shape[1] - 1)
  base, _, ex = model(jnp.asarray(ids), jnp.asarray(pixels), attention_mask_bt=jnp.asarray(mask),
                      hooks=Hooks(output_hidden_states=True, hidden_positions_bp=jnp.asarray(last)))
  hs = np.asarray(ex["hidden_states"])
  n = model.config.text_config.num_hidden_layers
  assert hs.shape[0] == n + 1 == len(ref)
  valid = mask.astype(bool)
  # HF: index 0 = embeddings (image features spliced in), i = output of layer i; its last entry is normed.
  for i in range(n):
    np.testing.assert_allclose(hs[i][valid], ref[i].numpy()[valid], rtol=RTOL, atol=ATOL, err_msg=f"layer {i}")
  np.testing.assert_allclose(np.asarray(ex["last_hidden_state"])[valid], ref[-1].numpy()[valid], rtol=RTOL,
                             atol=ATOL)
  # Captures at the last prompt token (left padding: position T - 1) are the per-layer residuals there.
  np.testing.assert_array_equal(np.asarray(ex["hidden_at_positions"])[:, :, 0], np.swapaxes(hs[1:, :, -1], 0, 1))
  # Zero additive vectors (shared and per-example) change nothing.
  d = model.config.text_config.hidden_size
  for v in (jnp.zeros((n, d)), jnp.zeros((len(rows), n, d))):
    steered, _, _ = model(jnp.asarray(ids), jnp.asarray(pixels), attention_mask_bt=jnp.asarray(mask),
                          hooks=Hooks(steer_vectors=v, steer_alpha=1.0))
    np.testing.assert_array_equal(np.asarray(steered), np.asarray(base))
  # A non-zero vector on the last layer shifts the final residual by exactly alpha * v.
  v = np.zeros((n, d), np.float32)
  v[-1] = np.linspace(-1, 1, d)
  _, _, ex2 = model(jnp.asarray(ids), jnp.asarray(pixels), attention_mask_bt=jnp.asarray(mask),
                    hooks=Hooks(steer_vectors=jnp.asarray(v), steer_alpha=0.5, output_hidden_states=True))
  np.testing.assert_allclose(np.asarray(ex2["hidden_states"][-1])[valid], hs[-1][valid] + 0.5 * v[-1],
                             rtol=1e-6, atol=1e-6)


def test_kv_cache_decode_equals_full_forward(llama_pair):
  # One LLaVA-level cache check (the decoder tests cover Mistral's window under the cache).
  _, _, model = llama_pair
  rows, pixels = _batch(seed=3)
  ids, mask = pad_rows(rows, "left")
  follow = np.random.RandomState(9).randint(3, 100, (len(rows), 4))
  full_ids = np.concatenate([ids, follow], 1)
  full_mask = np.concatenate([mask, np.ones_like(follow)], 1)
  full, _, _ = model(jnp.asarray(full_ids), jnp.asarray(pixels), attention_mask_bt=jnp.asarray(full_mask))
  cache = model.init_cache(len(rows), full_ids.shape[1])
  step_logits, cache, _ = model(jnp.asarray(ids), jnp.asarray(pixels), attention_mask_bt=jnp.asarray(mask),
                                kv_cache=cache, logits="last")
  np.testing.assert_allclose(np.asarray(step_logits), np.asarray(full)[:, ids.shape[1] - 1], rtol=RTOL, atol=ATOL)
  for j in range(follow.shape[1]):
    step_logits, cache, _ = model(jnp.asarray(follow[:, j:j + 1]), None, kv_cache=cache, logits="last",
                                  attention_mask_bt=jnp.ones((len(rows), 1), jnp.int32))
    np.testing.assert_allclose(np.asarray(step_logits), np.asarray(full)[:, ids.shape[1] + j], rtol=RTOL,
                               atol=ATOL, err_msg=f"decode step {j}")


def test_generate_compiles_once_per_bucket_and_checks_image_tokens(llama_pair):
  _, _, model = llama_pair
  rs = np.random.RandomState(4)
  pixels = rs.randn(1, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  # Start from empty jit caches: an earlier test (or a rerun of this one) that generated with these shapes would
  # otherwise leave the programs compiled, and the counts below would depend on the test order.
  jax.clear_caches()
  before = dict(decoding.TRACE_COUNTS)
  # Prompt lengths 22 and 27 share the 32 bucket: one embedding trace and one generate trace.
  for n_after in (3, 8):
    LV.generate(model, [prompt(rs, 2, n_after, True)], pixels, max_new_tokens=5, eos_token_id=())
  assert decoding.TRACE_COUNTS["generate"] - before.get("generate", 0) == 1
  assert decoding.TRACE_COUNTS["llava_embed"] - before.get("llava_embed", 0) == 1
  with pytest.raises(ValueError, match="image tokens"):
    LV.generate(model, [prompt(rs, 2, 3, True)], np.concatenate([pixels, pixels]), max_new_tokens=2)
  with pytest.raises(ValueError, match="NHWC"):
    model.image_features(jnp.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE)))


def test_feature_layer_list_and_full_strategy_shapes():
  # Pure-function checks of the selection rules (HF order: concatenate layers on channels, "full" keeps CLS).
  hs = [jnp.full((2, 5, 3), float(i)) for i in range(4)]
  out = LV.select_features(hs, [1, 3], "default")
  assert out.shape == (2, 4, 6)
  np.testing.assert_array_equal(np.asarray(out[0, 0]), [1, 1, 1, 3, 3, 3])
  assert LV.select_features(hs, [2], "full").shape == (2, 5, 3)
  # Scatter: k-th image position of the flattened batch takes feature row k; other rows untouched.
  emb = jnp.zeros((2, 3, 1))
  m = jnp.asarray([[False, True, True], [True, False, False]])
  feats = jnp.arange(1.0, 4.0).reshape(1, 3, 1)
  got = LV.scatter_image_features(emb, m, feats)[..., 0]
  np.testing.assert_array_equal(np.asarray(got), [[0, 1, 2], [3, 0, 0]])


@pytest.mark.parametrize("layers,strategy", [([0, -1], "default"), (-2, "full"), ([1, -2], "full")],
                         ids=["list_default", "int_full", "list_full"])
def test_feature_layer_lists_and_full_strategy_match_hf(tmp_path, layers, strategy):
  """Vision-feature selection against HF LlavaForConditionalGeneration built with the same rule: a list of layers
  (index 0 = embeddings, negative indices, channel concatenation in list order, a projector of E x len(list)
  inputs) and "full" (CLS kept: 17 image tokens per image). Compared: the projected image features (a forward hook
  on HF's projector) and the logits of a right-padded two-image batch."""
  hf = build_hf("llama", tmp_path, seed=5, vision_feature_layer=layers, vision_feature_select_strategy=strategy)
  model = LV.Llava.from_pretrained(tmp_path)
  n_img = N_IMG + (strategy == "full")
  rs = np.random.RandomState(12)
  rows = [[1] + list(rs.randint(3, 100, 3)) + [IMAGE_TOKEN] * n_img + list(rs.randint(3, 100, 4)),
          [1] + list(rs.randint(3, 100, 6)) + [IMAGE_TOKEN] * n_img + list(rs.randint(3, 100, 2))]
  pixels = rs.randn(2, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  ids, mask = pad_rows(rows, "right")
  seen = []
  handle = hf.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: seen.append(out.numpy()))
  try:
    ref = _hf_logits(hf, ids, mask, pixels, positions=False).logits.numpy()
  finally:
    handle.remove()
  feats = np.asarray(model.image_features(jnp.asarray(pixels)))
  d = model.config.text_config.hidden_size
  assert len(seen) == 1 and feats.shape == seen[0].shape == (2, n_img, d)
  np.testing.assert_allclose(feats, seen[0], rtol=RTOL, atol=ATOL)
  logits, _, _ = model(jnp.asarray(ids), jnp.asarray(pixels), attention_mask_bt=jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], rtol=RTOL, atol=ATOL)


def test_steered_generation_new_tokens_only_matches_hf_hooks(llama_pair):
  # CMRM's "new_tokens" mode (cmrm.md §4.2): steer the last prompt position in prefill and every decode step;
  # per-example vectors. HF reference: forward hooks on its decoder layers doing the same.
  import torch
  _, hf, model = llama_pair
  rows, pixels = _batch(seed=6)
  ids, mask = pad_rows(rows, "left")
  n = model.config.text_config.num_hidden_layers
  d = model.config.text_config.hidden_size
  v_bld = np.random.RandomState(3).randn(len(rows), n, d).astype(np.float32)
  alpha = 0.7
  handles = []
  for l, layer in enumerate(hf.model.language_model.layers):
    def hook(mod, inp, out, l=l):
      h = out[0] if isinstance(out, tuple) else out
      add = alpha * torch.as_tensor(v_bld[:, l])[:, None, :]
      if h.shape[1] > 1:                       # prefill: only the last prompt position
        sel = torch.zeros(h.shape[:2] + (1,))
        sel[:, -1] = 1.0
        add = add * sel
      h = h + add
      return (h, *out[1:]) if isinstance(out, tuple) else h
    handles.append(layer.register_forward_hook(hook))
  try:
    with torch.no_grad():
      ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=nchw(pixels),
                        max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=PAD)
  finally:
    for h in handles:
      h.remove()
  last_only = np.zeros_like(mask)
  last_only[:, -1] = 1
  out = LV.generate(model, ids, pixels, mask, max_new_tokens=20, eos_token_id=(),
                    hooks=Hooks(steer_vectors=v_bld, steer_alpha=alpha, steer_mask_bt=last_only, steer_decode=1))
  np.testing.assert_array_equal(np.asarray(out.tokens), ref[:, ids.shape[1]:].numpy())
  plain = LV.generate(model, ids, pixels, mask, max_new_tokens=20, eos_token_id=())
  assert not np.array_equal(np.asarray(plain.tokens), np.asarray(out.tokens))   # the steering mattered


@pytest.mark.multidevice
def test_sharded_generation_equals_single_device_by_value(llama_pair):
  """Greedy LLaVA generation on the 8-device mesh (data=2 x fsdp=4) gives the single-device tokens.

  The library's sharded path: ``Llava.from_pretrained(mesh=...)`` places every weight by the logical table (model
  width split over fsdp), and ``generate`` under ``jax.set_mesh`` constrains the activations and the KV cache to
  the batch axes (8 prompts over data x fsdp = 8 shards). Tokens must be identical; the first step's logits agree
  within rtol = atol = 1e-5 (float32, highest precision; sharded reductions only reorder sums, observed ~1e-7).
  """
  _, _, model = llama_pair
  mesh = sharding.make_mesh(data=2, fsdp=4)
  sharded = LV.Llava.from_pretrained(_DIRS["llama"], mesh=mesh)
  kernel = sharded.language_model.model.layers.self_attn.q_proj.kernel.get_value()
  assert kernel.sharding.spec[1] == "fsdp"
  assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4          # really split
  rs = np.random.RandomState(17)
  # 8 prompts of different lengths (11 to 34 tokens), images in five of them.
  shapes = [(4, 5, True), (7, 3, False), (2, 2, True), (11, 12, False), (1, 1, True), (5, 0, True), (20, 13, False),
            (3, 7, True)]
  rows = [prompt(rs, a, b, img) for a, b, img in shapes]
  assert len({len(r) for r in rows}) == len(rows)
  pixels = rs.randn(sum(img for *_, img in shapes), IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  n_new = 8
  want = LV.generate(model, rows, pixels, max_new_tokens=n_new, eos_token_id=())
  with jax.set_mesh(mesh):
    got = LV.generate(sharded, rows, pixels, max_new_tokens=n_new, eos_token_id=())
  # The decode ran batch-sharded: each device holds one of the 8 rows of the outputs.
  assert got.first_logits.addressable_shards[0].data.shape[0] == 1
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), [n_new] * len(rows))
  np.testing.assert_allclose(np.asarray(got.first_logits), np.asarray(want.first_logits), rtol=RTOL, atol=ATOL)
  # Different prompts give different continuations (the comparison is not between constant outputs).
  assert len({tuple(t) for t in np.asarray(want.tokens)}) > 1
