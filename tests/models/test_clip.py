"""vlsafe_jax.models.clip against HF transformers' torch CLIPModel (tiny random weights, float32).

Tolerance for every parity check: rtol = atol = 1e-5 (float32, highest matmul precision, eager HF attention);
logits (scaled by exp(logit_scale) ~ 14) use atol = 1e-4.
The L/14-shaped case uses the real ViT-L/14 widths, heads and MLP sizes (vision 1024/16/4096, patch 14; text
768/12/3072, 77 positions) with 2 layers per tower, a 56 px image and a 1,000-token vocabulary to keep the suite
fast on 2 CPU cores; depth and vocabulary size do not change the per-layer code paths.
"""
import dataclasses
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlsafe_jax import sharding
from vlsafe_jax.models import clip as C

RTOL = ATOL = 1e-5

# name -> (text kwargs, vision kwargs, projection_dim)
CASES = {
    # eos = 50, in the middle of the vocabulary: "first EOS" pooling. Larger ids occur before the EOS in every row
    # (see _inputs), so argmax pooling would pick another position and fail the parity; odd/prime sizes (head dim
    # 9, MLP 37, 5x5 patches of 7 px)
    "odd_first_eos": (dict(vocab_size=99, hidden_size=36, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=13, eos_token_id=50, bos_token_id=1),
                      dict(image_size=35, patch_size=7, hidden_size=36, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4), 13),
    # eos = 2: legacy argmax pooling; exact-erf GELU; 3x3 patches of 11 px; head dim 6
    "odd_argmax_gelu": (dict(vocab_size=101, hidden_size=30, intermediate_size=41, num_hidden_layers=3,
                             num_attention_heads=5, max_position_embeddings=11, eos_token_id=2, bos_token_id=1,
                             hidden_act="gelu"),
                        dict(image_size=33, patch_size=11, hidden_size=30, intermediate_size=41,
                             num_hidden_layers=3, num_attention_heads=5, hidden_act="gelu"), 7),
    "l14_shaped": (dict(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                        num_attention_heads=12, max_position_embeddings=77, eos_token_id=2, bos_token_id=1),
                   dict(image_size=56, patch_size=14, hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=2, num_attention_heads=16), 768),
}


def _build_hf(name, tmp_path_factory):
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
  t, v, p = CASES[name]
  cfg = CLIPConfig(text_config=CLIPTextConfig(projection_dim=p, **t).to_dict(),
                   vision_config=CLIPVisionConfig(projection_dim=p, **v).to_dict(), projection_dim=p)
  cfg._attn_implementation = "eager"
  # crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED), which made the weights differ per run.
  torch.manual_seed(zlib.crc32(name.encode()) % 1000)
  hf = CLIPModel(cfg).eval()
  with torch.no_grad():   # HF inits LayerNorm to (1, 0) and biases to 0: perturb so they are tested too
    for n, prm in hf.named_parameters():
      if "norm" in n or n.endswith("bias") or "class_embedding" in n:
        prm.add_(0.1 * torch.randn_like(prm))
  d = tmp_path_factory.mktemp(name)
  hf.save_pretrained(d)
  return hf, d


