"""checkpoints_convert/llava.py: both vision-tower namings, sharded files, dtype kept, aggregated errors,
export round trip, CLI, and streaming straight into an 8-device sharded state.

The tiny HF LLaVA comes from tests/models/_llava_hf.py (torch needed to build it once per module); every check
here compares tensors bit-exactly (no tolerance) except the HF reload of an export (rtol = atol = 1e-5, fp32).
"""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from _llava_hf import IMAGE_SIZE, build_hf, nchw, pad_rows, prompt  # noqa: E402

from checkpoints_convert import __main__ as cli  # noqa: E402
from checkpoints_convert import llava as C  # noqa: E402
from checkpoints_convert.mapping import ConversionError  # noqa: E402
from checkpoints_convert.safetensors_io import SafetensorsFile, save_safetensors  # noqa: E402
from vlsafe_jax import sharding  # noqa: E402
from vlsafe_jax.models import llava as LV  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llava_hf")
  build_hf("llama", d, seed=3)
  return d


def _tensors(path):
  f = SafetensorsFile(path)
  return {k: f.get(k) for k in f.shapes()}


def _flat(model):
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _variant(tmp_path, hf_dir, name, tensors):
  d = tmp_path / name
  d.mkdir()
  (d / "config.json").write_text((hf_dir / "config.json").read_text())
  save_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
  return d


def _assert_same(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_hub_naming_and_sharded_index_load_identically(hf_dir, tmp_path):
  ref = LV.Llava.from_pretrained(hf_dir)
  t = _tensors(hf_dir / "model.safetensors")
  assert sum(k.startswith("vision_tower.vision_model.") for k in t) == 0
  hub = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
         for k, v in t.items()}
  _assert_same(ref, LV.Llava.from_pretrained(_variant(tmp_path, hf_dir, "hub", hub)))
  # In-memory transformers-5 names (model.language_model.*, model.vision_tower.*, lm_head) also load.
  mem = {}
  for k, v in t.items():
    k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head", "lm_head")
    k = k.replace("vision_tower.", "model.vision_tower.").replace("multi_modal_projector.",
                                                                  "model.multi_modal_projector.")
    mem[k] = v
  _assert_same(ref, LV.Llava.from_pretrained(_variant(tmp_path, hf_dir, "mem", mem)))
  # Two shards + index.
  d = tmp_path / "sharded"
  d.mkdir()
  (d / "config.json").write_text((hf_dir / "config.json").read_text())
  keys = sorted(t)
  halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for fname, ks in halves.items():
    save_safetensors(d / fname, {k: t[k] for k in ks}, metadata={"format": "pt"})
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
  _assert_same(ref, LV.Llava.from_pretrained(d))


def test_half_precision_kept_without_torch(hf_dir, tmp_path):
  t = _tensors(hf_dir / "model.safetensors")
  for dt in (ml_dtypes.bfloat16, np.float16):
    d = _variant(tmp_path, hf_dir, np.dtype(dt).name, {k: v.astype(dt) for k, v in t.items()})
    model = LV.Llava.from_pretrained(d)
    flat = _flat(model)
    assert {a.dtype for a in flat.values()} == {np.dtype(dt)}
    np.testing.assert_array_equal(flat["language_model.lm_head.kernel"],
                                  t["language_model.lm_head.weight"].astype(dt).T)


def test_errors_are_aggregated(hf_dir, tmp_path):
  t = _tensors(hf_dir / "model.safetensors")
  t["vision_tower.encoder.layers.0.mlp.fc9.weight"] = t.pop("vision_tower.encoder.layers.0.mlp.fc1.weight")  # renamed
  del t["multi_modal_projector.linear_2.bias"]                                                              # missing
  t["language_model.model.layers.1.mlp.up_proj.weight"] = np.zeros((36, 40), np.float32)                    # mis-shaped
  # Both namings of one tensor in one file: a duplicate.
  t["vision_tower.vision_model.post_layernorm.bias"] = t["vision_tower.post_layernorm.bias"]
  with pytest.raises(ConversionError) as info:
    LV.Llava.from_pretrained(_variant(tmp_path, hf_dir, "bad", t))
  msg = str(info.value)
  for needle in ("vision_tower.encoder.layers.0.mlp.fc9.weight", "vision_tower.encoder.layers.0.mlp.fc1.kernel",
                 "multi_modal_projector.linear_2.bias", "language_model.model.layers.1.mlp.up_proj.weight",
                 "(36, 40)", "vision_tower.post_layernorm.bias", "duplicate"):
    assert needle in msg, (needle, msg)
  e = info.value
  assert len(e.missing) == 2 and len(e.unexpected) == 1 and len(e.misshaped) == 1 and len(e.duplicate) == 1


