"""HF Llama / Mistral causal LM <-> vlsafe_jax ``Llama``: key table, stacked-layer loading and export, Family.

HF keys (platform.md §4.4): ``model.embed_tokens.weight``, ``model.layers.{i}.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}.weight``, ``model.norm.weight``,
``lm_head.weight`` (absent when ``tie_word_embeddings``). LLaVA's text tower uses the same keys under a
``language_model.`` prefix (``checkpoints_convert.llava`` passes its ``stacked_prefix``).

Our decoder stores its layers **stacked** (``model.layers.self_attn.q_proj.kernel`` has shape (L, D, N*H)), so the
rule table targets *per-layer virtual paths* (``model.layers.{i}.self_attn.q_proj.kernel``); the generic engine in
:mod:`checkpoints_convert.mapping` then does its usual all-at-once checking (missing / unexpected / mis-shaped /
ambiguous / duplicate, one error) against per-layer shapes, and this module stacks the rows, one stacked tensor at
a time (at most one (L, ...) tensor in host RAM), placing it with its sharding if a mesh is given.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from checkpoints_convert.family import Family
from checkpoints_convert.mapping import KeyMap, Rule, Transform, flat_abstract, is_float, plan_import
from vlsafe_jax.model_io import fill_state

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
  stacked = _stacked_re(stacked_prefix)
  plan = plan_import(keymap, source.shapes(), virtual_targets(abstract_state, num_layers, stacked_prefix),
                     source_name)
  by_path = {path: (key, tf) for key, path, tf in plan}

  def read(path):
    key, tf = by_path[path]
    arr = np.ascontiguousarray(tf.forward(source.get(key)))
    if progress:
      progress(key)
    return arr

  def tensors():
    for path in flat_abstract(abstract_state):
      if stacked.match(path):
        sub = path[len(stacked_prefix):]
        # Cast row by row (fill_state would cast only the stacked copy, after holding L rows in the file dtype).
        arr = np.stack([cast(read(f"{stacked_prefix}{i}.{sub}")) for i in range(num_layers)])
        yield path, arr
      else:
        yield path, read(path)

  def cast(arr):
    return arr.astype(param_dtype) if param_dtype is not None and is_float(arr.dtype) else arr

  return fill_state(abstract_state, tensors(), param_dtype=param_dtype, shardings=shardings)


def export_llama_tensors(state: nnx.State, dtype: Any = None, keymap: KeyMap = LLAMA_KEYMAP,
                         stacked_prefix: str = "model.layers."):
  """Yields (HF key, numpy array in HF layout) for every parameter; stacked layers are split per layer."""
  stacked = _stacked_re(stacked_prefix)
  for path, (_, var) in flat_abstract(state).items():
    arr = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None and is_float(arr.dtype):
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


def _config_from_hf(config_cls: type, d: dict):
  """A plain causal-LM config.json, or a LLaVA config's ``text_config``."""
  return (config_cls.from_hf(d["text_config"], where="text_config") if "text_config" in d
          else config_cls.from_hf(d))


def _load_hf_state(family: Family, source, abstract_state: nnx.State, config, **kw) -> nnx.State:
  return load_llama_state(source, abstract_state, config.num_hidden_layers, keymap=family.keymap, **kw)


def _export_hf_tensors(family: Family, state: nnx.State, dtype: Any = None):
  return export_llama_tensors(state, dtype, keymap=family.keymap)


# The converted directory keeps the source's config.json (LlamaConfig has no HF writer) and tokenizer files.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "chat_template.jinja")
LLAMA_FAMILY = Family("llama", "decoder", LLAMA_KEYMAP, SIDE_FILES, writes_config=False,
                      config_from_hf=_config_from_hf, load_hf_state=_load_hf_state,
                      export_hf_tensors=_export_hf_tensors)


def is_converted(directory: str | os.PathLike) -> bool:
  """True for a directory written by :func:`save_converted` (``python -m checkpoints_convert llama``)."""
  return LLAMA_FAMILY.is_converted(directory)


def save_converted(model, dst: str | os.PathLike, *, src: str | os.PathLike | None = None) -> Path:
  """Converted directory: the source's config.json and tokenizer files, a marker, ``flax_model.safetensors``
  (nnx paths, stacked layers)."""
  return LLAMA_FAMILY.save_converted(model, dst, src=src)


def export_hf(model, dst: str | os.PathLike, *, dtype: Any = None, hf_config: dict | None = None) -> Path:
  """Writes ``model.safetensors`` (+ ``config.json`` when ``hf_config`` is given) in HF layout."""
  return LLAMA_FAMILY.export_hf(model, dst, dtype=dtype, hf_config=hf_config)


__all__ = ["LLAMA_RULES", "LLAMA_KEYMAP", "LLAMA_FAMILY", "load_llama_state", "export_llama_tensors", "export_hf",
           "virtual_targets", "save_converted", "is_converted"]
