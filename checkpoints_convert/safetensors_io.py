"""Torch-free tensor sources and a safetensors writer (platform.md §4.5-§4.6).

A *tensor source* is anything with ``shapes() -> {key: (shape, dtype_name)}`` and ``get(key) -> np.ndarray``;
tensors are read one at a time so a 7B checkpoint never sits in host RAM at once. Sources:

  * ``model.safetensors`` and sharded ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``:
    parsed directly (8-byte little-endian header length, JSON header, raw bytes memory-mapped), which keeps
    bf16/fp16 (as ``ml_dtypes.bfloat16`` / ``np.float16``) - ``safetensors.numpy`` fails on BF16;
  * ``pytorch_model.bin``: only through ``torch.load(weights_only=True)`` and only when torch is installed.

Every source's ``get`` refuses a floating tensor holding NaN/Inf (:func:`check_finite`), naming file and tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype tag <-> numpy dtype.
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_TAGS = {v: k for k, v in DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"


def _contig(x) -> np.ndarray:
  # np.ascontiguousarray turns 0-d arrays into shape (1,); logit_scale must stay 0-d.
  x = np.asarray(x)
  return x if x.flags.c_contiguous else x.copy(order="C")


class CheckpointFormatError(ValueError):
  """A checkpoint file is missing, truncated or malformed; the message names the file."""


def check_finite(arr: np.ndarray, file: str | os.PathLike, key: str) -> np.ndarray:
  """``arr`` unchanged, or a :class:`CheckpointFormatError` naming ``file`` and tensor ``key`` if a floating tensor
  holds NaN/Inf: a diverged or corrupted checkpoint would otherwise load silently and only surface as NaN
  outputs far from their cause."""
  if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
    return arr
  finite = np.isfinite(arr)
  if finite.all():
    return arr
  n_nan = int(np.isnan(arr).sum())
  first = tuple(int(i) for i in np.argwhere(~finite)[0])
  raise CheckpointFormatError(
      f"{file}: tensor {key!r} (shape {tuple(arr.shape)}, {arr.dtype.name}) holds {n_nan} NaN and "
      f"{int((~finite).sum()) - n_nan} Inf values (first at index {first}); the checkpoint is corrupt or was saved "
      f"from a diverged run")


# Marker file of every converted (Flax-layout) directory: {"format": "vlsafe_jax.<family>", ...}.
MARKER = "vlsafe_jax.json"


def parse_config(directory: str | os.PathLike, parse, what: str):
  """``parse(dict)`` of ``directory/config.json``; missing or malformed files raise a named error.

  Args:
    directory: checkpoint directory.
    parse: e.g. ``CLIPConfig.from_hf``; what it raises for a bad field is reported with the file name.
    what: the architecture being built, for the message ("CLIP", "LLaVA", ...).
  """
  cfg_path = Path(directory) / "config.json"
  if not cfg_path.exists():
    raise CheckpointFormatError(f"{directory}: no config.json (needed to build the {what} architecture)")
  d = read_json_object(cfg_path)
  try:
    return parse(d)
  # Whatever a wrong-typed or impossible field makes the parser raise, the file is what the user must fix.
  except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
    raise CheckpointFormatError(f"{cfg_path}: cannot build the {what} architecture from it: {e}") from e


def read_json_object(path: str | os.PathLike) -> dict:
  """``path`` parsed as a JSON object; invalid JSON (with line and column) or another top-level type raises
  :class:`CheckpointFormatError` naming the file."""
  path = Path(path)
  try:
    d = json.loads(path.read_bytes())
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
  except (OSError, UnicodeDecodeError) as e:
    raise CheckpointFormatError(f"{path}: cannot be read ({e})") from e
  if not isinstance(d, dict):
    raise CheckpointFormatError(f"{path}: expected a JSON object (key -> value) at the top level, got "
                                f"{type(d).__name__}")
  return d


def has_format(directory: str | os.PathLike, fmt: str) -> bool:
  """True for a converted directory whose marker names format ``fmt``."""
  marker = Path(directory) / MARKER
  return marker.exists() and json.loads(marker.read_text()).get("format") == fmt


def converted_weights(directory: str | os.PathLike, default_name: str) -> "SafetensorsFile":
  """The Flax-layout weights file of a converted directory (named in its marker, else ``default_name``)."""
  d = Path(directory)
  name = json.loads((d / MARKER).read_text()).get("weights", default_name)
  if not (d / name).exists():
    raise CheckpointFormatError(f"{d}: converted directory lacks its weights file {name}")
  return SafetensorsFile(d / name)


class SafetensorsFile:
  """One memory-mapped ``.safetensors`` file: header parsed eagerly, tensors read lazily."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    try:
      with open(self.path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
          raise CheckpointFormatError(f"{self.path}: shorter than the 8-byte safetensors header length")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
          raise CheckpointFormatError(f"{self.path}: header length {n} exceeds file size {size}")
        header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointFormatError(f"{self.path}: cannot read safetensors header ({e})") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    self._entries = header
    self._size = size
    for key, e in header.items():
      if e.get("dtype") not in DTYPES:
        raise CheckpointFormatError(f"{self.path}: tensor {key!r} has unsupported dtype {e.get('dtype')!r}")
    self._mm = None

  def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(e["shape"]), DTYPES[e["dtype"]].name) for k, e in self._entries.items()}

  def get(self, key: str) -> np.ndarray:
    """The tensor as a numpy array (a copy, so the file can be closed); NaN/Inf raise naming file and key."""
    if key not in self._entries:
      raise KeyError(f"{self.path}: no tensor {key!r}")
    e = self._entries[key]
    begin, end = e["data_offsets"]
    if self._data_start + end > self._size:
      raise CheckpointFormatError(f"{self.path}: tensor {key!r} runs past the end of the file (truncated?)")
    if self._mm is None:
      with open(self.path, "rb") as f:
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self._size else b""
    dt = DTYPES[e["dtype"]]
    arr = np.frombuffer(self._mm, dtype=dt, count=(end - begin) // dt.itemsize, offset=self._data_start + begin)
    return check_finite(arr.reshape(e["shape"]).copy(), self.path, key)


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
    for key, f in self._where.items():
      if key not in self._files[f]._entries:
        raise CheckpointFormatError(f"{index_path}: weight_map says {key!r} is in {f}, but it is not there")

  def shapes(self):
    out = {}
    for key, f in self._where.items():
      out[key] = self._files[f].shapes()[key]
    return out

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
    import torch
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
    import torch
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
  import torch
  if dt == torch.bfloat16:
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(torch.empty((), dtype=dt).numpy().dtype)


def torch_to_numpy(t) -> np.ndarray:
  """A CPU torch tensor as numpy, bf16 kept (reinterpreted through int16, which numpy understands)."""
  import torch
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


def save_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors (numpy, any dtype in :data:`DTYPES`, bf16 included) to one ``.safetensors`` file.

  Two passes over ``tensors`` are avoided by collecting shapes first: the header needs every offset, so arrays
  are held until written (call once per shard for big models).
  """
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  header: dict[str, object] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for key, arr in items:
    arr = _contig(arr)
    if arr.dtype not in _TAGS:
      raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored in safetensors")
    header[key] = {"dtype": _TAGS[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)          # the format pads the header to 8-byte alignment with spaces
  tmp = Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for arr in arrays:
      f.write(arr.tobytes())
  os.replace(tmp, path)


__all__ = ["DTYPES", "CheckpointFormatError", "check_finite", "SafetensorsFile", "ShardedSafetensors", "TorchBin",
           "torch_load", "open_hf_weights", "parse_config", "read_json_object", "save_safetensors", "torch_to_numpy"]
