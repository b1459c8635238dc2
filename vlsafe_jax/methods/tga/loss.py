"""TGA loss (tga.md §4.2): alignment + pair-wise terms on mid-layer masked means, plus the LM loss.

Notation (shape suffixes): B batch, L = |layers| selected hidden-state indices, D decoder width, T tokens, V vocab.
For sample b and selected layer l (HF hidden-state index: k = residual stream after k decoder blocks):

* ``v_bld`` mean image-token hidden state (segment 2) of the training pass, with gradient;
* ``r_bld`` mean retrieved-text hidden state (segment 1) of the same pass (precedes the image, causal mask);
* ``c_bld`` mean caption-token hidden state (segment 3) of the text-only reference pass (always stop_gradient);
* ``m_b`` 1 for rows that take part in the auxiliary terms (0 for "tox" ids and rows without an image,
  a retrieved text or a caption);
* ``rho = step / max_steps`` in [0, 1] (per stage).

    L_al = w_al (1 - rho)^decay_al / (|L| N) sum_l sum_b m_b exp(-cos(v, c))
    L_pw = w_pw (1 - rho)^decay_pw / (|L| N) sum_l sum_b m_b exp(cos(r, c) - cos(v, c))

with N = B (``norm="batch"``, the reference: excluded rows still count) or ``sum_b m_b`` (``norm="included"``).

``mode="torch_parity"`` reproduces the released code, whose Python ``math.exp`` turns both terms into constants:
same values, but wrapped in ``stop_gradient`` so only the LM loss trains the model.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlsafe_jax.data.tga_prompt import IGNORE_INDEX

MODES = ("differentiable", "torch_parity")
NORMS = ("batch", "included")


@dataclasses.dataclass(frozen=True)
class TGALossConfig:
  """Loss options (config ``tga.loss``); defaults are the reference code's values (tga.md §4.2)."""
  layers: tuple[int, ...] = tuple(range(10, 19))
  w_al: float = 0.25
  w_pw: float = 0.1
  decay_al: float = 1.0              # exponent of (1 - rho)
  decay_pw: float = 2.0
  stop_grad_retrieved: bool = True
  mode: str = "differentiable"
  norm: str = "batch"
  eps: float = 1e-8

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
    if self.mode not in MODES:
      raise ValueError(f"tga.loss.mode must be one of {MODES}, got {self.mode!r}")
    if self.norm not in NORMS:
      raise ValueError(f"tga.loss.norm must be one of {NORMS}, got {self.norm!r}")
    if not self.layers or min(self.layers) < 1:
      raise ValueError(f"tga.loss.layers must be non-empty HF hidden-state indices >= 1 (0 = embeddings), got "
                       f"{self.layers}")

  @property
  def last_layer(self) -> int:
    """Deepest layer used: the reference pass can stop there."""
    return max(self.layers)


def cosine(a_xd: jax.Array, b_xd: jax.Array, eps: float = 1e-8) -> jax.Array:
  """``a.b / (max(|a|, eps) max(|b|, eps))`` over the last axis, float32 (torch ``cosine_similarity``).

  a, b (..., D) any float dtype; returns (...) float32 in [-1, 1].
  """
  a = a_xd.astype(jnp.float32)
  b = b_xd.astype(jnp.float32)
  # sqrt(max(|a|^2, eps^2)) == max(|a|, eps), but its gradient at a = 0 is 0 instead of NaN (norm's x / |x|):
  # rows with an empty span have zero means and must not poison the gradient of the rows that are kept.
  na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps * eps))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps * eps))
  return jnp.sum(a * b, axis=-1) / (na * nb)


