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

File I/O (:func:`save_lora`, :func:`load_lora`) lives in plain functions here, never inside the modules.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# HySAC's targets (no q_proj), applied to both towers; patch_embedding exists only in the vision tower.
DEFAULT_TARGETS: tuple[str, ...] = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")

TRAINABLE = nnx.LoRAParam
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

LORA_FORMAT = "vlsafe_jax.lora"


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


def _lora_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  out = {}
  for name, site in lora_sites(model).items():
    out[f"{name}.lora_a"] = site.lora_a
    out[f"{name}.lora_b"] = site.lora_b
  return out


# --------------------------------------------------------------------------------------------------------------
# LoRA-only checkpoints (file I/O kept out of the modules)
# --------------------------------------------------------------------------------------------------------------

def save_lora(model: nnx.Module, path: str | os.PathLike) -> None:
  """Writes the LoRA parameters to one safetensors file (keys ``<module>.lora_a`` / ``.lora_b``, Flax layout)
  with each site's rank and alpha in the header metadata."""
  from safetensors.flax import save_file
  sites = lora_sites(model)
  if not sites:
    raise ValueError("model has no LoRA sites to save")
  meta = {"format": LORA_FORMAT,
          "sites": json.dumps({n: {"rank": s.lora_rank, "alpha": s.lora_alpha} for n, s in sites.items()})}
  save_file({k: v.get_value() for k, v in _lora_variables(model).items()}, os.fspath(path), metadata=meta)


