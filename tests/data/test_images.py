"""vlsafe_jax.data.images against transformers' CLIPImageProcessorPil (the oracle; tolerance 1e-5 absolute).

Real images shipped by matplotlib: grace_hopper.jpg (a 512x600 RGB photograph), Minduka_Present_Blue_Pack.png (a
128x128 RGBA photo-like image: upsampling + alpha compositing), logo2.png (542x130 RGBA: extreme aspect ratio).
Synthetic uint8 inputs cover odd sizes, non-square crops, grayscale, LA/P-with-transparency and RGBA arrays.
"""
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from vlsafe_jax.data import images as I

ATOL = 1e-5
SAMPLE = Path(matplotlib.get_data_path()) / "sample_data"
REAL = ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"]


def hf_reference(image, size=224, crop=None, **kw):
  from transformers import CLIPImageProcessorPil
  crop = crop if crop is not None else (size, size)
  proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop[0], "width": crop[1]},
                               **kw)
  extra = {"input_data_format": "channels_last"} if isinstance(image, np.ndarray) else {}
  out = proc(image, return_tensors="np", **extra)["pixel_values"]
  return out.transpose(0, 2, 3, 1)                     # NCHW -> NHWC


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("size", [224, 97])
def test_real_photographs(name, size):
  path = SAMPLE / name
  assert path.is_file(), f"matplotlib sample image {path} missing"
  ours = I.preprocess(path, size)
  ref = hf_reference(Image.open(path), size)
  assert ours.dtype == np.float32 and ours.shape == ref.shape == (1, size, size, 3)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_batch_of_paths_pil_and_arrays():
  paths = [SAMPLE / n for n in REAL]
  pils = [Image.open(p) for p in paths]
  ours = I.preprocess([paths[0], pils[1], np.asarray(pils[0].convert("RGB"))], 61)
  ref = np.concatenate([hf_reference(pils[0], 61), hf_reference(pils[1], 61), hf_reference(pils[0], 61)])
  np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("shape,size,crop", [
    ((37, 53, 3), 23, (23, 19)),        # landscape, non-square crop
    ((101, 29, 3), 31, (31, 31)),       # tall, upsampling of the short side
    ((17, 17, 3), 17, (17, 17)),        # no-op resize
    ((40, 64, 3), 20, (25, 30)),        # crop larger than the resized short side: zero padding
])
def test_odd_sizes(shape, size, crop):
  a = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
  ours = I.preprocess(a, size, crop_size=crop)
  ref = hf_reference(a, size, crop)
  assert ours.shape == ref.shape == (1, *crop, 3)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16"])
def test_modes_pil(mode):
  rng = np.random.default_rng(3)
  rgba = Image.fromarray(rng.integers(0, 256, (29, 43, 4), dtype=np.uint8), "RGBA")
  if mode == "P":
    im = rgba.convert("RGB").convert("P")
    im.info["transparency"] = 5          # palette index 5 transparent: HF composites onto white
  elif mode == "I;16":
    im = Image.fromarray(rng.integers(0, 65535, (29, 43), dtype=np.uint16))
  else:
    im = rgba.convert(mode)
  ours = I.preprocess(im, 19)
  ref = hf_reference(im, 19)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("channels", [None, 1, 4])
def test_gray_and_rgba_arrays(channels):
  shape = (31, 22) if channels is None else (31, 22, channels)
  a = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
  ours = I.preprocess(a, 13)
  # HF's numpy path needs a channel axis; for 2-D gray use the equivalent PIL 'L' image.
  ref = hf_reference(Image.fromarray(a, "L") if channels is None else a, 13)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_checkpoint_mean_std_and_config(tmp_path):
  cfg = {"size": {"shortest_edge": 41}, "crop_size": {"height": 41, "width": 41},
         "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 3,
         "image_processor_type": "CLIPImageProcessor"}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
  kw = I.processor_config(tmp_path)
  assert kw["size"] == 41 and kw["crop_size"] == (41, 41) and kw["mean"] == (0.5, 0.4, 0.3)
  path = SAMPLE / "grace_hopper.jpg"
  ours = I.preprocess(path, **kw)
  ref = hf_reference(Image.open(path), 41, image_mean=cfg["image_mean"], image_std=cfg["image_std"])
  np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
  # without preprocessor_config.json: OpenAI defaults, size from config.json's vision image_size
  other = tmp_path / "other"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"vision_config": {"image_size": 336}}))
  kw = I.processor_config(other)
  assert kw["size"] == kw["crop_size"] == 336 and kw["mean"] == I.CLIP_MEAN and kw["std"] == I.CLIP_STD


