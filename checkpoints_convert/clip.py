"""HF CLIP <-> vlsafe_jax CLIP: key table, loading, converted-directory format and export.

Accepted HF inputs: full ``CLIPModel`` files and single-tower ``CLIPTextModelWithProjection`` /
``CLIPVisionModelWithProjection`` files, as ``model.safetensors``, sharded safetensors + index, or (with torch)
``pytorch_model.bin``. A *converted directory* holds:

  config.json              HF-style CLIP config (transformers can read it too)
  vlsafe_jax.json          marker: {"format": "vlsafe_jax.clip", "version": 1, "weights": ...}
  flax_model.safetensors   every nnx state tensor under its nnx path ("vision_model.encoder.layers.0.mlp.fc1.kernel"),
                           already in Flax layout (kernels (in, out), conv HWIO), dtype as converted
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert.mapping import (IDENTITY_KEYMAP, KeyMap, Rule, Transform, dtype_from_name, export_tensors,
                                         load_state, placement)
from checkpoints_convert.safetensors_io import (MARKER, converted_weights, has_format, open_hf_weights, parse_config,
                                                save_safetensors)

FORMAT = "vlsafe_jax.clip"
FLAX_WEIGHTS = "flax_model.safetensors"
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


def _read_config(directory: Path):
  from vlsafe_jax.models.clip import CLIPConfig
  return parse_config(directory, CLIPConfig.from_hf, "CLIP")


def is_converted(directory: str | os.PathLike) -> bool:
  return has_format(directory, FORMAT)


def abstract_clip(config, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """(graphdef, abstract state) of a CLIP without allocating parameters."""
  from vlsafe_jax.models.clip import CLIP
  model = nnx.eval_shape(lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def load_clip(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None, mesh=None,
              progress=None):
  """Builds a ``vlsafe_jax.models.clip.CLIP`` from an HF CLIP directory or a converted directory.

  Args:
    dtype: compute dtype of the model.
    param_dtype: cast floating parameters to it; None keeps the checkpoint's dtype (bf16/fp16 stay).
    mesh: if given, each tensor is placed with the logical sharding table as it is read.
  Raises:
    CheckpointFormatError for missing/corrupt files; ConversionError (one message) listing missing, unexpected
    and mis-shaped tensors.
  """
  d = Path(path)
  config = _read_config(d)
  graphdef, abs_state = abstract_clip(config, dtype=dtype,
                                      param_dtype=param_dtype if param_dtype is not None else jnp.float32)
  if is_converted(d):
    source, keymap = converted_weights(d, FLAX_WEIGHTS), IDENTITY_KEYMAP
  else:
    source, keymap = open_hf_weights(d), CLIP_KEYMAP
  shardings = placement(abs_state, mesh)
  state = load_state(keymap, source, abs_state, source_name=str(d), param_dtype=param_dtype,
                     shardings=shardings, progress=progress)
  return nnx.merge(graphdef, state)


def _copy_side_files(src: Path, dst: Path) -> list[str]:
  copied = []
  for name in SIDE_FILES:
    if (src / name).exists() and src.resolve() != dst.resolve():
      shutil.copy2(src / name, dst / name)
      copied.append(name)
  return copied


def save_converted(model, dst: str | os.PathLike, *, src: str | os.PathLike | None = None) -> Path:
  """Writes ``model`` as a converted directory (config.json, marker, flax_model.safetensors)."""
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  tensors = export_tensors(IDENTITY_KEYMAP, nnx.state(model, nnx.Param))
  save_safetensors(dst / FLAX_WEIGHTS, tensors, metadata={"format": FORMAT})
  (dst / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
  (dst / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1, "weights": FLAX_WEIGHTS,
                                        "layout": "nnx (kernel [in, out], conv HWIO)"}, indent=2))
  if src is not None:
    _copy_side_files(Path(src), dst)
  return dst


def export_hf(model, dst: str | os.PathLike, *, dtype: Any = None, src: str | os.PathLike | None = None) -> Path:
  """Writes an HF directory (config.json + model.safetensors) that ``transformers.CLIPModel`` (or the
  single-tower class) loads. ``dtype`` casts floating tensors (None: as stored; float32 round trips bit-exact).
  """
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  tensors = list(export_tensors(CLIP_KEYMAP, nnx.state(model, nnx.Param), dtype=dtype))
  # transformers refuses safetensors files without a "format" metadata entry it knows.
  save_safetensors(dst / "model.safetensors", tensors, metadata={"format": "pt"})
  cfg = model.config.to_hf_dict()
  dts = {a.dtype.name for _, a in tensors if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"}
  if len(dts) == 1:
    cfg["dtype"] = dts.pop()
  (dst / "config.json").write_text(json.dumps(cfg, indent=2))
  if src is not None:
    _copy_side_files(Path(src), dst)
  return dst


def convert_cli(src: str, dst: str, param_dtype: str | None = None) -> Path:
  """``python -m checkpoints_convert clip``: HF directory -> converted directory."""
  return save_converted(load_clip(src, param_dtype=dtype_from_name(param_dtype)), dst, src=src)


def export_cli(src: str, dst: str, dtype: str | None = None) -> Path:
  """``python -m checkpoints_convert export``: converted (or HF) directory -> HF directory."""
  return export_hf(load_clip(src), dst, dtype=dtype_from_name(dtype), src=src)


__all__ = ["CLIP_RULES", "CLIP_KEYMAP", "load_clip", "save_converted", "export_hf", "is_converted",
           "abstract_clip"]
