"""checkpoints_convert for CLIP: input formats, aggregated errors, converted dirs, bit-exact export round trip.

Parity tolerance where embeddings are compared: rtol = atol = 1e-5 (float32, highest matmul precision).
"""
import fractions
import json
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from checkpoints_convert import clip as CC
from checkpoints_convert.__main__ import main as cli_main
from checkpoints_convert.mapping import ConversionError, flat_abstract
from checkpoints_convert.safetensors_io import CheckpointFormatError, SafetensorsFile, save_safetensors
from vlsafe_jax.models.clip import CLIP

pytestmark = pytest.mark.torch

TEXT = dict(vocab_size=97, hidden_size=20, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=11, eos_token_id=96, bos_token_id=95, projection_dim=7)
VISION = dict(image_size=15, patch_size=5, hidden_size=20, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, projection_dim=7)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
  torch.manual_seed(0)
  cfg = CLIPConfig(text_config=CLIPTextConfig(**TEXT).to_dict(), vision_config=CLIPVisionConfig(**VISION).to_dict(),
                   projection_dim=7)
  hf = CLIPModel(cfg).eval()
  d = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(d)
  return hf, d


def _inputs(batch=2):
  rng = np.random.RandomState(0)
  pixels = rng.randn(batch, 3, 15, 15).astype(np.float32)
  ids = rng.randint(0, 95, size=(batch, 11))
  ids[:, 0], ids[:, 6] = 95, 96
  return pixels, ids


def _hf_embeds(hf, pixels, ids):
  import torch
  with torch.no_grad():
    img = hf.get_image_features(pixel_values=torch.tensor(pixels))
    txt = hf.get_text_features(input_ids=torch.tensor(ids))
  as_np = lambda o: (o if torch.is_tensor(o) else o.pooler_output).float().numpy()
  return as_np(img), as_np(txt)


def _check_embeds(model, hf, tol=1e-5):
  pixels, ids = _inputs()
  img_ref, txt_ref = _hf_embeds(hf, pixels, ids)
  np.testing.assert_allclose(model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1))), img_ref,
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(model.encode_text(jnp.asarray(ids)), txt_ref, rtol=tol, atol=tol)


def _params(model):
  return {k: np.asarray(v.get_value()) for k, (_, v) in flat_abstract(nnx.state(model, nnx.Param)).items()}


def _copy_config(src, dst):
  dst.mkdir(parents=True, exist_ok=True)
  (dst / "config.json").write_text((src / "config.json").read_text())


def test_error_names_renamed_missing_and_misshaped_tensors_at_once(hf_dir, tmp_path):
  _, src = hf_dir
  f = SafetensorsFile(src / "model.safetensors")
  tensors = {k: f.get(k) for k in f.shapes()}
  tensors["text_model.encoder.layers.1.mlp.fc_1.weight"] = tensors.pop("text_model.encoder.layers.1.mlp.fc1.weight")
  del tensors["vision_model.post_layernorm.bias"]
  tensors["visual_projection.weight"] = tensors["visual_projection.weight"][:, :-1]
  tensors["text_model.embeddings.position_ids"] = np.arange(11)[None]       # known buffer: ignored
  bad = tmp_path / "bad"
  _copy_config(src, bad)
  save_safetensors(bad / "model.safetensors", tensors)
  with pytest.raises(ConversionError) as e:
    CLIP.from_pretrained(bad)
  msg = str(e.value)
  for needle in ("text_model.encoder.layers.1.mlp.fc_1.weight", "text_model.encoder.layers.1.mlp.fc1.kernel",
                 "vision_model.post_layernorm.bias", "visual_projection.weight", "(7, 19)", "(20, 7)", str(bad)):
    assert needle in msg, (needle, msg)
  assert "position_ids" not in msg
  assert (len(e.value.missing), len(e.value.unexpected), len(e.value.misshaped)) == (2, 1, 1)


def test_missing_files_give_named_errors(hf_dir, tmp_path):
  _, src = hf_dir
  _copy_config(src, tmp_path / "noweights")
  with pytest.raises(CheckpointFormatError, match="no weights found"):
    CLIP.from_pretrained(tmp_path / "noweights")
  (tmp_path / "trunc").mkdir()
  _copy_config(src, tmp_path / "trunc")
  (tmp_path / "trunc" / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:2000])
  with pytest.raises(CheckpointFormatError, match="trunc"):
    CLIP.from_pretrained(tmp_path / "trunc")


