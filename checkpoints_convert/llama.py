"""HF Llama / Mistral causal LM <-> vlsafe_jax ``Llama``: key table, loading into stacked layers, export.

HF keys (platform.md §4.4): ``model.embed_tokens.weight``, ``model.layers.{i}.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}.weight``, ``model.norm.weight``,
``lm_head.weight`` (absent when ``tie_word_embeddings``). LLaVA's text tower uses the same keys under a
``language_model.`` prefix; ``prefix=`` selects it.

Our decoder stores its layers **stacked** (``model.layers.self_attn.q_proj.kernel`` has shape (L, D, N*H)), so the
rule table targets *per-layer virtual paths* (``model.layers.{i}.self_attn.q_proj.kernel``); the generic engine in
:mod:`checkpoints_convert.mapping` then does its usual all-at-once checking (missing / unexpected / mis-shaped /
ambiguous / duplicate, one error) against per-layer shapes, and this module stacks the rows, one stacked tensor at
a time (at most one (L, ...) tensor in host RAM), placing it with its sharding if a mesh is given.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert.mapping import (IDENTITY_KEYMAP, KeyMap, Rule, Transform, _is_float, dtype_from_name,
                                         export_tensors, flat_abstract, load_state, placement, plan_import)
from checkpoints_convert.safetensors_io import (MARKER, converted_weights, has_format, open_hf_weights, parse_config,
                                                save_safetensors)

_PLACEHOLDERS = {
    "i": r"\d+",
    "lin": r"self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj",
    "ln": r"input_layernorm|post_attention_layernorm",
}

LLAMA_RULES = (
    Rule("model.embed_tokens.weight", "model.embed_tokens.embedding"),
    Rule("model.layers.{i}.{lin}.weight", "model.layers.{i}.{lin}.kernel", Transform.LINEAR),
    Rule("model.layers.{i}.{ln}.weight", "model.layers.{i}.{ln}.scale"),
    Rule("model.norm.weight", "model.norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel", Transform.LINEAR),
)
# Non-persistent rotary buffers that older pytorch_model.bin files contain.
LLAMA_IGNORE = (r"rotary_emb\.inv_freq$",)
LLAMA_KEYMAP = KeyMap(LLAMA_RULES, _PLACEHOLDERS, LLAMA_IGNORE)

_STACKED = re.compile(r"^model\.layers\.(?!\d)")           # stacked paths: "model.layers.<sub>" (no index)


def _stacked_re(stacked_prefix: str) -> re.Pattern:
  """Stacked-layer paths under ``stacked_prefix`` (LLaVA: ``language_model.model.layers.``), no layer index."""
  if stacked_prefix == "model.layers.":
    return _STACKED
  return re.compile("^" + re.escape(stacked_prefix) + r"(?!\d)")


_VIRTUAL = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class _Prefixed:
  """A tensor source seen through a key prefix (LLaVA's ``language_model.``); other keys are hidden."""

  def __init__(self, source, prefix: str):
    self.source, self.prefix = source, prefix

  def shapes(self):
    p = self.prefix
    return {k[len(p):]: v for k, v in self.source.shapes().items() if k.startswith(p)}

  def get(self, key):
    return self.source.get(self.prefix + key)


def virtual_targets(abstract_state: nnx.State, num_layers: int,
                    stacked_prefix: str = "model.layers.") -> dict[str, tuple[int, ...]]:
  """{per-layer or plain nnx path: shape}: stacked (L, ...) paths expanded to L per-layer entries."""
  out = {}
  stacked = _stacked_re(stacked_prefix)
  for path, (_, var) in flat_abstract(abstract_state).items():
    shape = tuple(var.get_value().shape)
    if stacked.match(path):
      if shape[0] != num_layers:
        raise ValueError(f"stacked parameter {path} has leading axis {shape[0]}, expected {num_layers} layers")
      sub = path[len(stacked_prefix):]
      for i in range(num_layers):
        out[f"{stacked_prefix}{i}.{sub}"] = shape[1:]
    else:
      out[path] = shape
  return out


def load_llama_state(source, abstract_state: nnx.State, num_layers: int, *, source_name: str,
                     param_dtype: Any = None, shardings: nnx.State | None = None, keymap: KeyMap = LLAMA_KEYMAP,
                     progress=None, stacked_prefix: str = "model.layers.") -> nnx.State:
  """Fills an abstract ``Llama`` state from a tensor source (see safetensors_io); one ConversionError lists
  every mismatch before any tensor is read. ``stacked_prefix`` locates the stacked layers (LLaVA nests the
  decoder: ``language_model.model.layers.``); the keymap must then target the same per-layer paths."""
  flat = flat_abstract(abstract_state)
  stacked = _stacked_re(stacked_prefix)
  plan = plan_import(keymap, source.shapes(), virtual_targets(abstract_state, num_layers, stacked_prefix),
                     source_name)
  by_path = {path: (key, tf) for key, path, tf in plan}
  flat_sh = flat_abstract(shardings) if shardings is not None else {}

  def cast(arr):
    if param_dtype is not None and _is_float(arr.dtype):
      return arr.astype(param_dtype)
    return arr

  filled = []
  for path, (ptuple, var) in flat.items():
    if stacked.match(path):
      sub = path[len(stacked_prefix):]
      rows = []
      for i in range(num_layers):
        key, tf = by_path[f"{stacked_prefix}{i}.{sub}"]
        rows.append(cast(np.ascontiguousarray(tf.forward(source.get(key)))))
        if progress:
          progress(key)
      arr = np.stack(rows)
      del rows
    else:
      key, tf = by_path[path]
      arr = cast(np.ascontiguousarray(tf.forward(source.get(key))))
      if progress:
        progress(key)
    if path in flat_sh:
      sh = flat_sh[path][1]
      sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
      value = jax.device_put(arr, sh)
    else:
      value = jnp.asarray(arr)
    filled.append((ptuple, var.replace(value)))
  return nnx.from_flat_state(filled)


def export_llama_tensors(state: nnx.State, dtype: Any = None, keymap: KeyMap = LLAMA_KEYMAP,
                         stacked_prefix: str = "model.layers."):
  """Yields (HF key, numpy array in HF layout) for every parameter; stacked layers are split per layer."""
  stacked = _stacked_re(stacked_prefix)
  for path, (_, var) in flat_abstract(state).items():
    arr = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None and _is_float(arr.dtype):
      arr = arr.astype(dtype)
    if stacked.match(path):
      sub = path[len(stacked_prefix):]
      items = [(f"{stacked_prefix}{i}.{sub}", arr[i]) for i in range(arr.shape[0])]
    else:
      items = [(path, arr)]
    for p, a in items:
      hits = keymap.to_hf(p)
      if len(hits) != 1:
        raise ValueError(f"export: model tensor {p} maps to {len(hits)} HF keys ({hits}); expected exactly one")
      key, tf = hits[0]
      yield key, np.ascontiguousarray(tf.inverse(a))


def read_config(directory: str | os.PathLike):
  """``LlamaConfig`` from ``directory/config.json`` (plain causal LM, or a LLaVA config's ``text_config``)."""
  from vlsafe_jax.models.llama import LlamaConfig
  return parse_config(directory, lambda d: (LlamaConfig.from_hf(d["text_config"], where="text_config")
                                            if "text_config" in d else LlamaConfig.from_hf(d)), "decoder")


def abstract_llama(config, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """(graphdef, abstract state) of a ``Llama`` without allocating parameters."""
  from vlsafe_jax.models.llama import Llama
  model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def load_llama(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None, mesh=None,
               config=None, prefix: str = "", progress=None):
  """Builds a ``vlsafe_jax.models.llama.Llama`` from an HF Llama/Mistral directory.

  Args:
    dtype: compute dtype. param_dtype: cast floating parameters (None keeps the file's dtype; bf16 stays bf16).
    mesh: place each stacked tensor with the logical sharding table as soon as it is assembled.
    config: a ``LlamaConfig`` overriding config.json. prefix: key prefix inside the file (``"language_model."``).
  Raises:
    CheckpointFormatError (missing/corrupt files) or ConversionError (one message listing every bad tensor).
  """
  d = Path(path)
  config = config or read_config(d)
  graphdef, abs_state = abstract_llama(config, dtype=dtype,
                                       param_dtype=param_dtype if param_dtype is not None else jnp.float32)
  shardings = placement(abs_state, mesh)
  if is_converted(d):
    state = load_state(IDENTITY_KEYMAP, converted_weights(d, FLAX_WEIGHTS), abs_state, source_name=str(d),
                       param_dtype=param_dtype, shardings=shardings, progress=progress)
    return nnx.merge(graphdef, state)
  source = open_hf_weights(d)
  if prefix:
    source = _Prefixed(source, prefix)
  state = load_llama_state(source, abs_state, config.num_hidden_layers, source_name=str(d),
                           param_dtype=param_dtype, shardings=shardings, progress=progress)
  return nnx.merge(graphdef, state)


FORMAT, FLAX_WEIGHTS = "vlsafe_jax.llama", "flax_model.safetensors"


def is_converted(directory: str | os.PathLike) -> bool:
  """True for a directory written by :func:`save_converted` (``python -m checkpoints_convert llama``)."""
  return has_format(directory, FORMAT)


def save_converted(model, dst: str | os.PathLike, *, src: str | os.PathLike | None = None) -> Path:
  """Converted directory: the source config.json, a marker, ``flax_model.safetensors`` (nnx paths, stacked)."""
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  save_safetensors(dst / FLAX_WEIGHTS, export_tensors(IDENTITY_KEYMAP, nnx.state(model, nnx.Param)),
                   metadata={"format": FORMAT})
  if src is not None and (Path(src) / "config.json").exists() and Path(src).resolve() != dst.resolve():
    import shutil
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "special_tokens_map.json", "chat_template.jinja"):
      if (Path(src) / name).exists():
        shutil.copy2(Path(src) / name, dst / name)
  (dst / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1, "weights": FLAX_WEIGHTS}, indent=2))
  return dst


def export_hf(model, dst: str | os.PathLike, *, dtype: Any = None, hf_config: dict | None = None) -> Path:
  """Writes ``model.safetensors`` (+ ``config.json`` when ``hf_config`` is given) in HF layout."""
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  save_safetensors(dst / "model.safetensors", export_llama_tensors(nnx.state(model, nnx.Param), dtype),
                   metadata={"format": "pt"})
  if hf_config is not None:
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
  return dst


def convert_cli(src: str, dst: str, param_dtype: str | None = None) -> Path:
  """``python -m checkpoints_convert llama``: HF directory -> converted directory."""
  return save_converted(load_llama(src, param_dtype=dtype_from_name(param_dtype)), dst, src=src)


__all__ = ["convert_cli", "LLAMA_RULES", "LLAMA_KEYMAP", "load_llama", "load_llama_state", "export_llama_tensors", "export_hf",
           "read_config", "abstract_llama", "virtual_targets", "save_converted", "is_converted"]
