"""Readers for safe/unsafe quadruplets on disk: ViSU as released, a plain user format, UWM calibration manifests.

All readers are grain-compatible random-access sources (``__len__`` / ``__getitem__``) that return *raw* records,
cheap to produce and to pickle; decoding and tokenisation live in ``data/transform.py`` (``QuadrupletTransform``)
so grain workers run them in parallel. Raw record (the same keys as ``synthetic.SyntheticQuadruplets``)::

  {"safe_image": path str | uint8 (H,W,3), "unsafe_image": ..., "safe_caption": str, "unsafe_caption": str,
   "tag": str, "tag_id": int (index into ``source.tag_names``), "index": int, "key": str (the item's name in its file)}

Formats (hysac.md §6, uwm.md §2):

* ViSU JSON: ``{"info": ..., "data": {"0": item, ...}}`` or the mapping itself; keys are stringified integers
  ``0..N-1`` (contiguous). Item fields ``coco_id`` (int; image ``<coco_root>/{train2017|val2017|test2017}/<12-digit
  id>.jpg``, first existing wins), ``nsfw_im_path`` (absolute, or relative to ``unsafe_root``), ``safe``, ``nsfw``,
  ``tag``.
* Plain: JSONL (one object per line) or CSV (header row) with ``safe_image, unsafe_image, safe_caption,
  unsafe_caption`` and optional ``tag``; relative image paths are resolved against ``image_root`` (default: the
  manifest's directory).
* Calibration pairs (UWM): JSONL ``{"safe": path|text, "unsafe": path|text, "tag": ...}``; rows are paths when
  they end in an image extension (or ``kind="image"``), texts otherwise; ``n_pairs`` rows after
  ``random.Random(seed).shuffle`` of the file order.

Bad input (design.md): malformed JSON (with the decoder's line/column), missing fields, empty captions, missing
images and non-contiguous keys raise ``DataError`` naming the file, item key and field. With ``on_error="skip"``
bad *items* are dropped instead and listed in ``source.skipped`` (``source.num_skipped`` counts them); file-level
problems (unreadable JSON, wrong top-level layout) always raise. Corrupt image files are detected at construction
only with ``verify_images=True`` (a full decode per image); otherwise decoding in the transform raises a
``DataError`` naming the item.
"""
from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlsafe_jax.data import images
from vlsafe_jax.data.transform import DataError, TextEncoder

COCO_SUBDIRS = ("train2017", "val2017", "test2017")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PLAIN_FIELDS = ("safe_image", "unsafe_image", "safe_caption", "unsafe_caption")


def _verify_image(path: str) -> str | None:
  """None if ``path`` decodes fully, else the reason."""
  try:
    images.load_image(path)
    return None
  except (FileNotFoundError, ValueError) as e:
    return f"corrupt or unreadable image {path}: {e}"


# --------------------------------------------------------------------------------------------------------------
# Shared reader machinery.
# --------------------------------------------------------------------------------------------------------------

class _Skip(Exception):
  """An item-level problem: raised as DataError, or recorded when on_error="skip"."""

  def __init__(self, field: str | None, reason: str):
    super().__init__(reason)
    self.field, self.reason = field, reason


