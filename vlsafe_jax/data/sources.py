"""One place that turns a config's ``data`` block into sources: splits, calibration sets, the text encoder, batches.

* :func:`make_text_encoder` - the caption tokenizer for ``data.kind``: the synthetic word tokenizer, or the HF
  tokenizer of ``data.tokenizer`` (default: the model directory).
* :func:`split_source` / :func:`make_sources` - the train / val / test quadruplet splits of ``data.kind``
  ``synthetic`` (the embedded benchmark), ``visu`` (released ViSU JSON + COCO root) or ``plain`` (JSONL/CSV
  manifests), plus the model-input transform.
* :func:`calibration_sources` - UWM's per-tower calibration pairs (``uwm.md`` §2).
* :func:`batches` - unshuffled batches over (a prefix of) a source, last one short; :func:`pad_rows` pads such a
  short batch to the full size by repeating its last row (one compilation; the copies are dropped afterwards).

Sources are random-access (``__len__`` / ``__getitem__``) and return raw records (``data/transform.py``).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vlsafe_jax.data import pipeline, synthetic, tokenize, visu
from vlsafe_jax.data.transform import HFTextEncoder, QuadrupletTransform, TextEncoder

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------------------------

def make_text_encoder(data: ml_collections.ConfigDict, model_dir: str | Path | None = None) -> TextEncoder:
  """The caption tokenizer for ``data``: ``SyntheticTokenizer(data.max_length)`` for the synthetic benchmark, else
  the HF tokenizer in ``data.tokenizer`` (when set) or ``model_dir`` (the base CLIP directory), padded/truncated to
  ``data.max_length``."""
  if data.kind == "synthetic":
    return synthetic.SyntheticTokenizer(data.max_length)
  where = data.get("tokenizer") or model_dir
  if not where:
    raise ValueError(f"data.kind={data.kind!r} needs a tokenizer: set data.tokenizer or give the model directory")
  return HFTextEncoder(tokenize.load_tokenizer(where), data.max_length)


# --------------------------------------------------------------------------------------------------------------
# Quadruplet splits
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sources:
  """The splits of one data config. ``val`` / ``test`` may be None (not configured); ``tag_names`` lists the
  category names behind the records' ``tag_id`` when they are fixed (the synthetic benchmark), else None."""
  train: Any
  val: Any
  test: Any
  transform: QuadrupletTransform
  tag_names: list[str] | None

  def split(self, name: str):
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return getattr(self, name)


def _synthetic_split(data: ml_collections.ConfigDict, split: str, size: int | None) -> synthetic.SyntheticQuadruplets:
  """The synthetic benchmark's ``split`` with the generator options of ``data`` (seed, image size, unsafe variant,
  motif scale): evaluated splits and UWM's calibration pairs are drawn alike."""
  return synthetic.SyntheticQuadruplets(split, size, seed=data.seed, image_size=data.image_size,
                                        unsafe_variant=data.get("unsafe_variant", "patch"),
                                        motif_scale=data.get("motif_scale", None) or synthetic.DEFAULT_MOTIF_SCALE)


def split_source(data: ml_collections.ConfigDict, split: str, *, size: int | None = None,
                 require_images: bool = True):
  """One split of ``data.kind`` as a random-access source, or None when its file is not configured.

  ``size``: the synthetic split's size (default ``data.<split>_size``; 0/None = the benchmark default).
  ``require_images``: False reads a ViSU file's captions only (text calibration).
  """
  if data.kind == "synthetic":
    n = size if size is not None else data.get(f"{split}_size")
    return _synthetic_split(data, split, n or None)
  path = data.get(f"{split}_json")
  if not path:
    return None
  on_error = data.get("on_error", "raise")
  if data.kind == "visu":
    return visu.ViSUQuadruplets(path, data.get("coco_root") or None, data.get("unsafe_root") or None,
                                require_images=require_images, on_error=on_error)
  if data.kind == "plain":
    return visu.PlainQuadruplets(path, data.get("image_root") or None, on_error=on_error)
  raise ValueError(f"data.kind must be 'synthetic', 'visu' or 'plain', got {data.kind!r}")


