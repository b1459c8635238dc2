"""The TGA forward on a LLaVA (tga.md §3.3-§4): per-row image embedding, the text-only reference pass, the loss of
one (micro-)batch, and the step's objective and metrics for :func:`vlsafe_jax.train.common.make_update_fn`.

Shapes: B rows, T tokens of the training prompt, D hidden size, |L| loss layers (HF hidden-state indices).
``batch`` holds the arrays of :func:`vlsafe_jax.data.tga_prompt.collate` plus ``pixels`` (B, h, w, 3) float32.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlsafe_jax.methods.tga import loss as loss_lib
from vlsafe_jax.models.hooks import Hooks
from vlsafe_jax.models.llava import Llava

# The batch arrays the step reads (collate may add others; they are dropped before the forward pass).
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "retrieved_mask", "image_mask", "ref_ids",
              "ref_attention_mask", "caption_mask", "aux_weight", "diag_weight", "pixels")


def embed_rows(model: Llava, input_ids_bt: jax.Array, pixels_bhwc: jax.Array) -> jax.Array:
  """Decoder inputs (B, T, D) with one image per row: row b's image-token positions take image b's features.

  Unlike HF's batch-global ``masked_scatter`` order, rows without image tokens (text-only rows, which still carry
  a dummy image so shapes stay static) consume no features, so a text-only row never shifts another row's image.
  """
  cfg = model.config
  image_bt = input_ids_bt == cfg.image_token_index
  x_btd = model.language_model.embed(jnp.where(image_bt, 0, input_ids_bt))
  feats_bnd = model.image_features(pixels_bhwc).astype(x_btd.dtype)
  pos_bt = jnp.clip(jnp.cumsum(image_bt.astype(jnp.int32), axis=1) - 1, 0, feats_bnd.shape[1] - 1)
  g_btd = jnp.take_along_axis(feats_bnd, pos_bt[..., None], axis=1)
  return jnp.where(image_bt[..., None], g_btd, x_btd)


def caption_means(model: Llava, batch: Mapping[str, jax.Array], layers: Sequence[int]) -> jax.Array:
  """Reference pass (tga.md §3.3): caption-token means (B, |layers|, D) float32 under stop_gradient.

  Runs only the first ``max(layers)`` decoder layers (no final norm, no LM head) on the text-only prompt.
  """
  lm = model.language_model
  _, _, ex = lm(batch["ref_ids"], attention_mask_bt=batch["ref_attention_mask"], logits="none",
                hooks=Hooks(hidden_masks_bmt=batch["caption_mask"][:, None, :], num_layers=max(layers)))
  return jax.lax.stop_gradient(loss_lib.select_layers(ex["hidden_masked_means"], layers)[:, :, 0])


def forward_terms(model: Llava, batch: Mapping[str, jax.Array], rho, cfg: loss_lib.TGALossConfig
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and terms for one (micro-)batch (see :func:`vlsafe_jax.methods.tga.loss.tga_loss`)."""
  c_bld = caption_means(model, batch, cfg.layers)
  x_btd = embed_rows(model, batch["input_ids"], batch["pixels"])
  masks_bmt = jnp.stack([batch["retrieved_mask"], batch["image_mask"]], axis=1)
  logits, _, ex = model.language_model(inputs_embeds_btd=x_btd, attention_mask_bt=batch["attention_mask"],
                                       hooks=Hooks(hidden_masks_bmt=masks_bmt))
  means = loss_lib.select_layers(ex["hidden_masked_means"], cfg.layers)        # (B, |L|, 2, D)
  return loss_lib.tga_loss(logits, batch["labels"], means[:, :, 1], means[:, :, 0], c_bld, batch["aux_weight"],
                           rho, cfg, batch.get("diag_weight"))


def make_loss_fn(graphdef, loss_cfg: loss_lib.TGALossConfig) -> Callable:
  """``(params, frozen, batch, key, rho) -> (loss, aux)``: the step's objective (deterministic; ``key`` unused)."""
  def loss_fn(params, frozen, batch, key, rho):
    del key                                     # no dropout in the TGA model
    model = nnx.merge(graphdef, params, frozen)
    return forward_terms(model, {k: batch[k] for k in BATCH_KEYS}, rho, loss_cfg)
  return loss_fn


def rho_schedule(total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """``step -> rho = step / total_steps`` float32 (tga.md §4: step = updates completed before this one)."""
  return lambda step: step.astype(jnp.float32) / float(max(total_steps, 1))


def make_metrics_fn(loss_cfg: loss_lib.TGALossConfig, total_steps: int) -> Callable[[dict, jax.Array], dict]:
  """``(aux, step) -> metrics``: the loss terms, rho, token accuracy and the per-layer cosines as 0-d scalars
  (``cos_vc_l{k}`` / ``cos_rc_l{k}`` with k the HF hidden-state index)."""
  rho_fn = rho_schedule(total_steps)

  def metrics_fn(aux, step):
    out = {"rho": rho_fn(step), "token_acc": aux["n_correct"] / jnp.maximum(aux["n_tokens"], 1)}
    for k in ("ce", "align", "pairwise", "align_raw", "pairwise_raw", "w_align", "w_pairwise"):
      out[k] = aux[k]
    for i, layer in enumerate(loss_cfg.layers):
      out[f"cos_vc_l{layer}"] = aux["cos_vc_l"][i]
      out[f"cos_rc_l{layer}"] = aux["cos_rc_l"][i]
    return out
  return metrics_fn


__all__ = ["BATCH_KEYS", "embed_rows", "caption_means", "forward_terms", "make_loss_fn", "rho_schedule",
           "make_metrics_fn"]
