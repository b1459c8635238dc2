"""Batched autoregressive generation for :class:`vlsafe_jax.models.llama.Llama` (and LLaVA through it).

One compiled function per (batch, prompt-length bucket, max_new_tokens, greedy/sampling): a prefill over the
left-padded prompt fills a preallocated KV cache of ``bucket + max_new_tokens`` slots, then a ``lax.while_loop``
decodes one token per iteration inside the same program (no host round trip, no recompilation per step) and
exits early once every row has emitted EOS. Sampling knobs (temperature, top-k, top-p), the seed and the steering
:class:`~vlsafe_jax.models.hooks.Hooks` (vectors, alpha, masks) are traced arguments, so changing them never
recompiles.

Conventions: prompts are left-padded (``attention_mask`` 0 on the left); :func:`generate_text` pads prompts
further on the left up to the bucket length (:func:`bucket_length`), which changes nothing numerically because
padded keys are masked and positions come from the mask. Output tokens after a row's EOS are ``pad_token_id``;
``lengths`` counts generated tokens including the EOS.

Core entry :func:`generate` takes either ``input_ids`` or ``inputs_embeds`` for the prefill (LLaVA splices
projected image features into the embeddings and calls it with ``inputs_embeds``).
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlsafe_jax.models.hooks import Hooks

# Python-side trace counter of the compiled generate program, keyed by "generate"; tests use it to prove that
# prompts of one bucket share a compilation.
TRACE_COUNTS: collections.Counter = collections.Counter()


class GenerateOutput(NamedTuple):
  """tokens: int32 (B, max_new_tokens), pad after EOS; lengths: int32 (B,) generated tokens incl. EOS;
  first_logits: float32 (B, V) logits of the first generated token (prefill's last position)."""
  tokens: jax.Array
  lengths: jax.Array
  first_logits: jax.Array


def bucket_length(n: int, *, min_bucket: int = 16, step: int = 64) -> int:
  """Prompt-length bucket: powers of two from ``min_bucket`` up to ``step``, then multiples of ``step``.

  Few distinct buckets bound the number of compilations; the multiples keep padding waste under ``step`` for
  long (LLaVA: ~600-token) prompts.
  """
  if n <= 0:
    raise ValueError(f"prompt length must be positive, got {n}")
  b = min_bucket
  while b < n and b < step:
    b *= 2
  if b >= n:
    return b
  return -(-n // step) * step


def sample_token(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                 top_p: jax.Array) -> jax.Array:
  """Samples one token per row: int32 (B,).

  HF order: logits / temperature, keep the ``top_k`` largest (0 = all), then the smallest set of tokens whose
  probability mass reaches ``top_p`` (the most likely token is always kept), then a categorical draw. All knobs
  are traced scalars (the thresholds come from one descending sort, so k need not be static).
  """
  v = logits_bv.shape[-1]
  logits = logits_bv.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  sorted_bv = jnp.sort(logits, axis=-1)[:, ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth_b1 = jax.lax.dynamic_slice_in_dim(sorted_bv, k - 1, 1, axis=-1)
  logits = jnp.where(logits < kth_b1, -jnp.inf, logits)
  sorted_bv = jnp.where(jnp.arange(v) < k, sorted_bv, -jnp.inf)
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  # Keep sorted token j iff the mass strictly before it is < top_p; the cutoff logit is the last kept one.
  before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  keep_bv = (before_bv < top_p) | (jnp.arange(v) == 0)
  cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < cutoff_b1, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _select(logits_bv, key, do_sample, temperature, top_k, top_p):
  if do_sample:
    return sample_token(logits_bv, key, temperature, top_k, top_p)
  return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "do_sample", "eos_ids", "pad_id"),
                   )
def _generate_jit(graphdef, state, input_ids_bt, inputs_embeds_btd, mask_bt, hooks, key, temperature, top_k,
                  top_p, *, max_new_tokens: int, do_sample: bool, eos_ids: tuple[int, ...], pad_id: int):
  TRACE_COUNTS["generate"] += 1
  model = nnx.merge(graphdef, state)
  b, p = mask_bt.shape
  cache = model.init_cache(b, p + max_new_tokens)
  first_logits, cache, _ = model(input_ids_bt, inputs_embeds_btd=inputs_embeds_btd, attention_mask_bt=mask_bt,
                                 kv_cache=cache, hooks=hooks, logits="last")
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def pick(logits_bv, step):
    return _select(logits_bv, jax.random.fold_in(key, step), do_sample, temperature, top_k, top_p)

  tok_b = pick(first_logits, 0)
  done_b = jnp.isin(tok_b, eos)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_b)
  lengths_b = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, done_b, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done_b)

  def body(carry):
    step, tok_b, done_b, tokens, lengths_b, cache = carry
    ones_b1 = jnp.ones((b, 1), jnp.int32)
    # A generated token is steered iff steer_decode (0/1) says so: the hooks' mask becomes that column.
    step_hooks = None if hooks is None else hooks.replace(steer_mask_bt=ones_b1 * hooks.steer_decode)
    logits_bv, cache, _ = model(tok_b[:, None], attention_mask_bt=ones_b1, kv_cache=cache, hooks=step_hooks,
                                logits="last")
    new_b = pick(logits_bv, step)
    new_b = jnp.where(done_b, pad_id, new_b)                 # finished rows only emit padding
    tokens = jax.lax.dynamic_update_slice(tokens, new_b[:, None], (0, step))
    lengths_b = lengths_b + (~done_b).astype(jnp.int32)
    done_b = done_b | jnp.isin(new_b, eos)
    return step + 1, new_b, done_b, tokens, lengths_b, cache

  carry = (jnp.asarray(1, jnp.int32), tok_b, done_b, tokens, lengths_b, cache)
  _, _, _, tokens, lengths_b, _ = jax.lax.while_loop(cond, body, carry)
  return GenerateOutput(tokens, lengths_b, first_logits)