def test_sharded_safetensors_and_pytorch_bin_load(hf_dir, tmp_path):
  import torch
  hf, src = hf_dir
  ref = _params(CLIP.from_pretrained(src))
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
  sharded = _params(CLIP.from_pretrained(tmp_path / "sharded"))
  _copy_config(src, tmp_path / "bin")
  sd = {k: v.clone() for k, v in hf.state_dict().items()}
  sd["vision_model.embeddings.position_ids"] = torch.arange(10)[None]    # old-style buffer, ignored
  torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
  from_bin = _params(CLIP.from_pretrained(tmp_path / "bin"))
  assert sorted(sharded) == sorted(ref) == sorted(from_bin)
  for k in ref:
    np.testing.assert_array_equal(sharded[k], ref[k], err_msg=k)
    np.testing.assert_array_equal(from_bin[k], ref[k], err_msg=k)
  _check_embeds(CLIP.from_pretrained(tmp_path / "sharded"), hf)


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_half_precision_weights_load_without_torch(hf_dir, tmp_path, monkeypatch, tdtype):
  import copy

  import torch
  hf, _ = hf_dir
  half = copy.deepcopy(hf).to(getattr(torch, tdtype))
  half.save_pretrained(tmp_path / tdtype)
  ref = {k: v for k, v in half.state_dict().items()}
  monkeypatch.setitem(sys.modules, "torch", None)          # any `import torch` now raises ImportError
  model = CLIP.from_pretrained(tmp_path / tdtype)                 # param_dtype=None keeps the file dtype
  monkeypatch.undo()
  params = _params(model)
  k = params["vision_model.encoder.layers.0.mlp.fc1.kernel"]
  assert k.dtype == np.dtype(getattr(ml_dtypes, tdtype) if tdtype == "bfloat16" else np.float16)
  want = ref["vision_model.encoder.layers.0.mlp.fc1.weight"].float().numpy().T
  np.testing.assert_array_equal(k.astype(np.float32), want)
  cast = CLIP.from_pretrained(tmp_path / tdtype, param_dtype=jnp.float32)
  assert _params(cast)["logit_scale"].dtype == np.float32


BAD_KEY = "text_model.encoder.layers.1.mlp.fc1.weight"


def _good_tensors(src):
  f = SafetensorsFile(src / "model.safetensors")
  return {k: f.get(k) for k in f.shapes()}


