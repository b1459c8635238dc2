"""LoRA for flax.nnx with PEFT 0.4 semantics (HySAC, ``hysac.md`` §4.2).

A LoRA site computes ``y = base(x) + scaling * B(A(dropout(x)))`` with ``scaling = alpha / rank``, dropout on the
adapter input only and only in train mode (each site draws its own key from its own forked rng stream and
builds its Bernoulli keep-mask with the counter-based hash of :func:`dropout_mask`, not
``jax.random.bernoulli``: see there for why),
``A`` initialised like PyTorch's ``nn.Linear`` default (U(+-1/sqrt(fan_in))) and ``B`` zeros, so a freshly
applied adapter is a no-op. ``nnx.LoRA`` / ``nnx.LoRALinear`` have neither the scaling nor the dropout, hence
this module.

Parameter paths (a deliberate choice): :class:`LoRALinear` / :class:`LoRAConv` *subclass* ``nnx.Linear`` /
``nnx.Conv`` and take over the base layer's own ``kernel`` / ``bias`` Variables, so the base weights stay at
their original paths (``vision_model.encoder.layers.3.self_attn.k_proj.kernel``) and only ``lora_a`` /
``lora_b`` (type ``nnx.LoRAParam``) are added next to them. Base-only checkpoints, the HF key table of
``checkpoints_convert`` and base-param filters therefore work unchanged on a LoRA-wrapped model, and
:func:`merge_lora` turns every site back into a plain ``nnx.Linear`` / ``nnx.Conv`` at the same path.

Filters: ``nnx.LoRAParam`` subclasses ``nnx.Param``, so a plain ``nnx.Param`` filter includes the adapters.
Use :data:`TRAINABLE` (= ``nnx.LoRAParam``) for the optimizer and :data:`BASE_PARAMS`
(= ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))``) for the frozen weights.

Layouts: Linear ``A`` is (d_in, r), ``B`` (r, d_out) (Flax (in, out) convention). The patch-embedding conv
(kernel == stride, 'VALID') is LoRA'd as patchify + two dense matmuls: ``A`` ((p_h * p_w * C), r) flattened in
the (h, w, c) order of the HWIO kernel, ``B`` (r, O); this equals PEFT's Conv(C->r, k=p, s=p) followed by a
1x1 Conv(r->O).

Shape-suffix legend: i input features, o output features, r rank, b batch (any leading dims), h/w patch grid,
p patch pixels (p_h * p_w * C).

File I/O (:func:`save_lora`, :func:`load_lora`) is ``vlsafe_jax.model_io``'s and PEFT naming (:func:`import_peft`,
:func:`export_peft`) ``checkpoints_convert.peft``'s; the functions here only hand them the model's LoRA sites.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert import peft
from vlsafe_jax import model_io

# HySAC's targets (no q_proj), applied to both towers; patch_embedding exists only in the vision tower.
DEFAULT_TARGETS: tuple[str, ...] = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")

TRAINABLE = nnx.LoRAParam
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------

def lora_delta(x_bi: jax.Array, a_ir: jax.Array, b_ro: jax.Array, scaling: float, *,
               dtype: Any = None, precision: Any = None) -> jax.Array:
  """The adapter term ``scaling * (x @ A) @ B``.

  Args:
    x_bi: (..., i) adapter input (already dropped out).
    a_ir: (i, r) down projection.
    b_ro: (r, o) up projection.
    scaling: ``alpha / rank`` (PEFT's ``lora_alpha / r``).
    dtype: compute dtype; None = the promoted dtype of the inputs.
    precision: matmul precision (None = JAX default).

  Returns:
    (..., o) in the compute dtype. Going through the rank bottleneck (two thin matmuls) costs
    O(r (i + o)) per row instead of O(i o) for a merged kernel.
  """
  dtype = dtype or jnp.result_type(x_bi, a_ir, b_ro)
  h_br = jnp.matmul(x_bi.astype(dtype), a_ir.astype(dtype), precision=precision)
  return jnp.matmul(h_br, b_ro.astype(dtype), precision=precision) * jnp.asarray(scaling, dtype)


def _mix32(x_u32: jax.Array) -> jax.Array:
  """Chris Wellons' ``lowbias32`` integer finalizer: a bijective avalanche mix of uint32 values (mod 2^32)."""
  x_u32 = x_u32 ^ (x_u32 >> 16)
  x_u32 = x_u32 * jnp.uint32(0x7FEB352D)
  x_u32 = x_u32 ^ (x_u32 >> 15)
  x_u32 = x_u32 * jnp.uint32(0x846CA68B)
  return x_u32 ^ (x_u32 >> 16)


def dropout_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """Boolean keep-mask, each entry independently True with probability ``1 - rate`` (up to 2^-32).

  Counter-based: entry ``i`` (row-major flat index) keeps iff ``mix(mix(i ^ k0) + k1) >= round(rate * 2^32)``
  with ``mix`` = :func:`_mix32` and ``(k0, k1)`` two uint32 words drawn from ``key`` with ``jax.random.bits``
  (one threefry call per site, not per entry). Why not ``jax.random.bernoulli``: on XLA:CPU threefry is lowered
  as a rolled loop that streams two uint32 arrays of the input's size through memory for every round, which made
  the LoRA dropout masks ~30% of the HySAC train step; this hash is a handful of integer ops that fuse into the
  consumer. The mask is a pure function of (key, position), so it is identical however the array is sharded.

  Args:
    key: a JAX PRNG key (typed or raw uint32), one per dropout call.
    shape: mask shape; at most 2^32 entries.
    rate: drop probability in [0, 1).

  Returns:
    bool array of ``shape``.
  """
  n = int(np.prod(shape, dtype=np.int64))
  if n > 2 ** 32:
    raise ValueError(f"dropout_mask: {n} entries in shape {shape} exceed the 2^32 counter range")
  k_2 = jax.random.bits(key, (2,), jnp.uint32)
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  # Row-major flat index from per-axis broadcasted iotas (not a reshaped 1-D iota), so under sharding each shard
  # computes only its own indices.
  for axis in range(len(shape) - 1, -1, -1):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2 ** 32)
    stride *= shape[axis]
  h = _mix32(_mix32(idx ^ k_2[0]) + k_2[1])
  threshold = min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)
  return h >= jnp.uint32(threshold)