def generate(model, *, attention_mask, input_ids=None, inputs_embeds=None, max_new_tokens: int = 32,
             eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | jax.Array = 0, hooks: Hooks | None = None) -> GenerateOutput:
  """Generates ``max_new_tokens`` tokens for a left-padded batch (no bucketing; see :func:`generate_text`).

  Args:
    model: a ``Llama`` (anything with the same ``__call__``/``init_cache`` interface).
    attention_mask: (B, P) 1 = prompt token, 0 = left padding. Exactly one of ``input_ids`` (B, P) and
      ``inputs_embeds`` (B, P, D).
    eos_token_id / pad_token_id: default from the model config (pad falls back to the first EOS, then 0).
    do_sample: False = greedy (static); True = sample with temperature / top_k (0 = off) / top_p (traced).
    seed: int or PRNG key; the same seed gives the same tokens.
    hooks: optional steering :class:`~vlsafe_jax.models.hooks.Hooks`: ``steer_vectors`` (L, D) or (B, L, D),
      ``steer_alpha``, ``steer_mask_bt`` (B, P) where to steer the prompt (default: every real prompt token),
      ``steer_decode`` (steer each generated token). Captures are not supported (generate returns none).
  Returns: :class:`GenerateOutput`.
  """
  cfg = model.config
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids and inputs_embeds")
  mask = jnp.asarray(attention_mask, jnp.int32)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  lead = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
  if tuple(mask.shape) != tuple(lead):
    raise ValueError(f"attention_mask shape {tuple(mask.shape)} != prompt (batch, length) {tuple(lead)}")
  eos = cfg.eos_token_ids if eos_token_id is None else (
      tuple(eos_token_id) if isinstance(eos_token_id, (tuple, list)) else (int(eos_token_id),))
  pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
  pad = int(pad if pad is not None else (eos[0] if eos else 0))
  steer_hooks = None
  if hooks is not None:
    if hooks.captures or hooks.num_layers is not None:
      raise ValueError("generate takes steering hooks only (captures and num_layers are forward-pass hooks)")
    if hooks.steers:
      # Fixed dtypes, so Python and array values of alpha / decode share one compilation.
      prompt_mask = mask if hooks.steer_mask_bt is None else jnp.asarray(hooks.steer_mask_bt, jnp.int32)
      steer_hooks = Hooks(steer_vectors=jnp.asarray(hooks.steer_vectors, jnp.float32),
                          steer_alpha=jnp.asarray(hooks.steer_alpha, jnp.float32), steer_mask_bt=prompt_mask,
                          steer_decode=jnp.asarray(hooks.steer_decode, jnp.int32))
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  graphdef, state = nnx.split(model)
  return _generate_jit(
      graphdef, state, None if input_ids is None else jnp.asarray(input_ids, jnp.int32),
      inputs_embeds, mask, steer_hooks, key, jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
      jnp.asarray(top_p, jnp.float32), max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
      eos_ids=eos, pad_id=pad)