def make_sources(data: ml_collections.ConfigDict, text_encoder: TextEncoder | None = None) -> Sources:
  """The train / val / test splits of ``data`` and their transform (``text_encoder``: default
  :func:`make_text_encoder` for the synthetic benchmark; required otherwise)."""
  if data.kind not in ("synthetic", "visu", "plain"):
    raise ValueError(f"data.kind must be 'synthetic', 'visu' or 'plain', got {data.kind!r}")
  if data.kind == "synthetic":
    text_encoder = text_encoder or make_text_encoder(data)
  elif text_encoder is None:
    raise ValueError(f"data.kind={data.kind!r} needs a text encoder (the base CLIP directory's tokenizer)")
  elif not data.train_json:
    raise ValueError(f"data.train_json is required for data.kind={data.kind!r} (path of the training split file)")
  return Sources(*(split_source(data, s) for s in SPLITS),
                 transform=QuadrupletTransform(text_encoder, image_size=data.image_size),
                 tag_names=list(synthetic.CATEGORIES) if data.kind == "synthetic" else None)


# --------------------------------------------------------------------------------------------------------------
# UWM calibration pairs
# --------------------------------------------------------------------------------------------------------------

class Subset:
  """A random-access view of ``source`` at ``indices`` (in that order)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[self.indices[int(i)]]


def calibration_sources(data: ml_collections.ConfigDict, calib: ml_collections.ConfigDict,
                        towers: Sequence[str] = ("text", "vision")) -> dict[str, Any]:
  """``{tower: random-access source}`` of UWM calibration records (``uwm.md`` §2), for the requested towers.

  Synthetic: the first ``calib.n_pairs`` items of the train split, for both towers. Otherwise per tower a
  calibration manifest (``calib.text_manifest`` / ``calib.vision_manifest``, ``visu.CalibrationPairs``), else the
  ViSU train split (captions only for the text tower) shuffled with ``random.Random(calib.seed)``, first
  ``calib.n_pairs``.
  """
  if data.kind == "synthetic":
    src = _synthetic_split(data, "train", calib.n_pairs)
    return {t: src for t in ("text", "vision") if t in towers}
  out = {}
  for tower, manifest, kind in (("text", calib.text_manifest, "text"), ("vision", calib.vision_manifest, "image")):
    if manifest:
      out[tower] = visu.CalibrationPairs(manifest, kind, calib.image_root or None, n_pairs=calib.n_pairs,
                                         seed=calib.seed)
    elif data.train_json:
      src = split_source(data, "train", require_images=(tower == "vision"))
      idx = list(range(len(src)))
      random.Random(calib.seed).shuffle(idx)   # uwm.md §2: Python random, seed 0, then the first n_pairs
      out[tower] = Subset(src, idx[:calib.n_pairs])
  if not out:
    raise ValueError("UWM calibration data: give calib.text_manifest / calib.vision_manifest (JSONL "
                     "{'safe','unsafe','tag'}) or data.train_json (ViSU train split)")
  return {t: s for t, s in out.items() if t in towers}


# --------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------

def batches(source, transform, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Unshuffled batches of ``transform`` records over (the first ``limit`` items of) ``source``, one epoch, one
  process; the last batch may be short."""
  n = len(source) if limit is None else min(int(limit), len(source))
  if n < len(source):
    source = Subset(source, range(n))
  yield from pipeline.make_loader(source, min(batch_size, n), seed=0, shuffle=False, num_epochs=1,
                                  drop_remainder=False, transform=transform, shard_index=0, shard_count=1)


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """``x`` (n, ...) with its last row repeated up to ``rows`` (n <= rows; unchanged when n == rows).

  Used to give a short last batch the full batch shape, so a jitted function compiles once; the copies are finite
  real inputs, and callers drop (or mask) the outputs past row n.
  """
  n = x.shape[0]
  if n > rows:
    raise ValueError(f"pad_rows: {n} rows, more than the target {rows}")
  if n == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - n, 0)], 0)


def pad_batch(batch: Mapping[str, np.ndarray], rows: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """:func:`pad_rows` on every array of ``batch`` (or only ``keys``; the others are left out)."""
  return {k: pad_rows(np.asarray(v), rows) for k, v in batch.items() if keys is None or k in keys}


__all__ = ["SPLITS", "Sources", "Subset", "make_text_encoder", "split_source", "make_sources",
           "calibration_sources", "batches", "pad_rows", "pad_batch"]
