"""UWM per-weight saliency scores through the exact rank-1 factorisation (``uwm.md`` §3-§4).

For a target linear layer ``y = x @ K + b`` (Flax kernel ``K`` of shape ``(d_in, d_out)``; the torch weight is
``W = K.T``) and a calibration sample n with layer-input activations ``X_td`` (tokens x d_in), UWM scores weight
``(j, i)`` (input j, output i) by

  a_j = ||X_{:,j}||_2 ,   s_j = std_t X_{t,j} (ddof = 1)
  O_i = (1/d_in) sum_k |K_ki| a_k                 output-node flow
  I_j = a_j (1/d_out) sum_m |K_jm|                input-node flow
  psi_ji = O_i I_j / (s_j + eps)

and aggregates over paired safe/unsafe samples by either

  mean_of_ratios (default; the reference code):  R = mean_n psi^uns / psi^sf
  ratio_of_means (the paper's formula):          R = mean_n psi^uns / mean_n psi^sf

optionally followed by the magnitude prior ``R <- |K| * R`` (text tower). The column factor
``C_j = (1/d_out) sum_m |K_jm|`` is common to both sides and cancels, so with ``g = a / (s + eps)`` every score is a
sum of rank-1 outer products ``g (x) O`` and only ``(d_in, d_out)`` accumulators are ever built, never the
``N x d_in x d_out`` tensor of the reference.

Shape letters: b = batch (samples of one calibration step), t = tokens, d = layer-input features (= d_in),
i = d_in, o = d_out. Every score is float32 whatever the activation/kernel dtype.

Usage per calibration step (one jit): reduce each target layer's captured inputs with :func:`layer_stats`, then
:func:`update` all layers' accumulators; at the end :func:`finalize` each layer. Sums run over the batch axis, so
the same jitted update works on a batch sharded over ``('data', 'fsdp')`` (XLA inserts the all-reduce).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Aggregation = Literal["mean_of_ratios", "ratio_of_means"]
AGGREGATIONS = ("mean_of_ratios", "ratio_of_means")

# Sentinel for "no non-finite sample seen": larger than any sample index.
_NO_BAD = np.iinfo(np.int32).max


class NonFiniteRatioError(FloatingPointError):
  """A calibration sample produced a non-finite per-sample score (``uwm.md`` §3 edge cases)."""


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  """Static scoring options of one tower (hashable: passed to jit as a static argument).

  Attributes:
    aggregation: ``"mean_of_ratios"`` (default, reference code) or ``"ratio_of_means"`` (paper).
    eps: added to the std in the variance normalisation; 1e-8 for vision, 0 for text (``uwm.md`` §3).
    magnitude_prior: multiply the final score by ``|K|`` (default on for text, off for vision).
  """
  aggregation: Aggregation = "mean_of_ratios"
  eps: float = 1e-8
  magnitude_prior: bool = False

  def __post_init__(self):
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"ScoreConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
    if not self.eps >= 0:
      raise ValueError(f"ScoreConfig.eps must be >= 0, got {self.eps!r}")


@struct.dataclass
class LayerAccumulator:
  """Running sums of one target layer (a pytree; lives on device between calibration steps).

  Attributes:
    num_io: float32 ``(d_in, d_out)``; mean_of_ratios: ``sum_n v_n (x) u_n`` (per-sample ratio factors);
      ratio_of_means: ``sum_n g^uns_n (x) O^uns_n``.
    den_io: float32 ``(d_in, d_out)`` ``sum_n g^sf_n (x) O^sf_n`` for ratio_of_means; ``None`` otherwise.
    count: int32 scalar, pairs accumulated.
    dropped: int32 scalar, real pairs skipped because a side had fewer than 2 valid tokens.
    first_bad: int32 scalar, smallest calibration-sample index whose per-sample score was non-finite
      (``2**31 - 1`` when none).
  """
  num_io: jax.Array
  den_io: jax.Array | None
  count: jax.Array
  dropped: jax.Array
  first_bad: jax.Array


def layer_stats(x_btd: jax.Array, valid_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-sample, per-feature token statistics of a layer input.

  Args:
    x_btd: activations ``(B, T, D)``, any float dtype (reduced in float32).
    valid_bt: optional bool/0-1 ``(B, T)``; only positions with 1 enter the statistics (text padding mask).
      ``None`` means every token is valid (vision).

  Returns:
    ``(a_bd, s_bd)``, float32 ``(B, D)``: the L2 norm over valid tokens (>= 0) and the unbiased (ddof = 1)
    standard deviation over valid tokens (>= 0). Rows with fewer than 2 valid tokens get ``s = 0``; they must be
    dropped by the caller (see :func:`pairs_ok`).
  """
  x_btd = jnp.asarray(x_btd).astype(jnp.float32)
  if x_btd.ndim != 3:
    raise ValueError(f"layer_stats expects activations (B, T, D), got shape {x_btd.shape}")
  if valid_bt is None:
    m_bt1 = jnp.ones(x_btd.shape[:2] + (1,), jnp.float32)
  else:
    if valid_bt.shape != x_btd.shape[:2]:
      raise ValueError(f"layer_stats: valid mask shape {valid_bt.shape} does not match activations "
                       f"{x_btd.shape[:2]} (B, T)")
    m_bt1 = jnp.asarray(valid_bt).astype(jnp.float32)[..., None]
  # Zero the padded positions first so their (arbitrary) values can neither leak in nor produce NaN * 0.
  x_btd = jnp.where(m_bt1 > 0, x_btd, 0.0)
  n_b1 = jnp.sum(m_bt1, axis=1)
  a_bd = jnp.sqrt(jnp.sum(jnp.square(x_btd), axis=1))
  mean_bd = jnp.sum(x_btd, axis=1) / jnp.maximum(n_b1, 1.0)
  # Two-pass variance: more accurate in float32 than E[x^2] - E[x]^2 for large-mean features.
  sq_bd = jnp.sum(m_bt1 * jnp.square(x_btd - mean_bd[:, None, :]), axis=1)
  s_bd = jnp.sqrt(sq_bd / jnp.maximum(n_b1 - 1.0, 1.0))
  return a_bd, s_bd