@pytest.mark.parametrize("layout", ["safetensors", "sharded_bf16", "pytorch_bin", "converted"])
def test_nonfinite_weight_is_named_at_load(hf_dir, tmp_path, layout):
  """One NaN (or Inf) in one tensor: the loader names the file holding it and the tensor, whatever the layout."""
  import torch
  _, src = hf_dir
  t = _good_tensors(src)
  bad = t[BAD_KEY].copy()
  bad[2, 3] = np.nan if layout != "sharded_bf16" else np.inf
  d = tmp_path / layout
  _copy_config(src, d)
  if layout == "safetensors":
    save_safetensors(d / "model.safetensors", {**t, BAD_KEY: bad})
    where, what = d / "model.safetensors", "1 NaN and 0 Inf"
  elif layout == "sharded_bf16":
    t = {k: v.astype(ml_dtypes.bfloat16) for k, v in {**t, BAD_KEY: bad}.items()}
    keys = sorted(t)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
      save_safetensors(d / name, {k: t[k] for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    where = d / next(name for name, ks in shards.items() if BAD_KEY in ks)
    what = "0 NaN and 1 Inf"
  elif layout == "pytorch_bin":
    torch.save({k: torch.from_numpy(v) for k, v in {**t, BAD_KEY: bad}.items()}, d / "pytorch_model.bin")
    where, what = d / "pytorch_model.bin", "1 NaN and 0 Inf"
  else:                    # a converted directory: flax_model.safetensors under nnx names
    cli_main(["clip", "--src", str(src), "--dst", str(d)])
    conv = SafetensorsFile(d / CC.FLAX_WEIGHTS)
    tensors = {k: conv.get(k) for k in conv.shapes()}
    key = "text_model.encoder.layers.1.mlp.fc1.kernel"
    tensors[key] = bad.T.copy()
    save_safetensors(d / CC.FLAX_WEIGHTS, tensors)
    where, what = d / CC.FLAX_WEIGHTS, "1 NaN and 0 Inf"
  name = "text_model.encoder.layers.1.mlp.fc1.kernel" if layout == "converted" else BAD_KEY
  with pytest.raises(CheckpointFormatError) as info:
    CLIP.from_pretrained(d)
  msg = str(info.value)
  assert msg.startswith(f"{where}: tensor {name!r}"), msg
  assert what in msg and ("(3, 2)" if layout == "converted" else "(2, 3)") in msg, msg


def test_malformed_config_json_is_one_named_error(hf_dir, tmp_path):
  """Not JSON, not an object, a sub-config of the wrong type, an impossible value: each one error naming
  config.json (and the key where there is one), never a raw JSONDecodeError / AttributeError /
  ZeroDivisionError from inside the parser."""
  _, src = hf_dir
  good = json.loads((src / "config.json").read_text())
  cases = {
      "truncated": ((src / "config.json").read_text()[:40], r"config\.json: not valid JSON \(line \d+, column"),
      "list": ("[1, 2]", r"config\.json: expected a JSON object .*got list"),
      "text_str": (json.dumps({**good, "text_config": "oops"}), r"config\.json: .*text_config.* str"),
      "heads0": (json.dumps({**good, "text_config": {**good["text_config"], "num_attention_heads": 0}}),
                 r"config\.json: .*num_attention_heads"),
      "width_str": (json.dumps({**good, "vision_config": {**good["vision_config"], "hidden_size": "20"}}),
                    r"config\.json: .*vision_config\.hidden_size must be an int, got str"),
      "proj_none": (json.dumps({**good, "projection_dim": None}), r"config\.json: .*config\.projection_dim must be"),
  }
  for name, (text, pattern) in cases.items():
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointFormatError, match=pattern) as info:
      CLIP.from_pretrained(d)
    assert str(d / "config.json") in str(info.value), name


def test_non_tensor_pickle_in_bin_is_one_named_error(hf_dir, tmp_path):
  """pytorch_model.bin holding non-tensors (a list; a dict with a string; a pickled object weights_only refuses;
  random bytes): one CheckpointFormatError naming the file, never a raw AttributeError / UnpicklingError."""
  import torch
  _, src = hf_dir
  cases = {
      "list": (lambda p: torch.save([1, 2], p), r"expected a state dict .*got list"),
      "str_entry": (lambda p: torch.save({"text_model.x": "abc", "w": torch.ones(2)}, p),
                    r"not a state dict of tensors; 1 non-tensor entries: 'text_model\.x' \(str\)"),
      "object": (lambda p: torch.save({"w": torch.ones(2), "x": fractions.Fraction(1, 3)}, p),
                 r"cannot be read with torch\.load\(weights_only=True\) \(UnpicklingError: .*(global|GLOBAL)"),
      "garbage": (lambda p: p.write_bytes(b"this is not a pickle"), r"cannot be read with torch\.load"),
  }
  for name, (write, pattern) in cases.items():
    d = tmp_path / name
    _copy_config(src, d)
    write(d / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match=pattern) as info:
      CLIP.from_pretrained(d)
    assert str(info.value).startswith(f"{d / 'pytorch_model.bin'}: "), (name, str(info.value))


def test_convert_export_round_trip_is_bit_exact_and_loads_in_transformers(hf_dir, tmp_path):
  from transformers import CLIPModel
  hf, src = hf_dir
  (src / "vocab.json").write_text("{}")                               # side files travel along
  cli_main(["clip", "--src", str(src), "--dst", str(tmp_path / "ours")])
  assert CC.is_converted(tmp_path / "ours") and (tmp_path / "ours" / "vocab.json").exists()
  ours = CLIP.from_pretrained(tmp_path / "ours")
  assert _params(ours)["logit_scale"].shape == ()                     # 0-d, as in HF
  _check_embeds(ours, hf)
  cli_main(["export", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "back")])
  a, b = SafetensorsFile(src / "model.safetensors"), SafetensorsFile(tmp_path / "back" / "model.safetensors")
  assert sorted(a.shapes()) == sorted(b.shapes())
  for k in a.shapes():
    x, y = a.get(k), b.get(k)
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k
  reloaded = CLIPModel.from_pretrained(tmp_path / "back").eval()
  pixels, ids = _inputs()
  for r, e in zip(_hf_embeds(reloaded, pixels, ids), _hf_embeds(hf, pixels, ids)):
    np.testing.assert_array_equal(r, e)


def test_single_tower_vision_file(hf_dir, tmp_path):
  import torch
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  torch.manual_seed(1)
  hf = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()
  hf.save_pretrained(tmp_path / "vis")
  model = CLIP.from_pretrained(tmp_path / "vis")
  assert not hasattr(model, "text_model")
  pixels, _ = _inputs()
  with torch.no_grad():
    ref = hf(pixel_values=torch.tensor(pixels)).image_embeds.numpy()
  np.testing.assert_allclose(model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1))), ref, rtol=1e-5,
                             atol=1e-5)
  CC.export_hf(model, tmp_path / "vis_back")
  assert json.loads((tmp_path / "vis_back" / "config.json").read_text())["model_type"] == "clip_vision_model"
  back = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "vis_back").eval()
  with torch.no_grad():
    np.testing.assert_array_equal(back(pixel_values=torch.tensor(pixels)).image_embeds.numpy(), ref)


def test_load_onto_fsdp_mesh(hf_dir):
  from vlsafe_jax import sharding
  hf, src = hf_dir
  mesh = sharding.make_mesh(data=2, fsdp=4)
  model = CLIP.from_pretrained(src, mesh=mesh)
  k = nnx.state(model, nnx.Param)["text_model"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"].get_value()
  assert k.sharding.spec[0] == "fsdp" and len(k.addressable_shards) == 8
  _check_embeds(model, hf)
