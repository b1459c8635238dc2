"""The generic model-input transform for safe/unsafe records, and the text-encoder interface it tokenises with.

Raw record (what every reader returns: ``synthetic.SyntheticQuadruplets``, the readers in ``data/visu.py``)::

  {"safe_image": path str | uint8 (H,W,3), "unsafe_image": ..., "safe_caption": str, "unsafe_caption": str,
   "tag": str, "tag_id": int, "index": int, "key": str, "file": str}

(calibration pairs carry only the image or only the caption fields; zero-shot sources carry ``image`` and
``label``). Transformed record (:class:`QuadrupletTransform`; batching stacks these to NHWC / (B, L))::

  {"safe_image": float32 (S,S,3) CLIP-normalised, "unsafe_image": ..., "safe_ids": int32 (L,),
   "unsafe_ids": int32 (L,), "safe_mask": int32 (L,), "unsafe_mask": int32 (L,), "tag": int32, "index": int32}

Errors about one item raise :class:`DataError`, which names the file, the item key and the field.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from vlsafe_jax.data import images, tokenize


class DataError(ValueError):
  """Bad input data, with the file, item key and field it concerns."""

  def __init__(self, message: str, file: str | os.PathLike | None = None, key: str | None = None,
               field: str | None = None):
    where = ", ".join(p for p in (f"file {file}" if file else "", f"item {key!r}" if key is not None else "",
                                  f"field {field!r}" if field else "") if p)
    super().__init__(f"{where}: {message}" if where else message)
    self.file, self.key, self.field = (str(file) if file else None), key, field


class TextEncoder(Protocol):
  """What the transform needs from a tokenizer: fixed-length ids + mask, and untruncated lengths."""
  max_length: int

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...

  def lengths(self, texts: Sequence[str]) -> np.ndarray: ...


class HFTextEncoder:
  """Adapter for an HF CLIP tokenizer (``data.tokenize.load_tokenizer(dir)``) to the ``TextEncoder`` protocol.

  Uses ``vlsafe_jax.data.tokenize.tokenize`` (pad to ``max_length``, truncate keeping EOT last; hysac.md §5.4).
  """

  def __init__(self, tokenizer: Any, max_length: int = 77):
    self.tokenizer, self.max_length = tokenizer, int(max_length)

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    out = tokenize.tokenize(self.tokenizer, list(texts), max_length=self.max_length)
    ids, mask = (out["input_ids"], out["attention_mask"]) if isinstance(out, dict) else out
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def lengths(self, texts: Sequence[str]) -> np.ndarray:
    enc = self.tokenizer(list(texts), truncation=False, padding=False)
    return np.array([len(x) for x in enc["input_ids"]], np.int64)


def read_image(path: str | os.PathLike, *, file: Any = None, key: str | None = None,
               field: str | None = None) -> np.ndarray:
  """``images.to_rgb_array`` of an image file (uint8 (H, W, 3); transparency composited onto white, as HF does),
  with a :class:`DataError` naming the manifest, item and field when the file is missing or corrupt."""
  try:
    return images.to_rgb_array(path)
  except FileNotFoundError as e:
    raise DataError(f"image not found: {path}", file, key, field) from e
  except ValueError as e:
    raise DataError(f"corrupt or unreadable image {path}: {e}", file, key, field) from e


def normalize_uint8(image_hw3: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) in [0, 255] -> float32 (H, W, 3) with CLIP mean/std normalisation (no resize)."""
  x = image_hw3.astype(np.float32) / 255.0
  return (x - np.asarray(images.CLIP_MEAN, np.float32)) / np.asarray(images.CLIP_STD, np.float32)


class QuadrupletTransform:
  """Raw record -> model inputs: decode + CLIP-preprocess images, tokenise captions. Picklable for grain workers.

  Fields absent from the record are absent from the output (calibration pairs carry only images or only texts).

  Args:
    text_encoder: a ``TextEncoder`` (``synthetic.SyntheticTokenizer`` or ``HFTextEncoder``); None skips captions.
    image_size: output side S. uint8 arrays already S x S are only normalised (the synthetic benchmark); anything
      else goes through ``data.images.preprocess`` (bicubic shortest-side resize, center crop, CLIP mean/std).
    on_long_caption: "truncate" (CLIP's behaviour) or "error" (raise naming the item).
  """

  def __init__(self, text_encoder: TextEncoder | None, image_size: int = 224, on_long_caption: str = "truncate"):
    if on_long_caption not in ("truncate", "error"):
      raise ValueError(f"on_long_caption must be 'truncate' or 'error', got {on_long_caption!r}")
    self.text_encoder, self.image_size, self.on_long_caption = text_encoder, int(image_size), on_long_caption

  def _image(self, value: Any, rec: dict[str, Any], field: str) -> np.ndarray:
    if isinstance(value, (str, os.PathLike)):
      value = read_image(value, file=rec.get("file"), key=rec.get("key"), field=field)
    img = np.asarray(value)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
      raise DataError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}", rec.get("file"),
                      rec.get("key"), field)
    if img.shape[:2] == (self.image_size, self.image_size):
      return normalize_uint8(img)
    return np.asarray(images.preprocess([img], self.image_size), np.float32)[0]

  def __call__(self, rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ("safe_image", "unsafe_image", "image"):
      if field in rec:
        out[field] = self._image(rec[field], rec, field)
    fields = [f for f in ("safe_caption", "unsafe_caption", "caption") if f in rec]
    if fields and self.text_encoder is not None:
      texts = [rec[f] for f in fields]
      if self.on_long_caption == "error":
        lengths = self.text_encoder.lengths(texts)
        for f, n in zip(fields, lengths):
          if n > self.text_encoder.max_length:
            raise DataError(f"caption has {int(n)} tokens, more than max_length={self.text_encoder.max_length}",
                            rec.get("file"), rec.get("key"), f)
      ids, mask = self.text_encoder(texts)
      for f, i, m in zip(fields, ids, mask):
        stem = f.rsplit("_", 1)[0] if f != "caption" else "text"
        out[f"{stem}_ids"], out[f"{stem}_mask"] = i, m
    for field in ("tag_id", "label"):
      if field in rec:
        out["tag" if field == "tag_id" else "label"] = np.int32(rec[field])
    out["index"] = np.int32(rec["index"])
    return out


__all__ = ["DataError", "TextEncoder", "HFTextEncoder", "read_image", "normalize_uint8", "QuadrupletTransform"]