def pairs_ok(valid_safe_bt: jax.Array | None, valid_unsafe_bt: jax.Array | None,
             batch: int | None = None) -> jax.Array:
  """Bool ``(B,)``: pairs whose safe and unsafe rows both have at least 2 valid tokens (std needs ddof = 1).

  ``None`` masks mean all tokens valid (then ``batch`` gives B, and every pair is usable if T >= 2).
  """
  def ok(v):
    if v is None:
      if batch is None:
        raise ValueError("pairs_ok needs `batch` when both masks are None")
      return jnp.ones((batch,), bool)
    return jnp.sum(jnp.asarray(v).astype(jnp.int32), axis=-1) >= 2
  return ok(valid_safe_bt) & ok(valid_unsafe_bt)


def output_flow(a_bd: jax.Array, kernel_io: jax.Array) -> jax.Array:
  """``O_bo = a_bd @ |K| / d_in``, float32 ``(B, d_out)`` (output-node information flow, ``uwm.md`` §3)."""
  abs_k = jnp.abs(kernel_io.astype(jnp.float32))
  return jnp.dot(a_bd, abs_k, precision=jax.lax.Precision.HIGHEST) / kernel_io.shape[0]


def normalised_input(a_bd: jax.Array, s_bd: jax.Array, eps: float) -> jax.Array:
  """``g_bd = a / (s + eps)``, float32 ``(B, d_in)``; the input-node flow without its cancelling column factor."""
  return a_bd / (s_bd + eps)


