"""VLM safety prompt sets: :class:`SafetyItem` records and their readers / writer (``cmrm.md`` §7, ``tga.md`` §7).

A :class:`SafetyItem` holds ``id``, ``question``, ``image`` (path, in-memory uint8 (H, W, 3) array, or None for
text only), ``category`` and an optional ``caption``. Readers:

* :func:`read_jsonl`: the project manifest, one JSON object per line
  ``{"id", "question" | "prompt", "image": path | null, "category" | "scene", "caption"?}``; relative image
  paths resolve against ``image_root`` (default: the manifest's directory). TGA's ``{"id","image","prompt","scene"}``
  rows read the same (a missing prompt takes ``default_question``).
* :func:`read_vlsafe`: VLSafe-style files (a JSON list or JSONL) whose rows hold the question under ``query`` /
  ``question`` / ``instruction`` / ``prompt`` and the image under ``image`` / ``image_id`` / ``image_path`` /
  ``img``; category ``"vlsafe"`` unless the row has one.
* :func:`read_jailbreakllms`: JailbreakLLMs-style ``forbidden_question_set`` CSV (or JSONL) with ``question`` and
  ``content_policy_name`` (the 13 scenarios, used as the category), optional ``q_id`` and an ``image`` column
  (the "manipulated" COCO pairing); rows without an image are text-only.

:func:`read_prompt_set` dispatches by kind; :func:`write_jsonl` writes a project manifest. Generation and judging
live in :mod:`vlsafe_jax.eval.vlm_safety`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

@dataclasses.dataclass(frozen=True)
class SafetyItem:
  """One evaluation prompt. ``image``: a path (str), an in-memory uint8 (H, W, 3) array, or None (text only)."""
  id: str
  question: str
  image: Any = None
  category: str = "all"
  caption: str | None = None

  @property
  def has_image(self) -> bool:
    return self.image is not None


def _resolve(image, root: Path | None):
  """A manifest image entry -> absolute path string, in-memory array unchanged, or None (text only)."""
  if image is None or (isinstance(image, str) and not image.strip()):
    return None
  if not isinstance(image, (str, os.PathLike)):
    return image
  p = Path(image)
  return str(p if p.is_absolute() or root is None else root / p)


def read_json_rows(path: str | os.PathLike) -> list[dict]:
  """A JSON list or JSONL file -> list of dicts (errors name the file, and the line or item)."""
  path = Path(path)
  text = path.read_text(encoding="utf-8")
  stripped = text.lstrip()
  if stripped.startswith("["):
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON list ({e})") from e
  else:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: invalid JSON line ({e})") from e
  for i, r in enumerate(rows):
    if not isinstance(r, dict):
      raise ValueError(f"{path}: item {i} is a {type(r).__name__}, expected a JSON object")
  return rows


def _pick(row: Mapping, keys: Sequence[str]):
  for k in keys:
    if k in row and row[k] is not None:
      return row[k]
  return None


def read_jsonl(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
               default_question: str | None = None, use_images: bool = True) -> list[SafetyItem]:
  """The project manifest (see module docstring). ``use_images=False`` drops every image (text-only set)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompt manifest {path} does not exist")
  root = Path(image_root) if image_root else path.parent
  items = []
  for i, r in enumerate(read_json_rows(path)):
    q = _pick(r, ("question", "prompt"))
    if q is None:
      q = default_question
    if q is None or not str(q).strip():
      raise ValueError(f"{path}: item {i} (id {r.get('id', i)!r}) has no 'question' (or 'prompt')")
    img = _resolve(r.get("image"), root) if use_images else None
    items.append(SafetyItem(str(r.get("id", i)), str(q), img, str(_pick(r, ("category", "scene")) or "all"),
                            r.get("caption")))
  _check_ids(items, path)
  return items


def read_vlsafe(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                use_images: bool = True) -> list[SafetyItem]:
  """VLSafe-style rows (JSON list or JSONL): question under query/question/instruction/prompt, image under
  image/image_id/image_path/img (resolved against ``image_root``)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"VLSafe file {path} does not exist")
  root = Path(image_root) if image_root else path.parent
  items = []
  for i, r in enumerate(read_json_rows(path)):
    q = _pick(r, ("query", "question", "instruction", "prompt"))
    if q is None or not str(q).strip():
      raise ValueError(f"{path}: item {i} has none of the question keys query/question/instruction/prompt")
    img = _pick(r, ("image", "image_id", "image_path", "img"))
    items.append(SafetyItem(str(r.get("id", i)), str(q), _resolve(img, root) if use_images else None,
                            str(r.get("category", "vlsafe")), r.get("caption")))
  _check_ids(items, path)
  return items


def read_jailbreakllms(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                       use_images: bool = True) -> list[SafetyItem]:
  """JailbreakLLMs ``forbidden_question_set``-style CSV (or JSONL): ``question``, ``content_policy_name``
  (category), optional ``q_id`` / ``id`` and ``image``."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"JailbreakLLMs file {path} does not exist")
  root = Path(image_root) if image_root else path.parent
  if path.suffix.lower() == ".csv":
    with path.open(newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  else:
    rows = read_json_rows(path)
  items = []
  for i, r in enumerate(rows):
    q = _pick(r, ("question", "prompt"))
    if q is None or not str(q).strip():
      raise ValueError(f"{path}: row {i} has no 'question'")
    cat = _pick(r, ("content_policy_name", "category", "scenario")) or "all"
    img = _resolve(r.get("image") or None, root) if use_images else None
    items.append(SafetyItem(str(_pick(r, ("id", "q_id")) if _pick(r, ("id", "q_id")) is not None else i),
                            str(q), img, str(cat), r.get("caption") or None))
  _check_ids(items, path)
  return items


READERS = {"jsonl": read_jsonl, "vlsafe": read_vlsafe, "jailbreakllms": read_jailbreakllms}


def read_prompt_set(path: str | os.PathLike, kind: str = "jsonl", **kwargs) -> list[SafetyItem]:
  """Dispatch to :data:`READERS` by ``kind``."""
  if kind not in READERS:
    raise ValueError(f"prompt-set kind {kind!r} unknown; expected one of {sorted(READERS)}")
  return READERS[kind](path, **kwargs)


def _check_ids(items: Sequence[SafetyItem], path) -> None:
  seen: dict[str, int] = {}
  for i, it in enumerate(items):
    if it.id in seen:
      raise ValueError(f"{path}: duplicate id {it.id!r} (items {seen[it.id]} and {i})")
    seen[it.id] = i


def write_jsonl(items: Sequence[SafetyItem], path: str | os.PathLike) -> Path:
  """Writes items with path (or null) images as a project manifest (in-memory arrays are not serialisable)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for it in items:
      if it.image is not None and not isinstance(it.image, (str, os.PathLike)):
        raise ValueError(f"item {it.id!r}: in-memory image cannot be written to a manifest; save it first")
      row = {"id": it.id, "question": it.question, "image": None if it.image is None else str(it.image),
             "category": it.category}
      if it.caption is not None:
        row["caption"] = it.caption
      f.write(json.dumps(row) + "\n")
  return path


__all__ = ["SafetyItem", "read_jsonl", "read_vlsafe", "read_jailbreakllms", "read_prompt_set", "READERS",
           "read_json_rows", "write_jsonl"]
