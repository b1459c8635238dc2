"""CMRM steering: per-layer additive vectors during LLaVA generation (``cmrm.md`` §3.3, §4.2, §6).

The decoder adds ``alpha * mask[b, t] * v[l]`` to the residual output of layer l (prefill and every decode step,
before layer l+1 computes and caches its K/V), so generation with steering stays the single compiled loop of
:mod:`vlsafe_jax.models.decoding`; vectors, alpha and masks are traced (changing them never recompiles).

* Layer subsets (``layers``: ``"all"``, a list of 0-based indices, or ``"a:b"``) zero the other layers' rows: the
  add of an exact 0 leaves them unchanged.
* ``apply="all"``: every real prompt position and every new token. ``apply="new_tokens"``: only the last prompt
  position (whose logits give the first token) and the decode steps (cmrm.md §4.2).
* Dataset-level: one (L, D) vector for all rows, alpha default 1.0. Sample-level: (B, L, D) vectors from two extra
  prefills per batch (corrupted image, text only), alpha default 0.5.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlsafe_jax.methods.cmrm import shift
from vlsafe_jax.methods.cmrm.masks import APPLY_MODES, layer_mask, prompt_steer_mask
from vlsafe_jax.models.hooks import Hooks

DEFAULT_ALPHA = {"dataset": 1.0, "sample": 0.5}


def dataset_vectors(vectors, text_config) -> np.ndarray:
  """``vectors`` as float32 (L, D), checked against the decoder's (layers, hidden size); a clear error otherwise."""
  v = np.asarray(vectors, np.float32)
  if v.shape != (text_config.num_hidden_layers, text_config.hidden_size):
    raise ValueError(f"cmrm vectors shape {v.shape} != (decoder layers, hidden) = "
                     f"({text_config.num_hidden_layers}, {text_config.hidden_size})")
  return v


def steer_hooks(vectors, alpha: float, *, layers: Any = "all", apply: str = "all",
                attention_mask_bt: np.ndarray | None = None) -> Hooks:
  """Steering :class:`~vlsafe_jax.models.hooks.Hooks` for ``llava.generate`` / ``decoding.generate`` from (L, D)
  or (B, L, D) ``vectors`` (every generated token steered).

  ``attention_mask_bt`` (left-padded prompt mask) is needed for ``apply="new_tokens"``.
  """
  v = np.asarray(vectors, np.float32)
  lm = layer_mask(layers, v.shape[-2])
  prompt_mask = None
  if apply != "all":
    if attention_mask_bt is None:
      raise ValueError("cmrm.apply='new_tokens' needs the prompt attention mask")
    prompt_mask = prompt_steer_mask(attention_mask_bt, apply)
  elif apply not in APPLY_MODES:
    raise ValueError(f"cmrm.apply {apply!r} unknown; expected one of {APPLY_MODES}")
  return Hooks(steer_vectors=v * lm[:, None], steer_alpha=float(alpha), steer_mask_bt=prompt_mask, steer_decode=1)


class Steerer:
  """A ``steer_fn`` for :func:`vlsafe_jax.eval.vlm_safety.generate_responses`.

  Args:
    model: the LLaVA (used for sample-level extraction).
    level: ``"dataset"`` (needs ``vectors`` (L, D)) or ``"sample"`` (vectors computed per batch).
    alpha: None = :data:`DEFAULT_ALPHA` of the level. layers / apply: see the module docstring.
    extract / corrupt / noise_seed: sample-level extraction options (cmrm.md §4.1, §5).
  Rows without an image are steered too for dataset level (the vector is input-independent); sample level needs
  an image span in every row (its text-only counterpart is the row with the span deleted).
  """

  def __init__(self, model, *, level: str = "dataset", vectors=None, alpha: float | None = None,
               layers: Any = "all", apply: str = "all", extract: str = "last", corrupt: str = "blank",
               noise_seed: int = 0, batch_size: int = 16):
    if level not in DEFAULT_ALPHA:
      raise ValueError(f"cmrm level {level!r} unknown; expected 'dataset' or 'sample'")
    if level == "dataset":
      if vectors is None:
        raise ValueError("dataset-level steering needs vectors (L, D)")
      self.vectors = dataset_vectors(vectors, model.config.text_config)
    self.model, self.level, self.layers, self.apply = model, level, layers, apply
    self.alpha = DEFAULT_ALPHA[level] if alpha is None else float(alpha)
    self.extract, self.corrupt, self.noise_seed, self.batch_size = extract, corrupt, noise_seed, batch_size
    self._seen = 0
    self._dataset_hooks = None

  def vectors_for(self, prompts: Sequence[Any]) -> np.ndarray:
    """(B, L, D) sample-level vectors for multimodal prompts (two prefills)."""
    ht, hc = shift.extract_pairs(self.model, prompts, mode=self.extract, corrupt=self.corrupt,
                                 noise_seed=self.noise_seed, batch_size=max(len(prompts), 1), start=self._seen)
    self._seen += len(prompts)
    return shift.sample_vectors(ht, hc)

  def skip(self, n: int) -> None:
    """Advances the per-sample noise-seed offset past ``n`` prompts steered elsewhere (a resumed job that reloads
    a stored set instead of generating it again), so the next prompts get the seeds of an uninterrupted run."""
    self._seen += int(n)

  def __call__(self, batch) -> Mapping[str, Any]:
    """``{"hooks": Hooks}``: the extra ``llava.generate`` keyword argument for this batch."""
    if self.level == "dataset" and self.apply == "all":
      # Input-independent: build (and upload) the hooks once; per batch this is then an attribute read, which
      # keeps the host-side cost of dataset-level steering out of the generate loop's timing (the <= 3% budget).
      if self._dataset_hooks is None:
        h = steer_hooks(self.vectors, self.alpha, layers=self.layers, apply=self.apply)
        self._dataset_hooks = h.replace(steer_vectors=jnp.asarray(h.steer_vectors, jnp.float32),
                                        steer_alpha=jnp.asarray(h.steer_alpha, jnp.float32),
                                        steer_decode=jnp.asarray(h.steer_decode, jnp.int32))
      return {"hooks": self._dataset_hooks}
    v = self.vectors if self.level == "dataset" else self.vectors_for(batch.prompts)
    return {"hooks": steer_hooks(v, self.alpha, layers=self.layers, apply=self.apply,
                                 attention_mask_bt=batch.attention_mask)}


__all__ = ["APPLY_MODES", "DEFAULT_ALPHA", "dataset_vectors", "layer_mask", "prompt_steer_mask", "steer_hooks",
           "Steerer"]
