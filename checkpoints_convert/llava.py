"""HF LLaVA (``LlavaForConditionalGeneration``) <-> vlsafe_jax ``Llava``: key table, normalisation, tied head, Family.

Accepted inputs (platform.md §4.3, §4.5): ``model.safetensors``, sharded safetensors + index, or (with torch)
``pytorch_model.bin``; both vision-tower namings (hub ``vision_tower.vision_model.*``, transformers-5
``vision_tower.*``) and the text/projector variants (``language_model.model.*``, ``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head`` / ``language_model.lm_head``). Every key
is first normalised to one canonical name (the transformers-5 file layout), then matched by one declarative table;
all problems (missing, unexpected, mis-shaped, ambiguous, duplicate - e.g. a file holding both namings) come back
in ONE ``ConversionError`` before a byte is read.

Loading streams tensor by tensor (decoder layers are stacked one parameter at a time, see
:mod:`checkpoints_convert.llama`); with a mesh every tensor is ``device_put`` with its NamedSharding as soon as it
is read, so a 7B/13B checkpoint never sits whole on one device. fp16/bf16 are kept unless ``param_dtype`` casts.

``Llava.from_pretrained`` loads HF and converted directories (``vlsafe_jax.model_io``) through
:data:`LLAVA_FAMILY`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from checkpoints_convert.family import Family
from checkpoints_convert.llama import export_llama_tensors, load_llama_state
from checkpoints_convert.mapping import ConversionError, KeyMap, Rule, Transform

STACKED_PREFIX = "language_model.model.layers."
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "processor_config.json", "generation_config.json")

# Original key prefix -> canonical prefix; the first matching pattern wins.
_NORMALISE = (
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "vision_tower."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^(?:language_model\.model\.|model\.language_model\.(?:model\.)?)"), "language_model.model."),
    (re.compile(r"^(?:language_model\.)?lm_head\."), "language_model.lm_head."),
)

_PLACEHOLDERS = {
    "i": r"\d+",
    "lin": r"self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj",
    "ln": r"input_layernorm|post_attention_layernorm",
    "vlin": r"self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]",
    "vln": r"layer_norm[12]",
    "vnorm": r"pre_layrnorm|post_layernorm",
    "plin": r"linear_[12]",
}

LLAVA_RULES = (
    # decoder (per-layer virtual paths; the loader stacks them)
    Rule("language_model.model.embed_tokens.weight", "language_model.model.embed_tokens.embedding"),
    Rule("language_model.model.layers.{i}.{lin}.weight", "language_model.model.layers.{i}.{lin}.kernel",
         Transform.LINEAR),
    Rule("language_model.model.layers.{i}.{ln}.weight", "language_model.model.layers.{i}.{ln}.scale"),
    Rule("language_model.model.norm.weight", "language_model.model.norm.scale"),
    Rule("language_model.lm_head.weight", "language_model.lm_head.kernel", Transform.LINEAR),
    # projector
    Rule("multi_modal_projector.{plin}.weight", "multi_modal_projector.{plin}.kernel", Transform.LINEAR),
    Rule("multi_modal_projector.{plin}.bias", "multi_modal_projector.{plin}.bias"),
    # CLIP vision tower (platform.md §4.2 vision keys, tower prefix "vision_tower")
    Rule("vision_tower.encoder.layers.{i}.{vlin}.weight", "vision_tower.encoder.layers.{i}.{vlin}.kernel",
         Transform.LINEAR),
    Rule("vision_tower.encoder.layers.{i}.{vlin}.bias", "vision_tower.encoder.layers.{i}.{vlin}.bias"),
    Rule("vision_tower.encoder.layers.{i}.{vln}.weight", "vision_tower.encoder.layers.{i}.{vln}.scale"),
    Rule("vision_tower.encoder.layers.{i}.{vln}.bias", "vision_tower.encoder.layers.{i}.{vln}.bias"),
    Rule("vision_tower.{vnorm}.weight", "vision_tower.{vnorm}.scale"),
    Rule("vision_tower.{vnorm}.bias", "vision_tower.{vnorm}.bias"),
    Rule("vision_tower.embeddings.class_embedding", "vision_tower.embeddings.class_embedding"),
    Rule("vision_tower.embeddings.patch_embedding.weight", "vision_tower.embeddings.patch_embedding.kernel",
         Transform.CONV2D),
    Rule("vision_tower.embeddings.position_embedding.weight",
         "vision_tower.embeddings.position_embedding.embedding"),
)
# Non-persistent buffers (position ids, rotary inv_freq) that older files contain.
LLAVA_IGNORE = (r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$")
LLAVA_KEYMAP = KeyMap(LLAVA_RULES, _PLACEHOLDERS, LLAVA_IGNORE)
# Tied decoders have no lm_head parameter; a stored copy of the tied matrix is then ignored.
_TIED_KEYMAP = KeyMap(LLAVA_RULES, _PLACEHOLDERS, LLAVA_IGNORE + (r"^language_model\.lm_head\.weight$",))


def canonical_key(key: str) -> str:
  """The transformers-5 file name of an HF LLaVA key in any accepted naming (unknown keys unchanged)."""
  for rx, repl in _NORMALISE:
    m = rx.match(key)
    if m:
      return repl + key[m.end():]
  return key


class NormalisedSource:
  """A tensor source seen through :func:`canonical_key`; keys that collide are reported as duplicates."""

  def __init__(self, source):
    self.source = source
    self._orig: dict[str, str] = {}
    self.duplicate: list[tuple[str, list[str]]] = []
    groups: dict[str, list[str]] = {}
    for k in source.shapes():
      groups.setdefault(canonical_key(k), []).append(k)
    for canon, keys in groups.items():
      self._orig[canon] = keys[0]
      if len(keys) > 1:
        self.duplicate.append((canon, keys))

  def original(self, key: str) -> str:
    """The file's name for a canonical key."""
    return self._orig.get(key, key)

  def shapes(self):
    full = self.source.shapes()
    return {c: full[k] for c, k in self._orig.items()}

  def get(self, key):
    return self.source.get(self._orig[key])


