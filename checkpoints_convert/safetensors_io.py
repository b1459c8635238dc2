"""The tensor sources of HF model directories (platform.md §4.5-§4.6).

A *tensor source* is anything with ``shapes() -> {key: (shape, dtype_name)}`` and ``get(key) -> np.ndarray``;
tensors are read one at a time so a 7B checkpoint never sits in host RAM at once. Sources:

  * ``model.safetensors`` and sharded ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``:
    parsed directly (8-byte little-endian header length, JSON header, raw bytes memory-mapped), which keeps
    bf16/fp16 (as ``ml_dtypes.bfloat16`` / ``np.float16``) - ``safetensors.numpy`` fails on BF16;
  * ``pytorch_model.bin``: only through ``torch.load(weights_only=True)`` and only when torch is installed.

Every source's ``get`` refuses a floating tensor holding NaN/Inf (:func:`check_finite`), naming file and tensor.
The single-file container (:class:`SafetensorsFile`, :func:`save_safetensors`) is the library's own
(``vlsafe_jax.model_io``, which also writes converted directories); it is re-exported here for the HF readers.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from vlsafe_jax.model_io import (DTYPES, CheckpointFormatError, SafetensorsFile, check_finite, read_json_object,
                                 save_safetensors)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"


class ShardedSafetensors:
  """``model.safetensors.index.json`` + the shard files its ``weight_map`` names."""

  def __init__(self, index_path: str | os.PathLike):
    index_path = Path(index_path)
    try:
      weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise CheckpointFormatError(f"{index_path}: not a valid safetensors index (needs 'weight_map'): {e}") from e
    missing = sorted({f for f in weight_map.values() if not (index_path.parent / f).exists()})
    if missing:
      raise CheckpointFormatError(f"{index_path}: shard files listed in weight_map are missing: {missing}")
    self._files = {f: SafetensorsFile(index_path.parent / f) for f in sorted(set(weight_map.values()))}
    self._where = dict(weight_map)
    self._shapes = {f: sf.shapes() for f, sf in self._files.items()}
    for key, f in self._where.items():
      if key not in self._shapes[f]:
        raise CheckpointFormatError(f"{index_path}: weight_map says {key!r} is in {f}, but it is not there")

  def shapes(self):
    return {key: self._shapes[f][key] for key, f in self._where.items()}

  def get(self, key):
    return self._files[self._where[key]].get(key)


def _unpickler_reason(e: Exception) -> str:
  """The useful clause of a torch.load error (its weights_only message is a page of advice around one line)."""
  msg = str(e)
  m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", msg, re.S)
  line = (m.group(1) if m else (msg.splitlines() or [""])[0]).strip()
  return f"{type(e).__name__}: {line.split('. ')[0]}" if line else type(e).__name__


def torch_load(path: str | os.PathLike):
  """``torch.load(path, weights_only=True)`` on CPU (memory-mapped for zip-format files; legacy pre-1.6 pickles
  cannot be mapped). Raises :class:`CheckpointFormatError` naming the file for anything unreadable: not a torch
  file, truncated, or a pickle of arbitrary objects, which ``weights_only`` refuses to execute."""
  try:
    import torch  # lazy: heavy dependency torch
  except ImportError as e:
    raise CheckpointFormatError(
        f"{path}: reading a PyTorch pickle needs torch (pip install torch==2.13.0); convert the checkpoint to "
        f"safetensors elsewhere or install the [torch] extra") from e
  path = Path(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
  except Exception as e:  # noqa: BLE001 - pickle, zip and legacy-format errors come in many types
    raise CheckpointFormatError(
        f"{path}: cannot be read with torch.load(weights_only=True) ({_unpickler_reason(e)}); only tensors and "
        f"plain containers of them are read from PyTorch pickles, never arbitrary objects") from e


class TorchBin:
  """``pytorch_model.bin`` via ``torch.load(weights_only=True)`` (needs torch; never executes pickled code)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    sd = torch_load(self.path)       # raises the named error when torch is missing
    import torch  # lazy: heavy dependency torch
    if not isinstance(sd, Mapping):
      raise CheckpointFormatError(f"{path}: expected a state dict (tensor name -> tensor), got {type(sd).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
      raise CheckpointFormatError(f"{path}: not a state dict of tensors; {len(bad)} non-tensor entries: "
                                  f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    self._sd = sd

  def shapes(self):
    return {k: (tuple(v.shape), _torch_np_dtype(v.dtype).name) for k, v in self._sd.items()}

  def get(self, key):
    return check_finite(torch_to_numpy(self._sd[key]), self.path, key)


def _torch_np_dtype(dt) -> np.dtype:
  import torch  # lazy: heavy dependency torch
  if dt == torch.bfloat16:
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(torch.empty((), dtype=dt).numpy().dtype)


def torch_to_numpy(t) -> np.ndarray:
  """A CPU torch tensor as numpy, bf16 kept (reinterpreted through int16, which numpy understands)."""
  import torch  # lazy: heavy dependency torch
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.numpy().copy()


def open_hf_weights(directory: str | os.PathLike):
  """The tensor source of an HF model directory: index.json > model.safetensors > pytorch_model.bin."""
  d = Path(directory)
  if not d.is_dir():
    raise CheckpointFormatError(f"{d}: not a directory")
  if (d / INDEX_NAME).exists():
    return ShardedSafetensors(d / INDEX_NAME)
  if (d / SINGLE_NAME).exists():
    return SafetensorsFile(d / SINGLE_NAME)
  if (d / TORCH_NAME).exists():
    return TorchBin(d / TORCH_NAME)
  raise CheckpointFormatError(
      f"{d}: no weights found (expected {SINGLE_NAME}, {INDEX_NAME} + shards, or {TORCH_NAME}); "
      f"files present: {sorted(p.name for p in d.iterdir())}")


__all__ = ["DTYPES", "CheckpointFormatError", "check_finite", "SafetensorsFile", "ShardedSafetensors", "TorchBin",
           "torch_load", "open_hf_weights", "read_json_object", "save_safetensors", "torch_to_numpy"]