def load_lora(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
  """Loads a :func:`save_lora` file into a model that already has the same LoRA sites (apply_lora first).

  Every missing / unexpected / mis-shaped tensor and every rank/alpha mismatch is reported in one error
  naming the file. Returns ``model``.
  """
  from safetensors import safe_open
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LoRA file {path} does not exist")
  with safe_open(path, framework="flax") as f:
    meta = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if meta.get("format") != LORA_FORMAT:
    raise ValueError(f"{path}: not a vlsafe_jax LoRA file (metadata format={meta.get('format')!r})")
  saved_sites = json.loads(meta.get("sites", "{}"))
  variables = _lora_variables(model)
  errors = [f"missing tensor {k}" for k in variables if k not in tensors]
  errors += [f"unexpected tensor {k} {tuple(tensors[k].shape)}" for k in tensors if k not in variables]
  for k, var in variables.items():
    if k in tensors and tuple(tensors[k].shape) != tuple(var.get_value().shape):
      errors.append(f"{k}: file shape {tuple(tensors[k].shape)} != model shape {tuple(var.get_value().shape)}")
  # A diverged run's NaN/Inf would otherwise load silently and only show up as NaN outputs.
  errors += [f"{k}: {int(np.size(t) - np.isfinite(np.asarray(t, np.float32)).sum())} NaN/Inf values"
             for k, t in tensors.items() if not np.isfinite(np.asarray(t, np.float32)).all()]
  for name, site in lora_sites(model).items():
    cfg = saved_sites.get(name)
    if cfg and (cfg["rank"] != site.lora_rank or not np.isclose(cfg["alpha"], site.lora_alpha)):
      errors.append(f"{name}: file rank/alpha {cfg['rank']}/{cfg['alpha']} != model "
                    f"{site.lora_rank}/{site.lora_alpha}")
  if errors:
    raise ValueError(f"{path}: LoRA state does not fit the model:\n  " + "\n  ".join(errors))
  for k, var in variables.items():
    var.set_value(jnp.asarray(tensors[k], var.get_value().dtype))
  return model


# --------------------------------------------------------------------------------------------------------------
# PEFT import
# --------------------------------------------------------------------------------------------------------------

def _to_numpy(t) -> np.ndarray:
  # torch tensors are duck-typed (torch is never imported here); bf16 goes through float32.
  if hasattr(t, "detach"):
    t = t.detach().cpu()
    if "bfloat16" in str(t.dtype) or "float16" in str(t.dtype):
      t = t.float()
    return t.numpy()
  return np.asarray(t)


_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


def import_peft(model: nnx.Module, tensors: Mapping[str, Any],
                prefix: str | Sequence[str] = "base_model.model.", *, adapter: str = "default",
                ignore: str | None = None, allow_missing: bool = False) -> nnx.Module:
  """Copies PEFT LoRA tensors into the model's LoRA sites (apply_lora with PEFT's r/alpha first), in place.

  Names: ``<prefix><HF module path>.lora_A.<adapter>.weight`` / ``lora_B``. The HF module path after the
  prefix must equal a LoRA site's dotted nnx path (CLIP mirrors HF names). Prefixes: a PEFT-wrapped HF
  ``CLIPModel`` uses ``'base_model.model.'``; HySAC's state dict uses ``'visual.base_model.model.'`` and
  ``'textual.base_model.model.'`` (pass both); ``''`` = no prefix.

  Layouts (torch -> here): Linear A (r, in) -> (in, r); B (out, r) -> (r, out). Conv A OIHW (r, C, p_h, p_w)
  -> HWIO flatten ((p_h p_w C), r); B (O, r, 1, 1) -> (r, O).

  Args:
    tensors: name -> array (numpy, jax or torch).
    ignore: optional regex (``re.search``) of names to skip (e.g. the base weights in a full state dict).
    allow_missing: do not complain about LoRA sites that receive no tensors.

  Raises:
    ValueError: listing together every name without the prefix, non-LoRA name, name without a LoRA site,
      other-adapter name, mis-shaped tensor, and (unless allow_missing) every site left without A or B.
  """
  prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
  sites = lora_sites(model)
  errors: list[str] = []
  assigned: dict[tuple[str, str], np.ndarray] = {}
  for key in sorted(tensors):
    if ignore is not None and re.search(ignore, key):
      continue
    rest = next((key[len(p):] for p in prefixes if key.startswith(p)), None)
    if rest is None:
      errors.append(f"{key}: does not start with prefix {' or '.join(map(repr, prefixes))}")
      continue
    m = _PEFT_KEY.match(rest)
    if m is None:
      errors.append(f"{key}: not a PEFT LoRA tensor name (expected '<module>.lora_A|lora_B.<adapter>.weight')")
      continue
    if m["adapter"] != adapter:
      errors.append(f"{key}: adapter {m['adapter']!r} != {adapter!r}")
      continue
    site = sites.get(m["module"])
    if site is None:
      errors.append(f"{key}: no LoRA site named {m['module']!r} in the model")
      continue
    arr = _to_numpy(tensors[key])
    var = site.lora_a if m["which"] == "A" else site.lora_b
    want = tuple(var.get_value().shape)
    conv = isinstance(site, LoRAConv)
    try:
      arr = _peft_layout(arr, m["which"], conv)
    except ValueError as e:
      errors.append(f"{key}: {e}")
      continue
    if arr.shape != want:
      errors.append(f"{key}: shape {tuple(_to_numpy(tensors[key]).shape)} maps to {arr.shape}, "
                    f"site {m['module']} expects {want} (rank {site.lora_rank})")
      continue
    assigned[(m["module"], m["which"])] = arr
  if not allow_missing:
    for name in sites:
      for which in "AB":
        if (name, which) not in assigned:
          errors.append(f"LoRA site {name} got no lora_{which} tensor")
  if errors:
    raise ValueError(f"PEFT import failed ({len(errors)} problems):\n  " + "\n  ".join(errors))
  for (name, which), arr in assigned.items():
    var = sites[name].lora_a if which == "A" else sites[name].lora_b
    var.set_value(jnp.asarray(arr, var.get_value().dtype))
  return model


def _peft_layout(arr: np.ndarray, which: str, conv: bool) -> np.ndarray:
  """Torch PEFT tensor -> our (rows, cols) layout; see :func:`import_peft`."""
  if not conv:
    if arr.ndim != 2:
      raise ValueError(f"Linear lora_{which} must be 2-D, got shape {arr.shape}")
    return arr.T
  if arr.ndim != 4:
    raise ValueError(f"Conv lora_{which} must be 4-D (OIHW), got shape {arr.shape}")
  if which == "A":                                      # (r, C, ph, pw) -> (ph, pw, C, r) -> (ph*pw*C, r)
    return np.transpose(arr, (2, 3, 1, 0)).reshape(-1, arr.shape[0])
  if arr.shape[2:] != (1, 1):
    raise ValueError(f"Conv lora_B must be a 1x1 kernel (O, r, 1, 1), got shape {arr.shape}")
  return arr[:, :, 0, 0].T


def export_peft(model: nnx.Module, prefix: str = "base_model.model.", adapter: str = "default"
                ) -> dict[str, np.ndarray]:
  """Inverse of :func:`import_peft`: PEFT-named float32 numpy tensors in torch layout."""
  out = {}
  for name, site in lora_sites(model).items():
    a = np.asarray(site.lora_a.get_value(), np.float32)
    b = np.asarray(site.lora_b.get_value(), np.float32)
    if isinstance(site, LoRAConv):
      ph, pw = site.kernel_size
      c = a.shape[0] // (ph * pw)
      a = np.transpose(a.reshape(ph, pw, c, -1), (3, 2, 0, 1))
      b = b.T[:, :, None, None]
    else:
      a, b = a.T, b.T
    out[f"{prefix}{name}.lora_A.{adapter}.weight"] = np.ascontiguousarray(a)
    out[f"{prefix}{name}.lora_B.{adapter}.weight"] = np.ascontiguousarray(b)
  return out


__all__ = [
    "DEFAULT_TARGETS", "TRAINABLE", "BASE_PARAMS", "LoRALinear", "LoRAConv", "lora_delta", "merge_linear_kernel",
    "merge_conv_kernel", "patchify", "target_matches", "path_name", "apply_lora", "lora_sites", "merge_lora",
    "lora_state", "lora_param_count", "save_lora", "load_lora", "import_peft", "export_peft",
]
