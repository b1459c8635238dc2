"""CLIP image preprocessing, equal to transformers' ``CLIPImageProcessorPil`` (``platform.md`` §5.4).

Pipeline per image (the order and arithmetic follow the HF PIL backend so results agree to float32 rounding):

  1. decode (paths) and convert to RGB; transparency is composited onto white, grayscale is repeated;
  2. optional pad-to-square with the mean colour (LLaVA-1.5's ``expand2square``), image centred;
  3. resize the shortest side to ``size`` with PIL bicubic (long side ``int(size * long / short)``);
  4. centre crop to ``crop_size`` (top/left offset ``(H - h) // 2``; zero padding if the image is smaller);
  5. ``x * (1/255)`` in float64, cast to float32; ``(x - mean) / std`` in float32.

Output: NHWC float32 numpy ``(N, crop_h, crop_w, 3)`` (what ``CLIP.encode_image`` takes). No torchvision, no
torch: PIL does the resampling, numpy the rest.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

# OpenAI CLIP normalisation constants (same values as transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray]

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def load_image(path: str | os.PathLike) -> Image.Image:
  """Opens and fully decodes an image file; errors name the file.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not a readable image (corrupt, truncated or another format).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file {path} does not exist")
  try:
    with Image.open(path) as im:
      im.load()              # decode now: truncated files fail here, not later inside the pipeline
      return im.copy()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def to_rgb_array(image: ImageLike, *, name: str | None = None) -> np.ndarray:
  """Any accepted input -> uint8 (H, W, 3) RGB array, compositing transparency onto white (as HF does).

  Args:
    image: a PIL image (any mode), a path, or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
    name: how to call the image in error messages (default: the path, or its position).
  """
  if isinstance(image, (str, os.PathLike)):
    image = load_image(image)
  what = name or "image"
  if isinstance(image, Image.Image):
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
      rgba = image.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"{what}: arrays must be uint8 (H, W[, C]) with values 0..255, got dtype {image.dtype}")
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ValueError(f"{what}: array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) channels-last, "
                       f"got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
      raise ValueError(f"{what}: empty image of shape {image.shape}")
    if image.shape[-1] == 1:
      return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
      # Same blend as HF's numpy path: alpha * rgb + (1 - alpha) * white in float64, rounded.
      alpha = image[..., 3:4] / 255
      return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image
  raise TypeError(f"{what}: expected a PIL image, a path or a uint8 array, got {type(image).__name__}")


def pad_to_square(rgb_hwc: np.ndarray, fill: Sequence[float] = CLIP_MEAN) -> np.ndarray:
  """Pads a uint8 (H, W, 3) image to (L, L, 3), L = max(H, W), image centred (offset (L - side) // 2).

  ``fill`` is a colour in [0, 1] (default: the CLIP mean, LLaVA-1.5's choice), converted with ``int(255 * f)``.
  """
  h, w, _ = rgb_hwc.shape
  if h == w:
    return rgb_hwc
  side = max(h, w)
  out = np.empty((side, side, 3), np.uint8)
  out[...] = np.asarray([int(255 * f) for f in fill], np.uint8)
  top, left = (side - h) // 2, (side - w) // 2
  out[top:top + h, left:left + w] = rgb_hwc
  return out


def resize_output_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
  """(h, w) after resizing: an int resizes the shortest side to ``size`` (long side ``int(size * long /
  short)``, truncated like HF/torchvision); a pair is an exact (height, width)."""
  if not isinstance(size, int):
    return int(size[0]), int(size[1])
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def center_crop(x_hwc: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
  """Centre crop (top = (H - h) // 2, left = (W - w) // 2); images smaller than the crop are zero-padded
  first, centred with the extra pixel at the top/left (HF's ``center_crop``)."""
  h, w = x_hwc.shape[:2]
  ch, cw = crop_hw
  if h < ch or w < cw:
    nh, nw = max(h, ch), max(w, cw)
    padded = np.zeros((nh, nw) + x_hwc.shape[2:], x_hwc.dtype)
    pt, pl = -(-(nh - h) // 2), -(-(nw - w) // 2)      # ceil division
    padded[pt:pt + h, pl:pl + w] = x_hwc
    x_hwc, h, w = padded, nh, nw
  top, left = (h - ch) // 2, (w - cw) // 2
  return x_hwc[top:top + ch, left:left + cw]


def normalize(rgb_hwc: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
              rescale_factor: float = 1 / 255) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 ``(x * rescale_factor - mean) / std`` (rescale in float64 like HF, then fp32)."""
  x = (rgb_hwc.astype(np.float64) * rescale_factor).astype(np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_one(image: ImageLike, size: int | tuple[int, int] = 224, *, mean: Sequence[float] = CLIP_MEAN,
                   std: Sequence[float] = CLIP_STD, crop_size: int | tuple[int, int] | None = None,
                   do_center_crop: bool = True, pad_square: bool = False, resample: str | int = "bicubic",
                   rescale_factor: float = 1 / 255, name: str | None = None) -> np.ndarray:
  """One image -> float32 (crop_h, crop_w, 3); see :func:`preprocess`."""
  rgb = to_rgb_array(image, name=name)
  if pad_square:
    rgb = pad_to_square(rgb, mean)
  h, w = rgb.shape[:2]
  new_h, new_w = resize_output_size(h, w, size)
  method = _RESAMPLE[resample] if isinstance(resample, str) else resample
  # PIL resize on uint8 RGB, exactly like the HF PIL backend (PIL returns a copy when the size is unchanged).
  rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=method))
  if do_center_crop:
    if crop_size is None:
      crop_size = size
    crop_hw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    rgb = center_crop(rgb, crop_hw)
  return normalize(rgb, mean, std, rescale_factor)


def preprocess(images: ImageLike | Sequence[ImageLike], size: int | tuple[int, int] = 224, mean: Sequence[float] =
               CLIP_MEAN, std: Sequence[float] = CLIP_STD, pad_to_square: bool = False, *,
               crop_size: int | tuple[int, int] | None = None, do_center_crop: bool = True,
               resample: str | int = "bicubic", rescale_factor: float = 1 / 255) -> np.ndarray:
  """CLIP preprocessing (= HF ``CLIPImageProcessorPil``) -> NHWC float32 numpy.

  Args:
    images: one image or a list; each a PIL image, a file path, or a uint8 array (H, W[, 1|3|4]).
      A single 4-D uint8 array (N, H, W, C) is treated as a batch.
    size: shortest-side resize target (int), or an exact (height, width).
    mean, std: per-channel normalisation (default OpenAI CLIP; use the checkpoint's, see
      :func:`processor_config`).
    pad_to_square: pad with the mean colour to a centred square before resizing (LLaVA-1.5).
    crop_size: centre-crop size (int or (h, w)); None = ``size``.
    do_center_crop: False skips the crop (then images must come out the same size to be stacked).
    resample: PIL filter name or ``PIL.Image.Resampling`` value (HF CLIP uses bicubic).
    rescale_factor: multiplier applied before normalising (HF: 1/255).

  Returns:
    float32 (N, crop_h, crop_w, 3); values roughly in [-1.8, 2.2] for the CLIP mean/std.

  Raises:
    FileNotFoundError / ValueError naming the file (or the image's index) for missing or unreadable images,
    bad array shapes/dtypes, or images that come out in different sizes.
  """
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  elif not isinstance(images, (list, tuple)):
    images = [images]
  if not images:
    raise ValueError("preprocess: got an empty list of images")
  out = []
  for i, im in enumerate(images):
    name = os.fspath(im) if isinstance(im, (str, os.PathLike)) else f"image {i}"
    out.append(preprocess_one(im, size, mean=mean, std=std, crop_size=crop_size, do_center_crop=do_center_crop,
                              pad_square=pad_to_square, resample=resample, rescale_factor=rescale_factor,
                              name=name))
  shapes = {x.shape for x in out}
  if len(shapes) > 1:
    raise ValueError(f"preprocessed images have different shapes {sorted(shapes)}; enable the centre crop or "
                     f"pass an exact (height, width) size")
  return np.stack(out)


def processor_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
  """Preprocessing keyword arguments for :func:`preprocess` from an HF checkpoint directory.

  Reads ``preprocessor_config.json`` when present (``size`` as int or ``{"shortest_edge"}`` /
  ``{"height", "width"}``, ``crop_size``, ``image_mean``, ``image_std``, ``do_center_crop``, ``resample``,
  ``rescale_factor``). Without it, falls back to the OpenAI CLIP defaults with ``size`` taken from
  ``config.json``'s vision ``image_size`` (224 if that is absent too).

  Returns:
    dict with keys size, crop_size, mean, std, do_center_crop, resample, rescale_factor.
  """
  d = Path(ckpt_dir)
  if not d.is_dir():
    raise FileNotFoundError(f"checkpoint directory {d} does not exist")
  cfg_path = d / "preprocessor_config.json"
  if not cfg_path.is_file():
    size = 224
    model_cfg = d / "config.json"
    if model_cfg.is_file():
      c = json.loads(model_cfg.read_text())
      size = int((c.get("vision_config") or c).get("image_size", 224))
    return dict(size=size, crop_size=size, mean=CLIP_MEAN, std=CLIP_STD, do_center_crop=True,
                resample="bicubic", rescale_factor=1 / 255)
  try:
    c = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path}: invalid JSON: {e}") from e

  def parse_size(v, key):
    if v is None or isinstance(v, int):
      return v
    if isinstance(v, dict):
      if "shortest_edge" in v:
        return int(v["shortest_edge"])
      if "height" in v and "width" in v:
        return (int(v["height"]), int(v["width"]))
    raise ValueError(f"{cfg_path}: unsupported {key} {v!r} (expected an int, {{'shortest_edge': n}} or "
                     f"{{'height': h, 'width': w}})")

  size = parse_size(c.get("size", 224), "size")
  crop = parse_size(c.get("crop_size"), "crop_size")
  resample = c.get("resample", int(Image.Resampling.BICUBIC))
  return dict(size=size, crop_size=crop if crop is not None else size,
              mean=tuple(c.get("image_mean", CLIP_MEAN)), std=tuple(c.get("image_std", CLIP_STD)),
              do_center_crop=bool(c.get("do_center_crop", True)),
              resample=Image.Resampling(resample) if isinstance(resample, int) else resample,
              rescale_factor=float(c.get("rescale_factor", 1 / 255)))


__all__ = ["CLIP_MEAN", "CLIP_STD", "load_image", "to_rgb_array", "pad_to_square", "resize_output_size",
           "center_crop", "normalize", "preprocess_one", "preprocess", "processor_config"]
