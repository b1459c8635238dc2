"""The library's own file formats (utility layer: model and config classes come in as arguments).

HF files are read and written by ``checkpoints_convert``; everything vlsafe_jax writes for itself lives here:

  converted directory   ``config.json`` (HF-style, when the family writes one) + ``vlsafe_jax.json`` (marker:
                        ``{"format": "vlsafe_jax.<family>", "version": 1, "weights": ...}``) +
                        ``flax_model.safetensors`` (every ``nnx.Param`` under its dotted nnx path, Flax layout:
                        kernels (in, out), conv HWIO, decoder layers stacked; dtype as saved)
  LoRA file             one safetensors file, keys ``<site>.lora_a`` / ``.lora_b`` (Flax layout), each site's rank
                        and alpha in the header metadata (format ``vlsafe_jax.lora``)
  trainable state       ``<name>.safetensors`` (dotted nnx paths of the trainable variables) + ``<name>.json``
                        (metadata: options, base path, config); used by HySAC (``hysac_trainable.*``)
  bounds.json           HySAC root-distance statistics with the reference's keys S/U/V/G
  CMRM vectors          ``<path>.npz`` (key ``vectors``, (L, D) float32) + ``<path>.json`` (metadata + shape)

It also holds the bf16-safe safetensors container (:class:`SafetensorsFile`, :func:`save_safetensors`; the
``safetensors.numpy`` package cannot hold bf16) and the one error type for "these tensors do not fit this model"
(:class:`ConversionError`), which the HF converter raises too. Every loader checks everything first and reports all
missing, unexpected, mis-shaped and non-finite tensors in one error naming the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from vlsafe_jax import _compat, sharding

# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


class CheckpointFormatError(ValueError):
  """A checkpoint file is missing, truncated or malformed; the message names the file."""


class ConversionError(ValueError):
  """All problems found while matching a checkpoint to a model, in one message."""

  def __init__(self, source: str, missing=(), unexpected=(), misshaped=(), ambiguous=(), duplicate=()):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    self.ambiguous, self.duplicate = list(ambiguous), list(duplicate)
    lines = [f"checkpoint {source} does not match the model:"]
    if self.missing:
      lines.append(f"  missing ({len(self.missing)}; model tensors no checkpoint key provides):")
      lines += [f"    {p}  expected shape {s}" for p, s in self.missing]
    if self.unexpected:
      lines.append(f"  unexpected ({len(self.unexpected)}; checkpoint keys with no place in the model):")
      lines += [f"    {k}  shape {s}{'  (' + why + ')' if why else ''}" for k, s, why in self.unexpected]
    if self.misshaped:
      lines.append(f"  mis-shaped ({len(self.misshaped)}):")
      lines += [f"    {k} {hs} -> {p}: becomes {got}, model expects {want}"
                for k, hs, p, got, want in self.misshaped]
    if self.ambiguous:
      lines.append(f"  ambiguous ({len(self.ambiguous)}; key matches several rules):")
      lines += [f"    {k} -> {targets}" for k, targets in self.ambiguous]
    if self.duplicate:
      lines.append(f"  duplicate ({len(self.duplicate)}; several keys map to one model tensor):")
      lines += [f"    {p} <- {keys}" for p, keys in self.duplicate]
    super().__init__("\n".join(lines))


def is_float(dt) -> bool:
  # ml_dtypes.bfloat16 is not a numpy "floating" subtype, so test it by name as well.
  return np.issubdtype(dt, np.floating) or np.dtype(dt).name == "bfloat16"


def nonfinite_count(arr: np.ndarray) -> tuple[int, int]:
  """(number of NaN, number of Inf) in a floating array; (0, 0) for other dtypes."""
  if not is_float(arr.dtype):
    return 0, 0
  x = np.asarray(arr, np.float32) if arr.dtype.name == "bfloat16" else arr
  n_nan = int(np.isnan(x).sum())
  return n_nan, int((~np.isfinite(x)).sum()) - n_nan


def check_finite(arr: np.ndarray, file: str | os.PathLike, key: str) -> np.ndarray:
  """``arr`` unchanged, or a :class:`CheckpointFormatError` naming ``file`` and tensor ``key`` if a floating tensor
  holds NaN/Inf: a diverged or corrupted checkpoint would otherwise load silently and only surface as NaN
  outputs far from their cause."""
  if not is_float(arr.dtype):
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


# --------------------------------------------------------------------------------------------------------------
# safetensors container (torch-free, bf16-safe)
# --------------------------------------------------------------------------------------------------------------

# safetensors dtype tag <-> numpy dtype.
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_TAGS = {v: k for k, v in DTYPES.items()}


def contiguous(x) -> np.ndarray:
  # np.ascontiguousarray turns 0-d arrays into shape (1,); logit_scale must stay 0-d.
  x = np.asarray(x)
  return x if x.flags.c_contiguous else x.copy(order="C")


class SafetensorsFile:
  """One memory-mapped ``.safetensors`` file: header parsed eagerly, tensors read lazily. A tensor source
  (``shapes()``, ``get(key)``) for the loaders here and in ``checkpoints_convert``."""

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

  def get(self, key: str, *, finite: bool = True) -> np.ndarray:
    """The tensor as a numpy array (a copy, so the file can be closed). With ``finite`` (the default) NaN/Inf
    raise naming file and key; loaders that collect every problem into one message read with ``finite=False``."""
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
    arr = arr.reshape(e["shape"]).copy()
    return check_finite(arr, self.path, key) if finite else arr


def save_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors (numpy, any dtype in :data:`DTYPES`, bf16 included) to one ``.safetensors`` file, atomically
  (a ``.tmp`` file renamed into place).

  The header needs every offset before the first byte of data, so arrays are held until written (call once per
  shard for big models).
  """
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  header: dict[str, object] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for key, arr in items:
    arr = contiguous(arr)
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