def init_accumulator(d_in: int, d_out: int, aggregation: Aggregation = "mean_of_ratios") -> LayerAccumulator:
  """Zero accumulator for a layer with Flax kernel ``(d_in, d_out)``."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  # Separate buffers for num and den: the jitted update donates them, and one buffer cannot be donated twice.
  zeros = lambda: jnp.zeros((d_in, d_out), jnp.float32)  # noqa: E731
  return LayerAccumulator(num_io=zeros(), den_io=zeros() if aggregation == "ratio_of_means" else None,
                          count=jnp.zeros((), jnp.int32), dropped=jnp.zeros((), jnp.int32),
                          first_bad=jnp.full((), _NO_BAD, jnp.int32))


def init_accumulators(kernels: Mapping[str, Any], aggregation: Aggregation = "mean_of_ratios"
                      ) -> dict[str, LayerAccumulator]:
  """Accumulators for every target layer, keyed like ``kernels`` (layer path -> Flax kernel or its shape)."""
  out = {}
  for name, k in kernels.items():
    shape = tuple(getattr(k, "shape", k))
    if len(shape) != 2:
      raise ValueError(f"target layer {name!r}: kernel must be 2-D (d_in, d_out), got shape {shape}")
    out[name] = init_accumulator(shape[0], shape[1], aggregation)
  return out


def accumulate(acc: LayerAccumulator, stats_safe: tuple[jax.Array, jax.Array],
               stats_unsafe: tuple[jax.Array, jax.Array], kernel_io: jax.Array, cfg: ScoreConfig,
               keep_b: jax.Array | None = None, real_b: jax.Array | None = None,
               offset: jax.Array | int = 0) -> LayerAccumulator:
  """Adds one calibration batch of pairs to a layer's accumulator (pure; jit-able; shardable over the batch).

  Args:
    acc: the layer's running sums.
    stats_safe, stats_unsafe: ``(a_bd, s_bd)`` from :func:`layer_stats`; row n of each forms pair n.
    kernel_io: the layer's Flax kernel ``(d_in, d_out)`` (the unedited weights).
    cfg: aggregation and eps (the magnitude prior is applied in :func:`finalize`).
    keep_b: bool ``(B,)``, pairs passing the token-count rule (:func:`pairs_ok`); default all.
    real_b: bool ``(B,)``, False for rows that only pad the batch (neither used nor counted as dropped).
    offset: global calibration index of row 0, so a non-finite sample is reported by its dataset index.

  Returns:
    The updated accumulator.
  """
  a_s, s_s = stats_safe
  a_u, s_u = stats_unsafe
  n = a_s.shape[0]
  d_in, d_out = kernel_io.shape
  for nm, x in (("safe a", a_s), ("safe s", s_s), ("unsafe a", a_u), ("unsafe s", s_u)):
    if x.shape != (n, d_in):
      raise ValueError(f"UWM accumulate: {nm} stats have shape {x.shape}, expected ({n}, {d_in}) to match "
                       f"the kernel (d_in={d_in}, d_out={d_out})")
  real_b = jnp.ones((n,), bool) if real_b is None else jnp.asarray(real_b, bool)
  keep_b = real_b if keep_b is None else (jnp.asarray(keep_b, bool) & real_b)

  o_s, o_u = output_flow(a_s, kernel_io), output_flow(a_u, kernel_io)
  g_s, g_u = normalised_input(a_s, s_s, cfg.eps), normalised_input(a_u, s_u, cfg.eps)
  if cfg.aggregation == "mean_of_ratios":
    # psi^uns_ji / psi^sf_ji = (g^uns_j / g^sf_j) (O^uns_i / O^sf_i): a rank-1 outer product per pair.
    lhs_bi, rhs_bo = g_u / g_s, o_u / o_s
    finite_b = jnp.all(jnp.isfinite(lhs_bi), -1) & jnp.all(jnp.isfinite(rhs_bo), -1)
    lhs_bi = jnp.where(keep_b[:, None], lhs_bi, 0.0)
    rhs_bo = jnp.where(keep_b[:, None], rhs_bo, 0.0)
    num = acc.num_io + jnp.einsum("bi,bo->io", lhs_bi, rhs_bo, precision=jax.lax.Precision.HIGHEST)
    den = acc.den_io
  else:
    finite_b = (jnp.all(jnp.isfinite(g_s), -1) & jnp.all(jnp.isfinite(g_u), -1)
                & jnp.all(jnp.isfinite(o_s), -1) & jnp.all(jnp.isfinite(o_u), -1))
    w_b1 = keep_b[:, None]
    num = acc.num_io + jnp.einsum("bi,bo->io", jnp.where(w_b1, g_u, 0.0), jnp.where(w_b1, o_u, 0.0),
                                  precision=jax.lax.Precision.HIGHEST)
    den = acc.den_io + jnp.einsum("bi,bo->io", jnp.where(w_b1, g_s, 0.0), jnp.where(w_b1, o_s, 0.0),
                                  precision=jax.lax.Precision.HIGHEST)
  idx_b = jnp.asarray(offset, jnp.int32) + jnp.arange(n, dtype=jnp.int32)
  bad = jnp.min(jnp.where(keep_b & ~finite_b, idx_b, _NO_BAD))
  return LayerAccumulator(
      num_io=num, den_io=den,
      count=acc.count + jnp.sum(keep_b.astype(jnp.int32)),
      dropped=acc.dropped + jnp.sum((real_b & ~keep_b).astype(jnp.int32)),
      first_bad=jnp.minimum(acc.first_bad, bad))


def _update(accs, stats_safe, stats_unsafe, kernels, cfg, keep_b=None, real_b=None, offset=0):
  return {name: accumulate(acc, stats_safe[name], stats_unsafe[name], kernels[name], cfg, keep_b, real_b, offset)
          for name, acc in accs.items()}


# One jitted update per calibration batch for all target layers of a tower. The accumulators are donated:
# they are replaced every step, and at CLIP-L scale they are ~400 MB.
update = jax.jit(_update, static_argnames=("cfg",), donate_argnames=("accs",))
update.__doc__ = """Jitted :func:`accumulate` over every target layer (dicts keyed by layer path).

