"""vlsafe_jax.models.lora: PEFT-semantics LoRA on CLIP (hysac.md §4.2).

Oracles: the LoRA equation evaluated in numpy (float64), an independent lax convolution for the patch-embedding
adapter, the param count computed in hysac.md (8,676,544 for the HySAC defaults on ViT-L/14), and a torch
PEFT-wrapped HF CLIPModel. Tolerances: float32 with highest matmul precision; embeddings rtol = atol = 1e-5;
merged vs unmerged atol 1e-5 (the merge re-associates sums); numpy formula checks atol 1e-5.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vlsafe_jax import _compat
from vlsafe_jax.models import clip as C
from vlsafe_jax.models import lora as L

from _clip_configs import L14  # tests/models is on sys.path (pytest prepends this file's folder)

RTOL = ATOL = 1e-5

TINY = C.CLIPConfig(
    text_config=C.CLIPTextConfig(vocab_size=37, hidden_size=15, intermediate_size=23, num_hidden_layers=2,
                                 num_attention_heads=3, max_position_embeddings=9, projection_dim=7,
                                 eos_token_id=36, bos_token_id=35),
    vision_config=C.CLIPVisionConfig(image_size=21, patch_size=7, hidden_size=15, intermediate_size=23,
                                     num_hidden_layers=2, num_attention_heads=3, projection_dim=7),
    projection_dim=7)

EXPECTED_SITES = sorted(
    [f"{tower}.encoder.layers.{i}.{m}" for tower in ("text_model", "vision_model") for i in range(2)
     for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    + ["vision_model.embeddings.patch_embedding"])


def _inputs(batch=2):
  rng = np.random.RandomState(0)
  pixels = rng.randn(batch, 21, 21, 3).astype(np.float32)
  ids = rng.randint(1, 34, size=(batch, 9))
  ids[:, 0], ids[:, -1] = 35, 36
  return jnp.asarray(pixels), jnp.asarray(ids)


def _randomize_b(model, seed=0, scale=0.5):
  for i, site in enumerate(L.lora_sites(model).values()):
    b = site.lora_b.get_value()
    site.lora_b.set_value(scale * jax.random.normal(jax.random.key(seed + i), b.shape, b.dtype))


def _flat(state):
  return {L.path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _embed(model, pixels, ids):
  return np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(ids))


def test_apply_defaults_zero_init_is_noop():
  model = C.CLIP(TINY, rngs=nnx.Rngs(0))
  pixels, ids = _inputs()
  before = _embed(model, pixels, ids)
  base_before = _flat(nnx.state(model, nnx.Param))
  L.apply_lora(model, rngs=nnx.Rngs(1))
  assert list(L.lora_sites(model)) == EXPECTED_SITES               # HySAC defaults: no q_proj, both towers
  assert isinstance(model.text_model.encoder.layers[0].self_attn.q_proj, nnx.Linear)
  assert not isinstance(model.text_model.encoder.layers[0].self_attn.q_proj, L.LoRALinear)
  # base weights keep their paths and values; only lora_a / lora_b are new
  assert _flat(nnx.state(model, L.BASE_PARAMS)).keys() == base_before.keys()
  for k, v in _flat(nnx.state(model, L.BASE_PARAMS)).items():
    np.testing.assert_array_equal(v, base_before[k], err_msg=k)
  lora_keys = set(_flat(L.lora_state(model)))
  assert lora_keys == {f"{s}.lora_{w}" for s in EXPECTED_SITES for w in "ab"}
  for mode in ("train", "eval"):             # B = 0: a no-op even with dropout active
    getattr(model, mode)()
    after = _embed(model, pixels, ids)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_init_scaling_and_annotations():
  model = C.CLIP(TINY, rngs=nnx.Rngs(0))
  L.apply_lora(model, rank=4, alpha=3.0, rngs=nnx.Rngs(1))
  sites = L.lora_sites(model)
  fc1 = sites["vision_model.encoder.layers.0.mlp.fc1"]
  patch = sites["vision_model.embeddings.patch_embedding"]
  assert fc1.lora_scaling == pytest.approx(0.75) and fc1.lora_rank == 4
  assert isinstance(fc1.lora_a, nnx.LoRAParam) and isinstance(fc1.lora_a, nnx.Param)
  assert fc1.lora_a.get_value().shape == (15, 4) and fc1.lora_b.get_value().shape == (4, 23)
  assert patch.lora_a.get_value().shape == (7 * 7 * 3, 4) and patch.lora_b.get_value().shape == (4, 15)
  for site, fan_in in ((fc1, 15), (patch, 147)):
    a = np.asarray(site.lora_a.get_value())
    bound = 1 / np.sqrt(fan_in)                                     # PyTorch Linear/Conv default init
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.7 * bound
    assert (np.asarray(site.lora_b.get_value()) == 0).all()
  assert fc1.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
  assert fc1.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "mlp")
  assert patch.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "embed")
  # A's bound at a large fan-in, statistically: U(-b, b) has std b / sqrt(3)
  big = nnx.Module()
  big.proj = nnx.Linear(1031, 64, rngs=nnx.Rngs(0))
  L.apply_lora(big, ["proj"], rank=64, rngs=nnx.Rngs(2))
  a = np.asarray(big.proj.lora_a.get_value())
  np.testing.assert_allclose(a.std(), 1 / np.sqrt(3 * 1031), rtol=0.02)


def test_linear_and_conv_match_numpy_formula():
  model = C.CLIP(TINY, rngs=nnx.Rngs(0))
  L.apply_lora(model, rank=3, alpha=5.0, dropout=0.0, rngs=nnx.Rngs(1))
  _randomize_b(model)
  site = model.vision_model.encoder.layers[1].mlp.fc2
  x = np.random.RandomState(1).randn(2, 5, 23).astype(np.float32)
  w, b = np.float64(site.kernel.get_value()), np.float64(site.bias.get_value())
  a_, b_ = np.float64(site.lora_a.get_value()), np.float64(site.lora_b.get_value())
  ref = x @ w + b + (5.0 / 3) * (x @ a_) @ b_
  np.testing.assert_allclose(np.asarray(site(jnp.asarray(x))), ref, rtol=RTOL, atol=ATOL)
  # patch conv: base conv + PEFT's Conv(C->r, k=p, s=p) then 1x1 Conv(r->O), evaluated with lax.conv
  conv = model.vision_model.embeddings.patch_embedding
  img = jnp.asarray(np.random.RandomState(2).randn(2, 21, 21, 3).astype(np.float32))
  k_a = conv.lora_a.get_value().reshape(7, 7, 3, 3)                 # (h, w, c) rows -> HWIO
  dn = ("NHWC", "HWIO", "NHWC")
  hid = jax.lax.conv_general_dilated(img, k_a, (7, 7), "VALID", dimension_numbers=dn,
                                     precision=jax.lax.Precision.HIGHEST)
  base = jax.lax.conv_general_dilated(img, conv.kernel.get_value(), (7, 7), "VALID", dimension_numbers=dn,
                                      precision=jax.lax.Precision.HIGHEST)
  ref = base + (5.0 / 3) * jnp.einsum("bhwr,ro->bhwo", hid, conv.lora_b.get_value(),
                                      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(np.asarray(conv(img)), np.asarray(ref), rtol=RTOL, atol=ATOL)


def test_merge_equals_unmerged_and_restores_plain_structure():
  plain = C.CLIP(TINY, rngs=nnx.Rngs(0))
  plain_paths = set(_flat(nnx.state(plain)))
  model = C.CLIP(TINY, rngs=nnx.Rngs(0))
  L.apply_lora(model, rank=4, alpha=2.0, rngs=nnx.Rngs(1))
  _randomize_b(model)
  model.eval()
  pixels, ids = _inputs()
  unmerged = _embed(model, pixels, ids)
  assert np.abs(unmerged[0] - _embed(plain, pixels, ids)[0]).max() > 1e-3     # the adapters do something
  L.merge_lora(model)
  assert not L.lora_sites(model)
  assert type(model.vision_model.embeddings.patch_embedding) is nnx.Conv
  assert type(model.text_model.encoder.layers[1].mlp.fc1) is nnx.Linear
  assert set(_flat(nnx.state(model))) == plain_paths                # exports as an ordinary CLIP
  assert nnx.graphdef(model) == nnx.graphdef(plain)
  merged = _embed(model, pixels, ids)
  np.testing.assert_allclose(merged[0], unmerged[0], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(merged[1], unmerged[1], rtol=RTOL, atol=ATOL)


def test_dropout_only_in_train_mode_with_independent_masks():
  class Toy(nnx.Module):
    def __init__(self):
      self.k_proj = nnx.Linear(13, 5, rngs=nnx.Rngs(0))
      self.v_proj = nnx.Linear(13, 5, rngs=nnx.Rngs(0))

  toy = Toy()
  L.apply_lora(toy, ["k_proj", "v_proj"], rank=13, alpha=13.0, dropout=0.5, rngs=nnx.Rngs(3))
  for site in (toy.k_proj, toy.v_proj):          # adapter = identity on the input: delta = dropout(x) @ B
    site.lora_a.set_value(jnp.eye(13))
    site.lora_b.set_value(jnp.eye(13, 5))
  x = jnp.asarray(np.random.RandomState(0).rand(4, 13).astype(np.float32) + 0.5)   # strictly positive
  toy.eval()
  base = np.asarray(nnx.Linear.__call__(toy.k_proj, x))
  d_eval = np.asarray(toy.k_proj(x)) - base
  np.testing.assert_allclose(d_eval, np.asarray(x)[:, :5], rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(toy.k_proj(x)), np.asarray(toy.k_proj(x)))
  toy.train()
  dk = np.asarray(toy.k_proj(x)) - base
  dv = np.asarray(toy.v_proj(x)) - base
  dk2 = np.asarray(toy.k_proj(x)) - base
  xs = np.asarray(x)[:, :5]
  for d in (dk, dv, dk2):    # inverted dropout: each entry is 0 or x / (1 - p)
    dropped = np.isclose(d, 0, atol=1e-5)
    np.testing.assert_allclose(d[~dropped], 2 * xs[~dropped], rtol=1e-4, atol=1e-4)
    assert 0 < dropped.mean() < 1
  assert not np.array_equal(np.isclose(dk, 0, atol=1e-5), np.isclose(dv, 0, atol=1e-5))   # own mask per site
  assert not np.array_equal(np.isclose(dk, 0, atol=1e-5), np.isclose(dk2, 0, atol=1e-5))  # fresh mask per call


def test_training_step_changes_only_lora():
  model = C.CLIP(TINY, rngs=nnx.Rngs(0))
  L.apply_lora(model, rngs=nnx.Rngs(1))
  model.train()
  base_before = _flat(nnx.state(model, L.BASE_PARAMS))
  lora_before = _flat(L.lora_state(model))
  opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=L.TRAINABLE)
  pixels, ids = _inputs()

  @nnx.jit
  def step(model, opt, pixels, ids):
    def loss_fn(model):
      logits, _ = model(pixels, ids)
      labels = jnp.arange(logits.shape[0])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, L.TRAINABLE))(model)
    opt.update(model, grads)
    return loss

  for _ in range(2):
    step(model, opt, pixels, ids)
  for k, v in _flat(nnx.state(model, L.BASE_PARAMS)).items():
    np.testing.assert_array_equal(v, base_before[k], err_msg=f"base param {k} changed")
  lora_after = _flat(L.lora_state(model))
  unchanged = [k for k in lora_after if np.array_equal(lora_after[k], lora_before[k])]
  assert not unchanged, f"LoRA params not updated: {unchanged}"


def test_param_count_hysac_l14():
  # hysac.md §4.2: 24 x 262,144 (vision) + 25,792 (patch) + 12 x 196,608 (text) = 8,676,544. Abstract: no FLOPs.
  abstract = _compat.eval_shape(lambda: L.apply_lora(C.CLIP(L14, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)))
  assert L.lora_param_count(abstract) == 8_676_544
  assert len(L.lora_sites(abstract)) == 24 * 5 + 12 * 5 + 1


def test_save_load_lora(tmp_path):
  model = C.CLIP(TINY, rngs=nnx.Rngs(0))
  L.apply_lora(model, rank=4, alpha=2.0, rngs=nnx.Rngs(1))
  _randomize_b(model)
  L.save_lora(model, tmp_path / "lora.safetensors")
  other = L.apply_lora(C.CLIP(TINY, rngs=nnx.Rngs(0)), rank=4, alpha=2.0, rngs=nnx.Rngs(9))
  L.load_lora(other, tmp_path / "lora.safetensors")
  saved, loaded = _flat(L.lora_state(model)), _flat(L.lora_state(other))
  assert saved.keys() == loaded.keys()
  for k in saved:
    np.testing.assert_array_equal(saved[k], loaded[k])
  wrong = L.apply_lora(C.CLIP(TINY, rngs=nnx.Rngs(0)), ["fc1"], rank=3, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"lora\.safetensors(.|\n)*missing tensor|lora\.safetensors(.|\n)*shape"):
    L.load_lora(wrong, tmp_path / "lora.safetensors")
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    L.load_lora(other, tmp_path / "nope.safetensors")
  # One Inf in a saved LoRA matrix: the error names the file and the tensor.
  from safetensors import safe_open
  from safetensors.numpy import save_file
  with safe_open(tmp_path / "lora.safetensors", framework="numpy") as f:
    meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
  key = sorted(tensors)[-1]
  tensors[key][0, 0] = np.inf
  save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
  with pytest.raises(ValueError, match=rf"bad\.safetensors: (.|\n)*{re.escape(key)}: 1 NaN/Inf"):
    L.load_lora(other, tmp_path / "bad.safetensors")


def test_targets_and_errors():
  model = C.CLIP(TINY, rngs=nnx.Rngs(0))
  L.apply_lora(model, r"vision_model\.encoder\.layers\.\d+\.(self_attn\.q_proj|mlp\.fc1)", rank=2,
               rngs=nnx.Rngs(1))
  assert list(L.lora_sites(model)) == [f"vision_model.encoder.layers.{i}.{m}" for i in range(2)
                                       for m in ("mlp.fc1", "self_attn.q_proj")]
  with pytest.raises(ValueError, match="already has a LoRA adapter"):
    L.apply_lora(model, ["fc1"], rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="matched no nnx.Linear"):
    L.apply_lora(model, ["proj"], rngs=nnx.Rngs(1))       # suffix rule: 'proj' is not 'k_proj'
  with pytest.raises(ValueError, match=re.escape("text_model.encoder (CLIPEncoder is not")):
    L.apply_lora(model, ["encoder"], rngs=nnx.Rngs(1))
  conv = nnx.Module()
  conv.c = nnx.Conv(3, 4, (3, 3), strides=(1, 1), padding="SAME", rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="strides"):
    L.apply_lora(conv, ["c"], rngs=nnx.Rngs(0))


def test_patchify_order():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  p = L.patchify(x, (2, 3))
  assert p.shape == (2, 2, 2, 18)
  np.testing.assert_array_equal(np.asarray(p[1, 1, 0]), np.asarray(x[1, 2:4, 0:3, :]).reshape(-1))


@pytest.mark.torch
def test_peft_import_reproduces_torch_peft(tmp_path):
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import CLIPConfig, CLIPModel

  hf_cfg = CLIPConfig(text_config=C.CLIPConfig.to_hf_dict(TINY)["text_config"],
                      vision_config=C.CLIPConfig.to_hf_dict(TINY)["vision_config"], projection_dim=7)
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  hf = CLIPModel(hf_cfg).eval()
  hf.save_pretrained(tmp_path / "hf")
  targets = ["k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"]
  peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=3, lora_dropout=0.0, target_modules=targets,
                                             init_lora_weights=False)).eval()
  state = peft_model.state_dict()
  lora_tensors = {k: v for k, v in state.items() if ".lora_" in k}
  assert any(".lora_A.default.weight" in k for k in lora_tensors)

  model = C.CLIP.from_pretrained(tmp_path / "hf")
  L.apply_lora(model, targets, rank=4, alpha=3.0, dropout=0.0, rngs=nnx.Rngs(0))
  # the full state dict also works with an ignore pattern for the non-LoRA tensors
  L.import_peft(model, state, ignore=r"^(?!.*\.lora_[AB]\.)")
  model.eval()
  pixels, ids = _inputs()
  with torch.no_grad():
    base = peft_model.base_model.model
    px = torch.tensor(np.asarray(pixels).transpose(0, 3, 1, 2))
    img_ref = base.visual_projection(base.vision_model(pixel_values=px).pooler_output).numpy()
    txt_ref = base.text_projection(base.text_model(input_ids=torch.tensor(np.asarray(ids))).pooler_output).numpy()
  img, txt = _embed(model, pixels, ids)
  with torch.no_grad():
    plain = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    img_plain = plain.visual_projection(plain.vision_model(pixel_values=px).pooler_output).numpy()
  assert np.abs(img_ref - img_plain).max() > 1e-3                    # the PEFT adapters are not a no-op
  np.testing.assert_allclose(img, img_ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(txt, txt_ref, rtol=RTOL, atol=ATOL)
  # export_peft inverts the layout transforms exactly
  back = L.export_peft(model)
  assert back.keys() == lora_tensors.keys()
  for k, v in back.items():
    np.testing.assert_array_equal(v, lora_tensors[k].numpy(), err_msg=k)
  # unmatched names fail loudly, all listed together
  bad = dict(lora_tensors)
  bad["base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(4, 15)
  bad["visual.base_model.model.x.lora_A.default.weight"] = torch.zeros(4, 15)
  bad.pop("base_model.model.vision_model.encoder.layers.1.mlp.fc2.lora_B.default.weight")
  with pytest.raises(ValueError) as err:
    L.import_peft(model, bad)
  msg = str(err.value)
  assert "no LoRA site named 'text_model.encoder.layers.0.self_attn.q_proj'" in msg
  assert "visual.base_model.model.x.lora_A.default.weight: does not start with prefix" in msg
  assert "vision_model.encoder.layers.1.mlp.fc2 got no lora_B" in msg
  # HySAC-style prefixes
  hysac = {k.replace("base_model.model.", "visual.base_model.model." if ".vision_model." in k or
                     k.startswith("base_model.model.vision_model") else "textual.base_model.model."): v
           for k, v in lora_tensors.items()}
  fresh = L.apply_lora(C.CLIP.from_pretrained(tmp_path / "hf"), targets, rank=4, alpha=3.0, dropout=0.0,
                       rngs=nnx.Rngs(5))
  L.import_peft(fresh, hysac, prefix=("visual.base_model.model.", "textual.base_model.model."))
  fresh.eval()
  np.testing.assert_allclose(_embed(fresh, pixels, ids)[0], img_ref, rtol=RTOL, atol=ATOL)