# --------------------------------------------------------------------------------------------------------------
# Abstract models and filling their state
# --------------------------------------------------------------------------------------------------------------

def path_str(path) -> str:
  return ".".join(str(p) for p in path)


def flat_abstract(state: nnx.State) -> dict[str, tuple[tuple, Any]]:
  """{'a.b.0.kernel': (path tuple, Variable)} for an nnx State (abstract or concrete)."""
  return {path_str(p): (tuple(p), v) for p, v in nnx.to_flat_state(state)}


def abstract_model(model_cls: type, config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
  """(graphdef, abstract state) of ``model_cls(config, dtype=, param_dtype=, rngs=)`` without allocating
  parameters (``nnx.eval_shape``)."""
  model = _compat.eval_shape(lambda: model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def placement(abstract_state: nnx.State, mesh=None):
  """Shardings for :func:`fill_state` (each tensor placed by the logical table over ``mesh`` as soon as it is
  read), or None without a mesh (host arrays)."""
  return None if mesh is None else sharding.state_shardings(abstract_state, mesh)


def fill_state(abstract_state: nnx.State, tensors: Iterable[tuple[str, np.ndarray]], *, param_dtype: Any = None,
               shardings: nnx.State | None = None) -> nnx.State:
  """A concrete State with the structure of ``abstract_state``, its leaves taken from ``tensors``.

  Args:
    tensors: (dotted nnx path, array in Flax layout) for every path of ``abstract_state``, consumed one at a time
      (a generator keeps at most one tensor in host RAM). Names and shapes must already have been checked.
    param_dtype: cast every floating tensor to it; None keeps the stored dtype (bf16 stays bf16).
    shardings: optional State of ``jax.sharding.Sharding`` (:func:`placement`): each tensor is ``device_put``
      with its sharding as soon as it arrives.
  """
  flat = flat_abstract(abstract_state)
  flat_sh = flat_abstract(shardings) if shardings is not None else {}
  filled = {}
  for path, arr in tensors:
    if param_dtype is not None and is_float(arr.dtype):
      arr = arr.astype(param_dtype)
    if path in flat_sh:
      sh = flat_sh[path][1]
      sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
      value = jax.device_put(contiguous(arr), sh)
    else:
      value = jnp.asarray(contiguous(arr))
    ptuple, var = flat[path]
    filled[ptuple] = var.replace(value)
  return nnx.from_flat_state([(ptuple, filled[ptuple]) for ptuple, _ in flat.values()])


def load_named_state(source, abstract_state: nnx.State, *, source_name: str, param_dtype: Any = None,
                     shardings: nnx.State | None = None, progress: Callable[[str], None] | None = None
                     ) -> nnx.State:
  """Fills ``abstract_state`` from a tensor source whose keys are the dotted nnx paths themselves.

  Raises one :class:`ConversionError` listing every missing, unexpected and mis-shaped tensor before any is read.
  """
  targets = {p: tuple(v.get_value().shape) for p, (_, v) in flat_abstract(abstract_state).items()}
  shapes = source.shapes()
  unexpected = [(k, s, f"maps to {k}, which this model does not have") for k, (s, _) in shapes.items()
                if k not in targets]
  misshaped = [(k, tuple(s), k, tuple(s), targets[k]) for k, (s, _) in shapes.items()
               if k in targets and tuple(s) != targets[k]]
  missing = [(p, s) for p, s in targets.items() if p not in shapes]
  if missing or unexpected or misshaped:
    raise ConversionError(source_name, missing, unexpected, misshaped)

  def tensors():
    for key in shapes:
      yield key, source.get(key)
      if progress:
        progress(key)

  return fill_state(abstract_state, tensors(), param_dtype=param_dtype, shardings=shardings)


# --------------------------------------------------------------------------------------------------------------
# Converted directories
# --------------------------------------------------------------------------------------------------------------

MARKER = "vlsafe_jax.json"           # marker file of every converted directory
FLAX_WEIGHTS = "flax_model.safetensors"
# Layout notes recorded in the marker, per family.
LAYOUTS = {"clip": "nnx (kernel [in, out], conv HWIO)",
           "llava": "nnx (kernel [in, out], conv HWIO, stacked decoder layers)",
           "llama": None}


def format_name(family: str) -> str:
  """The marker's ``format`` for a model family: ``"vlsafe_jax.<family>"``."""
  return f"vlsafe_jax.{family}"


def is_converted(directory: str | os.PathLike, family: str) -> bool:
  """True for a converted directory of ``family`` (``"clip"``, ``"llava"``, ``"llama"``)."""
  marker = Path(directory) / MARKER
  return marker.exists() and json.loads(marker.read_text()).get("format") == format_name(family)


def read_config(directory: str | os.PathLike, parse: Callable[[dict], Any], what: str):
  """``parse(dict)`` of ``directory/config.json``; missing or malformed files raise a named error.

  Args:
    directory: checkpoint directory (HF or converted).
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


def converted_weights(directory: str | os.PathLike) -> SafetensorsFile:
  """The Flax-layout weights file of a converted directory (named in its marker, else ``flax_model.safetensors``)."""
  d = Path(directory)
  name = json.loads((d / MARKER).read_text()).get("weights", FLAX_WEIGHTS)
  if not (d / name).exists():
    raise CheckpointFormatError(f"{d}: converted directory lacks its weights file {name}")
  return SafetensorsFile(d / name)


def load_converted(directory: str | os.PathLike, model_cls: type, config: Any, *, dtype: Any = jnp.float32,
                   param_dtype: Any = None, mesh=None, progress: Callable[[str], None] | None = None):
  """``model_cls`` built from ``config`` with the weights of a converted directory.

  Args:
    dtype: compute dtype. param_dtype: cast floating parameters (None keeps the stored dtype).
    mesh: place every tensor with the logical sharding table as soon as it is read.
  Raises:
    CheckpointFormatError (missing/corrupt files) or ConversionError (one message listing every bad tensor).
  """
  d = Path(directory)
  graphdef, abs_state = abstract_model(model_cls, config, dtype=dtype,
                                       param_dtype=param_dtype if param_dtype is not None else jnp.float32)
  state = load_named_state(converted_weights(d), abs_state, source_name=str(d), param_dtype=param_dtype,
                           shardings=placement(abs_state, mesh), progress=progress)
  return nnx.merge(graphdef, state)


def named_tensors(state: nnx.State, dtype: Any = None) -> Iterable[tuple[str, np.ndarray]]:
  """(dotted nnx path, host numpy array) for every leaf of a concrete State, one at a time; ``dtype`` casts the
  floating ones."""
  for path, (_, var) in flat_abstract(state).items():
    arr = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None and is_float(arr.dtype):
      arr = arr.astype(dtype)
    yield path, contiguous(arr)


def copy_files(src: str | os.PathLike, dst: str | os.PathLike, names: Iterable[str]) -> list[str]:
  """Copies the files ``names`` that exist in ``src`` to ``dst`` (nothing when both are the same directory)."""
  src, dst = Path(src), Path(dst)
  if src.resolve() == dst.resolve():
    return []
  copied = []
  for name in names:
    if (src / name).exists():
      shutil.copy2(src / name, dst / name)
      copied.append(name)
  return copied


def save_converted(model: nnx.Module, dst: str | os.PathLike, family: str, *, hf_config: dict | None = None,
                   src: str | os.PathLike | None = None, side_files: Iterable[str] = ()) -> Path:
  """Writes ``model``'s ``nnx.Param`` state as a converted directory of ``family`` (see the module docstring).

  Args:
    hf_config: written as ``config.json`` (None writes none: the family copies it from ``src``).
    src: directory whose ``side_files`` (tokenizer, processor, config files) are copied along, so the output is
      self-contained.
  """
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  fmt = format_name(family)
  save_safetensors(dst / FLAX_WEIGHTS, named_tensors(nnx.state(model, nnx.Param)), metadata={"format": fmt})
  if hf_config is not None:
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
  if src is not None:
    copy_files(src, dst, side_files)
  marker = {"format": fmt, "version": 1, "weights": FLAX_WEIGHTS}
  if LAYOUTS.get(family):
    marker["layout"] = LAYOUTS[family]
  (dst / MARKER).write_text(json.dumps(marker, indent=2))
  return dst


# --------------------------------------------------------------------------------------------------------------
# Named-variable files (LoRA, trainable state)
# --------------------------------------------------------------------------------------------------------------

def save_variables(path: str | os.PathLike, variables: Mapping[str, nnx.Variable],
                   metadata: Mapping[str, str]) -> None:
  """Writes ``{name: variable value}`` to one safetensors file with string ``metadata`` in its header."""
  save_safetensors(path, {k: np.asarray(jax.device_get(v.get_value())) for k, v in variables.items()},
                   metadata=metadata)


def read_variables(path: str | os.PathLike, variables: Mapping[str, nnx.Variable], what: str,
                   extra_errors: Callable[[dict], list[str]] | None = None) -> dict[str, np.ndarray]:
  """Reads a :func:`save_variables` file and checks it against ``variables`` without assigning anything.

  Every missing, unexpected, mis-shaped or non-finite tensor (and what ``extra_errors(metadata)`` adds) goes into
  one ``ValueError`` naming the file: ``"<path>: <what> does not fit the model:"``. Returns ``{name: array}``.
  """
  f = SafetensorsFile(path)
  tensors = {k: f.get(k, finite=False) for k in f.shapes()}
  errors = [f"missing tensor {k}" for k in variables if k not in tensors]
  errors += [f"unexpected tensor {k} {tuple(tensors[k].shape)}" for k in tensors if k not in variables]
  errors += [f"{k}: file shape {tuple(tensors[k].shape)} != model shape {tuple(v.get_value().shape)}"
             for k, v in variables.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.get_value().shape)]
  # A diverged run's NaN/Inf would otherwise load silently and only show up as NaN outputs.
  errors += [f"{k}: {sum(nonfinite_count(t))} NaN/Inf values" for k, t in tensors.items() if sum(nonfinite_count(t))]
  if extra_errors is not None:
    errors += extra_errors(f.metadata)
  if errors:
    raise ValueError(f"{path}: {what} does not fit the model:\n  " + "\n  ".join(errors))
  return tensors


def assign(variables: Mapping[str, nnx.Variable], tensors: Mapping[str, np.ndarray]) -> None:
  """Sets every variable to its tensor, in the variable's own dtype."""
  for k, var in variables.items():
    var.set_value(jnp.asarray(tensors[k], var.get_value().dtype))


LORA_FORMAT = "vlsafe_jax.lora"


def _lora_variables(sites: Mapping[str, Any]) -> dict[str, nnx.Variable]:
  out = {}
  for name, site in sites.items():
    out[f"{name}.lora_a"] = site.lora_a
    out[f"{name}.lora_b"] = site.lora_b
  return out


def save_lora(sites: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes the LoRA parameters of ``sites`` (``{dotted site name: LoRA module}`` with ``lora_a``, ``lora_b``,
  ``lora_rank``, ``lora_alpha``; ``models.lora.lora_sites``) to one safetensors file."""
  if not sites:
    raise ValueError("model has no LoRA sites to save")
  meta = {"format": LORA_FORMAT,
          "sites": json.dumps({n: {"rank": s.lora_rank, "alpha": s.lora_alpha} for n, s in sites.items()})}
  save_variables(path, _lora_variables(sites), meta)


def load_lora(sites: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Loads a :func:`save_lora` file into ``sites`` (the same names, ranks and alphas), in place.

  Every missing / unexpected / mis-shaped / non-finite tensor and every rank/alpha mismatch is reported in one
  ``ValueError`` naming the file; a missing file raises ``FileNotFoundError``.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LoRA file {os.fspath(path)} does not exist")
  fmt = SafetensorsFile(path).metadata.get("format")
  if fmt != LORA_FORMAT:
    raise ValueError(f"{os.fspath(path)}: not a vlsafe_jax LoRA file (metadata format={fmt!r})")

  def site_errors(meta: dict) -> list[str]:
    saved = json.loads(meta.get("sites", "{}"))
    out = []
    for name, site in sites.items():
      cfg = saved.get(name)
      if cfg and (cfg["rank"] != site.lora_rank or not np.isclose(cfg["alpha"], site.lora_alpha)):
        out.append(f"{name}: file rank/alpha {cfg['rank']}/{cfg['alpha']} != model {site.lora_rank}/"
                   f"{site.lora_alpha}")
    return out

  variables = _lora_variables(sites)
  assign(variables, read_variables(path, variables, "LoRA state", site_errors))


def save_trainable(directory: str | os.PathLike, variables: Mapping[str, nnx.Variable], meta: Mapping[str, Any],
                   *, name: str, fmt: str) -> Path:
  """Writes ``<name>.safetensors`` (``variables`` under their dotted paths) and ``<name>.json``
  (``{"format": fmt, **meta}``) into ``directory``; returns it."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  save_variables(d / f"{name}.safetensors", variables, {"format": fmt})
  (d / f"{name}.json").write_text(json.dumps({"format": fmt, **meta}, indent=2))
  return d


def load_trainable(directory: str | os.PathLike, variables: Mapping[str, nnx.Variable], *, name: str,
                   what: str) -> None:
  """Loads ``<name>.safetensors`` of a :func:`save_trainable` directory into ``variables``, in place; one
  ``ValueError`` names the file and every missing / unexpected / mis-shaped / non-finite tensor."""
  d = Path(directory)
  f = d / f"{name}.safetensors"
  if not f.is_file():
    raise FileNotFoundError(f"{d}: no {f.name} (not a directory written by save_trainable)")
  assign(variables, read_variables(f, variables, what))


def read_trainable_meta(directory: str | os.PathLike, *, name: str, fmt: str) -> dict[str, Any]:
  """The ``<name>.json`` metadata of a :func:`save_trainable` directory; its ``format`` must be ``fmt``."""
  meta_path = Path(directory) / f"{name}.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"{directory}: no {meta_path.name}")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != fmt:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {fmt!r}")
  return meta


# --------------------------------------------------------------------------------------------------------------
# bounds.json (HySAC root-distance statistics)
# --------------------------------------------------------------------------------------------------------------

BOUND_NAMES = ("S", "U", "V", "G")          # safe text, unsafe text, safe image, unsafe image (the reference's)
BOUND_STATS = ("avg", "up_95", "low_05")


def save_bounds(path: str | os.PathLike, b: Mapping[str, Mapping[str, float]]) -> Path:
  """Writes ``bounds.json`` (the reference's layout: ``{"S": {"avg": .., "up_95": .., "low_05": ..}, ...}``)."""
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(json.dumps({k: dict(v) for k, v in b.items()}, indent=2))
  return p


def load_bounds(path: str | os.PathLike) -> dict[str, dict[str, float]]:
  """Reads and validates a ``bounds.json`` (ours or the released ``hysac_bounds.json``).

  Every present key among S/U/V/G must hold finite numbers for ``avg``, ``up_95`` and ``low_05``; other statistics
  are kept as they are. Raises ``ValueError`` naming the file and the key.
  """
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"bounds file {p} does not exist")
  try:
    data = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{p}: malformed JSON ({e})") from e
  if not isinstance(data, dict) or not data:
    raise ValueError(f"{p}: expected a JSON object with keys among S/U/V/G, got {type(data).__name__}")
  unknown = [k for k in data if k not in BOUND_NAMES]
  if unknown:
    raise ValueError(f"{p}: unknown keys {unknown}; expected S (safe text), U (unsafe text), V (safe image), "
                     f"G (unsafe image)")
  out = {}
  for k, stats in data.items():
    if not isinstance(stats, dict):
      raise ValueError(f"{p}: {k!r} must map statistic names to numbers, got {type(stats).__name__}")
    for s in BOUND_STATS:
      v = stats.get(s)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{p}: {k}.{s} must be a finite number, got {v!r}")
    out[k] = {s: float(v) for s, v in stats.items() if isinstance(v, (int, float))}
  return out


# --------------------------------------------------------------------------------------------------------------
# CMRM steering vectors
# --------------------------------------------------------------------------------------------------------------

def _vector_base(path: str | os.PathLike) -> Path:
  base = Path(path)
  return base.with_suffix("") if base.suffix in (".npz", ".json") else base


def save_vectors(path: str | os.PathLike, vectors: np.ndarray, meta: Mapping[str, Any]) -> tuple[Path, Path]:
  """Writes ``<path>.npz`` (key ``vectors``, (L, D) float32) and ``<path>.json`` (``meta`` + ``num_layers``,
  ``hidden_size``); ``path`` may end in .npz or .json. Returns both paths.

  Each file goes through a temporary sibling and ``os.replace``, the .json first: the .npz is the pair's commit
  point (a reader such as the CMRM job takes an existing .npz as "extracted"), so a process killed while saving
  leaves either no .npz or a complete pair, never a torn array file or an array without its metadata."""
  base = _vector_base(path)
  base.parent.mkdir(parents=True, exist_ok=True)
  v = np.asarray(vectors, np.float32)
  full = dict(meta, num_layers=int(v.shape[0]), hidden_size=int(v.shape[1]))
  npz, js = base.with_suffix(".npz"), base.with_suffix(".json")
  tmp = js.with_name(js.name + ".tmp")
  tmp.write_text(json.dumps(full, indent=2, default=str))
  os.replace(tmp, js)
  tmp = npz.with_name(npz.name + ".tmp")
  with tmp.open("wb") as f:           # a file object: np.savez would append ".npz" to a path
    np.savez(f, vectors=v)
  os.replace(tmp, npz)
  return npz, js


def load_vectors(path: str | os.PathLike, *, num_layers: int | None = None, hidden_size: int | None = None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
  """``(vectors (L, D) float32, meta)`` of a :func:`save_vectors` pair (meta ``{}`` without the .json); checks
  the shape against the model's layer count and width when given."""
  base = _vector_base(path)
  npz = base.with_suffix(".npz")
  if not npz.is_file():
    raise FileNotFoundError(f"CMRM vector file {npz} does not exist")
  with np.load(npz) as f:
    if "vectors" not in f:
      raise ValueError(f"{npz}: no 'vectors' array (keys: {list(f.keys())})")
    v = np.asarray(f["vectors"], np.float32)
  meta = json.loads(base.with_suffix(".json").read_text()) if base.with_suffix(".json").is_file() else {}
  if v.ndim != 2:
    raise ValueError(f"{npz}: vectors must be (layers, hidden), got shape {v.shape}")
  if num_layers is not None and v.shape[0] != num_layers:
    raise ValueError(f"{npz}: vectors have {v.shape[0]} layers but the model has {num_layers} decoder layers")
  if hidden_size is not None and v.shape[1] != hidden_size:
    raise ValueError(f"{npz}: vectors have hidden size {v.shape[1]} but the model's is {hidden_size}")
  return v, meta


__all__ = [
    "CheckpointFormatError", "ConversionError", "is_float", "contiguous", "nonfinite_count", "check_finite", "read_json_object", "DTYPES", "SafetensorsFile",
    "save_safetensors", "flat_abstract", "path_str", "abstract_model", "placement", "fill_state",
    "load_named_state", "MARKER", "FLAX_WEIGHTS", "format_name", "is_converted", "read_config",
    "converted_weights", "load_converted", "named_tensors", "copy_files", "save_converted", "save_variables",
    "read_variables", "assign", "LORA_FORMAT", "save_lora", "load_lora", "save_trainable", "load_trainable",
    "read_trainable_meta", "BOUND_NAMES", "BOUND_STATS", "save_bounds", "load_bounds", "save_vectors",
    "load_vectors",
]