def _inputs(name, batch=2):
  t, v, _ = CASES[name]
  rng = np.random.RandomState(0)
  pixels = rng.randn(batch, 3, v["image_size"], v["image_size"]).astype(np.float32)
  length = t["max_position_embeddings"]
  ids = rng.randint(3, t["vocab_size"] - 2, size=(batch, length))
  eos = t["eos_token_id"] if t["eos_token_id"] != 2 else t["vocab_size"] - 1   # argmax rule: EOT = max id
  ids[ids == eos] += 1                       # the only EOS tokens are the ones placed below
  ids[0, length // 2] = eos
  ids[0, length // 2 + 1:] = eos                                             # padded with EOT, like CLIP
  ids[1, -1] = eos
  ids[:, 0] = t["bos_token_id"]
  return pixels, ids


_BUILT = {}


def _get(name, tmp_path_factory):
  if name not in _BUILT:
    hf, d = _build_hf(name, tmp_path_factory)
    _BUILT[name] = (name, hf, C.CLIP.from_pretrained(d))
  return _BUILT[name]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  return _get(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["odd_first_eos", "odd_argmax_gelu"])
def small_case(request, tmp_path_factory):
  """The mask / capture checks run on the two small architectures (same code path as L/14-shaped)."""
  return _get(request.param, tmp_path_factory)


def _close(a, b, atol=ATOL, what=""):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=atol, err_msg=what)


@pytest.mark.torch
def test_parity_embeddings_and_hidden_states(case):
  import torch
  name, hf, model = case
  atol = ATOL
  pixels, ids = _inputs(name)
  with torch.no_grad():
    vo = hf.vision_model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    to = hf.text_model(input_ids=torch.tensor(ids), output_hidden_states=True)
    img_ref = hf.visual_projection(vo.pooler_output).numpy()
    txt_ref = hf.text_projection(to.pooler_output).numpy()
  img, vout = model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1)), output_hidden_states=True)
  txt, tout = model.encode_text(jnp.asarray(ids), output_hidden_states=True)
  chex.assert_shape(img, (2, CASES[name][2]))
  assert img.dtype == jnp.float32 and txt.dtype == jnp.float32
  _close(img, img_ref, ATOL, "image_embeds")
  _close(txt, txt_ref, ATOL, "text_embeds")
  assert len(vout["hidden_states"]) == len(vo.hidden_states) == CASES[name][1]["num_hidden_layers"] + 1
  assert len(tout["hidden_states"]) == len(to.hidden_states)
  for i, (a, b) in enumerate(zip(vout["hidden_states"], vo.hidden_states)):
    _close(a, b.numpy(), atol, f"vision hidden_states[{i}]")
  for i, (a, b) in enumerate(zip(tout["hidden_states"], to.hidden_states)):
    _close(a, b.numpy(), atol, f"text hidden_states[{i}]")
  _close(tout["last_hidden_state"], to.last_hidden_state.numpy(), atol, "text last_hidden_state")
  # logits: exp(logit_scale) * cosine, as HF's CLIPModel
  with torch.no_grad():
    ref = hf(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(ids)).logits_per_image.numpy()
  logits, _ = model(jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids))
  _close(logits, ref, 1e-4, "logits_per_image")


@pytest.mark.torch
def test_parity_padding_mask_and_captured_inputs(small_case):
  """Text with a padding mask, and captured fc2 / out_proj inputs vs torch forward pre-hooks."""
  import torch
  name, hf, model = small_case
  pixels, ids = _inputs(name)
  mask = np.ones_like(ids)
  mask[0, ids.shape[1] // 2 + 1:] = 0
  seen = {}
  def hook(key):
    def fn(module, args):
      seen[key] = args[0].detach().numpy().copy()
    return fn
  handles = []
  for tower, names in (("vision_model", ("mlp.fc2",)), ("text_model", ("self_attn.out_proj", "mlp.fc2"))):
    for i, layer in enumerate(getattr(hf, tower).encoder.layers):
      for n in names:
        handles.append(layer.get_submodule(n).register_forward_pre_hook(hook(f"{tower}.encoder.layers.{i}.{n}")))
  try:
    with torch.no_grad():
      to = hf.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
      hf.vision_model(pixel_values=torch.tensor(pixels))
      txt_ref = hf.text_projection(to.pooler_output).numpy()
  finally:
    for h in handles:
      h.remove()
  txt, tout = model.encode_text(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True,
                                capture=("self_attn.out_proj", "mlp.fc2"))
  _, vout = model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1)), capture="mlp.fc2")
  _close(txt, txt_ref, ATOL, "masked text_embeds")
  for i, (a, b) in enumerate(zip(tout["hidden_states"], to.hidden_states)):
    _close(a, b.numpy(), ATOL, f"masked text hidden_states[{i}]")
  got = {**{k: v for k, v in tout.items() if ".layers." in k}, **{k: v for k, v in vout.items() if ".layers." in k}}
  assert sorted(got) == sorted(seen)
  for k in seen:
    _close(got[k], seen[k], ATOL, k)


def _tiny_config(**text_overrides):
  t, v, p = CASES["odd_first_eos"]
  return C.CLIPConfig(text_config=C.CLIPTextConfig(projection_dim=p, **{**t, **text_overrides}),
                      vision_config=C.CLIPVisionConfig(projection_dim=p, **v), projection_dim=p)


def test_text_pool_index_rules():
  ids = jnp.array([[5, 9, 7, 9, 0], [1, 3, 4, 4, 2]])
  # eos == 2: first argmax; otherwise first occurrence of eos
  np.testing.assert_array_equal(C.text_pool_index(ids, 2), [1, 2])
  np.testing.assert_array_equal(C.text_pool_index(ids, 4), [0, 2])
  np.testing.assert_array_equal(C.text_pool_index(ids, 7), [2, 0])