def test_export_round_trip_bit_exact_and_hf_reload(hf_dir, tmp_path):
  import torch
  import transformers
  model = LV.Llava.from_pretrained(hf_dir)
  orig = _tensors(hf_dir / "model.safetensors")
  out = C.export_hf(model, tmp_path / "v5")
  got = _tensors(out / "model.safetensors")
  assert got.keys() == orig.keys()
  for k in orig:
    np.testing.assert_array_equal(got[k], orig[k], err_msg=k)
  # Hub naming, forced into 3 shards: transformers 5 loads it with identical outputs.
  hub = C.export_hf(model, tmp_path / "hub", vision_naming="hub", max_shard_bytes=80_000)
  index = json.loads((hub / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) >= 2
  assert all(not k.startswith("vision_tower.") or k.startswith("vision_tower.vision_model.")
             for k in index["weight_map"])
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(hub, attn_implementation="eager").eval()
  rs = np.random.RandomState(0)
  ids, mask = pad_rows([prompt(rs, 3, 4, True)], "left")
  pixels = rs.randn(1, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  with torch.no_grad():
    ref = reloaded(input_ids=torch.tensor(ids), pixel_values=nchw(pixels)).logits.numpy()
  logits, _, _ = model(jnp.asarray(ids), jnp.asarray(pixels))
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)


def _logits_vs_hf(model, hf):
  import torch
  rs = np.random.RandomState(1)
  ids, _ = pad_rows([prompt(rs, 3, 4, True)], "left")
  pixels = rs.randn(1, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), pixel_values=nchw(pixels)).logits.numpy()
  logits, _, _ = model(jnp.asarray(ids), jnp.asarray(pixels))
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)


def test_top_level_tie_loads_like_transformers(tmp_path):
  """``LlavaConfig(tie_word_embeddings=True)`` over an untied text_config: transformers 5 ties (the top-level flag
  wins, ``LlavaConfig.__post_init__`` ORs the two) and saves no lm_head. Oracle: HF's own logits (fp32, 1e-5).
  A stored head that differs from the embeddings is kept untied, as transformers' ``tie_weights`` does."""
  import transformers
  src = tmp_path / "tied"
  hf = build_hf("llama", src, seed=4, tie_word_embeddings=True)
  cfg = json.loads((src / "config.json").read_text())
  assert cfg["tie_word_embeddings"] is True and not cfg["text_config"].get("tie_word_embeddings")
  t = _tensors(src / "model.safetensors")
  assert not [k for k in t if "lm_head" in k]
  model = LV.Llava.from_pretrained(src)
  assert model.config.text_config.tie_word_embeddings
  _logits_vs_hf(model, hf)
  # A stored copy equal to the embeddings is the tied matrix: still tied.
  same = _variant(tmp_path, src, "same", {**t, "language_model.lm_head.weight": t[C.EMBED_KEY]})
  assert LV.Llava.from_pretrained(same).config.text_config.tie_word_embeddings
  # A different stored head: untied on both sides.
  head = np.random.RandomState(5).randn(*t[C.EMBED_KEY].shape).astype(np.float32)
  d = _variant(tmp_path, src, "head", {**t, "language_model.lm_head.weight": head})
  with pytest.warns(UserWarning, match="differs"):
    untied = LV.Llava.from_pretrained(d)
  hf2 = transformers.LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
  assert hf2.lm_head.weight.data_ptr() != hf2.model.language_model.embed_tokens.weight.data_ptr()
  assert not untied.config.text_config.tie_word_embeddings
  _logits_vs_hf(untied, hf2)