def left_pad(rows: list[list[int]] | np.ndarray, mask: np.ndarray | None, length: int, pad_id: int):
  """Left-pads (or re-pads) token rows to ``length``: returns int32 ids (B, length) and mask (B, length)."""
  if mask is not None:
    ids = np.asarray(rows)
    mask = np.asarray(mask).astype(bool)
    rows = [list(r[m]) for r, m in zip(ids, mask)]
  out_ids = np.full((len(rows), length), pad_id, np.int32)
  out_mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    if len(r) > length:
      raise ValueError(f"prompt {i} has {len(r)} tokens, more than the bucket length {length}")
    if len(r):
      out_ids[i, length - len(r):] = r
      out_mask[i, length - len(r):] = 1
  return out_ids, out_mask


def repad_steer_mask(hooks: Hooks | None, mask: np.ndarray | None, length: int) -> Hooks | None:
  """``hooks`` with its prompt steering mask re-padded like the prompts (:func:`left_pad` to ``length``).

  ``mask`` is the prompts' original attention mask (None for token lists, which carry no steering mask).
  """
  if hooks is None or hooks.steer_mask_bt is None:
    return hooks
  if mask is None:
    raise ValueError("a steering mask (hooks.steer_mask_bt) needs input_ids as an array with attention_mask")
  steer_mask, _ = left_pad(np.asarray(hooks.steer_mask_bt), mask, length, 0)
  return hooks.replace(steer_mask_bt=steer_mask)


def generate_text(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, min_bucket: int = 16,
                  bucket_step: int = 64, hooks: Hooks | None = None, **kwargs) -> GenerateOutput:
  """Text-only generation with prompt-length bucketing (one compilation per bucket).

  Args:
    input_ids: (B, T) array (left- or right-padded, with ``attention_mask``) or a list of token lists.
    attention_mask: (B, T) 1 = real token; required for padded arrays.
    hooks: steering hooks (see :func:`generate`); ``steer_mask_bt`` (B, T) is aligned with ``input_ids`` and
      re-padded with the prompts.
    kwargs: see :func:`generate`.
  """
  if isinstance(input_ids, (list, tuple)) and attention_mask is None:
    rows, mask = list(input_ids), None
    n = max(len(r) for r in rows)
  else:
    rows = np.asarray(input_ids)
    mask = np.ones(rows.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != rows.shape:
      raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {rows.shape}")
    n = int(mask.sum(-1).max())
  length = bucket_length(n, min_bucket=min_bucket, step=bucket_step)
  pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
  ids, new_mask = left_pad(rows, mask, length, pad)
  return generate(model, input_ids=ids, attention_mask=new_mask, max_new_tokens=max_new_tokens,
                  hooks=repad_steer_mask(hooks, mask, length), **kwargs)


__all__ = ["generate", "generate_text", "GenerateOutput", "sample_token", "bucket_length", "left_pad",
           "repad_steer_mask", "TRACE_COUNTS"]