class _ItemSource:
  """Base random-access source over validated items (dicts with str paths/captions and a ``key``)."""

  def __init__(self, file: Path, on_error: str):
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    self.file, self.on_error = Path(file), on_error
    self.items: list[dict[str, Any]] = []
    self.skipped: list[tuple[str, str | None, str]] = []  # (item key, field, reason)

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def _add(self, key: str, build: Callable[[], dict[str, Any]]) -> None:
    try:
      item = build()
    except _Skip as e:
      if self.on_error == "raise":
        raise DataError(e.reason, self.file, key, e.field) from None
      self.skipped.append((key, e.field, e.reason))
      return
    item["key"] = key
    self.items.append(item)

  def _finish(self, check_captions: TextEncoder | None, verify_images: bool) -> None:
    """Post-passes that need all items: caption lengths (one batched tokenizer call), full image decodes."""
    if check_captions is not None:
      fields = [f for f in ("safe_caption", "unsafe_caption") if self.items and f in self.items[0]]
      bad: dict[int, tuple[str, str]] = {}
      for f in fields:
        lengths = check_captions.lengths([it[f] for it in self.items])
        for i in np.flatnonzero(lengths > check_captions.max_length):
          bad.setdefault(int(i), (f, f"caption has {int(lengths[i])} tokens, more than max_length="
                                     f"{check_captions.max_length}"))
      self._drop(bad)
    if verify_images:
      bad = {}
      for i, it in enumerate(self.items):
        for f in ("safe_image", "unsafe_image"):
          if f in it and isinstance(it[f], str) and (reason := _verify_image(it[f])) is not None:
            bad.setdefault(i, (f, reason))
      self._drop(bad)
    if self.on_error == "skip" and self.skipped:
      print(f"[vlsafe_jax.data] {self.file}: skipped {self.num_skipped} bad item(s) (on_error='skip'); "
            f"first: item {self.skipped[0][0]!r} field {self.skipped[0][1]!r}: {self.skipped[0][2]}")
    if not self.items:
      raise DataError("no usable items", self.file)
    tags = sorted({it.get("tag", "") for it in self.items})
    self.tag_names = tuple(tags)
    index = {t: i for i, t in enumerate(tags)}
    for it in self.items:
      it["tag_id"] = index[it.get("tag", "")]

  def _drop(self, bad: dict[int, tuple[str, str]]) -> None:
    if not bad:
      return
    if self.on_error == "raise":
      i = min(bad)
      raise DataError(bad[i][1], self.file, self.items[i]["key"], bad[i][0])
    self.skipped.extend((self.items[i]["key"], f, r) for i, (f, r) in sorted(bad.items()))
    self.items = [it for i, it in enumerate(self.items) if i not in bad]

  def __len__(self) -> int:
    return len(self.items)

  def __repr__(self) -> str:
    # grain validates restored iterator state against repr(source): keep it stable and content-describing.
    return f"{type(self).__name__}(file={str(self.file)!r}, n={len(self.items)}, skipped={self.num_skipped})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    rec = dict(self.items[index])
    rec["index"], rec["file"] = index, str(self.file)
    return rec


def _caption(row: dict[str, Any], field: str) -> str:
  if field not in row or row[field] is None:
    raise _Skip(field, "missing caption")
  text = row[field]
  if not isinstance(text, str):
    raise _Skip(field, f"caption must be a string, got {type(text).__name__}")
  if not text.strip():
    raise _Skip(field, "empty caption")
  return text


def _image_path(row: dict[str, Any], field: str, root: Path) -> str:
  value = row.get(field)
  if not isinstance(value, str) or not value.strip():
    raise _Skip(field, "missing image path")
  path = Path(value) if os.path.isabs(value) else root / value
  if not path.is_file():
    raise _Skip(field, f"image not found: {path}")
  return str(path)


def _load_json(path: Path) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise DataError("file not found", path) from e
  except json.JSONDecodeError as e:
    raise DataError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", path) from e


# --------------------------------------------------------------------------------------------------------------
# ViSU as released.
# --------------------------------------------------------------------------------------------------------------

def coco_image_path(coco_root: str | os.PathLike, coco_id: int,
                    subdirs: Sequence[str] = COCO_SUBDIRS) -> tuple[Path | None, list[Path]]:
  """The COCO rule: ``<root>/{train2017|val2017|test2017}/<12-digit id>.jpg``, first existing wins.

  Returns ``(path or None, candidates tried)``.
  """
  tried = [Path(coco_root) / sub / f"{int(coco_id):012d}.jpg" for sub in subdirs]
  return next((p for p in tried if p.is_file()), None), tried


