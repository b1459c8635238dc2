"""Llama / Mistral causal decoder in flax.nnx, numerically matching HF ``LlamaForCausalLM`` / ``MistralForCausalLM``.

Attribute names mirror HF module names (``model.embed_tokens``, ``model.layers.self_attn.{q,k,v,o}_proj``,
``model.layers.{input,post_attention}_layernorm``, ``model.layers.mlp.{gate,up,down}_proj``, ``model.norm``,
``lm_head``) so the declarative converter maps keys cleanly. The decoder layers are **stacked**: one
``LlamaDecoderLayer`` whose parameters carry a leading layer axis (built with ``nnx.vmap``), run with
``jax.lax.scan``. HF ``model.layers.{i}.<sub>.weight`` is therefore row ``i`` of our ``model.layers.<sub>.kernel``
(transposed). Why a scan and not a Python loop: a 32-layer 7B decoder compiles one layer body instead of 32, which
keeps the generate loop's compile time and the AOT 7B test short; per-layer steering vectors and captures ride the
scan as stacked inputs/outputs.

Shape-suffix legend: B batch, T new tokens of this call, S cache slots (keys), D width, F MLP hidden, N query heads,
K key/value heads, H head dim, L decoder layers, V vocab, P captured positions per example, M capture masks.

Dtype policy: parameters in ``param_dtype`` (float32 default, or as loaded); matmuls and the residual stream in
``dtype`` (float32 default, bf16 on accelerators). RMSNorm statistics, RoPE tables and the attention softmax run in
float32; logits are returned in float32.

Positions and padding: batches are **left-padded**. ``attention_mask`` (B, T) marks real tokens; positions default to
``cumsum(mask) - 1`` (plus the number of real tokens already cached), as HF ``generate`` computes them. The KV cache
is preallocated (:class:`KVCache`, layer-major ``(L, B, S, K, H)`` so the layer scan slices it with one dynamic
index); all rows write the same slot ``cache.index``, so left-padded prompts stay right-aligned.

Hooks (no monkey-patching; ``cmrm.md`` §4, ``tga.md`` §4.2), all traced arrays so changing them never recompiles:
* steering: ``steer_vectors`` (L, D) shared or (B, L, D) per example, ``steer_mask_bt`` (B, T) and scalar
  ``steer_alpha``: layer l's residual output becomes ``h + alpha * mask[..., None] * v_l`` *before* it feeds layer
  l+1 (whose K/V are cached), and before the final norm for the last layer;
* captures (returned in ``extras``): every layer's residual output at all positions (``output_hidden_states``),
  gathered at per-example positions (``hidden_positions_bp``), or float32 masked means over token sets
  (``hidden_masks_bmt``) accumulated inside the scan.

Model code never reads files: ``Llama.from_pretrained`` hands ``Llama`` and ``LlamaConfig`` to the generic loader
(``checkpoints_convert.llama.LLAMA_FAMILY``: HF directories; ``vlsafe_jax.model_io``: converted directories).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert.llama import LLAMA_FAMILY
from vlsafe_jax import sharding
from vlsafe_jax.models import attention
from vlsafe_jax.models.config_fields import check_field_types

ROPE_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Decoder hyper-parameters (HF field names; defaults are Llama-2-7B / Vicuna-7B).

  RoPE scaling is flattened into ``rope_*`` fields so the config stays hashable (it is static model structure).
  ``sliding_window=None`` means full causal attention (Llama); Mistral sets an int.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None      # None = num_attention_heads (MHA)
  head_dim: int | None = None                 # None = hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  sliding_window: int | None = None
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  model_type: str = "llama"
  # Rematerialise each decoder layer in the backward pass (training); no effect on inference.
  remat: bool = False
  # "auto": cuDNN flash attention on NVIDIA GPUs when the shapes allow, XLA otherwise (models/attention.py).
  attention_impl: str | None = "auto"

  def __post_init__(self):
    for name in ("num_attention_heads", "num_key_value_heads"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"LlamaConfig: {name} must be a positive integer, got {v!r}")
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"LlamaConfig: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                         f"{self.num_attention_heads} and no head_dim is given")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"LlamaConfig: num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even for rotary embeddings")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"LlamaConfig: rope_type {self.rope_type!r} not supported; expected one of {ROPE_TYPES}")
    if self.hidden_act != "silu":
      raise ValueError(f"LlamaConfig: hidden_act {self.hidden_act!r} not supported (only 'silu')")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"LlamaConfig: sliding_window must be >= 1 or None, got {self.sliding_window}")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    attention.check_impl("LlamaConfig", self.attention_impl)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    return () if e is None else (tuple(e) if isinstance(e, tuple) else (int(e),))

  @classmethod
  def from_hf(cls, hf: Any, *, where: str = "config", **overrides) -> "LlamaConfig":
    """Builds a config from an HF ``LlamaConfig`` / ``MistralConfig`` object or a config.json dict.

    Accepts both RoPE forms (platform.md §4.7): hub files with top-level ``rope_theta`` + ``rope_scaling``
    (``type`` or ``rope_type`` key), and transformers-5 ``rope_parameters``. A LLaVA config's ``text_config``
    must be passed itself (``where="text_config"`` names it in errors). Unknown HF fields are ignored;
    unsupported features and wrong-typed fields raise with the field named.
    """
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
      raise ValueError(f"config model_type {model_type!r} is not a Llama/Mistral decoder config")
    for key in ("attention_bias", "mlp_bias"):
      if d.get(key):
        raise ValueError(f"config field {key}=true is not supported (Llama-2/Vicuna/Mistral have no biases)")
    rope = d.get("rope_parameters")
    if isinstance(rope, Mapping) and "rope_theta" not in rope and any(isinstance(v, Mapping) for v in rope.values()):
      raise ValueError("config rope_parameters is per-layer-type (a dict of dicts); not supported for Llama")
    if not isinstance(rope, Mapping):
      rope = dict(d.get("rope_scaling") or {})
      if "rope_theta" in d and d["rope_theta"] is not None:
        rope["rope_theta"] = d["rope_theta"]
    rope = dict(rope)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"config rope type {rope_type!r} (rope_parameters/rope_scaling) not supported; "
                       f"expected one of {ROPE_TYPES}")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
      raise ValueError("config partial_rotary_factor != 1 is not supported")
    kw: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in d.items():
      if k in names and v is not None and not k.startswith("rope_"):
        kw[k] = v
    if model_type == "llama":
      kw.pop("sliding_window", None)   # Llama configs have no sliding window; ignore stray fields
    elif d.get("use_sliding_window") is False:
      kw.pop("sliding_window", None)
    check_field_types(cls, kw, where)
    kw["model_type"] = model_type
    kw["pad_token_id"] = d.get("pad_token_id")
    kw["rope_type"] = rope_type
    kw["rope_theta"] = float(rope.get("rope_theta", 10000.0))
    if rope_type in ("linear", "llama3"):
      if "factor" not in rope:
        raise ValueError(f"config rope type {rope_type!r} needs a 'factor' field")
      kw["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
      for ours, theirs in (("rope_low_freq_factor", "low_freq_factor"), ("rope_high_freq_factor", "high_freq_factor"),
                           ("rope_original_max_position_embeddings", "original_max_position_embeddings")):
        if theirs not in rope:
          raise ValueError(f"config rope type 'llama3' needs a {theirs!r} field")
        kw[ours] = rope[theirs]
    kw.update(overrides)
    return cls(**kw)


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Rotary inverse frequencies, float32 (H/2,), for the config's rope type (platform.md §4.7).

  default: ``1 / theta^(2i/H)``; linear: divided by ``factor``; llama3: wavelengths ``2*pi/f`` longer than
  ``L0/low_freq_factor`` are divided by ``factor``, shorter than ``L0/high_freq_factor`` kept, and blended with
  ``s = (L0/lambda - low) / (high - low)`` in between. Computed in float32 as HF does (numpy, host side).
  """
  h = cfg.head_dim
  exponent = np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / np.float32(h)
  inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
  if cfg.rope_type == "linear":
    inv = (inv / np.float32(cfg.rope_factor)).astype(np.float32)
  elif cfg.rope_type == "llama3":
    factor = np.float32(cfg.rope_factor)
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    l0 = cfg.rope_original_max_position_embeddings
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    scaled = np.where(wavelen > l0 / low, inv / factor, inv).astype(np.float32)
    smooth = ((l0 / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < l0 / high) & ~(wavelen > l0 / low)
    inv = np.where(medium, blended, scaled).astype(np.float32)
  return inv


def rope_tables(positions_bt: jax.Array, inv_freq_h2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables (B, T, H) float32 for int positions (B, T); halves duplicated (HF rotate-half layout)."""
  freqs_bth2 = positions_bt.astype(jnp.float32)[..., None] * inv_freq_h2.astype(jnp.float32)
  emb_bth = jnp.concatenate([freqs_bth2, freqs_bth2], axis=-1)
  return jnp.cos(emb_bth), jnp.sin(emb_bth)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
  """HF rotary embedding: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]`` (halves, not
  interleaved). x (B, T, heads, H) any float dtype; tables cast to x's dtype (as HF does)."""
  cos = cos_bth[:, :, None, :].astype(x_btnh.dtype)
  sin = sin_bth[:, :, None, :].astype(x_btnh.dtype)
  x1, x2 = jnp.split(x_btnh, 2, axis=-1)
  return x_btnh * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def rms_norm(x: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
  """Llama RMSNorm, HF order: statistics in float32, normalised value cast back to x's dtype, then * scale.

  x (..., D) any float dtype; scale (D,); returns x's dtype.
  """
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale_d.astype(x.dtype) * y.astype(x.dtype)


def attention_mask(q_slots_bt: jax.Array, k_slots_s: jax.Array, key_valid_bs: jax.Array,
                   sliding_window: int | None) -> jax.Array:
  """Boolean attention mask (B, 1, T, S): True where query t may attend key s.

  Causal on cache-slot indices (key slot <= query slot), Mistral's window (``0 <= q - k < window``), padded keys
  hidden. A query always sees its own slot, so padding queries get a finite (ignored) softmax instead of NaN.
  Slot indices equal position differences among real tokens because padding is on the left only.
  """
  q = q_slots_bt[:, :, None]
  k = k_slots_s[None, None, :]
  ok = k <= q
  if sliding_window is not None:
    ok &= (q - k) < sliding_window
  ok &= key_valid_bs[:, None, :].astype(bool)
  ok |= k == q
  return ok[:, None]


def positions_from_mask(mask_bt: jax.Array, offset_b: jax.Array | int = 0) -> jax.Array:
  """HF generate's positions: ``cumsum(mask) - 1`` plus real tokens already cached; padding gets 0. int32 (B, T)."""
  m = mask_bt.astype(jnp.int32)
  pos = jnp.cumsum(m, axis=-1) - 1 + jnp.asarray(offset_b, jnp.int32).reshape(-1, 1)
  return jnp.where(m > 0, pos, 0).astype(jnp.int32)


def llama_param_count(cfg: LlamaConfig, *, include_embeddings: bool = True) -> int:
  """Number of parameters (untied LM head counted once more unless tied)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  n, k = cfg.num_attention_heads, cfg.num_key_value_heads
  per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d
  total = cfg.num_hidden_layers * per_layer + d
  if include_embeddings:
    total += cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
  return total


def llama_prefill_flops(cfg: LlamaConfig, seq_len: int) -> float:
  """Analytic forward FLOPs for one sequence of ``seq_len`` tokens (perf.md: 2/MAC, matmuls + attention
  ``QK^T`` and ``PV`` without causal discount, LM head over every position)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  n, k = cfg.num_attention_heads, cfg.num_key_value_heads
  t = seq_len
  macs = cfg.num_hidden_layers * (t * (d * n * h * 2 + d * k * h * 2 + 3 * d * f) + 2 * t * t * n * h)
  macs += t * d * cfg.vocab_size
  return 2.0 * macs


def llama_decode_bytes(cfg: LlamaConfig, context_len: int, bytes_per_param: int = 2, batch: int = 1) -> float:
  """Bytes read per decode step: every weight once (embedding rows ignored when untied) plus the K/V cache of
  ``context_len`` tokens for ``batch`` rows (perf.md §2: bandwidth, not MFU, for batch-1 decode)."""
  weights = llama_param_count(cfg) - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
  kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context_len * batch
  return float((weights + kv) * bytes_per_param)


# --------------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------------

class KVCache(NamedTuple):
  """Preallocated key/value cache (a pytree; pass it through jit / while_loop carries).

  k, v: (L, B, S, K, H) in the compute dtype, layer-major so the layer scan indexes one axis.
  valid_bs: bool (B, S), slots holding real (non-padding) tokens. index: int32 (), next slot to write (shared by
  all rows: prompts are left-padded). lengths_b: int32 (B,), real tokens cached per row (next position).
  """
  k: jax.Array
  v: jax.Array
  valid_bs: jax.Array
  index: jax.Array
  lengths_b: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """Empty cache for ``batch`` rows and ``max_len`` slots (prompt bucket + new tokens)."""
  shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  # Under a mesh the cache splits like the activations (batch over data/fsdp, KV heads over model); a no-op
  # otherwise. Without it a cache created inside jit would be replicated on every device.
  kv_axes = (None, "batch", "length", "act_heads", None)
  k = sharding.constrain(jnp.zeros(shape, dtype), kv_axes)
  v = sharding.constrain(jnp.zeros(shape, dtype), kv_axes)
  return KVCache(k, v, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

def _linear(d_in, d_out, axes, *, dtype, param_dtype, rngs):
  """Bias-free nnx.Linear with logical sharding on its kernel (in, out)."""
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes), rngs=rngs)


class LlamaRMSNorm(nnx.Module):
  """RMSNorm with HF's weight stored as ``scale`` (D,), see :func:`rms_norm`."""

  def __init__(self, d: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((d,), param_dtype), out_sharding=("norm",))

  def __call__(self, x):
    return rms_norm(x, self.scale.get_value(), self.eps)


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention with RoPE and a (cache or no-cache) slot-indexed mask."""

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, h = cfg.hidden_size, cfg.head_dim
    self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, h
    self.attention_impl = cfg.attention_impl
    self.q_proj = _linear(d, self.n_heads * h, ("embed", "heads"), **kw)
    self.k_proj = _linear(d, self.n_kv * h, ("embed", "kv_heads"), **kw)
    self.v_proj = _linear(d, self.n_kv * h, ("embed", "kv_heads"), **kw)
    self.o_proj = _linear(self.n_heads * h, d, ("heads", "embed"), **kw)

  def project_kv(self, x_btd, cos_bth, sin_bth):
    """Rotated keys and values of the new tokens: (B, T, K, H) each."""
    b, t, _ = x_btd.shape
    k_btkh = apply_rope(self.k_proj(x_btd).reshape(b, t, self.n_kv, self.head_dim), cos_bth, sin_bth)
    v_btkh = self.v_proj(x_btd).reshape(b, t, self.n_kv, self.head_dim)
    return k_btkh, v_btkh

  def attend(self, x_btd, cos_bth, sin_bth, k_bskh, v_bskh, mask_b1ts):
    """Queries from x (B, T, D) against keys/values (B, S, K, H) -> (B, T, D)."""
    b, t, _ = x_btd.shape
    q_btnh = apply_rope(self.q_proj(x_btd).reshape(b, t, self.n_heads, self.head_dim), cos_bth, sin_bth)
    o_btnh = attention.dot_product_attention(
        q_btnh, k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype), mask=mask_b1ts,
        scale=self.head_dim ** -0.5, impl=self.attention_impl, site="llama")
    return self.o_proj(o_btnh.reshape(b, t, self.n_heads * self.head_dim))


class LlamaMLP(nnx.Module):
  """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(d, f, ("embed", "mlp"), **kw)
    self.up_proj = _linear(d, f, ("embed", "mlp"), **kw)
    self.down_proj = _linear(f, d, ("mlp", "embed"), **kw)

  def __call__(self, x_btd):
    return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. Used stacked (leading L axis)."""

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = LlamaAttention(cfg, **kw)
    self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype,
                                                 rngs=rngs)
    self.mlp = LlamaMLP(cfg, **kw)


class LlamaModel(nnx.Module):
  """HF ``LlamaModel``: embed_tokens -> scanned decoder layers -> norm."""

  def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)

    # One layer module with stacked (L, ...) parameters; the inserted axis is unsharded (logical name None).
    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make_layers(r):
      return LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r)

    self.layers = make_layers(rngs)
    self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bt: jax.Array, *,
               kv_cache: KVCache | None = None, steer_vectors=None, steer_mask_bt=None, steer_alpha=1.0,
               output_hidden_states: bool = False, hidden_positions_bp=None, hidden_masks_bmt=None,
               num_layers: int | None = None):
    """Runs the stack on embeddings x (B, T, D). See :meth:`Llama.__call__` for the arguments.

    Returns ``(h_btd normed, new_cache, extras)``.
    """
    cfg = self.config
    b, t, _ = x_btd.shape
    n_layers = cfg.num_hidden_layers if num_layers is None else num_layers
    if not 1 <= n_layers <= cfg.num_hidden_layers:
      raise ValueError(f"num_layers {num_layers} outside [1, {cfg.num_hidden_layers}]")
    # inv_freq is a host-side float32 constant of the config (not state: nothing to convert or shard).
    cos_bth, sin_bth = rope_tables(positions_bt, jnp.asarray(rope_inv_freq(cfg)))
    x_btd = sharding.constrain(x_btd.astype(self.dtype), ("batch", "length", "act_embed"))

    if kv_cache is not None:
      index = kv_cache.index
      valid_bs = jax.lax.dynamic_update_slice(kv_cache.valid_bs, mask_bt.astype(bool), (0, index))
      mask = attention_mask(index + jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.arange(kv_cache.max_len),
                            valid_bs, cfg.sliding_window)
    else:
      mask = attention_mask(jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.arange(t), mask_bt, cfg.sliding_window)

    steer = steer_vectors is not None
    if steer:
      v = jnp.asarray(steer_vectors, jnp.float32)
      if v.ndim == 2 and v.shape == (cfg.num_hidden_layers, cfg.hidden_size):
        v_lxd = v[:, None, :]                                  # (L, 1, D): shared by all rows
      elif v.ndim == 3 and v.shape == (b, cfg.num_hidden_layers, cfg.hidden_size):
        v_lxd = jnp.swapaxes(v, 0, 1)                          # (L, B, D)
      else:
        raise ValueError(f"steer_vectors must be (L, D) = ({cfg.num_hidden_layers}, {cfg.hidden_size}) or "
                         f"(B, L, D) = ({b}, {cfg.num_hidden_layers}, {cfg.hidden_size}), got {v.shape}")
      s_mask = mask_bt if steer_mask_bt is None else steer_mask_bt
      if s_mask.shape != (b, t):
        raise ValueError(f"steer_mask shape {s_mask.shape} != (batch, length) {(b, t)}")
      # alpha * mask folded once (float32); the per-layer add casts to the residual dtype (cmrm.md §4.2).
      s_bt1 = (jnp.asarray(steer_alpha, jnp.float32) * s_mask.astype(jnp.float32))[..., None]
    if hidden_masks_bmt is not None:
      hm = hidden_masks_bmt.astype(jnp.float32)
      hm_denom_bm1 = jnp.maximum(hm.sum(-1, keepdims=True), 1.0)

    graphdef, layer_state = nnx.split(self.layers)
    layer_state = jax.tree.map(lambda a: a[:n_layers], layer_state)
    use_cache = kv_cache is not None

    def body(carry, xs):
      x, ck, cv = carry
      state_l, i, v_xd = xs
      layer = nnx.merge(graphdef, state_l)
      attn = layer.self_attn
      h_btd = layer.input_layernorm(x)
      k_new, v_new = attn.project_kv(h_btd, cos_bth, sin_bth)
      if use_cache:
        # Write only the new tokens into the full cache (in-place DUS on the loop carry), then read this layer.
        ck = jax.lax.dynamic_update_slice(ck, k_new.astype(ck.dtype)[None], (i, 0, index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v_new.astype(cv.dtype)[None], (i, 0, index, 0, 0))
        k_all, v_all = ck[i], cv[i]
      else:
        k_all, v_all = k_new, v_new
      x = x + attn.attend(h_btd, cos_bth, sin_bth, k_all, v_all, mask).astype(x.dtype)
      mlp_btd = layer.mlp(layer.post_attention_layernorm(x)).astype(x.dtype)
      if steer:
        # One expression with the residual add, so XLA emits a single elementwise fusion for both (the steering
        # add then costs no extra pass over the residual stream: bench cmrm's <= 3% overhead budget).
        x = x + (mlp_btd + (s_bt1 * v_xd[:, None, :]).astype(x.dtype))
      else:
        x = x + mlp_btd
      x = sharding.constrain(x, ("batch", "length", "act_embed"))
      ys = {}
      if output_hidden_states:
        ys["hidden"] = x
      if hidden_positions_bp is not None:
        ys["at_positions"] = jnp.take_along_axis(x, hidden_positions_bp[..., None].astype(jnp.int32), axis=1)
      if hidden_masks_bmt is not None:
        ys["masked_means"] = jnp.einsum("bmt,btd->bmd", hm, x.astype(jnp.float32)) / hm_denom_bm1
      return (x, ck, cv), ys

    if cfg.remat:
      body = jax.checkpoint(body)
    dummy = jnp.zeros((), x_btd.dtype)
    ck0 = kv_cache.k if use_cache else dummy
    cv0 = kv_cache.v if use_cache else dummy
    v_xs = v_lxd[:n_layers] if steer else jnp.zeros((n_layers, 1, 1), jnp.float32)
    (h_btd, ck, cv), ys = jax.lax.scan(body, (x_btd, ck0, cv0),
                                       (layer_state, jnp.arange(n_layers, dtype=jnp.int32), v_xs))
    extras: dict[str, Any] = {}
    if output_hidden_states:
      # HF convention: index 0 = embeddings, index i = output of layer i (pre-final-norm).
      extras["hidden_states"] = jnp.concatenate([x_btd[None], ys["hidden"]], axis=0)
    if hidden_positions_bp is not None:
      extras["hidden_at_positions"] = jnp.swapaxes(ys["at_positions"], 0, 1)       # (B, L, P, D)
    if hidden_masks_bmt is not None:
      extras["hidden_masked_means"] = jnp.swapaxes(ys["masked_means"], 0, 1)       # (B, L, M, D) float32
    new_cache = None
    if use_cache:
      new_cache = KVCache(ck, cv, valid_bs, index + t, kv_cache.lengths_b + mask_bt.astype(jnp.int32).sum(-1))
    if n_layers < cfg.num_hidden_layers:
      return h_btd, new_cache, extras          # truncated stack: no final norm (TGA reference pass)
    return self.norm(h_btd), new_cache, extras


class Llama(nnx.Module):
  """HF ``LlamaForCausalLM`` / ``MistralForCausalLM``: ``model`` + ``lm_head`` (absent when tied)."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  @classmethod
  def from_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=None, mesh=None) -> "Llama":
    """Loads an HF Llama/Mistral causal-LM directory (config.json + safetensors, sharded or not)."""
    return LLAMA_FAMILY.load(path, cls, LlamaConfig, dtype=dtype, param_dtype=param_dtype, mesh=mesh)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return init_cache(self.config, batch, max_len, self.dtype)

  def embed(self, input_ids_bt: jax.Array) -> jax.Array:
    """Token embeddings (B, T, D) in the compute dtype."""
    return self.model.embed_tokens(input_ids_bt)

  def logits_from_hidden(self, h_btd: jax.Array) -> jax.Array:
    """LM head (tied: embedding transpose) -> float32 logits (B, T, V)."""
    if self.config.tie_word_embeddings:
      out = self.model.embed_tokens.attend(h_btd)
    else:
      out = self.lm_head(h_btd)
    return out.astype(jnp.float32)

  def __call__(self, input_ids_bt: jax.Array | None = None, *, inputs_embeds_btd: jax.Array | None = None,
               positions_bt: jax.Array | None = None, attention_mask_bt: jax.Array | None = None,
               kv_cache: KVCache | None = None, steer_vectors: jax.Array | None = None,
               steer_mask_bt: jax.Array | None = None, steer_alpha: jax.Array | float = 1.0,
               output_hidden_states: bool = False, hidden_positions_bp: jax.Array | None = None,
               hidden_masks_bmt: jax.Array | None = None, logits: str = "all", num_layers: int | None = None):
    """Forward pass.

    Args:
      input_ids_bt: int (B, T), or ``inputs_embeds_btd`` (B, T, D) (LLaVA splices image features there).
      positions_bt: int (B, T) RoPE positions; default from the mask (see module docstring).
      attention_mask_bt: (B, T) 1 = real token, 0 = left padding; default all ones.
      kv_cache: a :class:`KVCache`; the new tokens are written at ``cache.index`` and attend to every valid
        cached slot. Without a cache the call attends within itself (plain causal forward).
      steer_vectors: (L, D) or (B, L, D) additive per-layer vectors (float32, cast at the add).
      steer_mask_bt: (B, T) where to add them (default: the attention mask). ``steer_alpha``: scalar.
      output_hidden_states: return ``extras['hidden_states']`` (L+1, B, T, D): embeddings then each layer.
      hidden_positions_bp: int (B, P) indices into this call's T tokens -> ``extras['hidden_at_positions']``
        (B, L, P, D) (e.g. the last prompt token, ``T - 1`` under left padding).
      hidden_masks_bmt: (B, M, T) 0/1 -> ``extras['hidden_masked_means']`` (B, L, M, D) float32 means.
      logits: ``"all"`` (B, T, V), ``"last"`` (B, V) at the last position (left padding puts every row's last
        real token there), or ``"none"``.
      num_layers: run only the first ``num_layers`` layers (no final norm, no logits; static).

    Returns:
      ``(logits float32 or None, new KVCache or None, extras dict)``; extras also holds ``last_hidden_state``
      (B, T, D), the final-norm output (or the truncated stack's output).
    """
    cfg = self.config
    if (input_ids_bt is None) == (inputs_embeds_btd is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids_bt is not None:
      if input_ids_bt.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids_bt.shape}")
      x_btd = self.embed(input_ids_bt)
    else:
      if inputs_embeds_btd.ndim != 3 or inputs_embeds_btd.shape[-1] != cfg.hidden_size:
        raise ValueError(f"inputs_embeds must be (batch, length, {cfg.hidden_size}), got "
                         f"{inputs_embeds_btd.shape}")
      x_btd = inputs_embeds_btd
    b, t = x_btd.shape[:2]
    mask_bt = jnp.ones((b, t), jnp.int32) if attention_mask_bt is None else attention_mask_bt
    if mask_bt.shape != (b, t):
      raise ValueError(f"attention_mask shape {mask_bt.shape} != (batch, length) {(b, t)}")
    if kv_cache is not None and kv_cache.k.shape[1] != b:
      raise ValueError(f"kv_cache batch {kv_cache.k.shape[1]} != input batch {b}")
    if positions_bt is None:
      positions_bt = positions_from_mask(mask_bt, 0 if kv_cache is None else kv_cache.lengths_b)
    if logits not in ("all", "last", "none"):
      raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    h_btd, new_cache, extras = self.model(
        x_btd, positions_bt, mask_bt, kv_cache=kv_cache, steer_vectors=steer_vectors,
        steer_mask_bt=steer_mask_bt, steer_alpha=steer_alpha, output_hidden_states=output_hidden_states,
        hidden_positions_bp=hidden_positions_bp, hidden_masks_bmt=hidden_masks_bmt, num_layers=num_layers)
    extras["last_hidden_state"] = h_btd
    truncated = num_layers is not None and num_layers < cfg.num_hidden_layers
    if logits == "none" or truncated:
      return None, new_cache, extras
    if logits == "last":
      return self.logits_from_hidden(h_btd[:, -1]), new_cache, extras
    return self.logits_from_hidden(h_btd), new_cache, extras


__all__ = [
    "LlamaConfig", "Llama", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm",
    "KVCache", "init_cache", "rope_inv_freq", "rope_tables", "apply_rope", "rms_norm", "attention_mask",
    "positions_from_mask", "llama_param_count", "llama_prefill_flops", "llama_decode_bytes", "ROPE_TYPES",
]
