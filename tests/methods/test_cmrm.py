"""CMRM (cmrm.md §10) on a tiny random HF LLaVA (float32, highest matmul precision).

Tolerances: steered HF parity rtol = atol = 1e-5 on first-token logits and exact greedy tokens (fp32 both sides,
HF eager attention); alpha = 0 vs unsteered rtol 1e-6; the corrected layer-1 state equals the text-only state to
rtol 1e-6 / atol 1e-6 (float rounding of a + (b - a)); 8-device extraction vs 1 device rtol = atol = 1e-5; KV-cache
generation vs full forward rtol = atol = 1e-5 on logits and exact greedy tokens; ``text_mean`` states vs HF
decoder-layer outputs rtol = atol = 1e-5 (fp32 both sides); ``pca_vector`` vs numpy SVD in float64 rtol 1e-5 /
atol 1e-6 (the result is stored as float32).
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from _llava_hf import IMAGE_SIZE, IMAGE_TOKEN, N_IMG, PAD, build_hf, nchw  # noqa: E402

from vlsafe_jax.data.vlm_prompts import SEG_IMAGE, SEG_OTHER, SEG_QUESTION, Prompt  # noqa: E402
from vlsafe_jax.methods.cmrm import shift, steer  # noqa: E402
from vlsafe_jax.models import llava as LV  # noqa: E402
from vlsafe_jax.models.hooks import Hooks  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  d = tmp_path_factory.mktemp("cmrm_llava")
  hf = build_hf("llama", d, seed=3)
  return hf, LV.Llava.from_pretrained(d)


def _prompt(rs, before, after):
  """A multimodal Prompt: BOS + text, image span, question text (ids in [3, 100))."""
  ids = [1] + list(rs.randint(3, 100, before)) + [IMAGE_TOKEN] * N_IMG + list(rs.randint(3, 100, after))
  segs = [SEG_OTHER] * (1 + before) + [SEG_IMAGE] * N_IMG + [SEG_QUESTION] * after
  return Prompt(np.asarray(ids, np.int32), np.asarray(segs, np.int32), "")


def _prompts(seed=0, n=3):
  rs = np.random.RandomState(seed)
  return [_prompt(rs, 2 + i, 3 + 2 * i) for i in range(n)]


def _gen(model, prompts, pixels, **kw):
  from vlsafe_jax.data.vlm_prompts import collate
  arr = collate(prompts, PAD, side="left")
  return LV.generate(model, arr["input_ids"], pixels, arr["attention_mask"], max_new_tokens=6, eos_token_id=(),
                     **kw), arr


def test_alpha_zero_is_identity(pair):
  _, model = pair
  prompts = _prompts(0)
  pixels = np.random.RandomState(1).randn(3, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  base, arr = _gen(model, prompts, pixels)
  v = np.random.RandomState(2).randn(2, 40).astype(np.float32)
  for apply in ("all", "new_tokens"):
    out, _ = _gen(model, prompts, pixels, hooks=steer.steer_hooks(v, 0.0, apply=apply,
                                                                  attention_mask_bt=arr["attention_mask"]))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))
    np.testing.assert_allclose(np.asarray(out.first_logits), np.asarray(base.first_logits), rtol=1e-6, atol=1e-6)
  # Non-zero alpha does change the output (the test above can fail).
  out, _ = _gen(model, prompts, pixels, hooks=steer.steer_hooks(30 * v, 1.0))
  assert not np.allclose(np.asarray(out.first_logits), np.asarray(base.first_logits))


def test_sample_vector_corrects_first_layer_exactly(pair):
  _, model = pair
  prompts = _prompts(4)
  ht, hc = shift.extract_pairs(model, prompts, mode="last", corrupt="noise", noise_seed=5)
  v_bld = shift.sample_vectors(ht, hc)
  from vlsafe_jax.data.vlm_prompts import collate
  arr = collate(prompts, PAD, side="left")
  pix = shift.corrupted_pixels(3, IMAGE_SIZE, "noise", seed=5)
  t = arr["input_ids"].shape[1]
  _, _, ex = model(jnp.asarray(arr["input_ids"]), jnp.asarray(pix), attention_mask_bt=jnp.asarray(arr["attention_mask"]),
                   hooks=Hooks(steer_vectors=jnp.asarray(v_bld), steer_alpha=1.0,
                               hidden_positions_bp=jnp.full((3, 1), t - 1, jnp.int32)), logits="none")
  corrected = np.asarray(ex["hidden_at_positions"])[:, :, 0]
  np.testing.assert_allclose(corrected[:, 0], ht[:, 0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(hc[:, 0], ht[:, 0], atol=1e-3)        # the image really shifts the state


def test_steered_generation_matches_hf_hooks(pair):
  import torch
  hf, model = pair
  prompts = _prompts(7)
  pixels = np.random.RandomState(8).randn(3, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  rs = np.random.RandomState(9)
  for vectors, alpha in ((rs.randn(2, 40).astype(np.float32), 1.0), (rs.randn(3, 2, 40).astype(np.float32), 0.5)):
    out, arr = _gen(model, prompts, pixels, hooks=steer.steer_hooks(vectors, alpha))
    v = torch.tensor(vectors if vectors.ndim == 3 else np.broadcast_to(vectors, (3, 2, 40)).copy())
    handles = []
    for l, layer in enumerate(hf.model.language_model.layers):
      def hook(mod, inp, outp, l=l):
        h = outp[0] if isinstance(outp, tuple) else outp
        h = h + alpha * v[:, l][:, None, :]
        return (h, *outp[1:]) if isinstance(outp, tuple) else h
      handles.append(layer.register_forward_hook(hook))
    try:
      with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(arr["input_ids"].astype(np.int64)),
                          attention_mask=torch.tensor(arr["attention_mask"].astype(np.int64)),
                          pixel_values=nchw(pixels), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    finally:
      for h in handles:
        h.remove()
    t = arr["input_ids"].shape[1]
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.sequences[:, t:].numpy())
    np.testing.assert_allclose(np.asarray(out.first_logits), ref.logits[0].numpy(), rtol=1e-5, atol=1e-5)


def test_new_tokens_mode_leaves_earlier_positions(pair):
  _, model = pair
  prompts = _prompts(11)
  from vlsafe_jax.data.vlm_prompts import collate
  arr = collate(prompts, PAD, side="left")
  pix = np.random.RandomState(12).randn(3, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  v = np.random.RandomState(13).randn(2, 40).astype(np.float32)
  hooks = steer.steer_hooks(v, 1.0, apply="new_tokens", layers=[1], attention_mask_bt=arr["attention_mask"])
  args = (jnp.asarray(arr["input_ids"]), jnp.asarray(pix))
  mask = jnp.asarray(arr["attention_mask"])
  _, _, base = model(*args, attention_mask_bt=mask, hooks=Hooks(output_hidden_states=True))
  _, _, st = model(*args, attention_mask_bt=mask, hooks=hooks.replace(output_hidden_states=True))
  hb, hs = np.asarray(base["hidden_states"]), np.asarray(st["hidden_states"])
  np.testing.assert_array_equal(hs[:, :, :-1], hb[:, :, :-1])       # positions < P - 1 untouched
  np.testing.assert_array_equal(hs[1, :, -1], hb[1, :, -1])          # layer 0 (index 1) outside the subset
  np.testing.assert_allclose(hs[2, :, -1], hb[2, :, -1] + v[1], rtol=1e-6, atol=1e-6)


def test_kv_cache_generation_matches_full_forward(pair):
  """cmrm.md §10 KV-cache consistency: steered greedy generation (cached prefill + decode loop) gives the same
  first logits and tokens as a steered full forward (no cache) over prompt + generated tokens, and a step-by-step
  cached decode gives the same logits at every step (rtol = atol = 1e-5, fp32). ``new_tokens``: the full forward
  steers exactly what the loop steered, the last prompt column (P - 1 under left padding) and every new token."""
  _, model = pair
  from vlsafe_jax.data.vlm_prompts import collate
  prompts = _prompts(15)
  pixels = np.random.RandomState(16).randn(3, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  v = 3 * np.random.RandomState(17).randn(2, 40).astype(np.float32)
  arr = collate(prompts, PAD, side="left")
  b, p = arr["input_ids"].shape
  n_new = 6
  ids, mask, pix = jnp.asarray(arr["input_ids"]), jnp.asarray(arr["attention_mask"]), jnp.asarray(pixels)
  for apply in ("all", "new_tokens"):
    hooks = steer.steer_hooks(v, 1.0, apply=apply, attention_mask_bt=arr["attention_mask"])
    out, _ = _gen(model, prompts, pixels, hooks=hooks)
    tokens = np.asarray(out.tokens)
    full_ids = jnp.concatenate([ids, jnp.asarray(tokens)], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones((b, n_new), jnp.int32)], axis=1)
    if apply == "all":
      s_mask = full_mask
    else:
      s_mask = jnp.zeros((b, p + n_new), jnp.int32).at[:, p - 1:].set(1)
    steer_in = Hooks(steer_vectors=jnp.asarray(hooks.steer_vectors), steer_alpha=hooks.steer_alpha)
    full, _, _ = model(full_ids, pix, attention_mask_bt=full_mask, hooks=steer_in.replace(steer_mask_bt=s_mask))
    full = np.asarray(full)[:, p - 1:p - 1 + n_new]               # logits predicting new tokens 0..n-1
    np.testing.assert_allclose(np.asarray(out.first_logits), full[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tokens, full.argmax(-1))
    # Every decode step's logits from the cache (the loop generate runs, unrolled here to see each step).
    cache = model.init_cache(b, p + n_new)
    prompt_mask = mask if apply == "all" else jnp.asarray(hooks.steer_mask_bt)
    step, cache, _ = model(ids, pix, attention_mask_bt=mask, kv_cache=cache,
                           hooks=steer_in.replace(steer_mask_bt=prompt_mask), logits="last")
    cached = [np.asarray(step)]
    ones = jnp.ones((b, 1), jnp.int32)
    for k in range(n_new - 1):
      step, cache, _ = model(jnp.asarray(tokens[:, k:k + 1]), None, attention_mask_bt=ones, kv_cache=cache,
                             hooks=steer_in.replace(steer_mask_bt=ones), logits="last")
      cached.append(np.asarray(step))
    np.testing.assert_allclose(np.stack(cached, 1), full, rtol=1e-5, atol=1e-5)
    # The steering really changes these logits (so the comparisons above can fail).
    plain, _, _ = model(full_ids, pix, attention_mask_bt=full_mask)
    assert not np.allclose(np.asarray(plain)[:, p - 1:p - 1 + n_new], full, atol=1e-3)


def test_vectors_round_trip_and_errors(tmp_path):
  v = np.random.RandomState(0).randn(3, 7).astype(np.float32)
  shift.CMRMVectors(v, {"model_id": "m", "extract": "last"}).save(tmp_path / "cmrm_vectors")
  back = shift.CMRMVectors.load(tmp_path / "cmrm_vectors.npz", num_layers=3, hidden_size=7)
  np.testing.assert_array_equal(back.vectors, v)
  assert back.meta["model_id"] == "m" and back.meta["num_layers"] == 3
  with pytest.raises(ValueError, match="4 decoder layers"):
    shift.CMRMVectors.load(tmp_path / "cmrm_vectors", num_layers=4, hidden_size=7)
  with pytest.raises(ValueError, match="hidden size 7"):
    shift.CMRMVectors.load(tmp_path / "cmrm_vectors", num_layers=3, hidden_size=8)
  with pytest.raises(FileNotFoundError, match="missing"):
    shift.CMRMVectors.load(tmp_path / "missing")


def test_dataset_and_pca_vectors():
  rs = np.random.RandomState(0)
  diffs = rs.randn(11, 3, 5).astype(np.float32)
  np.testing.assert_allclose(shift.dataset_vector(diffs), diffs.astype(np.float64).mean(0), rtol=1e-6)
  # Rank 1: rows are positive multiples of one direction per layer -> the scaled PC equals the mean.
  u = rs.randn(3, 5)
  rank1 = rs.uniform(0.5, 2.0, (11, 3, 1)) * u[None]
  np.testing.assert_allclose(shift.pca_vector(rank1), rank1.mean(0), rtol=1e-5, atol=1e-6)
  # Sign alignment: flipping every row flips the result with the mean.
  np.testing.assert_allclose(shift.pca_vector(-rank1), -rank1.mean(0), rtol=1e-5, atol=1e-6)


def test_pca_vector_full_rank_matches_numpy_svd():
  """Full-rank differences (the rank-1 case above is passed by returning the mean): per layer the result is the
  top right singular vector u of the (centred when asked) float64 matrix, scaled by mean . u. The reference
  (mean . u) u does not depend on the sign numpy's SVD gives u, so the comparison is sign-invariant."""
  rs = np.random.RandomState(3)
  n, n_layers, d = 23, 3, 7
  # Anisotropic (singular values well apart, so u is well defined), with an offset so that mean != 0 and the
  # centred and uncentred directions differ.
  scales = np.array([5.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3])
  diffs = (rs.randn(n, n_layers, d) * scales + rs.randn(n_layers, d)).astype(np.float32)
  for center in (False, True):
    got = shift.pca_vector(diffs, center=center)
    assert got.shape == (n_layers, d) and got.dtype == np.float32
    for l in range(n_layers):
      m = diffs[:, l].astype(np.float64)
      mean = m.mean(0)
      _, sv, vt = np.linalg.svd(m - mean if center else m)
      assert sv[0] > 1.5 * sv[1], (center, l, sv[:2])     # the top direction is unambiguous
      u = vt[0]
      np.testing.assert_allclose(got[l], (mean @ u) * u, rtol=1e-5, atol=1e-6, err_msg=f"center={center} l={l}")
      assert got[l] @ mean >= 0                                # points along the mean shift
      assert not np.allclose(got[l], mean, atol=1e-2)         # full rank: not the mean (the rank-1 shortcut)
  assert not np.allclose(shift.pca_vector(diffs, center=True), shift.pca_vector(diffs), atol=1e-2)