def test_constants_equal_transformers():
  from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  assert tuple(OPENAI_CLIP_MEAN) == I.CLIP_MEAN and tuple(OPENAI_CLIP_STD) == I.CLIP_STD


def test_pad_to_square():
  a = np.zeros((4, 10, 3), np.uint8) + 200
  sq = I.pad_to_square(a)
  assert sq.shape == (10, 10, 3)
  fill = [int(255 * m) for m in I.CLIP_MEAN]
  np.testing.assert_array_equal(sq[:3].reshape(-1, 3), np.tile(fill, (30, 1)))   # (10 - 4) // 2 = 3 rows on top
  assert (sq[3:7] == 200).all() and (sq[7:] == np.asarray(fill, np.uint8)).all()
  # through preprocess: equals HF on the explicitly padded image
  im = np.random.default_rng(1).integers(0, 256, (21, 50, 3), dtype=np.uint8)
  np.testing.assert_allclose(I.preprocess(im, 16, pad_to_square=True), hf_reference(I.pad_to_square(im), 16),
                             rtol=0, atol=ATOL)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    I.preprocess(tmp_path / "missing.jpg")
  bad = tmp_path / "corrupt.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  with pytest.raises(ValueError, match="corrupt.png"):
    I.preprocess([SAMPLE / "grace_hopper.jpg", bad])
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes((SAMPLE / "grace_hopper.jpg").read_bytes()[:5000])
  with pytest.raises(ValueError, match="truncated.jpg"):
    I.preprocess(truncated)
  with pytest.raises(ValueError, match=r"image 1: arrays must be uint8"):
    I.preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match=r"image 0: .*got shape \(8, 8, 2\)"):
    I.preprocess(np.zeros((8, 8, 2), np.uint8))
  with pytest.raises(ValueError, match="different shapes"):
    I.preprocess([np.zeros((8, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)], 8, do_center_crop=False)


def _llava15_expand2square(pil_img, background_color):
  """LLaVA-1.5's ``expand2square`` (image_aspect_ratio "pad"), restated from its definition: a new image of the
  long side in ``background_color``, the original pasted centred at offset (long - short) // 2."""
  width, height = pil_img.size
  if width == height:
    return pil_img
  side = max(width, height)
  result = Image.new(pil_img.mode, (side, side), background_color)
  result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
  return result


@pytest.mark.parametrize("shape", [(240, 410, 3), (500, 173, 3), (337, 338, 3), (97, 1001, 3)],
                         ids=["landscape", "portrait", "odd_near_square", "extreme_odd"])
def test_llava15_pad_and_336_equal_hf_processor(shape):
  """The LLaVA-1.5 path (pad to square with the mean colour, then the 336-px CLIP processor) against the oracle:
  LLaVA-1.5's own recipe (expand2square with ``tuple(int(x*255) for x in image_mean)``) followed by HF's PIL CLIP
  processor built as in llava-v1.5's preprocessor_config.json (shortest edge 336, crop 336, bicubic, CLIP mean/std).
  (``CLIPImageProcessor`` falls back to this PIL backend without torchvision; LLaVA-1.5 used the PIL processor.)
  Tolerance: ATOL = 1e-5 absolute on the normalised values (float32 rounding; one uint8 step is ~0.015)."""
  from transformers import CLIPImageProcessorPil
  from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                               do_center_crop=True, do_resize=True, resample=Image.Resampling.BICUBIC,
                               do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                               image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True)
  # Smooth gradients plus noise: resampling differences show up, and the pad border is not image-coloured.
  h, w, _ = shape
  yy, xx = np.mgrid[0:h, 0:w]
  rng = np.random.default_rng(h * w)
  a = np.stack([255 * yy / h, 255 * xx / w, 127 + 100 * np.sin(xx / 7 + yy / 11)], -1) + rng.normal(0, 20, shape)
  im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
  fill = tuple(int(x * 255) for x in proc.image_mean)
  ref = proc(_llava15_expand2square(im, fill), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = I.preprocess(im, 336, pad_to_square=True)
  assert ours.shape == ref.shape == (1, 336, 336, 3)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
  # The pad really reaches the output (the top-left corner is mean-coloured border), so the fill is compared.
  if abs(h - w) > 20:
    border = ours[0, :2, :2]
    want = (np.asarray(fill) / 255 - np.asarray(OPENAI_CLIP_MEAN)) / np.asarray(OPENAI_CLIP_STD)
    np.testing.assert_allclose(border, np.broadcast_to(want, border.shape), atol=1e-5)