class ViSUQuadruplets(_ItemSource):
  """ViSU split file as released (hysac.md §6).

  Args:
    json_path: the split's JSON file (e.g. ``visu_test_dpo_corrected_nsfw_images.json``).
    coco_root: directory holding ``train2017/``, ``val2017/``, ``test2017/``.
    unsafe_root: root for relative ``nsfw_im_path`` values (default: the JSON file's directory).
    require_images: False reads captions only (text calibration, ViSU-Text): ``coco_id``/``nsfw_im_path`` are
      then not resolved, and records carry no image fields.
    on_error: "raise" or "skip" (bad items dropped, listed in ``skipped``).
    check_captions: a ``TextEncoder``; captions longer than its ``max_length`` are bad items.
    verify_images: fully decode every image at construction (finds corrupt files; slow on big sets).
  """

  def __init__(self, json_path: str | os.PathLike, coco_root: str | os.PathLike | None = None,
               unsafe_root: str | os.PathLike | None = None, *, require_images: bool = True,
               on_error: str = "raise", check_captions: TextEncoder | None = None, verify_images: bool = False):
    super().__init__(Path(json_path), on_error)
    if require_images and coco_root is None:
      raise ValueError("ViSUQuadruplets: coco_root is required when require_images=True")
    data = _load_json(self.file)
    if isinstance(data, dict) and "data" in data:
      data = data["data"]
    if not isinstance(data, dict):
      raise DataError(f"expected a JSON object mapping '0'..'N-1' to items (optionally under 'data'), got "
                      f"{type(data).__name__}", self.file)
    keys = list(data)
    bad_keys = [k for k in keys if not (isinstance(k, str) and k.isdigit() and str(int(k)) == k)]
    if bad_keys:
      raise DataError(f"keys must be stringified integers 0..N-1; bad key(s) {bad_keys[:5]}", self.file)
    ints = sorted(int(k) for k in keys)
    if ints != list(range(len(ints))):
      missing = sorted(set(range(len(ints))) - set(ints))[:5]
      raise DataError(f"keys must be contiguous 0..{len(ints) - 1}; missing {missing}, max key {ints[-1]}",
                      self.file)
    unsafe_root = Path(unsafe_root) if unsafe_root is not None else self.file.parent
    for i in ints:
      key = str(i)
      self._add(key, lambda row=data[key]: self._item(row, coco_root, unsafe_root, require_images))
    self._finish(check_captions, verify_images)

  @staticmethod
  def _item(row: Any, coco_root, unsafe_root: Path, require_images: bool) -> dict[str, Any]:
    if not isinstance(row, dict):
      raise _Skip(None, f"item must be a JSON object, got {type(row).__name__}")
    item = {"safe_caption": _caption(row, "safe"), "unsafe_caption": _caption(row, "nsfw"),
            "tag": str(row.get("tag") or "")}
    if require_images:
      if row.get("coco_id") is None:
        raise _Skip("coco_id", "missing coco_id (needed to find the safe COCO image)")
      try:
        coco_id = int(row["coco_id"])
      except (TypeError, ValueError):
        raise _Skip("coco_id", f"coco_id must be an integer, got {row['coco_id']!r}") from None
      path, tried = coco_image_path(coco_root, coco_id)
      if path is None:
        raise _Skip("coco_id", f"COCO image {coco_id} not found; tried {[str(p) for p in tried]}")
      item["safe_image"] = str(path)
      item["unsafe_image"] = _image_path(row, "nsfw_im_path", unsafe_root)
      item["coco_id"] = coco_id
    return item


# --------------------------------------------------------------------------------------------------------------
# Plain user format.
# --------------------------------------------------------------------------------------------------------------