Args:
  accs: ``{path: LayerAccumulator}`` (donated: do not reuse the argument after the call).
  stats_safe, stats_unsafe: ``{path: (a_bd, s_bd)}``.
  kernels: ``{path: kernel_io}``.
  cfg: :class:`ScoreConfig` (static).
  keep_b, real_b, offset: as in :func:`accumulate` (shared by all layers: token counts are per sample).
"""


def stats_and_update(accs, x_safe, x_unsafe, kernels, cfg: ScoreConfig, valid_safe_bt=None,
                     valid_unsafe_bt=None, real_b=None, offset=0):
  """Token reduction + accumulation for all layers; call inside the jitted calibration step.

  ``x_safe`` / ``x_unsafe`` map layer path -> captured layer inputs ``(B, T, d_in)``; the validity masks
  ``(B, T)`` (text) are shared by all layers of a tower.
  """
  batch = next(iter(x_safe.values())).shape[0]
  keep_b = pairs_ok(valid_safe_bt, valid_unsafe_bt, batch)
  st_s = {k: layer_stats(v, valid_safe_bt) for k, v in x_safe.items()}
  st_u = {k: layer_stats(v, valid_unsafe_bt) for k, v in x_unsafe.items()}
  return _update(accs, st_s, st_u, kernels, cfg, keep_b, real_b, offset)


def check_finite(accs: Mapping[str, LayerAccumulator] | LayerAccumulator, name: str = "layer") -> None:
  """Raises :class:`NonFiniteRatioError` naming the layer and sample index if any sample was non-finite.

  A host sync: call it after each batch to stop early, or rely on :func:`finalize` calling it.
  """
  items = accs.items() if isinstance(accs, Mapping) else [(name, accs)]
  for layer, acc in items:
    bad = int(acc.first_bad)
    if bad != _NO_BAD:
      raise NonFiniteRatioError(
          f"UWM layer {layer!r}: calibration sample {bad} gives a non-finite per-sample score ratio "
          f"(a zero or non-finite norm/std: a dead feature, a constant text feature with eps=0, or bad input)")


def finalize(acc: LayerAccumulator, kernel_io: jax.Array, cfg: ScoreConfig, name: str = "layer") -> jax.Array:
  """The layer's UWM score ``R`` in Flax layout ``(d_in, d_out)``, float32.

  Raises:
    NonFiniteRatioError: a sample's per-sample score was non-finite (message names ``name`` and the sample).
    ValueError: no pair was accumulated.
  """
  check_finite(acc, name)
  count = int(acc.count)
  if count == 0:
    raise ValueError(f"UWM layer {name!r}: no calibration pairs were accumulated "
                     f"({int(acc.dropped)} dropped for having fewer than 2 valid tokens)")
  if kernel_io.shape != acc.num_io.shape:
    raise ValueError(f"UWM layer {name!r}: kernel shape {kernel_io.shape} != accumulator {acc.num_io.shape}")
  return _finalize(acc.num_io, acc.den_io, jnp.asarray(count, jnp.float32), kernel_io, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _finalize(num_io, den_io, count, kernel_io, cfg: ScoreConfig):
  r_io = num_io / count if cfg.aggregation == "mean_of_ratios" else num_io / den_io
  if cfg.magnitude_prior:
    r_io = jnp.abs(kernel_io.astype(jnp.float32)) * r_io
  return r_io


def finalize_all(accs: Mapping[str, LayerAccumulator], kernels: Mapping[str, jax.Array],
                 cfg: ScoreConfig) -> dict[str, jax.Array]:
  """:func:`finalize` for every layer; returns ``{path: R_io}``."""
  return {name: finalize(acc, kernels[name], cfg, name) for name, acc in accs.items()}


__all__ = [
    "AGGREGATIONS", "ScoreConfig", "LayerAccumulator", "NonFiniteRatioError", "layer_stats", "pairs_ok",
    "output_flow", "normalised_input", "init_accumulator", "init_accumulators", "accumulate", "update",
    "stats_and_update", "check_finite", "finalize", "finalize_all",
]
