"""Which attention kernel runs: cuDNN flash attention on NVIDIA GPUs when the shapes allow, XLA otherwise.

``jax.nn.dot_product_attention(implementation=None)`` always lowers to XLA's own attention (jax 0.10 / 0.11), so
flash attention has to be requested explicitly, and ``implementation="cudnn"`` raises on shapes or dtypes cuDNN
does not support (and on CPU). The models therefore take ``attention_impl`` in their configs:

* ``"auto"`` (default): :func:`choose_impl` picks cuDNN when every documented condition holds and XLA otherwise;
  if cuDNN still rejects the call at trace time, XLA is used. The choice and its reason are logged once per call
  site and shape (logger ``vlsafe_jax.models.attention``) and kept in :func:`choices` for benchmark records.
* ``"cudnn"``: cuDNN or an error; ``"xla"`` or ``None``: XLA.

Shape letters: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = (None, "auto", "xla", "cudnn")

_LOG = logging.getLogger(__name__)
# site -> {"impl", "reason", "q_shape", "k_shape", "dtype"}: the latest choice per call site (traced once per jit).
_CHOICES: dict[str, dict[str, Any]] = {}
_LOGGED: set[tuple] = set()


def check_impl(where: str, impl: str | None) -> None:
  """Raises ValueError naming ``where`` for an unknown ``attention_impl`` value."""
  if impl not in IMPLS:
    raise ValueError(f"{where}: attention_impl {impl!r} not supported; expected one of {IMPLS}")


def choose_impl(requested: str | None, *, platform: str, dtype, q_shape: tuple[int, ...], k_shape: tuple[int, ...],
                has_mask: bool, compute_capability: str | None = None) -> tuple[str, str]:
  """The attention implementation for one call, and why: ``("cudnn" | "xla", reason)``.

  Pure function of static facts, so it is testable on CPU. The cuDNN conditions are the ones
  ``jax.nn.dot_product_attention(implementation="cudnn")`` checks before it builds a kernel (jax 0.10-0.11):
  an NVIDIA GPU, bf16/fp16 q/k/v, head dim a multiple of 8 and <= 128 (<= 256 from Hopper, compute capability
  9.0, on). Two further rules are ours: a mask becomes a cuDNN bias, whose training kernels need even T and S,
  and the same attention code runs under ``jax.grad``, so masked calls need even lengths; and single-token
  queries (decode steps) stay on XLA, where attention is a matrix-vector product next to the weight reads.

  Args:
    requested: ``"auto"``, ``"cudnn"``, ``"xla"`` or None (= XLA).
    platform: ``jax.devices()[0].platform`` ("gpu", "cpu", "tpu").
    dtype: the q/k/v dtype.
    q_shape: (B, T, N, H). k_shape: (B, S, K, H).
    has_mask: a boolean mask is passed (padding / cache slots); causality alone is not a mask.
    compute_capability: e.g. "9.0" (None when unknown: the conservative 128 head-dim limit applies).
  """
  check_impl("choose_impl", requested)
  if requested in (None, "xla"):
    return "xla", "requested"
  if requested == "cudnn":
    return "cudnn", "requested"
  if platform != "gpu":
    return "xla", f"platform {platform} (cuDNN flash attention needs an NVIDIA GPU)"
  dt = jnp.dtype(dtype)
  if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "xla", f"dtype {dt.name} (cuDNN flash attention needs bf16/fp16)"
  _, t, _, h = q_shape
  s = k_shape[1]
  hopper = compute_capability is not None and tuple(int(x) for x in compute_capability.split(".")[:2]) >= (9, 0)
  h_max = 256 if hopper else 128
  if h % 8 or h > h_max:
    return "xla", f"head dim {h} (cuDNN: a multiple of 8, <= {h_max})"
  if t == 1:
    return "xla", "single-token query (decode step: a matrix-vector product XLA fuses)"
  if has_mask and (t % 2 or s % 2):
    return "xla", f"masked attention with odd lengths T={t}, S={s} (cuDNN bias kernels for training need even)"
  return "cudnn", "shapes and dtype supported"


def dot_product_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, *, mask: jax.Array | None,
                          scale: float, is_causal: bool = False, impl: str | None = "auto",
                          site: str = "attention") -> jax.Array:
  """``jax.nn.dot_product_attention`` with the implementation chosen by :func:`choose_impl`.

  Args:
    q_btnh: queries (B, T, N, H); k_bskh, v_bskh: keys and values (B, S, K, H), same dtype.
    mask: bool, broadcastable to (B, N, T, S) (True = attend), or None.
    scale: logit scale (``H ** -0.5``).
    is_causal: causal masking (in addition to ``mask``).
    impl: ``attention_impl`` of the model config.
    site: call-site name for the log and :func:`choices` (e.g. ``"clip.vision"``).

  Returns:
    (B, T, N, H) in the query dtype.
  """
  dev = jax.devices()[0]
  choice, reason = choose_impl(impl, platform=dev.platform, dtype=q_btnh.dtype, q_shape=q_btnh.shape,
                               k_shape=k_bskh.shape, has_mask=mask is not None,
                               compute_capability=getattr(dev, "compute_capability", None))
  out = None
  if choice == "cudnn":
    m = mask
    if m is not None:
      # cuDNN turns the mask into a bias, which must span the full (T, S) block.
      m = jnp.broadcast_to(m, m.shape[:-2] + (q_btnh.shape[1], k_bskh.shape[1]))
    try:
      out = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=m, scale=scale, is_causal=is_causal,
                                         implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError) as e:
      if impl == "cudnn":
        raise
      choice, reason = "xla", f"cuDNN rejected the call: {e}"
  if out is None:
    out = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, scale=scale, is_causal=is_causal,
                                       implementation="xla")
  _record(site, choice, reason, q_btnh, k_bskh)
  return out


def _record(site: str, impl: str, reason: str, q, k) -> None:
  entry = {"impl": impl, "reason": reason, "q_shape": tuple(q.shape), "k_shape": tuple(k.shape),
           "dtype": jnp.dtype(q.dtype).name}
  _CHOICES[site] = entry
  key = (site, impl, reason, entry["q_shape"], entry["k_shape"])
  if key not in _LOGGED:
    _LOGGED.add(key)
    _LOG.info("attention %s: %s (%s) q %s k %s %s", site, impl, reason, entry["q_shape"], entry["k_shape"],
              entry["dtype"])


def choices() -> dict[str, dict[str, Any]]:
  """The latest implementation chosen per call site (a copy): ``{site: {"impl", "reason", "q_shape", ...}}``."""
  return {k: dict(v) for k, v in _CHOICES.items()}


def clear_choices() -> None:
  """Forgets the recorded choices (a benchmark calls this before each workload)."""
  _CHOICES.clear()


__all__ = ["IMPLS", "check_impl", "choose_impl", "dot_product_attention", "choices", "clear_choices"]
