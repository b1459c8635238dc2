"""CLIP (text + vision towers) in flax.nnx, numerically matching HF ``transformers.CLIPModel``.

Attribute paths mirror HF module names, so nnx state paths read like HF keys with Flax leaf names
(``('vision_model', 'encoder', 'layers', 3, 'mlp', 'fc2', 'kernel')`` <-> HF
``vision_model.encoder.layers.3.mlp.fc2.weight``); the converter (``checkpoints_convert``) and LoRA rely on it.
Every sub-layer is called through its ``__call__``, so LoRA may swap an ``nnx.Linear`` / ``nnx.Conv``
attribute for a module with the same call signature.

Shape-suffix legend: B batch, T tokens (text length or 1 + patches), D width, F MLP hidden, N heads,
H head dim, P projection dim, V vocab, p patch size, C channels, h/w image height/width.

Dtype policy: parameters live in ``param_dtype`` (float32 by default, or as loaded); matmuls run in ``dtype``
(float32 by default, bf16 on accelerators). LayerNorm statistics are computed in float32 by flax whatever the
compute dtype, and the attention softmax runs in float32 inside ``jax.nn.dot_product_attention``. ``encode_*``
return float32 embeddings.

Optional outputs (no monkey-patching): ``output_hidden_states=True`` returns every layer's hidden states in HF's
convention (index 0 = embeddings output, after ``pre_layrnorm`` for vision; index i = output of layer i) and
``capture=("mlp.fc2", "self_attn.out_proj", ...)`` returns the *inputs* of those Linear layers in every layer,
keyed by HF-style names like ``'vision_model.encoder.layers.3.mlp.fc2'`` -> (B, T, d_in). Both come back in a
plain dict, which composes with ``jax.jit`` / ``nnx.jit`` (no mutable collections involved).

Model code never reads files: ``CLIP.from_pretrained`` hands ``CLIP`` and ``CLIPConfig`` to the generic loader
(``checkpoints_convert.clip.CLIP_FAMILY``: HF directories; ``vlsafe_jax.model_io``: converted directories).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from checkpoints_convert.clip import CLIP_FAMILY
from vlsafe_jax.models import attention
from vlsafe_jax.models.config_fields import check_field_types

# Names of the Linear layers inside one encoder layer whose inputs can be captured.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "mlp.fc1", "mlp.fc2")


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Text tower hyper-parameters (HF ``CLIPTextConfig`` field names; defaults are HF's)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  # "auto": cuDNN flash attention on NVIDIA GPUs when the shapes allow, XLA otherwise (models/attention.py).
  attention_impl: str | None = "auto"

  def __post_init__(self):
    _check_heads("text_config", self.hidden_size, self.num_attention_heads)
    _check_act("text_config", self.hidden_act)
    attention.check_impl("text_config", self.attention_impl)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Vision tower hyper-parameters (HF ``CLIPVisionConfig`` field names; defaults are HF's)."""
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  attention_impl: str | None = "auto"

  def __post_init__(self):
    _check_heads("vision_config", self.hidden_size, self.num_attention_heads)
    _check_act("vision_config", self.hidden_act)
    attention.check_impl("vision_config", self.attention_impl)
    if self.image_size % self.patch_size:
      raise ValueError(f"vision_config: image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Two-tower CLIP. Either tower may be None (single-tower HF files such as
  ``CLIPVisionModelWithProjection``); ``projection_dim`` is the shared embedding width P."""
  text_config: CLIPTextConfig | None = dataclasses.field(default_factory=CLIPTextConfig)
  vision_config: CLIPVisionConfig | None = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf(cls, hf: Any) -> "CLIPConfig":
    """Builds a config from an HF ``CLIPConfig`` / ``CLIP{Text,Vision}Config`` object or a config.json dict.

    Single-tower configs (``model_type`` ``clip_text_model`` / ``clip_vision_model``) give a CLIPConfig with
    the other tower set to None. Unknown HF fields are ignored (HF configs carry many generic ones).
    """
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    model_type = d.get("model_type", "clip")
    if model_type == "clip_text_model":
      t = _sub_config(CLIPTextConfig, d, "config")
      return cls(text_config=t, vision_config=None, projection_dim=t.projection_dim)
    if model_type == "clip_vision_model":
      v = _sub_config(CLIPVisionConfig, d, "config")
      return cls(text_config=None, vision_config=v, projection_dim=v.projection_dim)
    if model_type != "clip":
      raise ValueError(f"config model_type {model_type!r} is not a CLIP config (expected 'clip', "
                       f"'clip_text_model' or 'clip_vision_model')")
    check_field_types(cls, d, "config")
    proj = int(d.get("projection_dim", 512))
    # Very old config.json files carry "*_config_dict" instead of "*_config".
    t = _sub_config(CLIPTextConfig, d.get("text_config") or d.get("text_config_dict") or {}, "text_config")
    v = _sub_config(CLIPVisionConfig, d.get("vision_config") or d.get("vision_config_dict") or {}, "vision_config")
    return cls(text_config=t, vision_config=v, projection_dim=proj,
               logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)))

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that ``transformers`` loads (``CLIPModel`` or the single-tower class)."""
    def tower(c, model_type):
      out = {k: v for k, v in dataclasses.asdict(c).items() if k != "attention_impl"}
      out["model_type"] = model_type
      return out
    if self.vision_config is None:
      out = tower(self.text_config, "clip_text_model")
      out.update(projection_dim=self.projection_dim, architectures=["CLIPTextModelWithProjection"])
      return out
    if self.text_config is None:
      out = tower(self.vision_config, "clip_vision_model")
      out.update(projection_dim=self.projection_dim, architectures=["CLIPVisionModelWithProjection"])
      return out
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
        "logit_scale_init_value": self.logit_scale_init_value,
        "text_config": tower(self.text_config, "clip_text_model"),
        "vision_config": tower(self.vision_config, "clip_vision_model"),
    }


