"""TGA training rows as model inputs (tga.md §2-§3): a random-access source of fixed-length records for the grain
loader, LLaVA image loading, and the LLaVA JSON row reader.

A row is a LLaVA-format dict: ``{"id", "image"?, "image_caption"?, "retrieved_caption"?, "conversations":
[{"from": "human" | "gpt", "value"}, ...]}``. :class:`TGASource` turns row ``i`` into the arrays of
:func:`vlsafe_jax.data.tga_prompt.collate` (token ids, labels, span masks; fixed lengths) plus ``pixels``
(h, w, 3) float32 normalised (zeros for text-only rows, so shapes stay static).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlsafe_jax.data import images as images_lib
from vlsafe_jax.data import prompt_sets
from vlsafe_jax.data import tga_prompt


class TGASource:
  """Random-access source of fixed-length training records (tga_prompt.collate of one row + pixels).

  ``rows``: LLaVA-format dicts; ``image_fn(row) -> (h, w, 3) float32`` normalised pixels (called only for rows
  with an image; text-only rows get zeros).
  """

  def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer, model_cfg, *, stage: str, max_length: int,
               ref_max_length: int, image_fn, template: str = "llava_llama_2", system: str | None = None,
               use_retrieved: bool = True, halve_identical: bool = True, exclude_ids_containing: str | None = "tox"):
    self.rows = list(rows)
    self.tok, self.cfg, self.stage = tokenizer, model_cfg, stage
    self.max_length, self.ref_max_length = max_length, ref_max_length
    self.image_fn, self.template, self.system = image_fn, template, system
    self.use_retrieved, self.halve, self.exclude = use_retrieved, halve_identical, exclude_ids_containing
    pad = tokenizer.pad_token_id
    self.pad = int(pad if pad is not None else 0)

  def __len__(self):
    return len(self.rows)

  def example(self, i: int) -> tga_prompt.TrainExample:
    row = dict(self.rows[i])
    if not self.use_retrieved:
      row["retrieved_caption"] = ""              # "plain" baseline: standard LLaVA prompts
    return tga_prompt.from_llava_row(self.tok, row, stage=self.stage, num_image_tokens=self.cfg.num_image_tokens,
                                     image_token_index=self.cfg.image_token_index, template=self.template,
                                     system=self.system, halve_identical=self.halve,
                                     exclude_ids_containing=self.exclude)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    ex = self.example(int(i))
    out = {k: v[0] for k, v in tga_prompt.collate([ex], self.pad, max_length=self.max_length,
                                                  ref_max_length=self.ref_max_length).items()}
    size = self.cfg.vision_config.image_size
    if ex.has_image:
      px = np.asarray(self.image_fn(self.rows[int(i)]), np.float32)
      if px.shape != (size, size, 3):
        raise ValueError(f"row {ex.id!r}: image_fn returned shape {px.shape}, expected ({size}, {size}, 3)")
    else:
      px = np.zeros((size, size, 3), np.float32)
    out["pixels"] = px
    return out


def file_image_fn(image_folder: str | Path, size: int, *, pad_square: bool):
  """LLaVA image loading: ``row["image"]`` under ``image_folder``; stage 2 pads to square with the mean colour
  (``image_aspect_ratio pad``), then CLIP resize / crop / normalise."""
  def fn(row):
    path = Path(image_folder) / row["image"]
    try:
      rgb = images_lib.to_rgb_array(images_lib.load_image(path), name=str(path))
    except (OSError, ValueError) as e:
      raise ValueError(f"TGA row {row.get('id')!r}: cannot read image {path}: {e}") from e
    if pad_square:
      rgb = images_lib.pad_to_square(rgb)
    return images_lib.preprocess_one(rgb, size)
  return fn


def read_rows(path: str | Path) -> list[dict]:
  """A LLaVA JSON list (or JSONL) of rows, at least one; errors name the file."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"TGA data file {path} does not exist")
  rows = prompt_sets.read_json_rows(path)
  if not rows:
    raise ValueError(f"{path}: no rows")
  return rows


__all__ = ["TGASource", "file_image_fn", "read_rows"]
