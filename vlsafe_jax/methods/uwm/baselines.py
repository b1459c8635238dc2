"""The two gradient baselines of UWM (``uwm.md`` §8): G-Unsafe and G-Safe-CLIP.

Score of a target weight = mean over calibration batches of ``|dL/dW|`` (only the scored layers' kernels are
differentiated, one ``jax.grad`` per batch), selection = hard top-k per layer (the ``1 - keep`` share with the
largest scores), manipulation alpha = 0 (zeroing). ``cos`` is the cosine similarity of projected embeddings;
I_s, I_u, T_s, T_u are the safe/unsafe image/text embeddings of a batch of quadruplets (rows paired).

- G-Unsafe (keep 0.965): vision ``-(1 - cos(I_s, T_s)) + (1 - cos(I_s, T_u))``, text
  ``-(1 - cos(T_s, I_s)) + (1 - cos(T_s, I_u))`` (batch means).
- G-Safe-CLIP (keep 0.995): vision = symmetric CLIP InfoNCE between T_u and I_s (logit scale e^4.6052 ~ 100)
  + ``(1 - cos(I_s, I_u))``; text = InfoNCE between I_u and T_s + ``(1 - cos(T_s, T_u))``.

The tower being scored decides which kernels are differentiated; the other tower's embeddings enter as constants.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from vlsafe_jax.methods.uwm import calibrate as cal
from vlsafe_jax.methods.uwm import edit

LOGIT_SCALE = float(np.exp(4.6052))   # CLIP's capped scale (~100)


def _unit(x_bp):
  x_bp = x_bp.astype(jnp.float32)
  return x_bp / jnp.linalg.norm(x_bp, axis=-1, keepdims=True)


def _cos(a_bp, b_bp):
  """Row-wise cosine similarity ``(B, P), (B, P) -> (B,)``."""
  return jnp.sum(_unit(a_bp) * _unit(b_bp), axis=-1)


def info_nce(a_bp: jax.Array, b_bp: jax.Array, scale: float = LOGIT_SCALE) -> jax.Array:
  """Symmetric CLIP InfoNCE, row i of ``a`` paired with row i of ``b``: scalar float32."""
  logits = scale * _unit(a_bp) @ _unit(b_bp).T
  labels = jnp.arange(a_bp.shape[0])
  ce = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()  # noqa: E731
  return 0.5 * (ce(logits) + ce(logits.T))


def g_unsafe_loss(emb: Mapping[str, jax.Array], tower: str) -> jax.Array:
  """G-Unsafe objective of ``tower`` from ``{"I_s", "I_u", "T_s", "T_u"}`` embeddings ``(B, P)``."""
  if tower == "vision":
    return jnp.mean(-(1 - _cos(emb["I_s"], emb["T_s"])) + (1 - _cos(emb["I_s"], emb["T_u"])))
  return jnp.mean(-(1 - _cos(emb["T_s"], emb["I_s"])) + (1 - _cos(emb["T_s"], emb["I_u"])))


def g_safe_clip_loss(emb: Mapping[str, jax.Array], tower: str) -> jax.Array:
  """G-Safe-CLIP objective of ``tower`` (InfoNCE redirect + safe/unsafe same-modality cosine distance)."""
  if tower == "vision":
    return info_nce(emb["T_u"], emb["I_s"]) + jnp.mean(1 - _cos(emb["I_s"], emb["I_u"]))
  return info_nce(emb["I_u"], emb["T_s"]) + jnp.mean(1 - _cos(emb["T_s"], emb["T_u"]))


@dataclasses.dataclass(frozen=True)
class Baseline:
  loss: Callable[[Mapping[str, jax.Array], str], jax.Array]
  keep: float
  alpha: float = 0.0


BASELINES = {"g_unsafe": Baseline(g_unsafe_loss, keep=0.965), "g_safe_clip": Baseline(g_safe_clip_loss, keep=0.995)}


def topk_mask(score_io: jax.Array, keep: float) -> jax.Array:
  """Hard top-k: bool mask of the ``round((1 - keep) * size)`` largest entries (ties: lower flat index first)."""
  if not 0.0 <= keep <= 1.0:
    raise ValueError(f"baseline keep ratio must be in [0, 1], got {keep}")
  flat = jnp.ravel(score_io)
  k = int(round((1.0 - keep) * flat.size))
  order = jnp.argsort(-flat, stable=True)
  mask = jnp.zeros(flat.shape, bool).at[order[:k]].set(True)
  return mask.reshape(score_io.shape)


def _set_path(tree: dict, path: str, value) -> dict:
  """Copy of nested dict ``tree`` with ``path + '.kernel'`` replaced (only the containers on the path are copied)."""
  parts = path.split(".") + ["kernel"]

  def rec(node, i):
    key = parts[i]
    k = int(key) if (key not in node and key.isdigit()) else key
    new = dict(node)
    new[k] = value if i == len(parts) - 1 else rec(node[k], i + 1)
    return new
  return rec(tree, 0)


def clip_embeddings_fn(graphdef) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """``(params, quadruplet batch) -> {"I_s", "I_u", "T_s", "T_u"}`` for a CLIP (pure)."""
  def fn(params, b):
    model = nnx.merge(graphdef, params)
    return {"I_s": model.encode_image(b["safe_image"]), "I_u": model.encode_image(b["unsafe_image"]),
            "T_s": model.encode_text(b["safe_ids"], b["safe_mask"]),
            "T_u": model.encode_text(b["unsafe_ids"], b["unsafe_mask"])}
  return fn


def gradient_scores(embed_fn: Callable, params: dict, batches: Iterable[Mapping[str, Any]], tower: str,
                    targets, loss: Callable, *, progress: bool = False) -> dict[str, jax.Array]:
  """Mean ``|dL/dK|`` over batches for the target kernels of ``tower`` (Flax layout), one grad per batch.

  Args:
    embed_fn: ``(params, batch) -> embeddings dict`` (:func:`clip_embeddings_fn`).
    params: nested pure dict of parameters (``nnx.to_pure_dict``).
    batches: quadruplet batches (``safe_image``, ``unsafe_image``, ``safe_ids``/``_mask``, ``unsafe_ids``/``_mask``).
    loss: ``(embeddings, tower) -> scalar``.
  """
  kernels = edit.find_targets(params, targets)

  @jax.jit
  def grad_step(acc, kernels, params, batch):
    def f(ks):
      p = params
      for name, k in ks.items():
        p = _set_path(p, name, k)
      return loss(embed_fn(p, batch), tower)
    g = jax.grad(f)(kernels)
    return jax.tree.map(lambda a, x: a + jnp.abs(x.astype(jnp.float32)), acc, g)

  acc = {k: jnp.zeros(v.shape, jnp.float32) for k, v in kernels.items()}
  it = batches
  if progress:
    it = tqdm(batches, desc=f"gradient baseline ({tower})", unit="batch")
  n = 0
  for batch in it:
    acc = grad_step(acc, kernels, params, {k: jnp.asarray(v) for k, v in batch.items()
                                           if k in ("safe_image", "unsafe_image", "safe_ids", "safe_mask",
                                                    "unsafe_ids", "unsafe_mask")})
    n += 1
  if n == 0:
    raise ValueError(f"gradient baseline ({tower}): no calibration batches")
  return {k: v / n for k, v in acc.items()}


def baseline_clip(model, batches: Mapping[str, Callable[[], Iterable]], method: str = "g_unsafe",
                  cfg: edit.UWMConfig | None = None, *, progress: bool = False) -> cal.UWMResult:
  """G-Unsafe / G-Safe-CLIP on a CLIP, towers in ``batches`` (text first, then vision); returns a NEW model.

  ``cfg`` only supplies the target patterns (default UWM targets); keep ratio and alpha come from ``method``.
  """
  if method not in BASELINES:
    raise ValueError(f"unknown UWM baseline {method!r}; expected one of {sorted(BASELINES)}")
  b = BASELINES[method]
  cfg = cfg or edit.UWMConfig()
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  embed = clip_embeddings_fn(graphdef)
  masks, scores, info = {}, {}, {}
  for tower in cal.TOWERS:
    if tower not in batches:
      continue
    sc = gradient_scores(embed, params, batches[tower](), tower, cfg.tower(tower).targets, b.loss,
                         progress=progress)
    m = {k: topk_mask(v, b.keep) for k, v in sc.items()}
    params = edit.apply(params, m, b.alpha)
    masks.update(m)
    scores.update(sc)
    info[tower] = {"method": method, "keep": b.keep, "alpha": b.alpha, "layers": len(m),
                   "selected": int(sum(int(jnp.sum(x)) for x in m.values()))}
  # merge builds a new model from the new pure dict: the input model's variables are never written.
  return cal.UWMResult(model=nnx.merge(graphdef, params), masks=masks, scores=scores, info=info)


__all__ = ["LOGIT_SCALE", "info_nce", "g_unsafe_loss", "g_safe_clip_loss", "Baseline", "BASELINES", "topk_mask",
           "clip_embeddings_fn", "gradient_scores", "baseline_clip"]