def _check_heads(where: str, hidden: int, heads: int) -> None:
  if not isinstance(heads, int) or heads < 1:
    raise ValueError(f"{where}: num_attention_heads must be a positive integer, got {heads!r}")
  if hidden % heads:
    raise ValueError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")


def _check_act(where: str, act: str) -> None:
  if act not in _ACTIVATIONS:
    raise ValueError(f"{where}: hidden_act {act!r} not supported; expected one of {sorted(_ACTIVATIONS)}")


def _sub_config(cls, d: Mapping[str, Any], where: str):
  if not isinstance(d, Mapping):
    raise ValueError(f"{where} must be a JSON object (field -> value), got {type(d).__name__}: {d!r:.60}")
  names = {f.name for f in dataclasses.fields(cls)}
  kw = {k: v for k, v in d.items() if k in names and v is not None}
  check_field_types(cls, kw, where)
  return cls(**kw)


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------

def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``; any shape/dtype."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact erf GELU (HF ``"gelu"``); jax.nn.gelu defaults to the tanh approximation, which HF does not use."""
  return jax.nn.gelu(x, approximate=False)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact,
                "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
                "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def text_pool_index(input_ids_bt: jax.Array, eos_token_id: int) -> jax.Array:
  """Token index that HF's CLIP text tower pools at, per row: int32 (B,).

  HF rule (platform.md §4.7): if ``eos_token_id == 2`` (legacy configs such as openai/clip-vit-large-patch14)
  pool at ``argmax(input_ids)`` - the first maximum, which is the EOT token 49407; otherwise at the first
  position whose id equals ``eos_token_id`` (position 0 when a row has none, like torch's argmax).
  """
  if eos_token_id == 2:
    return jnp.argmax(input_ids_bt, axis=-1).astype(jnp.int32)
  return jnp.argmax((input_ids_bt == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


def clip_image_flops(cfg: CLIPVisionConfig, projection_dim: int | None = None) -> float:
  """Analytic forward FLOPs of one image through the vision tower (+ projection).

  perf.md convention: 2 FLOP per MAC; patch-embedding conv, q/k/v/out, MLP, attention scores and weighted sum,
  projection; norms/softmax/activations ignored. ViT-L/14@224 gives 162.0 GFLOP (open_clip: 162.03).
  """
  d, f, t, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_positions, cfg.num_hidden_layers
  macs = cfg.num_patches * cfg.num_channels * cfg.patch_size ** 2 * d
  macs += n_layers * (t * (4 * d * d + 2 * d * f) + 2 * t * t * d)
  macs += d * (projection_dim if projection_dim is not None else cfg.projection_dim)
  return 2.0 * macs


def clip_text_flops(cfg: CLIPTextConfig, seq_len: int | None = None,
                    projection_dim: int | None = None) -> float:
  """Analytic forward FLOPs of one text of ``seq_len`` tokens (default: max positions) through the text tower.

  Same convention as :func:`clip_image_flops` (the embedding lookup costs no FLOPs; no causal discount).
  L/14 text at 77 tokens gives 13.3 GFLOP (open_clip: 13.3).
  """
  d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  t = seq_len or cfg.max_position_embeddings
  macs = n_layers * (t * (4 * d * d + 2 * d * f) + 2 * t * t * d)
  macs += d * (projection_dim if projection_dim is not None else cfg.projection_dim)
  return 2.0 * macs


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

def _linear(d_in, d_out, axes, *, use_bias=True, dtype, param_dtype, rngs):
  """nnx.Linear with logical sharding on kernel (in, out) and bias (out,)."""
  return nnx.Linear(
      d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)


def _layer_norm(d, eps, *, param_dtype, rngs):
  # dtype=float32: LayerNorm output (and its statistics) in float32; the next Linear casts to compute dtype.
  return nnx.LayerNorm(
      d, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with separate biased q/k/v/out projections (HF ``CLIPAttention``)."""

  def __init__(self, d: int, n_heads: int, *, attention_impl: str | None, dtype, param_dtype, rngs,
               site: str = "clip"):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.n_heads = n_heads
    self.attention_impl = attention_impl
    self.site = site
    self.q_proj = _linear(d, d, ("embed", "heads"), **kw)
    self.k_proj = _linear(d, d, ("embed", "heads"), **kw)
    self.v_proj = _linear(d, d, ("embed", "heads"), **kw)
    self.out_proj = _linear(d, d, ("heads", "embed"), **kw)

  def __call__(self, x_btd: jax.Array, *, causal: bool, key_mask_bt: jax.Array | None,
               captured: dict[str, jax.Array] | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D). ``key_mask_bt`` (bool/int, 1 = attend) masks padded keys.

    ``captured`` (a dict, filled in place when given) receives the inputs of the four projections under
    their local names (``'self_attn.out_proj'`` = merged head outputs, (B, T, D)).
    """
    b, t, d = x_btd.shape
    h = d // self.n_heads
    if captured is not None:
      for name in ("q_proj", "k_proj", "v_proj"):
        captured[f"self_attn.{name}"] = x_btd
    q_btnh = self.q_proj(x_btd).reshape(b, t, self.n_heads, h)
    k_btnh = self.k_proj(x_btd).reshape(b, t, self.n_heads, h)
    v_btnh = self.v_proj(x_btd).reshape(b, t, self.n_heads, h)
    mask = None
    if key_mask_bt is not None:
      mask = key_mask_bt.astype(bool)[:, None, None, :]        # (B, 1, 1, S): broadcast over heads and queries
    o_btnh = attention.dot_product_attention(q_btnh, k_btnh, v_btnh, mask=mask, scale=h ** -0.5, is_causal=causal,
                                             impl=self.attention_impl, site=self.site)
    o_btd = o_btnh.reshape(b, t, d)
    if captured is not None:
      captured["self_attn.out_proj"] = o_btd
    return self.out_proj(o_btd)


class CLIPMLP(nnx.Module):
  """fc1 -> activation -> fc2 (HF ``CLIPMLP``)."""

  def __init__(self, d: int, f: int, act: str, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act
    self.fc1 = _linear(d, f, ("embed", "mlp"), **kw)
    self.fc2 = _linear(f, d, ("mlp", "embed"), **kw)

  def __call__(self, x_btd, captured=None):
    if captured is not None:
      captured["mlp.fc1"] = x_btd
    a_btf = _ACTIVATIONS[self.act](self.fc1(x_btd))
    if captured is not None:
      captured["mlp.fc2"] = a_btf                               # UWM scores this (post-activation hidden)
    return self.fc2(a_btf)


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN block: x + attn(LN1(x)); x + mlp(LN2(x))."""

  def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, *, dtype, param_dtype, rngs):
    d = cfg.hidden_size
    self.layer_norm1 = _layer_norm(d, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = CLIPAttention(d, cfg.num_attention_heads, attention_impl=cfg.attention_impl,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                   site="clip.text" if isinstance(cfg, CLIPTextConfig) else "clip.vision")
    self.layer_norm2 = _layer_norm(d, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)

  def __call__(self, x_btd, *, causal=False, key_mask_bt=None, captured=None):
    h_btd = self.self_attn(self.layer_norm1(x_btd), causal=causal, key_mask_bt=key_mask_bt, captured=captured)
    x_btd = x_btd + h_btd.astype(x_btd.dtype)
    return x_btd + self.mlp(self.layer_norm2(x_btd), captured=captured).astype(x_btd.dtype)


class CLIPEncoder(nnx.Module):
  """Stack of ``CLIPEncoderLayer`` in ``self.layers`` (an nnx.List, so paths read ``encoder.layers.i``)."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x_btd, *, prefix: str, causal=False, key_mask_bt=None, output_hidden_states=False,
               capture: Sequence[str] = ()):
    """Returns (last hidden (B, T, D), hidden-states tuple or None, captured dict)."""
    hidden = [x_btd] if output_hidden_states else None
    captured_all: dict[str, jax.Array] = {}
    for i, layer in enumerate(self.layers):
      local: dict[str, jax.Array] | None = {} if capture else None
      x_btd = layer(x_btd, causal=causal, key_mask_bt=key_mask_bt, captured=local)
      if capture:
        for name in capture:
          captured_all[f"{prefix}.encoder.layers.{i}.{name}"] = local[name]
      if output_hidden_states:
        hidden.append(x_btd)
    return x_btd, (tuple(hidden) if output_hidden_states else None), captured_all


def _check_capture(capture: Sequence[str]) -> tuple[str, ...]:
  capture = (capture,) if isinstance(capture, str) else tuple(capture)
  bad = [c for c in capture if c not in LAYER_LINEARS]
  if bad:
    raise ValueError(f"capture names {bad} unknown; expected layer-local Linear names from {LAYER_LINEARS}")
  return capture


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                     embedding_init=nnx.with_partitioning(init, ("vocab", "embed")), rngs=rngs)
    self.position_embedding = nnx.Embed(
        cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(init, ("positions", "embed")), rngs=rngs)

  def __call__(self, input_ids_bt):
    t = input_ids_bt.shape[1]
    return self.token_embedding(input_ids_bt) + self.position_embedding(jnp.arange(t)[None, :])


class CLIPTextTransformer(nnx.Module):
  """HF ``CLIPTextTransformer``: embeddings -> causal encoder -> final_layer_norm -> pooled EOT token."""

  def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = CLIPEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype,
                                        rngs=rngs)

  def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None, *,
               output_hidden_states: bool = False, capture: Sequence[str] = ()) -> dict[str, Any]:
    """Args: input_ids (B, T) int, T <= max_position_embeddings; attention_mask (B, T) 1 = real token.

    Returns a dict: ``last_hidden_state`` (B, T, D) after final_layer_norm, ``pooler_output`` (B, D) float32,
    ``hidden_states`` (tuple of L+1 (B, T, D), only when asked) and captured Linear inputs keyed
    ``'text_model.encoder.layers.{i}.{name}'``.
    """
    cfg = self.config
    if input_ids_bt.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids_bt.shape}")
    if input_ids_bt.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"input_ids length {input_ids_bt.shape[1]} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    if attention_mask_bt is not None and attention_mask_bt.shape != input_ids_bt.shape:
      raise ValueError(f"attention_mask shape {attention_mask_bt.shape} != input_ids shape "
                       f"{input_ids_bt.shape}")
    capture = _check_capture(capture)
    x_btd = self.embeddings(input_ids_bt)
    x_btd, hidden, captured = self.encoder(
        x_btd, prefix="text_model", causal=True, key_mask_bt=attention_mask_bt,
        output_hidden_states=output_hidden_states, capture=capture)
    x_btd = self.final_layer_norm(x_btd)
    idx_b = text_pool_index(input_ids_bt, cfg.eos_token_id)
    pooled_bd = jnp.take_along_axis(x_btd, idx_b[:, None, None], axis=1)[:, 0]
    out = {"last_hidden_state": x_btd, "pooler_output": pooled_bd.astype(jnp.float32), **captured}
    if hidden is not None:
      out["hidden_states"] = hidden
    return out


class CLIPVisionEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    d, p = cfg.hidden_size, cfg.patch_size
    self.dtype = dtype
    self.class_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (d,), param_dtype), out_sharding=("embed",))
    self.patch_embedding = nnx.Conv(
        cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
        dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                          ("conv_hw", "conv_hw", "conv_in", "embed")), rngs=rngs)
    self.position_embedding = nnx.Embed(
        cfg.num_positions, d, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("positions", "embed")),
        rngs=rngs)

  def __call__(self, pixels_bhwc):
    b = pixels_bhwc.shape[0]
    patches_bhwd = self.patch_embedding(pixels_bhwc.astype(self.dtype))
    x_bnd = patches_bhwd.reshape(b, -1, patches_bhwd.shape[-1])      # row-major (h, w) = HF's flatten(2)
    cls_b1d = jnp.broadcast_to(self.class_embedding.get_value().astype(x_bnd.dtype), (b, 1, x_bnd.shape[-1]))
    x_btd = jnp.concatenate([cls_b1d, x_bnd], axis=1)
    return x_btd + self.position_embedding(jnp.arange(x_btd.shape[1])[None, :])


class CLIPVisionTransformer(nnx.Module):
  """HF ``CLIPVisionTransformer``: patches + CLS + positions -> pre_layrnorm -> encoder -> post_layernorm(CLS).

  Standalone (LLaVA uses it with ``output_hidden_states=True`` and reads ``hidden_states[-2]``).
  """

  def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pre_layrnorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.encoder = CLIPEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_layernorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype,
                                      rngs=rngs)

  def __call__(self, pixels_bhwc: jax.Array, *, output_hidden_states: bool = False,
               capture: Sequence[str] = ()) -> dict[str, Any]:
    """Args: pixels (B, h, w, C) normalised NHWC, h = w = image_size.

    Returns a dict: ``last_hidden_state`` (B, T, D) encoder output (no post_layernorm), ``pooler_output``
    (B, D) float32 = post_layernorm(CLS), ``hidden_states`` (tuple of L+1, index 0 after pre_layrnorm; only
    when asked) and captured Linear inputs keyed ``'vision_model.encoder.layers.{i}.{name}'``.
    """
    cfg = self.config
    expect = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixels_bhwc.ndim != 4 or tuple(pixels_bhwc.shape[1:]) != expect:
      raise ValueError(f"pixels must be NHWC (batch, {expect[0]}, {expect[1]}, {expect[2]}), got shape "
                       f"{tuple(pixels_bhwc.shape)} (NCHW input? wrong image_size?)")
    capture = _check_capture(capture)
    x_btd = self.pre_layrnorm(self.embeddings(pixels_bhwc))
    x_btd, hidden, captured = self.encoder(
        x_btd, prefix="vision_model", output_hidden_states=output_hidden_states, capture=capture)
    pooled_bd = self.post_layernorm(x_btd[:, 0])
    out = {"last_hidden_state": x_btd, "pooler_output": pooled_bd.astype(jnp.float32), **captured}
    if hidden is not None:
      out["hidden_states"] = hidden
    return out