def test_malformed_llava_config_json_is_one_named_error(hf_dir, tmp_path):
  """Each malformed LLaVA config.json gives one CheckpointFormatError naming the file and the key."""
  from checkpoints_convert.safetensors_io import CheckpointFormatError
  good = json.loads((hf_dir / "config.json").read_text())
  cases = {
      "text_list": ({**good, "text_config": [1]}, r"text_config must be a JSON object .*got list"),
      "token_str": ({**good, "image_token_index": "127"}, r"config\.image_token_index must be an int, got str"),
      "heads0": ({**good, "text_config": {**good["text_config"], "num_attention_heads": 0}},
                 r"num_attention_heads must be a positive integer, got 0"),
      "vision_eps": ({**good, "vision_config": {**good["vision_config"], "layer_norm_eps": "1e-5"}},
                     r"vision_config\.layer_norm_eps must be a float, got str"),
  }
  for name, (cfg, pattern) in cases.items():
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match=pattern) as info:
      LV.Llava.from_pretrained(d)
    assert str(info.value).startswith(f"{d / 'config.json'}: "), (name, str(info.value))


def test_cli_llava_and_llava_export(hf_dir, tmp_path):
  ref = LV.Llava.from_pretrained(hf_dir)
  cli.main(["llava", "--src", str(hf_dir), "--dst", str(tmp_path / "conv")])
  assert C.is_converted(tmp_path / "conv")
  _assert_same(ref, LV.Llava.from_pretrained(tmp_path / "conv"))
  cli.main(["llava-export", "--src", str(tmp_path / "conv"), "--dst", str(tmp_path / "back"),
            "--vision-naming", "hub"])
  back = _tensors(tmp_path / "back" / "model.safetensors")
  assert "vision_tower.vision_model.pre_layrnorm.weight" in back
  _assert_same(ref, LV.Llava.from_pretrained(tmp_path / "back"))
  with pytest.raises(SystemExit, match="no config.json"):
    cli.main(["llava", "--src", str(tmp_path), "--dst", str(tmp_path / "x")])


def test_cli_llama_converted_directory(tmp_path):
  from _llama_hf import build_hf as build_llama
  from vlsafe_jax.models.llama import Llama
  build_llama("llama", tmp_path / "hf")
  cli.main(["llama", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "conv")])
  _assert_same(Llama.from_pretrained(tmp_path / "hf"), Llama.from_pretrained(tmp_path / "conv"))
  cli.main(["llama", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "bf16"), "--param-dtype", "bfloat16"])
  dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(Llama.from_pretrained(tmp_path / "bf16"),
                                                                         nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}, dtypes


@pytest.mark.multidevice
def test_streaming_load_into_8_device_sharded_state(hf_dir):
  mesh = sharding.make_mesh(data=1, fsdp=8, model=1)
  model = LV.Llava.from_pretrained(hf_dir, mesh=mesh)
  ref = LV.Llava.from_pretrained(hf_dir)
  flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # D = 40 and the vision width 24 split 8 ways along "embed" (fsdp): each device holds 1/8 of those tensors.
  head = flat["language_model.lm_head.kernel"]
  assert head.sharding.spec[0] == "fsdp" and head.addressable_shards[0].data.shape == (5, 128)
  q = flat["language_model.model.layers.self_attn.q_proj.kernel"]
  assert q.addressable_shards[0].data.shape == (2, 5, 40)
  fc1 = flat["vision_tower.encoder.layers.0.mlp.fc1.kernel"]
  assert fc1.addressable_shards[0].data.shape == (3, 29)
  n_split = sum(a.addressable_shards[0].data.size * 8 == a.size for a in flat.values())
  assert n_split >= 10, n_split
  ref_flat = _flat(ref)
  for k, a in flat.items():
    np.testing.assert_array_equal(np.asarray(a), ref_flat[k], err_msg=k)
  # The sharded model runs (jitted under the mesh) and agrees with the single-device one.
  rs = np.random.RandomState(1)
  ids, mask = pad_rows([prompt(rs, 3, 4, True), prompt(rs, 5, 2, False)], "left")
  pixels = rs.randn(1, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  with jax.set_mesh(mesh):
    logits = nnx.jit(lambda m, i, p, k: m(i, p, attention_mask_bt=k)[0])(
        model, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
  want, _, _ = ref(jnp.asarray(ids), jnp.asarray(pixels), attention_mask_bt=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(logits)[mask > 0], np.asarray(want)[mask > 0], rtol=1e-5, atol=1e-5)
