"""HF CLIP <-> vlsafe_jax CLIP: the key table and the :class:`~checkpoints_convert.family.Family` record.

Accepted HF inputs: full ``CLIPModel`` files and single-tower ``CLIPTextModelWithProjection`` /
``CLIPVisionModelWithProjection`` files, as ``model.safetensors``, sharded safetensors + index, or (with torch)
``pytorch_model.bin``. ``CLIP.from_pretrained`` loads them (or a converted directory, see ``vlsafe_jax.model_io``)
through :data:`CLIP_FAMILY`; :func:`export_hf` writes a directory ``transformers.CLIPModel`` (or the single-tower
class) loads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from checkpoints_convert.family import Family
from checkpoints_convert.mapping import KeyMap, Rule, Transform
from vlsafe_jax.model_io import FLAX_WEIGHTS

# Tokenizer / processor files carried along by convert and export so the output directory is self-contained.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "preprocessor_config.json", "processor_config.json")

_PLACEHOLDERS = {
    "tower": r"text_model|vision_model",
    "i": r"\d+",
    "lin": r"self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]",
    "ln": r"layer_norm[12]",
    "norm": r"text_model\.final_layer_norm|vision_model\.pre_layrnorm|vision_model\.post_layernorm",
    "emb": r"text_model\.embeddings\.(?:token|position)_embedding|vision_model\.embeddings\.position_embedding",
    "proj": r"text_projection|visual_projection",
}

# platform.md §4.2 key list -> nnx paths (models/clip.py mirrors HF module names).
CLIP_RULES = (
    Rule("{tower}.encoder.layers.{i}.{lin}.weight", "{tower}.encoder.layers.{i}.{lin}.kernel", Transform.LINEAR),
    Rule("{tower}.encoder.layers.{i}.{lin}.bias", "{tower}.encoder.layers.{i}.{lin}.bias"),
    Rule("{tower}.encoder.layers.{i}.{ln}.weight", "{tower}.encoder.layers.{i}.{ln}.scale"),
    Rule("{tower}.encoder.layers.{i}.{ln}.bias", "{tower}.encoder.layers.{i}.{ln}.bias"),
    Rule("{norm}.weight", "{norm}.scale"),
    Rule("{norm}.bias", "{norm}.bias"),
    Rule("{emb}.weight", "{emb}.embedding"),
    Rule("vision_model.embeddings.class_embedding", "vision_model.embeddings.class_embedding"),
    Rule("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.kernel",
         Transform.CONV2D),
    Rule("{proj}.weight", "{proj}.kernel", Transform.LINEAR),
    Rule("logit_scale", "logit_scale"),
)
# Non-persistent buffers that older pytorch_model.bin files still contain.
CLIP_IGNORE = (r"(^|\.)position_ids$",)

CLIP_KEYMAP = KeyMap(CLIP_RULES, _PLACEHOLDERS, CLIP_IGNORE)


CLIP_FAMILY = Family("clip", "CLIP", CLIP_KEYMAP, SIDE_FILES)


def is_converted(directory: str | os.PathLike) -> bool:
  """True for a directory written by :func:`save_converted` (``python -m checkpoints_convert clip``)."""
  return CLIP_FAMILY.is_converted(directory)


def save_converted(model, dst: str | os.PathLike, *, src: str | os.PathLike | None = None) -> Path:
  """Writes ``model`` as a converted directory (config.json, marker, flax_model.safetensors; ``src``'s tokenizer
  and processor files copied along)."""
  return CLIP_FAMILY.save_converted(model, dst, src=src)


def export_hf(model, dst: str | os.PathLike, *, dtype: Any = None, src: str | os.PathLike | None = None) -> Path:
  """Writes an HF directory (config.json + model.safetensors) that ``transformers.CLIPModel`` (or the
  single-tower class) loads. ``dtype`` casts floating tensors (None: as stored; float32 round trips bit-exact).
  """
  return CLIP_FAMILY.export_hf(model, dst, dtype=dtype, src=src)


__all__ = ["FLAX_WEIGHTS", "CLIP_RULES", "CLIP_KEYMAP", "CLIP_FAMILY", "SIDE_FILES", "save_converted", "export_hf", "is_converted"]