class CLIP(nnx.Module):
  """Two-tower CLIP (HF ``CLIPModel``); either tower may be absent for single-tower checkpoints."""

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    p = config.projection_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.text_config is not None:
      self.text_model = CLIPTextTransformer(config.text_config, **kw)
      self.text_projection = _linear(config.text_config.hidden_size, p, ("embed", None), use_bias=False, **kw)
    if config.vision_config is not None:
      self.vision_model = CLIPVisionTransformer(config.vision_config, **kw)
      self.visual_projection = _linear(config.vision_config.hidden_size, p, ("embed", None), use_bias=False,
                                       **kw)
    if config.text_config is not None and config.vision_config is not None:
      # Single-tower HF files carry no logit_scale; the two-tower model always does.
      self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

  @classmethod
  def from_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=None, mesh=None) -> "CLIP":
    """Loads an HF CLIP directory (config.json + safetensors / sharded safetensors / pytorch_model.bin) or a
    directory written by ``python -m checkpoints_convert clip``. ``param_dtype=None`` keeps the file's dtype.
    With ``mesh``, parameters are placed tensor by tensor with the logical sharding table."""
    return CLIP_FAMILY.load(path, cls, CLIPConfig, dtype=dtype, param_dtype=param_dtype, mesh=mesh)

  def _require(self, tower: str):
    if not hasattr(self, tower):
      raise ValueError(f"this CLIP has no {tower} (loaded from a single-tower checkpoint)")

  def encode_image(self, pixels_bhwc: jax.Array, *, output_hidden_states: bool = False,
                   capture: Sequence[str] = (), return_intermediates: bool = False):
    """Image embeddings (B, P) float32, un-normalised (HF ``image_embeds`` before L2 normalisation).

    With ``return_intermediates`` (implied by ``output_hidden_states`` or a non-empty ``capture``) returns
    ``(embeds, out)`` where ``out`` is the vision tower's dict (see :class:`CLIPVisionTransformer`).
    """
    self._require("vision_model")
    out = self.vision_model(pixels_bhwc, output_hidden_states=output_hidden_states, capture=capture)
    emb_bp = self.visual_projection(out["pooler_output"]).astype(jnp.float32)
    if return_intermediates or output_hidden_states or capture:
      return emb_bp, out
    return emb_bp

  def encode_text(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None, *,
                  output_hidden_states: bool = False, capture: Sequence[str] = (),
                  return_intermediates: bool = False):
    """Text embeddings (B, P) float32, un-normalised (HF ``text_embeds``); same extras as encode_image."""
    self._require("text_model")
    out = self.text_model(input_ids_bt, attention_mask_bt, output_hidden_states=output_hidden_states,
                          capture=capture)
    emb_bp = self.text_projection(out["pooler_output"]).astype(jnp.float32)
    if return_intermediates or output_hidden_states or capture:
      return emb_bp, out
    return emb_bp

  def __call__(self, pixels_bhwc, input_ids_bt, attention_mask_bt=None):
    """HF-style logits: (logits_per_image (Bi, Bt), logits_per_text (Bt, Bi)) = exp(logit_scale) * cosine."""
    img = self.encode_image(pixels_bhwc)
    txt = self.encode_text(input_ids_bt, attention_mask_bt)
    logits_it = clip_logits(img, txt, self.logit_scale.get_value())
    return logits_it, logits_it.T


def clip_logits(image_embeds_ip: jax.Array, text_embeds_tp: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """exp(logit_scale) * cos(image, text): (I, P), (T, P), () -> (I, T) float32."""
  img = image_embeds_ip.astype(jnp.float32)
  txt = text_embeds_tp.astype(jnp.float32)
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  return jnp.exp(logit_scale.astype(jnp.float32)) * img @ txt.T


__all__ = [
    "CLIPTextConfig", "CLIPVisionConfig", "CLIPConfig", "CLIP", "CLIPTextTransformer", "CLIPVisionTransformer",
    "CLIPEncoderLayer", "CLIPAttention", "CLIPMLP", "quick_gelu", "gelu_exact", "text_pool_index",
    "clip_image_flops", "clip_text_flops", "clip_logits", "LAYER_LINEARS",
]
