"""checkpoints_convert hysac: a hand-built PEFT-0.4-named HySAC state dict -> HySAC trainable-state directory.

The state dict is written by hand with the exact key names of the released ``hysac_model.pth`` (hysac.md §4.4),
not with the installed peft. Reference: the same tensors merged in torch (``W + scaling * B @ A``, the patch conv
as ``B o A``), HF towers in float32, then ``exp0_c(exp(alpha) f)`` in torch float64.
Tolerance: rtol = 1e-4, atol = 1e-5 on the lifted embeddings (float32 JAX vs float32 torch towers).
"""
import copy
import json
import math

import numpy as np
import pytest

from checkpoints_convert.__main__ import HYSAC_CODE
from checkpoints_convert.__main__ import main as cli_main
from checkpoints_convert.hysac import HySACImportError, convert

pytestmark = pytest.mark.torch

RTOL, ATOL = 1e-4, 1e-5
RANK, ALPHA = 4, 1.0
TEXT = dict(vocab_size=97, hidden_size=20, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=11, eos_token_id=96, bos_token_id=95, projection_dim=7)
VISION = dict(image_size=15, patch_size=5, hidden_size=20, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, projection_dim=7)
TARGETS = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")
SCALARS = {"curv": math.log(2.0), "visual_alpha": math.log(0.3), "textual_alpha": math.log(0.5),
           "logit_scale": math.log(20.0)}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """(hf model, base dir, state dict with HySAC names, path of the .pth)."""
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
  torch.manual_seed(0)
  cfg = CLIPConfig(text_config=CLIPTextConfig(**TEXT).to_dict(), vision_config=CLIPVisionConfig(**VISION).to_dict(),
                   projection_dim=7)
  cfg._attn_implementation = "eager"
  hf = CLIPModel(cfg).eval()
  d = tmp_path_factory.mktemp("hysac")
  hf.save_pretrained(d / "base")
  sd = {}
  for k, v in hf.state_dict().items():
    if k.startswith(("vision_model.", "visual_projection.")):
      sd["visual.base_model.model." + k] = v.clone()
    elif k.startswith(("text_model.", "text_projection.")):
      sd["textual.base_model.model." + k] = v.clone()
  g = torch.Generator().manual_seed(1)
  for name, mod in hf.named_modules():
    if not name.endswith(TARGETS):
      continue
    prefix = "visual.base_model.model." if name.startswith("vision_model") else "textual.base_model.model."
    if isinstance(mod, torch.nn.Conv2d):
      a = torch.randn(RANK, mod.in_channels, *mod.kernel_size, generator=g) * 0.3
      b = torch.randn(mod.out_channels, RANK, 1, 1, generator=g) * 0.3
    else:
      a = torch.randn(RANK, mod.in_features, generator=g) * 0.3
      b = torch.randn(mod.out_features, RANK, generator=g) * 0.3
    sd[f"{prefix}{name}.lora_A.default.weight"] = a
    sd[f"{prefix}{name}.lora_B.default.weight"] = b
  for k, v in SCALARS.items():
    sd[k] = torch.tensor(v)
  sd["pixel_mean"] = torch.rand(1, 3, 1, 1)
  sd["pixel_std"] = torch.rand(1, 3, 1, 1)
  torch.save(sd, d / "hysac_model.pth")
  return hf, d / "base", sd, d / "hysac_model.pth"


def _inputs(batch=3):
  rng = np.random.RandomState(0)
  pixels = rng.randn(batch, 15, 15, 3).astype(np.float32)
  ids = rng.randint(0, 95, size=(batch, 11))
  ids[:, 0], ids[:, 6] = 95, 96
  return pixels, ids


def _torch_reference(hf, sd, pixels, ids):
  """Merged-weight HF towers + float64 exp map, written independently of the code under test."""
  import torch
  merged = copy.deepcopy(hf)
  scaling = ALPHA / RANK
  with torch.no_grad():
    for name, mod in merged.named_modules():
      if not name.endswith(TARGETS):
        continue
      prefix = "visual.base_model.model." if name.startswith("vision_model") else "textual.base_model.model."
      a, b = sd[f"{prefix}{name}.lora_A.default.weight"], sd[f"{prefix}{name}.lora_B.default.weight"]
      if isinstance(mod, torch.nn.Conv2d):
        mod.weight += scaling * torch.einsum("or,rchw->ochw", b[:, :, 0, 0], a)
      else:
        mod.weight += scaling * b @ a
    px = torch.tensor(pixels.transpose(0, 3, 1, 2))
    f_img = merged.visual_projection(merged.vision_model(pixel_values=px).pooler_output).double()
    f_txt = merged.text_projection(merged.text_model(input_ids=torch.tensor(ids)).pooler_output).double()

  c = torch.tensor(math.exp(SCALARS["curv"]), dtype=torch.float64)

  def exp0(v):
    s = torch.sqrt(c) * v.norm(dim=-1, keepdim=True)
    return torch.sinh(s) * v / s

  return (exp0(math.exp(SCALARS["visual_alpha"]) * f_img).numpy(),
          exp0(math.exp(SCALARS["textual_alpha"]) * f_txt).numpy())