HEAD_KEY, EMBED_KEY = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"


def resolve_tied_head(config, source: NormalisedSource, source_name: str):
  """``config`` with tying as transformers 5 resolves it for these tensors (``PreTrainedModel.tie_weights`` during
  ``from_pretrained``): a tied config whose file also stores an ``lm_head`` different from the embeddings is NOT
  tied (transformers warns and keeps the stored head); an identical stored copy is dropped (``_TIED_KEYMAP``).
  Reads the two (V, D) matrices only when the config says tied and both are stored."""
  t = config.text_config
  shapes = source.shapes()
  if not t.tie_word_embeddings or HEAD_KEY not in shapes or EMBED_KEY not in shapes:
    return config
  if np.array_equal(source.get(HEAD_KEY), source.get(EMBED_KEY)):
    return config
  warnings.warn(f"{source_name}: config.json ties the word embeddings, but the checkpoint stores an lm_head that "
                f"differs from them; loading it untied, as transformers does", stacklevel=2)
  return dataclasses.replace(config, text_config=dataclasses.replace(t, tie_word_embeddings=False))


def load_llava_state(source, abstract_state: nnx.State, config, *, source_name: str, param_dtype: Any = None,
                     shardings: nnx.State | None = None, progress=None) -> nnx.State:
  """Fills an abstract ``Llava`` state from an HF tensor source (any accepted naming); one ConversionError."""
  norm = NormalisedSource(source)
  keymap = _TIED_KEYMAP if config.text_config.tie_word_embeddings else LLAVA_KEYMAP
  try:
    state = load_llama_state(norm, abstract_state, config.text_config.num_hidden_layers, source_name=source_name,
                             param_dtype=param_dtype, shardings=shardings, keymap=keymap, progress=progress,
                             stacked_prefix=STACKED_PREFIX)
  except ConversionError as e:
    # Report the file's own key names (hub files say vision_tower.vision_model.*), not the canonical ones.
    orig = norm.original
    unexpected = [(orig(k), s, why) for k, s, why in e.unexpected]
    misshaped = [(orig(k), hs, p, got, want) for k, hs, p, got, want in e.misshaped]
    ambiguous = [(orig(k), t) for k, t in e.ambiguous]
    raise ConversionError(source_name, e.missing, unexpected, misshaped, ambiguous,
                          e.duplicate + norm.duplicate) from None
  if norm.duplicate:
    raise ConversionError(source_name, duplicate=norm.duplicate)
  return state


def export_hf_tensors(state: nnx.State, *, dtype: Any = None, vision_naming: str = "v5"
                      ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, array in HF layout) for every parameter, one at a time.

  ``vision_naming``: ``"v5"`` writes ``vision_tower.*`` (transformers-5 save_pretrained), ``"hub"`` writes
  ``vision_tower.vision_model.*`` (llava-hf hub files); both load into transformers 5.
  """
  if vision_naming not in ("v5", "hub"):
    raise ValueError(f"vision_naming must be 'v5' or 'hub', got {vision_naming!r}")
  for key, arr in export_llama_tensors(state, dtype, keymap=LLAVA_KEYMAP, stacked_prefix=STACKED_PREFIX):
    if vision_naming == "hub" and key.startswith("vision_tower."):
      key = "vision_tower.vision_model." + key[len("vision_tower."):]
    yield key, arr


def _prepare_config(config, source, source_name: str):
  return resolve_tied_head(config, NormalisedSource(source), source_name)


def _load_hf_state(family: Family, source, abstract_state: nnx.State, config, **kw) -> nnx.State:
  del family
  return load_llava_state(source, abstract_state, config, **kw)


def _export_hf_tensors(family: Family, state: nnx.State, dtype: Any = None, vision_naming: str = "v5"):
  del family
  return export_hf_tensors(state, dtype=dtype, vision_naming=vision_naming)


LLAVA_FAMILY = Family("llava", "LLaVA", LLAVA_KEYMAP, SIDE_FILES, prepare_config=_prepare_config,
                      load_hf_state=_load_hf_state, export_hf_tensors=_export_hf_tensors)


def is_converted(directory: str | os.PathLike) -> bool:
  """True for a directory written by :func:`save_converted` (``python -m checkpoints_convert llava``)."""
  return LLAVA_FAMILY.is_converted(directory)


def save_converted(model, dst: str | os.PathLike, *, src: str | os.PathLike | None = None) -> Path:
  """Writes ``model`` as a converted directory (config.json, marker, flax_model.safetensors; ``src``'s tokenizer
  and processor files copied along)."""
  return LLAVA_FAMILY.save_converted(model, dst, src=src)


def export_hf(model, dst: str | os.PathLike, *, dtype: Any = None, vision_naming: str = "v5",
              src: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2 ** 30) -> Path:
  """Writes an HF LLaVA directory (config.json + safetensors, sharded above ``max_shard_bytes``) that
  ``transformers.LlavaForConditionalGeneration`` loads; float32 / as-stored exports round-trip bit-exact."""
  return LLAVA_FAMILY.export_hf(model, dst, dtype=dtype, src=src, max_shard_bytes=max_shard_bytes,
                                vision_naming=vision_naming)


__all__ = ["LLAVA_RULES", "LLAVA_KEYMAP", "LLAVA_FAMILY", "canonical_key", "NormalisedSource", "resolve_tied_head",
           "load_llava_state", "save_converted", "export_hf", "export_hf_tensors", "is_converted"]