def test_text_mean_extraction_matches_hf_forward(pair):
  """``text_mean`` vs a direct forward of the HF reference, one unpadded prompt at a time: per decoder layer
  (forward hooks on HF's decoder layers = the residual output of layer l), the float mean over the prompt's
  non-image positions; corrupted pass = the prompt with the documented noise image (default_rng([seed, i])),
  text pass = the same prompt with the image span deleted. Batches of 2 with left padding on our side."""
  import torch
  hf, model = pair
  prompts = _prompts(21, n=3)
  seed = 4
  ht, hc = shift.extract_pairs(model, prompts, mode="text_mean", corrupt="noise", noise_seed=seed, batch_size=2)
  layers = hf.model.language_model.layers
  got = {}
  handles = [layer.register_forward_hook(
      lambda mod, inp, out, l=l: got.__setitem__(l, (out[0] if isinstance(out, tuple) else out)[0].numpy()))
      for l, layer in enumerate(layers)]
  try:
    for i, p in enumerate(prompts):
      noise = np.random.default_rng([seed, i]).standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
      ids = torch.tensor(p.input_ids[None].astype(np.int64))
      with torch.no_grad():
        hf(input_ids=ids, pixel_values=nchw(noise[None]))
      keep = p.input_ids != IMAGE_TOKEN
      ref_c = np.stack([got[l][keep].mean(0) for l in range(len(layers))])
      text_ids = p.input_ids[keep]
      with torch.no_grad():
        hf(input_ids=torch.tensor(text_ids[None].astype(np.int64)))
      ref_t = np.stack([got[l].mean(0) for l in range(len(layers))])
      np.testing.assert_allclose(hc[i], ref_c, rtol=1e-5, atol=1e-5, err_msg=f"corrupted pass, prompt {i}")
      np.testing.assert_allclose(ht[i], ref_t, rtol=1e-5, atol=1e-5, err_msg=f"text pass, prompt {i}")
  finally:
    for h in handles:
      h.remove()
  assert not np.allclose(ht, hc, atol=1e-3)                    # the image changes the states being compared


def test_layer_mask_and_errors():
  np.testing.assert_array_equal(steer.layer_mask("all", 4), [1, 1, 1, 1])
  np.testing.assert_array_equal(steer.layer_mask("1:3", 4), [0, 1, 1, 0])
  np.testing.assert_array_equal(steer.layer_mask([0, -1], 4), [1, 0, 0, 1])
  with pytest.raises(ValueError, match="out of range"):
    steer.layer_mask([4], 4)


def test_extraction_sharded_equals_single(pair):
  _, model = pair
  from vlsafe_jax import sharding
  prompts = _prompts(20, n=8)
  ht1, hc1 = shift.extract_pairs(model, prompts, batch_size=8, mode="text_mean")
  mesh = sharding.make_mesh(data=8)
  ht8, hc8 = shift.extract_pairs(model, prompts, batch_size=8, mode="text_mean", mesh=mesh)
  np.testing.assert_allclose(ht8, ht1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hc8, hc1, rtol=1e-5, atol=1e-5)