def test_first_eos_case_separates_the_pooling_rules():
  """The parity tests can only catch argmax-instead-of-first-EOS pooling if the two rules pick different tokens on
  the "odd_first_eos" inputs: EOS is not the largest id and a larger id precedes it in every row."""
  t = CASES["odd_first_eos"][0]
  _, ids = _inputs("odd_first_eos")
  first_eos = np.argmax(ids == t["eos_token_id"], axis=-1)
  assert (ids[np.arange(len(ids)), first_eos] == t["eos_token_id"]).all()   # every row has an EOS
  assert (np.argmax(ids, axis=-1) != first_eos).all()
  np.testing.assert_array_equal(C.text_pool_index(jnp.asarray(ids), t["eos_token_id"]), first_eos)


def test_activations_match_formulas():
  x = jnp.linspace(-4, 4, 17)
  np.testing.assert_allclose(C.quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6, atol=1e-7)
  from math import erf, sqrt
  ref = [0.5 * v * (1 + erf(v / sqrt(2))) for v in np.asarray(x, np.float64)]
  np.testing.assert_allclose(C.gelu_exact(x), ref, rtol=1e-6, atol=1e-6)


def test_flop_model_matches_open_clip_profile():
  """perf.md §3: open_clip model_profile.csv gives 162.03 / 13.3 / 381.9 GFLOP; within 2%."""
  l14_v = C.CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                             num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
  l14_t = C.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           projection_dim=768)
  assert C.clip_image_flops(l14_v) / 1e9 == pytest.approx(162.03, rel=0.02)
  assert C.clip_text_flops(l14_t, 77) / 1e9 == pytest.approx(13.3, rel=0.02)
  assert C.clip_image_flops(dataclasses.replace(l14_v, image_size=336)) / 1e9 == pytest.approx(381.9, rel=0.02)


def test_bad_inputs_give_named_errors():
  with pytest.raises(ValueError, match="num_attention_heads"):
    C.CLIPTextConfig(hidden_size=36, num_attention_heads=5)
  with pytest.raises(ValueError, match="hidden_act"):
    C.CLIPVisionConfig(hidden_act="relu6")
  model = C.CLIP(_tiny_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="NHWC"):
    model.encode_image(jnp.zeros((1, 3, 35, 35)))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model.encode_text(jnp.zeros((1, 14), jnp.int32))
  with pytest.raises(ValueError, match="capture"):
    model.encode_image(jnp.zeros((1, 35, 35, 3)), capture=("fc3",))
  with pytest.raises(ValueError, match="model_type"):
    C.CLIPConfig.from_hf({"model_type": "llama"})


def test_state_paths_mirror_hf_and_carry_logical_axes():
  model = C.CLIP(_tiny_config(), rngs=nnx.Rngs(0))
  flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  k = flat[("vision_model", "encoder", "layers", 1, "mlp", "fc2", "kernel")]
  assert k.get_value().shape == (37, 36) and k.get_metadata()["out_sharding"] == ("mlp", "embed")
  conv = flat[("vision_model", "embeddings", "patch_embedding", "kernel")]
  assert conv.get_value().shape == (7, 7, 3, 36)
  assert flat[("text_model", "embeddings", "token_embedding", "embedding")].get_metadata()["out_sharding"] == (
      "vocab", "embed")
  assert ("vision_model", "pre_layrnorm", "scale") in flat and ("logit_scale",) in flat
  unannotated = [p for p, v in flat.items() if v.get_value().ndim and not v.get_metadata().get("out_sharding")]
  assert not unannotated, unannotated


def test_fsdp_sharded_forward_equals_unsharded():
  """8 simulated devices, mesh data=2 x fsdp=4: the jitted forward gives the unsharded embeddings."""
  cfg = C.CLIPConfig(
      text_config=C.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=8, eos_token_id=63),
      vision_config=C.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=40,
                                       num_hidden_layers=1, num_attention_heads=4), projection_dim=16)
  model = C.CLIP(cfg, rngs=nnx.Rngs(3))
  graphdef, state = nnx.split(model)
  rng = np.random.RandomState(1)
  pixels = rng.randn(8, 16, 16, 3).astype(np.float32)
  ids = rng.randint(0, 64, size=(8, 8))

  @jax.jit
  def fwd(state, pixels, ids):
    m = nnx.merge(graphdef, state)
    return m.encode_image(pixels), m.encode_text(ids)

  ref_img, ref_txt = fwd(state, pixels, ids)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  placed = sharding.place_state(state, mesh)
  fc1 = placed["vision_model"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"].get_value()
  assert fc1.sharding.spec[0] == "fsdp"          # really split, not replicated
  with jax.set_mesh(mesh):
    img, txt = fwd(placed, sharding.shard_batch(pixels, mesh), sharding.shard_batch(ids, mesh))
  np.testing.assert_allclose(np.asarray(img), np.asarray(ref_img), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(txt), np.asarray(ref_txt), rtol=1e-5, atol=1e-6)