def masked_mean(h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Float32 mean of h over the positions where mask is 1: (B, T, D), (B, T) -> (B, D); empty masks give 0.

  The training step computes the same quantity inside the decoder's layer scan (``Hooks.hidden_masks_bmt``); this
  function is the reference for tests and for analysis on returned hidden states.
  """
  m = mask_bt.astype(jnp.float32)
  s = jnp.einsum("bt,btd->bd", m, h_btd.astype(jnp.float32))
  return s / jnp.maximum(m.sum(-1), 1.0)[:, None]


def select_layers(means_blmd: jax.Array, layers: Sequence[int]) -> jax.Array:
  """Picks HF hidden-state indices from the scan's per-layer captures.

  The decoder returns captures for layer outputs 1..L_run at array index 0..L_run-1 (no embeddings), so HF index
  k is array index k - 1. ``means_blmd`` (B, L_run, ...) -> (B, |layers|, ...).
  """
  idx = np.asarray(layers, np.int32) - 1
  if idx.min() < 0 or idx.max() >= means_blmd.shape[1]:
    raise ValueError(f"layers {tuple(layers)} outside the {means_blmd.shape[1]} captured decoder layers")
  return means_blmd[:, idx]


def decay_weights(rho: jax.Array | float, cfg: TGALossConfig) -> tuple[jax.Array, jax.Array]:
  """Scheduled weights ``(w_al (1-rho)^decay_al, w_pw (1-rho)^decay_pw)``; rho clipped to [0, 1]."""
  one_minus = 1.0 - jnp.clip(jnp.asarray(rho, jnp.float32), 0.0, 1.0)
  return cfg.w_al * one_minus ** cfg.decay_al, cfg.w_pw * one_minus ** cfg.decay_pw


def aux_losses(v_bld: jax.Array, r_bld: jax.Array, c_bld: jax.Array, m_b: jax.Array, rho: jax.Array | float,
               cfg: TGALossConfig, diag_b: jax.Array | None = None) -> dict[str, jax.Array]:
  """The two auxiliary terms and their diagnostics.

  Args:
    v_bld, r_bld, c_bld: image / retrieved-text / caption masked means (B, L, D) (float32 or bf16).
    m_b: (B,) 0/1 participation of each row.
    rho: training progress in [0, 1] (scalar).
    cfg: :class:`TGALossConfig`.
    diag_b: (B,) rows averaged in the diagnostics (default ``m_b``); e.g. every image row with a caption, so a
      baseline without retrieved text / aux terms still logs cos(v, c).
  Returns: dict with scalars ``align``, ``pairwise`` (weighted and decayed), ``align_raw``/``pairwise_raw``
    (unweighted normalised sums), and per-layer diagnostics ``cos_vc_l``/``cos_rc_l`` (L,) = mean over the
    ``diag_b`` rows of cos(v, c) / cos(r, c) (0 when there is none).
  """
  m = m_b.astype(jnp.float32)
  c = jax.lax.stop_gradient(c_bld)
  r = jax.lax.stop_gradient(r_bld) if cfg.stop_grad_retrieved else r_bld
  cos_vc_bl = cosine(v_bld, c, cfg.eps)
  cos_rc_bl = cosine(r, c, cfg.eps)
  n_layers = v_bld.shape[1]
  if cfg.norm == "batch":
    denom = jnp.float32(m.shape[0])
  else:
    denom = jnp.maximum(m.sum(), 1.0)
  # Excluded rows are zeroed with where (not a product) so a NaN/Inf in an unused row cannot leak in.
  keep_bl = m[:, None] > 0
  al_raw = jnp.sum(jnp.where(keep_bl, jnp.exp(-cos_vc_bl), 0.0)) / (n_layers * denom)
  pw_raw = jnp.sum(jnp.where(keep_bl, jnp.exp(cos_rc_bl - cos_vc_bl), 0.0)) / (n_layers * denom)
  w_al, w_pw = decay_weights(rho, cfg)
  align, pairwise = w_al * al_raw, w_pw * pw_raw
  if cfg.mode == "torch_parity":
    align, pairwise = jax.lax.stop_gradient(align), jax.lax.stop_gradient(pairwise)
  d = m if diag_b is None else diag_b.astype(jnp.float32)
  n_in = jnp.maximum(d.sum(), 1.0)
  diag = lambda x_bl: jax.lax.stop_gradient(jnp.sum(jnp.where(d[:, None] > 0, x_bl, 0.0), axis=0) / n_in)
  return {"align": align, "pairwise": pairwise, "align_raw": jax.lax.stop_gradient(al_raw),
          "pairwise_raw": jax.lax.stop_gradient(pw_raw), "cos_vc_l": diag(cos_vc_bl), "cos_rc_l": diag(cos_rc_bl),
          "w_align": w_al, "w_pairwise": w_pw}


def lm_loss(logits_btv: jax.Array, labels_bt: jax.Array, ignore_index: int = IGNORE_INDEX
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Next-token cross-entropy on labelled (answer) tokens, mean over them (HF causal-LM convention).

  Args:
    logits_btv: (B, T, V) logits of the training pass (any float dtype; computed in float32).
    labels_bt: int (B, T): the token to predict *at* position t (unshifted, as HF ``labels``), ``ignore_index``
      where no loss is taken (prompt, image, padding). Position t's logits predict label t + 1.
  Returns: ``(loss, n_tokens, n_correct)`` float32 scalars; loss is 0 when no token is labelled.
  """
  logits = logits_btv[:, :-1].astype(jnp.float32)
  target = labels_bt[:, 1:]
  valid = target != ignore_index
  safe = jnp.where(valid, target, 0)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, logz - picked, 0.0)
  n = valid.sum().astype(jnp.float32)
  correct = jnp.where(valid, jnp.argmax(logits, axis=-1) == safe, False).sum().astype(jnp.float32)
  return nll.sum() / jnp.maximum(n, 1.0), n, correct


def tga_loss(logits_btv: jax.Array, labels_bt: jax.Array, v_bld: jax.Array, r_bld: jax.Array, c_bld: jax.Array,
             m_b: jax.Array, rho: jax.Array | float, cfg: TGALossConfig, diag_b: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total ``L = L_CE + L_al + L_pw`` and every term (see :func:`aux_losses`, :func:`lm_loss`)."""
  ce, n_tok, n_correct = lm_loss(logits_btv, labels_bt)
  aux = aux_losses(v_bld, r_bld, c_bld, m_b, rho, cfg, diag_b)
  total = ce + aux["align"] + aux["pairwise"]
  return total, {"ce": ce, "n_tokens": n_tok, "n_correct": n_correct, **aux}


__all__ = ["TGALossConfig", "cosine", "masked_mean", "select_layers", "decay_weights", "aux_losses", "lm_loss",
           "tga_loss", "MODES", "NORMS", "IGNORE_INDEX"]
