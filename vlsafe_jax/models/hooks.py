"""Method hooks of the Llama decoder as one pytree: CMRM steering and TGA/CMRM hidden-state captures.

One :class:`Hooks` value is passed as ``hooks=`` through ``Llama.__call__``, ``Llava.__call__`` and
``decoding.generate`` / ``llava.generate`` (``cmrm.md`` §4, ``tga.md`` §4.2). Array fields are pytree leaves
(traced: changing a vector, alpha or a mask never recompiles); ``output_hidden_states`` and ``num_layers`` change
the program and are static (part of the pytree structure, so jit keys on them). ``None`` fields are off.

Inside the decoder's layer scan the steering vectors are the only part that varies by layer: they ride the scan
as layer-major inputs (:meth:`Hooks.layer_vectors`); the rest is shared by every layer. Each layer's residual
output then goes through :meth:`Hooks.steer` and :meth:`Hooks.capture`, and :meth:`Hooks.collect` turns the
scan's stacked outputs into the ``extras`` dict.

Shape-suffix legend: B batch, T tokens of this call, L decoder layers, D width, P captured positions per example,
M capture masks.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Hooks:
  """What a decoder call adds to or reads from the residual stream (all fields optional).

  Steering: layer l's residual output becomes ``h + alpha * mask[..., None] * v_l`` *before* it feeds layer l+1
  (whose K/V are cached), and before the final norm for the last layer.
    steer_vectors: (L, D) shared by all rows or (B, L, D) per example, float32 (cast to the residual dtype at the
      add); None = no steering.
    steer_mask_bt: (B, T) where to add them; None = every real token (the attention mask). In generation this is
      the prompt mask (B, P), aligned with the prompt as the caller passes it.
    steer_alpha: scalar.
    steer_decode: scalar 0/1, generation only: whether each generated token is steered too.

  Captures (returned in the call's ``extras``):
    output_hidden_states: static; ``extras['hidden_states']`` (L+1, B, T, D), embeddings then every layer's
      residual output (HF convention, pre-final-norm).
    hidden_positions_bp: int (B, P) indices into the call's T tokens -> ``extras['hidden_at_positions']``
      (B, L, P, D) (e.g. the last prompt token, ``T - 1`` under left padding).
    hidden_masks_bmt: (B, M, T) 0/1 -> ``extras['hidden_masked_means']`` (B, L, M, D) float32 means over each
      token set, accumulated inside the scan (no (L, B, T, D) stack is kept).
    num_layers: static; run only the first ``num_layers`` layers (no final norm, no logits: TGA's reference pass).
  """
  steer_vectors: jax.Array | None = None
  steer_mask_bt: jax.Array | None = None
  steer_alpha: jax.Array | float = 1.0
  steer_decode: jax.Array | int = 1
  hidden_positions_bp: jax.Array | None = None
  hidden_masks_bmt: jax.Array | None = None
  output_hidden_states: bool = struct.field(pytree_node=False, default=False)
  num_layers: int | None = struct.field(pytree_node=False, default=None)

  @property
  def steers(self) -> bool:
    return self.steer_vectors is not None

  @property
  def captures(self) -> bool:
    return self.output_hidden_states or self.hidden_positions_bp is not None or self.hidden_masks_bmt is not None

  def layers_to_run(self, total: int) -> int:
    """Decoder layers this call runs: ``num_layers`` (checked against ``total``) or all of them."""
    n = total if self.num_layers is None else self.num_layers
    if not 1 <= n <= total:
      raise ValueError(f"num_layers {self.num_layers} outside [1, {total}]")
    return n

  def layer_vectors(self, num_layers: int, hidden: int, batch: int) -> jax.Array | None:
    """Steering vectors layer-major, float32 (L, 1, D) when shared or (L, B, D) per example; None when off."""
    if not self.steers:
      return None
    v = jnp.asarray(self.steer_vectors, jnp.float32)
    if v.shape == (num_layers, hidden):
      return v[:, None, :]
    if v.shape == (batch, num_layers, hidden):
      return jnp.swapaxes(v, 0, 1)
    raise ValueError(f"steer_vectors must be (L, D) = ({num_layers}, {hidden}) or (B, L, D) = ({batch}, "
                     f"{num_layers}, {hidden}), got {v.shape}")

  def steer_scale(self, mask_bt: jax.Array) -> jax.Array | None:
    """``alpha * steer_mask`` as float32 (B, T, 1), folded once outside the layer scan; None when off.

    ``mask_bt`` is the call's attention mask, the default steering mask.
    """
    if not self.steers:
      return None
    s_mask = mask_bt if self.steer_mask_bt is None else self.steer_mask_bt
    if s_mask.shape != mask_bt.shape:
      raise ValueError(f"steer_mask shape {s_mask.shape} != (batch, length) {tuple(mask_bt.shape)}")
    return (jnp.asarray(self.steer_alpha, jnp.float32) * s_mask.astype(jnp.float32))[..., None]

  @staticmethod
  def steer(x_btd: jax.Array, scale_bt1: jax.Array | None, v_xd: jax.Array | None) -> jax.Array:
    """One layer's steered residual ``x + scale * v`` (v (1 or B, D) of this layer), in x's dtype (cmrm.md §4.2).

    The product is formed in float32 and cast once; XLA fuses it with the layer's residual add, so steering costs
    no extra pass over the residual stream (bench cmrm's <= 3% overhead budget).
    """
    if scale_bt1 is None:
      return x_btd
    return x_btd + (scale_bt1 * v_xd[:, None, :]).astype(x_btd.dtype)

  def capture(self, x_btd: jax.Array) -> dict[str, jax.Array]:
    """This layer's captures from its residual output x (B, T, D): the scan stacks them over layers."""
    ys = {}
    if self.output_hidden_states:
      ys["hidden"] = x_btd
    if self.hidden_positions_bp is not None:
      ys["at_positions"] = jnp.take_along_axis(
          x_btd, self.hidden_positions_bp[..., None].astype(jnp.int32), axis=1)            # (B, P, D)
    if self.hidden_masks_bmt is not None:
      m_bmt = self.hidden_masks_bmt.astype(jnp.float32)
      denom_bm1 = jnp.maximum(m_bmt.sum(-1, keepdims=True), 1.0)                           # empty set -> 0, not NaN
      ys["masked_means"] = jnp.einsum("bmt,btd->bmd", m_bmt, x_btd.astype(jnp.float32)) / denom_bm1
    return ys

  def collect(self, x0_btd: jax.Array, ys: dict[str, jax.Array]) -> dict[str, Any]:
    """``extras`` from the scan's stacked captures (leading layer axis) and the embeddings x0 (B, T, D)."""
    extras: dict[str, Any] = {}
    if self.output_hidden_states:
      extras["hidden_states"] = jnp.concatenate([x0_btd[None], ys["hidden"]], axis=0)     # (L+1, B, T, D)
    if self.hidden_positions_bp is not None:
      extras["hidden_at_positions"] = jnp.swapaxes(ys["at_positions"], 0, 1)             # (B, L, P, D)
    if self.hidden_masks_bmt is not None:
      extras["hidden_masked_means"] = jnp.swapaxes(ys["masked_means"], 0, 1)             # (B, L, M, D) float32
    return extras


NO_HOOKS = Hooks()

__all__ = ["Hooks", "NO_HOOKS"]
