"""One loader and one exporter for every model family, driven by a small :class:`Family` record.

A family module (``clip``, ``llama``, ``llava``) holds its HF key table and its specifics (LLaVA's key
normalisation and tied head, Llama's stacked layers) and describes itself with a ``Family``. The model and config
classes are never imported here: the caller passes them (``CLIP.from_pretrained`` passes ``cls`` and
``CLIPConfig``), so this package sits below ``vlsafe_jax.models`` and models import it, never the other way round.

Loading accepts an HF directory (``model.safetensors``, sharded safetensors + index, or ``pytorch_model.bin`` with
torch) or a converted directory (the library's own format, read by ``vlsafe_jax.model_io``). Exporting writes HF
safetensors (sharded above ``max_shard_bytes`` when the family asks for it) plus ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert.mapping import KeyMap, export_tensors, load_state
from checkpoints_convert.safetensors_io import open_hf_weights
from vlsafe_jax import model_io


def _from_hf(config_cls: type, d: dict):
  return config_cls.from_hf(d)


def _load_by_keymap(family: "Family", source, abstract_state: nnx.State, config, **kw) -> nnx.State:
  del config
  return load_state(family.keymap, source, abstract_state, **kw)


def _export_by_keymap(family: "Family", state: nnx.State, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  return export_tensors(family.keymap, state, dtype)


@dataclasses.dataclass(frozen=True)
class Family:
  """What the generic loader and exporter need to know about one model family.

  Attributes:
    name: ``"clip"`` / ``"llama"`` / ``"llava"``; the converted directory's format is ``vlsafe_jax.<name>``.
    what: the architecture's name in error messages (``"CLIP"``).
    keymap: the HF <-> nnx key table.
    side_files: tokenizer / processor / config files carried along by save and export so the output directory is
      self-contained.
    writes_config: True: save and export write ``model.config.to_hf_dict()`` as config.json; False (Llama): the
      converted directory copies config.json from the source (it is one of the ``side_files``) and export
      writes only a config it is given.
    config_from_hf: ``(config class, config.json dict) -> config``.
    prepare_config: optional ``(config, HF tensor source, source name) -> config``, applied before the abstract
      model is built (LLaVA: whether the model has an lm_head depends on the file's tensors).
    load_hf_state: ``(family, source, abstract state, config, *, source_name, param_dtype, shardings,
      progress) -> State``; default: the key table through ``mapping.load_state``.
    export_hf_tensors: ``(family, state, dtype, **options) -> iterator of (HF key, array)``; default: the key
      table through ``mapping.export_tensors``.
  """
  name: str
  what: str
  keymap: KeyMap
  side_files: tuple[str, ...] = ()
  writes_config: bool = True
  config_from_hf: Callable[[type, dict], Any] = _from_hf
  prepare_config: Callable[[Any, Any, str], Any] | None = None
  load_hf_state: Callable[..., nnx.State] = _load_by_keymap
  export_hf_tensors: Callable[..., Iterator[tuple[str, np.ndarray]]] = _export_by_keymap

  def is_converted(self, directory: str | os.PathLike) -> bool:
    """True for a converted directory of this family (written by :meth:`save_converted`)."""
    return model_io.is_converted(directory, self.name)

  def read_config(self, directory: str | os.PathLike, config_cls: type):
    """``config_cls`` instance from ``directory/config.json``; a missing or bad file raises CheckpointFormatError."""
    return model_io.read_config(directory, lambda d: self.config_from_hf(config_cls, d), self.what)

  def load(self, path: str | os.PathLike, model_cls: type, config_cls: type, *, dtype: Any = jnp.float32,
           param_dtype: Any = None, mesh=None, config=None, progress: Callable[[str], None] | None = None):
    """Builds ``model_cls`` from an HF directory or a converted directory of this family.

    Args:
      model_cls, config_cls: the model class (``model_cls(config, dtype=, param_dtype=, rngs=)``) and its config
        class (``config_cls.from_hf(dict)``).
      dtype: compute dtype. param_dtype: cast floating parameters (None keeps the file's dtype; bf16 stays bf16).
      mesh: place each tensor with the logical sharding table as soon as it is read.
      config: overrides config.json.
    Raises:
      CheckpointFormatError (missing/corrupt files) or ConversionError (one message listing every bad tensor).
    """
    d = Path(path)
    config = config or self.read_config(d, config_cls)
    if self.is_converted(d):
      return model_io.load_converted(d, model_cls, config, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                     progress=progress)
    source = open_hf_weights(d)
    if self.prepare_config is not None:
      config = self.prepare_config(config, source, str(d))
    graphdef, abs_state = model_io.abstract_model(
        model_cls, config, dtype=dtype, param_dtype=param_dtype if param_dtype is not None else jnp.float32)
    state = self.load_hf_state(self, source, abs_state, config, source_name=str(d), param_dtype=param_dtype,
                               shardings=model_io.placement(abs_state, mesh), progress=progress)
    return nnx.merge(graphdef, state)

  def save_converted(self, model: nnx.Module, dst: str | os.PathLike, *,
                     src: str | os.PathLike | None = None) -> Path:
    """Writes ``model`` as a converted directory (``model_io.save_converted``) with this family's config and side
    files."""
    return model_io.save_converted(model, dst, self.name,
                                   hf_config=model.config.to_hf_dict() if self.writes_config else None,
                                   src=src, side_files=self.side_files)

  def export_hf(self, model: nnx.Module, dst: str | os.PathLike, *, dtype: Any = None,
                src: str | os.PathLike | None = None, hf_config: dict | None = None,
                max_shard_bytes: int | None = None, **options) -> Path:
    """Writes an HF directory: safetensors in HF layout (one file, or shards + index above ``max_shard_bytes``)
    and config.json (the model's own when the family writes configs, else ``hf_config`` if given). With a single
    floating dtype among the written tensors, config.json records it as ``dtype``. ``dtype`` casts floating
    tensors (None: as stored; float32 round trips bit-exact). ``options`` go to the family's tensor exporter."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    dtypes: set[str] = set()

    def tensors():
      for key, arr in self.export_hf_tensors(self, nnx.state(model, nnx.Param), dtype, **options):
        if model_io.is_float(arr.dtype):
          dtypes.add(arr.dtype.name)
        yield key, arr

    write_hf_weights(dst, tensors(), max_shard_bytes)
    cfg = model.config.to_hf_dict() if self.writes_config else hf_config
    if cfg is not None:
      if self.writes_config and len(dtypes) == 1:
        cfg["dtype"] = dtypes.pop()
      (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    if src is not None:
      model_io.copy_files(src, dst, self.side_files)
    return dst


def write_hf_weights(dst: Path, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int | None) -> None:
  """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` when the
  tensors exceed ``max_shard_bytes`` (None: always one file); at most one shard of arrays is held in host RAM."""
  # transformers refuses safetensors files without a "format" metadata entry it knows.
  meta = {"format": "pt"}
  if max_shard_bytes is None:
    model_io.save_safetensors(dst / "model.safetensors", tensors, metadata=meta)
    return
  shards: list[list[str]] = []      # the keys of every shard written so far, under a temporary name
  cur, size = [], 0

  def flush():
    shards.append([k for k, _ in cur])
    model_io.save_safetensors(dst / f"_shard{len(shards)}.tmp.safetensors", cur, metadata=meta)

  for key, arr in tensors:
    if cur and size + arr.nbytes > max_shard_bytes:
      flush()
      cur, size = [], 0
    cur.append((key, arr))
    size += arr.nbytes
  if not shards:
    model_io.save_safetensors(dst / "model.safetensors", cur, metadata=meta)
    return
  flush()
  n = len(shards)
  weight_map = {}
  for i, keys in enumerate(shards, start=1):
    name = f"model-{i:05d}-of-{n:05d}.safetensors"
    os.replace(dst / f"_shard{i}.tmp.safetensors", dst / name)
    weight_map.update({k: name for k in keys})
  (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                               indent=2))


__all__ = ["Family", "write_hf_weights"]
