"""LLaVA-1.5 in flax.nnx: CLIP vision tower + two-layer GELU projector + Llama/Mistral decoder.

Numerically matches HF ``transformers.LlavaForConditionalGeneration`` (platform.md §4.3, §4.7). Attribute names
mirror the HF checkpoint keys after normalisation (``vision_tower.*``, ``multi_modal_projector.linear_{1,2}``,
``language_model.model.*``, ``language_model.lm_head``), so :mod:`checkpoints_convert.llava` maps keys with one table.

Shape-suffix legend: B batch, T tokens, D decoder width, E vision width, I images, N image tokens per image
((image_size / patch)^2, 576 at 336 px), L decoder layers, V vocab, h/w/C image height/width/channels.

Image tokens: the prompt builder (:mod:`vlsafe_jax.data.vlm_prompts`) expands ``<image>`` into N copies of
``image_token_index`` itself, so image spans are static and exact (CMRM/TGA masks). The projected features of
image k (in ``pixel_values`` order) fill the k-th block of N image-token positions in row-major order of the
batch - HF's ``masked_scatter`` rule - so rows without images (text-only prompts) simply contain no image tokens,
and left or right padding changes nothing.

Hooks are exactly the decoder's (:class:`vlsafe_jax.models.llama.Llama`): per-layer residual captures at all
positions (``output_hidden_states``), at per-example positions or as masked means, and additive steering vectors
(shared (L, D) or per-example (B, L, D), on a position mask, scaled by a traced alpha) that flow into the KV cache.

Generation (:func:`generate`): one jitted program embeds the prompt (vision tower, projector, scatter), then
:func:`vlsafe_jax.models.decoding.generate` runs the prefill with ``inputs_embeds`` and the single compiled
``while_loop`` decode. Compiles once per (batch, prompt-length bucket, images, max_new_tokens).

Model code never reads files: ``Llava.from_pretrained`` hands ``Llava`` and ``LlavaConfig`` to the generic loader
(``checkpoints_convert.llava.LLAVA_FAMILY``: HF directories; ``vlsafe_jax.model_io``: converted directories).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert.llava import LLAVA_FAMILY
from vlsafe_jax.models import decoding
from vlsafe_jax.models.clip import (CLIPVisionConfig, CLIPVisionTransformer, _ACTIVATIONS, _sub_config,
                                    clip_image_flops)
from vlsafe_jax.models.config_fields import check_field_types
from vlsafe_jax.models.llama import Llama, LlamaConfig, KVCache, llama_prefill_flops

SELECT_STRATEGIES = ("default", "full")


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """LLaVA hyper-parameters (HF ``LlavaConfig`` field names; defaults are llava-1.5-7b-hf's)."""
  vision_config: CLIPVisionConfig = dataclasses.field(default_factory=lambda: CLIPVisionConfig(
      image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
      num_attention_heads=16, projection_dim=768))
  text_config: LlamaConfig = dataclasses.field(default_factory=lambda: LlamaConfig(vocab_size=32064))
  image_token_index: int = 32000
  # int, or a tuple of ints whose features are concatenated along the channel axis (HF allows a list).
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  projector_hidden_act: str = "gelu"
  multimodal_projector_bias: bool = True

  def __post_init__(self):
    if isinstance(self.vision_feature_layer, list):
      object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
    if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
      raise ValueError(f"LlavaConfig: vision_feature_select_strategy {self.vision_feature_select_strategy!r} "
                       f"not supported; expected one of {SELECT_STRATEGIES}")
    if self.projector_hidden_act not in _ACTIVATIONS:
      raise ValueError(f"LlavaConfig: projector_hidden_act {self.projector_hidden_act!r} not supported; "
                       f"expected one of {sorted(_ACTIVATIONS)}")
    n = self.vision_config.num_hidden_layers
    for layer in self.feature_layers:
      # hidden_states has n + 1 entries (index 0 = embeddings after pre_layrnorm).
      if not -(n + 1) <= layer <= n:
        raise ValueError(f"LlavaConfig: vision_feature_layer {layer} out of range for a {n}-layer vision tower "
                         f"(hidden_states has {n + 1} entries)")

  @property
  def feature_layers(self) -> tuple[int, ...]:
    v = self.vision_feature_layer
    return tuple(v) if isinstance(v, tuple) else (int(v),)

  @property
  def num_image_tokens(self) -> int:
    """Image-token positions per image: N patches (``default`` drops CLS) or N + 1 (``full``)."""
    n = self.vision_config.num_patches
    return n if self.vision_feature_select_strategy == "default" else n + 1

  @property
  def projector_in_features(self) -> int:
    return self.vision_config.hidden_size * len(self.feature_layers)

  @classmethod
  def from_hf(cls, hf: Any, **overrides) -> "LlavaConfig":
    """From an HF ``LlavaConfig`` object or a config.json dict (hub files and transformers-5 files).

    Partial sub-configs (hub files rely on class defaults) are completed with HF's defaults, which equal this
    module's dataclass defaults. ``image_token_id`` (newer name) is accepted for ``image_token_index``.
    The embeddings are tied when either the top level or ``text_config`` says so: transformers 5's
    ``LlavaConfig.__post_init__`` ORs the two and ``LlavaForConditionalGeneration`` ties on the top-level flag, so
    such files carry no ``lm_head`` (whether a stored head still counts is decided at load time, from the tensors).
    """
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    if d.get("model_type", "llava") != "llava":
      raise ValueError(f"config model_type {d.get('model_type')!r} is not a LLaVA config (expected 'llava')")
    for key in ("vision_config", "text_config"):
      if not isinstance(d.get(key) or {}, Mapping):
        raise ValueError(f"{key} must be a JSON object (field -> value), got {type(d[key]).__name__}")
    check_field_types(cls, d, "config")
    vd = dict(d.get("vision_config") or {})
    if vd.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
      raise ValueError(f"config vision_config.model_type {vd.get('model_type')!r} is not supported (CLIP only)")
    vision = _sub_config(CLIPVisionConfig, vd, "vision_config")
    td = dict(d.get("text_config") or {})
    td.setdefault("model_type", "llama")
    text = LlamaConfig.from_hf(td, where="text_config")
    if d.get("tie_word_embeddings") and not text.tie_word_embeddings:
      text = dataclasses.replace(text, tie_word_embeddings=True)
    kw: dict[str, Any] = dict(vision_config=vision, text_config=text)
    token = d.get("image_token_index", d.get("image_token_id"))
    if token is not None:
      kw["image_token_index"] = int(token)
    for k in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
              "multimodal_projector_bias"):
      if d.get(k) is not None:
        kw[k] = d[k]
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that ``transformers.LlavaForConditionalGeneration`` loads."""
    v = {k: val for k, val in dataclasses.asdict(self.vision_config).items() if k != "attention_impl"}
    v["model_type"] = "clip_vision_model"
    t = self.text_config
    text = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)
            if f.name not in ("remat", "attention_impl") and not f.name.startswith("rope_")}
    text["rope_parameters"] = {"rope_theta": t.rope_theta, "rope_type": t.rope_type}
    if t.rope_type in ("linear", "llama3"):
      text["rope_parameters"]["factor"] = t.rope_factor
    if t.rope_type == "llama3":
      text["rope_parameters"].update(low_freq_factor=t.rope_low_freq_factor,
                                     high_freq_factor=t.rope_high_freq_factor,
                                     original_max_position_embeddings=t.rope_original_max_position_embeddings)
    if isinstance(text.get("eos_token_id"), tuple):
      text["eos_token_id"] = list(text["eos_token_id"])
    if t.model_type == "llama":
      text.pop("sliding_window", None)
    layer = self.vision_feature_layer
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": self.image_token_index, "image_seq_length": self.num_image_tokens,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": self.vision_feature_select_strategy,
        "projector_hidden_act": self.projector_hidden_act,
        "multimodal_projector_bias": self.multimodal_projector_bias,
        "tie_word_embeddings": t.tie_word_embeddings, "text_config": text, "vision_config": v,
    }


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------

def select_features(hidden_states: Sequence[jax.Array], layers: Sequence[int], strategy: str) -> jax.Array:
  """Vision features for the projector: (I, N, E * len(layers)).

  ``hidden_states`` is the vision tower's HF-convention tuple (index 0 = embeddings after pre_layrnorm, i =
  output of layer i; no post_layernorm). Each selected layer gives (I, 1 + N, E); ``default`` drops CLS
  (position 0), ``full`` keeps it; several layers are concatenated on the channel axis (HF order).
  """
  feats = [hidden_states[i] for i in layers]
  if strategy == "default":
    feats = [f[:, 1:] for f in feats]
  return feats[0] if len(feats) == 1 else jnp.concatenate(feats, axis=-1)


def scatter_image_features(embeds_btd: jax.Array, image_mask_bt: jax.Array, features_ind: jax.Array) -> jax.Array:
  """Places image features at image-token positions (HF ``masked_scatter`` order).

  Args:
    embeds_btd: token embeddings (B, T, D).
    image_mask_bt: bool (B, T), True at image-token positions; their row-major count must equal I * N (the
      caller checks this on concrete inputs; under jit extra positions reuse the last feature row).
    features_ind: projected features (I, N, D), images in the order their spans appear in the batch.
  Returns: (B, T, D) in ``embeds_btd``'s dtype.
  """
  b, t, d = embeds_btd.shape
  flat_kd = features_ind.reshape(-1, d).astype(embeds_btd.dtype)
  # k-th image position of the flattened batch takes feature row k.
  idx_bt = jnp.cumsum(image_mask_bt.reshape(-1).astype(jnp.int32)).reshape(b, t) - 1
  idx_bt = jnp.clip(idx_bt, 0, flat_kd.shape[0] - 1)
  gathered_btd = jnp.take(flat_kd, idx_bt, axis=0)
  return jnp.where(image_mask_bt[..., None], gathered_btd, embeds_btd)


def llava_prefill_flops(cfg: LlavaConfig, text_tokens: int, images: int = 1) -> float:
  """Forward FLOPs of one request: vision tower per image + projector + decoder over all prompt tokens."""
  n = cfg.num_image_tokens * images
  d, e = cfg.text_config.hidden_size, cfg.projector_in_features
  projector = 2.0 * n * (e * d + d * d)
  return images * clip_image_flops(cfg.vision_config) + projector + llama_prefill_flops(cfg.text_config,
                                                                                       n + text_tokens)


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

class LlavaMultiModalProjector(nnx.Module):
  """``linear_2(act(linear_1(x)))``; act is exact erf GELU for ``"gelu"`` (platform.md §4.7)."""

  def __init__(self, cfg: LlavaConfig, *, dtype, param_dtype, rngs):
    d, e = cfg.text_config.hidden_size, cfg.projector_in_features
    bias = cfg.multimodal_projector_bias
    self.act_name = cfg.projector_hidden_act

    def linear(d_in, d_out, axes):
      return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
                        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)

    # The hidden width is the decoder width: shard it like an MLP hidden (model axis), outputs like embed.
    self.linear_1 = linear(e, d, ("embed", "mlp"))
    self.linear_2 = linear(d, d, ("mlp", "embed"))

  def __call__(self, x_bne: jax.Array) -> jax.Array:
    return self.linear_2(_ACTIVATIONS[self.act_name](self.linear_1(x_bne)))


class Llava(nnx.Module):
  """HF ``LlavaForConditionalGeneration``: ``vision_tower`` + ``multi_modal_projector`` + ``language_model``."""

  def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.vision_tower = CLIPVisionTransformer(config.vision_config, dtype=dtype, param_dtype=param_dtype,
                                              rngs=rngs)
    self.multi_modal_projector = LlavaMultiModalProjector(config, dtype=dtype, param_dtype=param_dtype,
                                                          rngs=rngs)
    self.language_model = Llama(config.text_config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  @classmethod
  def from_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=None, mesh=None) -> "Llava":
    """Loads an HF LLaVA directory (either vision-tower naming, sharded or not) or a converted directory.

    ``param_dtype=None`` keeps the checkpoint dtype (fp16/bf16 stay); ``mesh`` streams every tensor straight
    into its sharding (a 7B/13B model never sits whole on one device).
    """
    return LLAVA_FAMILY.load(path, cls, LlavaConfig, dtype=dtype, param_dtype=param_dtype, mesh=mesh)

  # The decoding loop (decoding.py) drives the language model directly; these mirror its interface.
  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return self.language_model.init_cache(batch, max_len)

  def image_features(self, pixels_ihwc: jax.Array) -> jax.Array:
    """Projected image features (I, N, D) in the compute dtype from normalised NHWC pixels (I, h, w, C).

    Runs the vision encoder only up to the deepest selected layer (layer -2 skips the last layer, whose output
    LLaVA never uses); no post_layernorm (platform.md §4.7).
    """
    cfg = self.config
    vt = self.vision_tower
    vc = cfg.vision_config
    expect = (vc.image_size, vc.image_size, vc.num_channels)
    if pixels_ihwc.ndim != 4 or tuple(pixels_ihwc.shape[1:]) != expect:
      raise ValueError(f"pixel_values must be NHWC (images, {expect[0]}, {expect[1]}, {expect[2]}), got shape "
                       f"{tuple(pixels_ihwc.shape)} (NCHW input? wrong image_size?)")
    n_layers = vc.num_hidden_layers
    wanted = [i % (n_layers + 1) for i in cfg.feature_layers]      # HF index into L + 1 hidden states
    x_ite = vt.pre_layrnorm(vt.embeddings(pixels_ihwc))
    hidden = [x_ite]
    for layer in list(vt.encoder.layers)[:max(wanted)]:
      x_ite = layer(x_ite)
      hidden.append(x_ite)
    feats = select_features(hidden, wanted, cfg.vision_feature_select_strategy)
    return self.multi_modal_projector(feats.astype(self.dtype))

  def embed_inputs(self, input_ids_bt: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:
    """Decoder input embeddings (B, T, D): token embeddings with image features at image-token positions.

    ``pixel_values`` (I, h, w, C): one image per image span, in batch row-major order (rows without image
    tokens take none). None = text only (image-token ids, if any, keep their token embedding).
    """
    cfg = self.config
    image_mask_bt = input_ids_bt == cfg.image_token_index
    # Image-token ids may lie outside the embedding table (vocab grown later); their rows are replaced anyway.
    ids_bt = jnp.where(image_mask_bt, 0, input_ids_bt)
    x_btd = self.language_model.embed(ids_bt)
    if pixel_values is None:
      return x_btd
    _check_image_tokens(input_ids_bt, pixel_values.shape[0], cfg)
    return scatter_image_features(x_btd, image_mask_bt, self.image_features(pixel_values))

  def __call__(self, input_ids_bt: jax.Array, pixel_values: jax.Array | None = None, *,
               attention_mask_bt: jax.Array | None = None, positions_bt: jax.Array | None = None,
               kv_cache: KVCache | None = None, steer_vectors: jax.Array | None = None,
               steer_mask_bt: jax.Array | None = None, steer_alpha: jax.Array | float = 1.0,
               output_hidden_states: bool = False, hidden_positions_bp: jax.Array | None = None,
               hidden_masks_bmt: jax.Array | None = None, logits: str = "all", num_layers: int | None = None):
    """Forward pass: ``embed_inputs`` then the decoder with ``inputs_embeds``.

    Args: ``input_ids_bt`` int (B, T) with image spans already expanded; ``pixel_values`` (I, h, w, C)
      normalised NHWC or None; the rest as :meth:`vlsafe_jax.models.llama.Llama.__call__` (attention mask 1 =
      real token; left or right padding both work for a forward without cache, generation left-pads).
    Returns: ``(logits float32 or None, new KVCache or None, extras)``; see ``Llama.__call__``.
    """
    if input_ids_bt.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids_bt.shape}")
    x_btd = self.embed_inputs(input_ids_bt, pixel_values)
    return self.language_model(
        inputs_embeds_btd=x_btd, attention_mask_bt=attention_mask_bt, positions_bt=positions_bt,
        kv_cache=kv_cache, steer_vectors=steer_vectors, steer_mask_bt=steer_mask_bt, steer_alpha=steer_alpha,
        output_hidden_states=output_hidden_states, hidden_positions_bp=hidden_positions_bp,
        hidden_masks_bmt=hidden_masks_bmt, logits=logits, num_layers=num_layers)


def _check_image_tokens(input_ids_bt, n_images: int, cfg: LlavaConfig) -> None:
  """Fail loudly when concrete ids hold a different number of image tokens than the images provide."""
  try:
    ids = np.asarray(input_ids_bt)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return                            # shapes only under jit: the caller (generate) checked the host arrays
  have = int((ids == cfg.image_token_index).sum())
  want = n_images * cfg.num_image_tokens
  if have != want:
    raise ValueError(f"input_ids contain {have} image tokens (id {cfg.image_token_index}) but {n_images} "
                     f"image(s) x {cfg.num_image_tokens} tokens = {want} are needed; expand every <image> to "
                     f"{cfg.num_image_tokens} ids (vlsafe_jax.data.vlm_prompts) and pass one image per span")


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------

@nnx.jit
def _embed_jit(model: Llava, input_ids_bt, pixel_values):
  decoding.TRACE_COUNTS["llava_embed"] += 1
  return model.embed_inputs(input_ids_bt, pixel_values)


def generate(model: Llava, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 32,
             min_bucket: int = 16, bucket_step: int = 64, steer_prompt_mask=None,
             **kwargs) -> decoding.GenerateOutput:
  """Batched generation for LLaVA prompts (with images, text-only, or mixed in one batch).

  Args:
    model: a :class:`Llava`.
    input_ids: a list of token lists (e.g. ``[p.input_ids for p in prompts]`` from
      :func:`vlsafe_jax.data.vlm_prompts.build_prompt`), or a padded (B, T) array with ``attention_mask``
      (left or right padding). Image spans must already be expanded to N image-token ids.
    pixel_values: (I, h, w, C) normalised NHWC float32 (``data.images.preprocess``), one per image span in batch
      order; None for text-only batches.
    steer_prompt_mask: (B, T) aligned with ``input_ids``; re-padded with the prompts.
    kwargs: :func:`vlsafe_jax.models.decoding.generate` options: ``do_sample``, ``temperature``, ``top_k``,
      ``top_p``, ``seed``, ``eos_token_id``, ``pad_token_id``, ``steer_vectors`` (L, D) / (B, L, D),
      ``steer_alpha``, ``steer_decode``.
  Returns: :class:`vlsafe_jax.models.decoding.GenerateOutput` (tokens (B, max_new_tokens), lengths, first_logits).

  Prompts are re-padded on the left to a length bucket (``decoding.bucket_length``): one embedding program per
  (batch, bucket, images) and one generate program per (batch, bucket, max_new_tokens).
  """
  cfg = model.config
  if isinstance(input_ids, (list, tuple)) and attention_mask is None:
    rows, mask = [list(map(int, r)) for r in input_ids], None
    n = max(len(r) for r in rows)
  else:
    rows = np.asarray(input_ids)
    if rows.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length) or a list of token lists, got shape {rows.shape}")
    mask = np.ones(rows.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != rows.shape:
      raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {rows.shape}")
    n = int(mask.sum(-1).max())
  length = decoding.bucket_length(n, min_bucket=min_bucket, step=bucket_step)
  pad = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
  ids, new_mask = decoding.left_pad(rows, mask, length, pad)
  # Padding must never be read as an image token (it would shift the image-feature order).
  if pad == cfg.image_token_index:
    ids = np.where(new_mask > 0, ids, 0).astype(np.int32)
  n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
  _check_image_tokens(ids, n_images, cfg)
  if steer_prompt_mask is not None:
    if mask is None:
      raise ValueError("steer_prompt_mask needs input_ids as an array with attention_mask")
    steer_prompt_mask, _ = decoding.left_pad(np.asarray(steer_prompt_mask), mask, length, 0)
  pixels = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
  embeds_btd = _embed_jit(model, jnp.asarray(ids), pixels)
  kwargs.setdefault("pad_token_id", pad)
  return decoding.generate(model.language_model, inputs_embeds=embeds_btd, attention_mask=new_mask,
                           max_new_tokens=max_new_tokens, steer_prompt_mask=steer_prompt_mask, **kwargs)


__all__ = ["LlavaConfig", "Llava", "LlavaMultiModalProjector", "generate", "select_features",
           "scatter_image_features", "llava_prefill_flops", "SELECT_STRATEGIES"]