def apply_dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout with :func:`dropout_mask`: kept entries are ``x / (1 - rate)``, dropped ones 0 (x's dtype)."""
  if rate == 0.0:
    return x
  keep = dropout_mask(key, x.shape, rate)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def merge_linear_kernel(w_io: jax.Array, a_ir: jax.Array, b_ro: jax.Array, scaling: float) -> jax.Array:
  """``W' = W + scaling * A @ B`` for a Flax (in, out) kernel; the sum is formed in float32 and cast back."""
  delta_io = jnp.matmul(a_ir.astype(jnp.float32), b_ro.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
  return (w_io.astype(jnp.float32) + scaling * delta_io).astype(w_io.dtype)


def merge_conv_kernel(k_hwco: jax.Array, a_pr: jax.Array, b_ro: jax.Array, scaling: float) -> jax.Array:
  """``K'[h, w, c, o] = K[h, w, c, o] + scaling * sum_r A[(h, w, c), r] B[r, o]`` for an HWIO kernel.

  Args:
    k_hwco: (p_h, p_w, C, O) conv kernel.
    a_pr: (p_h * p_w * C, r), rows in row-major (h, w, c) order.
    b_ro: (r, O).
  """
  delta_po = jnp.matmul(a_pr.astype(jnp.float32), b_ro.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
  return (k_hwco.astype(jnp.float32) + scaling * delta_po.reshape(k_hwco.shape)).astype(k_hwco.dtype)


def patchify(x_bhwc: jax.Array, patch_hw: tuple[int, int]) -> jax.Array:
  """Non-overlapping patches of an NHWC image, flattened in (h, w, c) order (= an HWIO kernel's row order).

  Args:
    x_bhwc: (..., H, W, C). Rows/columns beyond the last whole patch are dropped, like a 'VALID' conv.
    patch_hw: (p_h, p_w).

  Returns:
    (..., H // p_h, W // p_w, p_h * p_w * C).
  """
  ph, pw = patch_hw
  *lead, hh, ww, c = x_bhwc.shape
  nh, nw = hh // ph, ww // pw
  x = x_bhwc[..., :nh * ph, :nw * pw, :]
  x = x.reshape(*lead, nh, ph, nw, pw, c)
  n = len(lead)
  x = jnp.moveaxis(x, n + 2, n + 1)                      # (..., nh, nw, ph, pw, c)
  return x.reshape(*lead, nh, nw, ph * pw * c)


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")   # = U(+-1/sqrt(fan_in))


def _kernel_axes(kernel: nnx.Variable) -> tuple | None:
  """Logical sharding names of a base kernel (``out_sharding`` metadata), or None when unannotated."""
  meta = kernel.get_metadata()
  return meta.get("out_sharding") or meta.get("sharding_names")


def _adopt(new: nnx.Module, base: nnx.Module) -> None:
  # Take over every attribute of the base layer (its kernel/bias Variables included) so the wrapper's state
  # paths for the base weights are exactly the base layer's, and the base's own __call__ runs unchanged.
  for name, value in vars(base).items():
    if not name.startswith("_pytree__") and not name.startswith("_object__"):
      setattr(new, name, value)


class _LoRAMixin:
  """Adapter parameters, dropout and bookkeeping shared by :class:`LoRALinear` and :class:`LoRAConv`."""

  def _init_lora(self, d_in: int, d_out: int, in_axis, out_axis, *, rank: int, alpha: float, dropout: float,
                 deterministic: bool, param_dtype, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    self.lora_rank = int(rank)
    self.lora_alpha = float(alpha)
    self.lora_scaling = float(alpha) / int(rank)
    self.lora_a = nnx.LoRAParam(_A_INIT(rngs.params(), (d_in, rank), param_dtype),
                                out_sharding=(in_axis, "lora_rank"))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), param_dtype), out_sharding=("lora_rank", out_axis))
    # Dropout forks its own stream from rngs['dropout'] (or 'default'): every site gets an independent mask.
    self.lora_dropout = nnx.Dropout(dropout, deterministic=deterministic, rngs=rngs)

  def _dropped(self, x: jax.Array) -> jax.Array:
    """The adapter input after dropout: identity in eval mode; else :func:`apply_dropout` with the next key of
    this site's own stream (the ``nnx.Dropout`` module keeps the stream and the train/eval flag)."""
    d = self.lora_dropout
    if d.deterministic or d.rate == 0.0:
      return x
    return apply_dropout(x, d.rngs(), d.rate)


class LoRALinear(_LoRAMixin, nnx.Linear):
  """An ``nnx.Linear`` plus a PEFT-style adapter: ``y = W x + b + (alpha/r) B A dropout(x)``.

  Built from an existing ``nnx.Linear`` whose Variables it adopts (base weights keep their paths, e.g.
  ``...k_proj.kernel``); adds ``lora_a`` (d_in, r) and ``lora_b`` (r, d_out) as ``nnx.LoRAParam`` with
  logical axes (base in-axis, 'lora_rank') / ('lora_rank', base out-axis), and ``lora_dropout``.
  """

  def __init__(self, base: nnx.Linear, *, rank: int = 16, alpha: float = 1.0, dropout: float = 0.0,
               deterministic: bool = False, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if isinstance(base, _LoRAMixin):
      raise ValueError("layer already has a LoRA adapter; merge_lora() it first")
    _adopt(self, base)
    d_in, d_out = base.kernel.get_value().shape
    axes = _kernel_axes(base.kernel) or (None, None)
    self._init_lora(d_in, d_out, axes[0], axes[-1], rank=rank, alpha=alpha, dropout=dropout,
                    deterministic=deterministic, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)
    delta = lora_delta(self._dropped(inputs), self.lora_a.get_value(), self.lora_b.get_value(),
                       self.lora_scaling, dtype=self.dtype, precision=self.precision)
    return y + delta.astype(y.dtype)

  def _merged(self) -> nnx.Linear:
    """A plain ``nnx.Linear`` with ``W' = W + scaling A B`` (same bias, dtypes, precision and metadata).

    Writes the merged value into the adopted kernel Variable: only for :func:`merge_lora`, which then drops
    this wrapper.
    """
    # zeros_init: no random draw for a kernel that is replaced right away (cheap even at L/14 sizes).
    lin = nnx.Linear(self.in_features, self.out_features, use_bias=self.use_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, precision=self.precision, dot_general=self.dot_general,
                     promote_dtype=self.promote_dtype, preferred_element_type=self.preferred_element_type,
                     kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
    kernel = self.kernel
    kernel.set_value(merge_linear_kernel(kernel.get_value(), self.lora_a.get_value(), self.lora_b.get_value(),
                                         self.lora_scaling))
    lin.kernel = kernel
    lin.bias = self.bias
    return lin


class LoRAConv(_LoRAMixin, nnx.Conv):
  """An ``nnx.Conv`` patch embedding (kernel == stride, 'VALID', no dilation/groups) plus a LoRA adapter.

  PEFT's conv LoRA is Conv(C->r, k=p, s=p) then Conv(r->O, 1x1); for non-overlapping patches that is
  patchify + dense A ((p_h p_w C), r) + dense B (r, O), which is what runs here. Base Variables keep their
  paths (``...patch_embedding.kernel``).
  """

  def __init__(self, base: nnx.Conv, *, rank: int = 16, alpha: float = 1.0, dropout: float = 0.0,
               deterministic: bool = False, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if isinstance(base, _LoRAMixin):
      raise ValueError("layer already has a LoRA adapter; merge_lora() it first")
    _check_patch_conv(base)
    _adopt(self, base)
    *hw, c_in, c_out = base.kernel.get_value().shape
    axes = _kernel_axes(base.kernel)
    # The flattened (h, w, c) axis mixes replicated conv dims: keep it unsharded; B inherits the out axis.
    self._init_lora(int(np.prod(hw)) * c_in, c_out, None, axes[-1] if axes else None, rank=rank, alpha=alpha,
                    dropout=dropout, deterministic=deterministic, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding=out_sharding)
    # Dropout on pixels (PEFT drops the conv adapter's input), then patchify the dropped-out image.
    x = self._dropped(inputs)
    patches_bhwp = patchify(x, tuple(self.kernel_size))
    delta = lora_delta(patches_bhwp, self.lora_a.get_value(), self.lora_b.get_value(), self.lora_scaling,
                       dtype=self.dtype, precision=self.precision)
    return y + delta.astype(y.dtype)

  def _merged(self) -> nnx.Conv:
    """A plain ``nnx.Conv`` with ``K' = K + scaling reshape(A B)``; like LoRALinear._merged, for merge_lora only."""
    conv = nnx.Conv(self.in_features, self.out_features, tuple(self.kernel_size), self.strides,
                    padding=self.padding, input_dilation=self.input_dilation,
                    kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
                    use_bias=self.use_bias, mask=self.mask, dtype=self.dtype, param_dtype=self.param_dtype,
                    precision=self.precision, conv_general_dilated=self.conv_general_dilated,
                    promote_dtype=self.promote_dtype, preferred_element_type=self.preferred_element_type,
                    kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
    kernel = self.kernel
    kernel.set_value(merge_conv_kernel(kernel.get_value(), self.lora_a.get_value(), self.lora_b.get_value(),
                                       self.lora_scaling))
    conv.kernel = kernel
    conv.bias = self.bias
    return conv


def _as_tuple(v, n):
  if v is None:
    return (1,) * n
  return (v,) * n if isinstance(v, int) else tuple(v)


def _check_patch_conv(conv: nnx.Conv) -> None:
  ks = tuple(conv.kernel_size)
  problems = []
  if len(ks) != 2:
    problems.append(f"kernel_size {ks} is not 2-D")
  if _as_tuple(conv.strides, len(ks)) != ks:
    problems.append(f"strides {conv.strides} != kernel_size {ks}")
  pad = conv.padding
  if not (pad == "VALID" or (not isinstance(pad, str) and all(tuple(p) == (0, 0) for p in pad))
          or (isinstance(pad, int) and pad == 0)):
    problems.append(f"padding {pad!r} is not 'VALID'")
  if _as_tuple(conv.input_dilation, len(ks)) != (1,) * len(ks) or \
     _as_tuple(conv.kernel_dilation, len(ks)) != (1,) * len(ks):
    problems.append("dilation is not 1")
  if conv.feature_group_count != 1:
    problems.append(f"feature_group_count {conv.feature_group_count} != 1")
  if conv.mask is not None:
    problems.append("kernel mask set")
  if problems:
    raise NotImplementedError("LoRAConv supports only non-overlapping patch convolutions (kernel == stride, "
                              "'VALID', no dilation/groups/mask); this conv has: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# Model surgery
# --------------------------------------------------------------------------------------------------------------

def path_name(path: Sequence[Any]) -> str:
  """('vision_model', 'encoder', 'layers', 3, 'mlp', 'fc1') -> 'vision_model.encoder.layers.3.mlp.fc1'."""
  return ".".join(str(p) for p in path)


def target_matches(name: str, targets: str | Sequence[str]) -> bool:
  """PEFT's ``target_modules`` rule on a dotted module name.

  A string is a regular expression that must match the whole name (``re.fullmatch``); a sequence of names
  matches when the name equals one of them or ends with ``'.' + name`` (so ``'fc1'`` matches every
  ``...mlp.fc1`` and ``'mlp.fc1'`` works too, but ``'proj'`` does not match ``k_proj``).
  """
  if isinstance(targets, str):
    return re.fullmatch(targets, name) is not None
  return any(name == t or name.endswith("." + t) for t in targets)


def _get_child(node, key):
  return node[key] if isinstance(key, int) else getattr(node, str(key))


def _set_child(node, key, value) -> None:
  if isinstance(key, int):
    node[key] = value
  else:
    setattr(node, str(key), value)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = _get_child(parent, key)
  _set_child(parent, path[-1], new)


def apply_lora(model: nnx.Module, targets: str | Sequence[str] = DEFAULT_TARGETS, rank: int = 16,
               alpha: float = 1.0, dropout: float = 0.1, *, rngs: nnx.Rngs, deterministic: bool = False,
               param_dtype: Any = jnp.float32) -> nnx.Module:
  """Wraps every ``nnx.Linear`` / ``nnx.Conv`` whose dotted path matches ``targets`` with a LoRA site, in place.

  Defaults are HySAC's (r = 16, alpha = 1 -> scaling 1/16, dropout 0.1; k/v/out_proj, fc1, fc2 and
  patch_embedding in both towers, never q_proj). Targets follow :func:`target_matches`. Dropout starts in
  train mode (``deterministic=False``, the nnx convention): call ``model.eval()`` for inference and
  ``model.train()`` for training.

  Args:
    model: any nnx module tree (CLIP or a toy); modified in place.
    targets: regex over dotted names, or a list of (suffix) names.
    rank, alpha, dropout: PEFT's ``r``, ``lora_alpha``, ``lora_dropout``.
    rngs: A-init keys (``rngs.params``) and per-site dropout streams (``rngs.dropout`` or default).
    param_dtype: dtype of the adapter parameters (float32 even when the base is bf16).

  Returns:
    ``model`` (for chaining).

  Raises:
    ValueError: nothing matched, or a matched module is not a Linear/Conv (or is already wrapped).
  """
  found, bad = [], []
  for path, module in nnx.iter_modules(model):
    if not path:
      continue
    name = path_name(path)
    if not target_matches(name, targets):
      continue
    if isinstance(module, _LoRAMixin):
      bad.append(f"{name} (already has a LoRA adapter)")
    elif isinstance(module, (nnx.Linear, nnx.Conv)):
      found.append((path, module))
    else:
      bad.append(f"{name} ({type(module).__name__} is not an nnx.Linear / nnx.Conv)")
  if bad:
    raise ValueError(f"LoRA targets {targets!r} matched unsupported modules: " + ", ".join(bad))
  if not found:
    raise ValueError(f"LoRA targets {targets!r} matched no nnx.Linear / nnx.Conv in {type(model).__name__}")
  kw = dict(rank=rank, alpha=alpha, dropout=dropout, deterministic=deterministic, param_dtype=param_dtype,
            rngs=rngs)
  for path, module in sorted(found, key=lambda pm: path_name(pm[0])):   # deterministic rng consumption order
    wrapper = LoRALinear(module, **kw) if isinstance(module, nnx.Linear) else LoRAConv(module, **kw)
    _replace(model, path, wrapper)
  return model


def lora_sites(model: nnx.Module) -> dict[str, LoRALinear | LoRAConv]:
  """Dotted module name -> LoRA site, sorted by name."""
  sites = {path_name(p): m for p, m in nnx.iter_modules(model) if isinstance(m, _LoRAMixin)}
  return dict(sorted(sites.items()))


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base weights (``W' = W + scaling A B``) and restores plain nnx.Linear/Conv.

  Afterwards the model's structure and state paths are exactly those of the un-adapted model (no LoRAParam,
  no dropout), so it exports as an ordinary CLIP. In place; returns ``model``.
  """
  for name, site in lora_sites(model).items():
    path = tuple(int(k) if k.isdigit() else k for k in name.split("."))
    _replace(model, path, site._merged())
  return model


def lora_state(model: nnx.Module) -> nnx.State:
  """The LoRA-only state, ``nnx.state(model, nnx.LoRAParam)``."""
  return nnx.state(model, nnx.LoRAParam)


def lora_param_count(model: nnx.Module) -> int:
  """Number of LoRA parameters (works on abstract ``nnx.eval_shape`` models too)."""
  leaves = jax.tree.leaves(lora_state(model))
  return int(sum(np.prod(x.shape) for x in leaves))


# --------------------------------------------------------------------------------------------------------------
# Model-level entry points of the LoRA file format (vlsafe_jax.model_io) and PEFT conversion
# (checkpoints_convert.peft); the modules above never touch files or foreign names.
# --------------------------------------------------------------------------------------------------------------

def save_lora(model: nnx.Module, path: str | os.PathLike) -> None:
  """Writes the LoRA parameters to one safetensors file (keys ``<module>.lora_a`` / ``.lora_b``, Flax layout)
  with each site's rank and alpha in the header metadata (``model_io.save_lora``)."""
  model_io.save_lora(lora_sites(model), path)


def load_lora(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
  """Loads a :func:`save_lora` file into a model that already has the same LoRA sites (apply_lora first).

  Every missing / unexpected / mis-shaped tensor and every rank/alpha mismatch is reported in one error
  naming the file (``model_io.load_lora``). Returns ``model``.
  """
  model_io.load_lora(lora_sites(model), path)
  return model


def import_peft(model: nnx.Module, tensors: Mapping[str, Any],
                prefix: str | Sequence[str] = "base_model.model.", *, adapter: str = "default",
                ignore: str | None = None, allow_missing: bool = False) -> nnx.Module:
  """Copies PEFT LoRA tensors (``<prefix><HF module path>.lora_A|lora_B.<adapter>.weight``, numpy, jax or torch)
  into the model's LoRA sites (apply_lora with PEFT's r/alpha first), in place; see
  ``checkpoints_convert.peft.import_peft`` for layouts and errors. Returns ``model``."""
  peft.import_peft(lora_sites(model), tensors, prefix, adapter=adapter, ignore=ignore, allow_missing=allow_missing)
  return model


def export_peft(model: nnx.Module, prefix: str = "base_model.model.", adapter: str = "default"
                ) -> dict[str, np.ndarray]:
  """Inverse of :func:`import_peft`: PEFT-named float32 numpy tensors in torch layout."""
  return peft.export_peft(lora_sites(model), prefix, adapter)


__all__ = [
    "DEFAULT_TARGETS", "TRAINABLE", "BASE_PARAMS", "LoRALinear", "LoRAConv", "lora_delta", "merge_linear_kernel",
    "merge_conv_kernel", "patchify", "target_matches", "path_name", "apply_lora", "lora_sites", "merge_lora",
    "lora_state", "lora_param_count", "save_lora", "load_lora", "import_peft", "export_peft",
]