def _read_rows(path: Path) -> list[tuple[str, Any]]:
  """(item key, row) pairs from JSONL ("line N") or CSV ("row N", the header is row 1)."""
  if not path.is_file():
    raise DataError("file not found", path)
  rows: list[tuple[str, Any]] = []
  if path.suffix.lower() == ".csv":
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if reader.fieldnames is None:
        raise DataError("empty CSV (expected a header row)", path)
      for n, row in enumerate(reader, start=2):
        rows.append((f"row {n}", row))
    return rows
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rows.append((f"line {n}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON at line {n} column {e.colno}: {e.msg}", path, f"line {n}") from e
  return rows


class PlainQuadruplets(_ItemSource):
  """The plain user format: JSONL or CSV with ``safe_image, unsafe_image, safe_caption, unsafe_caption[, tag]``.

  Args:
    path: ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` (header row).
    image_root: base for relative image paths (default: the manifest's directory).
    on_error, check_captions, verify_images: as ``ViSUQuadruplets``.
  """

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
               on_error: str = "raise", check_captions: TextEncoder | None = None, verify_images: bool = False):
    super().__init__(Path(path), on_error)
    root = Path(image_root) if image_root is not None else self.file.parent
    for key, row in _read_rows(self.file):
      self._add(key, lambda row=row: self._item(row, root))
    self._finish(check_captions, verify_images)

  @staticmethod
  def _item(row: Any, root: Path) -> dict[str, Any]:
    if not isinstance(row, dict):
      raise _Skip(None, f"row must be a JSON object, got {type(row).__name__}")
    return {"safe_image": _image_path(row, "safe_image", root),
            "unsafe_image": _image_path(row, "unsafe_image", root),
            "safe_caption": _caption(row, "safe_caption"), "unsafe_caption": _caption(row, "unsafe_caption"),
            "tag": str(row.get("tag") or "")}


# --------------------------------------------------------------------------------------------------------------
# UWM calibration pairs.
# --------------------------------------------------------------------------------------------------------------

class CalibrationPairs(_ItemSource):
  """UWM calibration manifest (uwm.md §2): JSONL rows ``{"safe": path|text, "unsafe": path|text, "tag": ...}``.

  Image rows become ``safe_image``/``unsafe_image`` records, text rows ``safe_caption``/``unsafe_caption``; one
  manifest must be all images or all texts.

  Args:
    path: the JSONL manifest.
    kind: "image", "text", or "auto" (image when the first row's ``safe`` value ends in an image extension).
    image_root: base for relative paths (default: the manifest's directory).
    n_pairs: keep this many rows after ``random.Random(seed).shuffle`` of the file order (None: all, unshuffled).
    seed: shuffle seed (UWM default 0).
    on_error, check_captions, verify_images: as ``ViSUQuadruplets``.
  """

  def __init__(self, path: str | os.PathLike, kind: str = "auto", image_root: str | os.PathLike | None = None, *,
               n_pairs: int | None = None, seed: int = 0, on_error: str = "raise",
               check_captions: TextEncoder | None = None, verify_images: bool = False):
    super().__init__(Path(path), on_error)
    rows = _read_rows(self.file)
    if not rows:
      raise DataError("empty calibration manifest", self.file)
    if kind == "auto":
      first = rows[0][1].get("safe") if isinstance(rows[0][1], dict) else None
      kind = "image" if isinstance(first, str) and first.lower().endswith(IMAGE_EXTENSIONS) else "text"
    if kind not in ("image", "text"):
      raise ValueError(f"kind must be 'image', 'text' or 'auto', got {kind!r}")
    self.kind = kind
    if n_pairs is not None:
      random.Random(seed).shuffle(rows)
      rows = rows[:n_pairs]
    root = Path(image_root) if image_root is not None else self.file.parent
    for key, row in rows:
      self._add(key, lambda row=row: self._item(row, kind, root))
    self._finish(check_captions, verify_images)

  @staticmethod
  def _item(row: Any, kind: str, root: Path) -> dict[str, Any]:
    if not isinstance(row, dict):
      raise _Skip(None, f"row must be a JSON object, got {type(row).__name__}")
    tag = str(row.get("tag") or "")
    if kind == "image":
      return {"safe_image": _image_path(row, "safe", root), "unsafe_image": _image_path(row, "unsafe", root),
              "tag": tag}
    return {"safe_caption": _caption(row, "safe"), "unsafe_caption": _caption(row, "unsafe"), "tag": tag}


__all__ = ["CalibrationPairs", "DataError", "PlainQuadruplets", "ViSUQuadruplets", "coco_image_path"]