def test_import_matches_torch_reference(released, tmp_path):
  from vlsafe_jax.methods.hysac.model import load_hysac
  hf, base, sd, pth = released
  bounds = {k: {"avg": 1.0 + i, "up_95": 1.5 + i, "low_05": 0.5 + i} for i, k in enumerate("SUVG")}
  (tmp_path / "hysac_bounds.json").write_text(json.dumps(bounds))
  cli_main(["hysac", "--src", str(pth), "--base", str(base), "--dst", str(tmp_path / "out"),
            "--bounds", str(tmp_path / "hysac_bounds.json")])
  assert json.loads((tmp_path / "out" / "bounds.json").read_text()) == bounds
  model = load_hysac(tmp_path / "out")
  for k, v in SCALARS.items():
    np.testing.assert_allclose(float(getattr(model.scalars, k)[...]), v, rtol=1e-6, err_msg=k)
  pixels, ids = _inputs()
  img, txt = np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(ids))
  img_ref, txt_ref = _torch_reference(hf, sd, pixels, ids)
  np.testing.assert_allclose(img, img_ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(txt, txt_ref, rtol=RTOL, atol=ATOL)
  from vlsafe_jax.models import lora as L
  for site in L.lora_sites(model.clip).values():
    site.lora_b.set_value(site.lora_b.get_value() * 0)
  no_lora = np.asarray(model.encode_image(pixels))
  # the adapters are not a no-op: without them the embeddings are far from the reference
  assert np.abs(no_lora - img_ref).max() > 1e-2


def test_renamed_and_unknown_keys_fail_together(released, tmp_path):
  import torch
  hf, base, sd, _ = released
  bad = dict(sd)
  lora_key = "textual.base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.default.weight"
  renamed_lora = lora_key.replace("lora_A", "lora_Z")
  bad[renamed_lora] = bad.pop(lora_key)
  base_key = "visual.base_model.model.vision_model.encoder.layers.1.mlp.fc2.weight"
  bad[base_key + "x"] = bad.pop(base_key)
  bad["stray_buffer"] = torch.zeros(2)
  bad.pop("curv")
  torch.save(bad, tmp_path / "bad.pth")
  with pytest.raises(HySACImportError) as err:
    convert(tmp_path / "bad.pth", base, tmp_path / "out", code=HYSAC_CODE)
  msg = str(err.value)
  assert "stray_buffer: unexpected key" in msg
  assert "missing scalar 'curv'" in msg
  # the second round (model-level checks) names the renamed keys and the site left without its A
  sd2 = dict(bad)
  sd2.pop("stray_buffer")
  sd2["curv"] = torch.tensor(0.0)
  torch.save(sd2, tmp_path / "bad2.pth")
  with pytest.raises(HySACImportError) as err:
    convert(tmp_path / "bad2.pth", base, tmp_path / "out", code=HYSAC_CODE)
  msg = str(err.value)
  assert renamed_lora in msg
  assert base_key + "x" in msg
  assert "text_model.encoder.layers.0.mlp.fc1 got no lora_A" in msg
  # a base weight that differs from --base is refused (the output references --base instead of copying it)
  sd3 = dict(sd)
  sd3[base_key] = sd[base_key] + 1.0
  torch.save(sd3, tmp_path / "bad3.pth")
  with pytest.raises(HySACImportError, match="differs from the --base CLIP"):
    convert(tmp_path / "bad3.pth", base, tmp_path / "out", code=HYSAC_CODE)


def test_nonfinite_or_non_tensor_pth_is_one_named_error(released, tmp_path):
  """A NaN in one LoRA matrix, or a pickled object weights_only refuses: one CheckpointFormatError naming the .pth
  (and the tensor), before anything is converted."""
  import fractions

  import torch

  from checkpoints_convert.safetensors_io import CheckpointFormatError
  _, base, sd, _ = released
  key = "visual.base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_B.default.weight"
  nan = dict(sd)
  nan[key] = sd[key].clone()
  nan[key][1, 2] = float("nan")
  torch.save(nan, tmp_path / "nan.pth")
  with pytest.raises(CheckpointFormatError, match=rf"nan\.pth: tensor '{key}' .*1 NaN and 0 Inf"):
    convert(tmp_path / "nan.pth", base, tmp_path / "out", code=HYSAC_CODE)
  torch.save({**sd, "note": fractions.Fraction(1, 3)}, tmp_path / "obj.pth")
  with pytest.raises(CheckpointFormatError, match=r"obj\.pth: cannot be read with torch\.load\(weights_only=True\)"):
    convert(tmp_path / "obj.pth", base, tmp_path / "out", code=HYSAC_CODE)
  assert not (tmp_path / "out").exists()
