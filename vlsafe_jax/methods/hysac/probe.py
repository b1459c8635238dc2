"""The free-embedding probe: can this loss reach the safety hierarchy from this starting geometry?

HySAC's hierarchy ``d(0,T) < d(0,I) < d(0,T*) < d(0,I*)`` must come from the seven-term loss acting on the towers'
embeddings. The probe removes the towers: every item's four features ``f_I, f_I*, f_T, f_T*`` become free
parameters, initialised from a model's own (un-normalised, projected) embeddings of a split, and are trained with
:func:`~vlsafe_jax.methods.hysac.losses.hysac_loss` and the four learned scalars under the reference clamps
(AdamW). It runs in seconds on a CPU and reports the root-distance ordering and the cone-collapse diagnostics
(``diagnostics.py``). If the probe does not order the sets, no encoder will (the loss and scalars cannot get there
from that start); if it does and the towers do not, the towers are what fails.

Pure JAX on arrays: no model, no file I/O (the job driver ``vlsafe_jax/train/hysac_probe.py`` embeds a split and
writes the report). Shape letters: n = items, b = batch, d = embedding dim.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlsafe_jax.methods.hysac import diagnostics, losses
from vlsafe_jax.methods.hysac import scalars as scalars_lib
from vlsafe_jax.methods.hysac.model import root_distance

KEYS = ("I", "I*", "T", "T*")        # the four sets, in the loss's order (e_i, e_iu, e_t, e_tu)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Probe optimisation and scalar initialisation (``probe.*`` config keys).

  Attributes:
    steps: optimiser steps.
    batch_size: quadruplets per step (contrastive negatives = the batch).
    lr, b1, b2: AdamW on the free features and the scalars.
    weight_decay: on the free features only (never on the scalars, as in training).
    seed: batch order.
    log_every: steps between history records (diagnostics on all items).
    alpha_init, curv_init, learn_curv, logit_scale_init, freeze_logit_scale: as ``hysac.scalars.*``.
  """
  steps: int = 1500
  batch_size: int = 64
  lr: float = 1e-3
  b1: float = 0.9
  b2: float = 0.98
  weight_decay: float = 0.0
  seed: int = 0
  log_every: int = 100
  alpha_init: str | float = "inv_sqrt_embed_dim"
  curv_init: float = 1.0
  learn_curv: bool = True
  logit_scale_init: float = 1.0 / 0.07
  freeze_logit_scale: bool = False


@dataclasses.dataclass
class ProbeResult:
  """``root_distance``: per set (n,) final root distances; ``history``: per logged step the loss, the seven terms,
  the scalars and the diagnostics; ``final``: the last record plus :func:`hierarchy_stats`."""
  root_distance: dict[str, np.ndarray]
  history: list[dict[str, float]]
  final: dict[str, float | bool]


def hierarchy_stats(root_d: Mapping[str, np.ndarray]) -> dict[str, float | bool]:
  """Ordering and peak separation of root distances ``{"T", "I", "T*", "I*"} -> (n,)``.

  Returns per set ``mean_<K>`` / ``std_<K>``; ``ordered`` (means T < I < T* < I*); for each consecutive pair
  ``gap_<A>_<B>`` = mean B - mean A and ``sep_<A>_<B>`` = gap / mean of the two stds (the Figure-2 peaks are visibly
  apart from about 0.5; keys use ``u`` for ``*``); ``tu_below_i_share`` (share of items with d(0,T*) < d(0,I)).
  """
  order = ("T", "I", "T*", "I*")
  name = lambda k: k.replace("*", "u").lower()
  out: dict[str, float | bool] = {}
  for k in order:
    v = np.asarray(root_d[k], np.float64)
    out[f"mean_{name(k)}"], out[f"std_{name(k)}"] = float(v.mean()), float(v.std())
  for a, b in zip(order, order[1:]):
    gap = out[f"mean_{name(b)}"] - out[f"mean_{name(a)}"]
    spread = 0.5 * (out[f"std_{name(a)}"] + out[f"std_{name(b)}"])
    out[f"gap_{name(a)}_{name(b)}"] = gap
    out[f"sep_{name(a)}_{name(b)}"] = gap / spread if spread > 0 else math.copysign(math.inf, gap)
  out["ordered"] = all(out[f"gap_{name(a)}_{name(b)}"] > 0 for a, b in zip(order, order[1:]))
  out["tu_below_i_share"] = float(np.mean(np.asarray(root_d["T*"]) < np.asarray(root_d["I"])))
  return out


def _init_params(features: Mapping[str, np.ndarray], cfg: ProbeConfig) -> dict:
  dim = int(np.shape(features["I"])[-1])
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  log_alpha = scalars_lib.alpha_init_value(cfg.alpha_init, dim)
  scale = scalars_lib.LOGIT_SCALE_MAX if cfg.freeze_logit_scale else math.log(cfg.logit_scale_init)
  return {"f": jnp.stack([f32(features[k]) for k in KEYS]),
          "scalars": {"curv": f32(math.log(cfg.curv_init)), "visual_alpha": f32(log_alpha),
                      "textual_alpha": f32(log_alpha), "logit_scale": f32(scale)}}


def _lift_all(params: dict, idx=None) -> tuple[list[jax.Array], jax.Array, jax.Array]:
  """Clamped scalars -> ``([e_i, e_iu, e_t, e_tu], c, s)`` for rows ``idx`` (all rows when None)."""
  sc = scalars_lib.clamp_scalars(params["scalars"])
  c, s = jnp.exp(sc["curv"]), jnp.exp(sc["logit_scale"])
  f = params["f"] if idx is None else params["f"][:, idx]
  alphas = (sc["visual_alpha"], sc["visual_alpha"], sc["textual_alpha"], sc["textual_alpha"])
  return [losses.lift(f[k], a, c) for k, a in enumerate(alphas)], c, s


def _record(params: dict, loss_cfg: losses.HySACLossConfig) -> dict[str, jax.Array]:
  """Diagnostics and scalars on every item (no loss: its contrastive terms depend on the batch)."""
  embs, c, _ = _lift_all(params)
  sc = scalars_lib.clamp_scalars(params["scalars"])
  a_img, a_txt = jnp.exp(sc["visual_alpha"]), jnp.exp(sc["textual_alpha"])
  rec = diagnostics.embedding_diagnostics(*embs, c, min_radius=loss_cfg.min_radius)
  rec.update(diagnostics.scalar_clamp_flags(c, a_img, a_txt))
  rec.update(curvature=c, alpha_image=a_img, alpha_text=a_txt, logit_scale=jnp.exp(sc["logit_scale"]))
  return rec


def run_probe(features: Mapping[str, np.ndarray], loss_cfg: losses.HySACLossConfig = losses.HySACLossConfig(),
              cfg: ProbeConfig = ProbeConfig()) -> ProbeResult:
  """Trains free per-item features with the HySAC loss and reports the hierarchy.

  Args:
    features: ``{"I", "I*", "T", "T*"} -> (n, d)`` float arrays: the un-normalised projected embeddings of n
      quadruplets (row k of each set belongs to item k), i.e. what the towers would feed :func:`losses.lift`.
    loss_cfg: the loss to probe (``negatives="local"`` groups must divide ``cfg.batch_size``).
    cfg: optimisation and scalar initialisation.

  Returns:
    :class:`ProbeResult`.
  """
  n = int(np.shape(features["I"])[0])
  for k in KEYS:
    if k not in features:
      raise KeyError(f"run_probe: features lack set {k!r}; expected keys {KEYS}")
    if np.shape(features[k]) != np.shape(features["I"]):
      raise ValueError(f"run_probe: set {k!r} has shape {np.shape(features[k])}, set 'I' {np.shape(features['I'])}")
  if not 2 <= cfg.batch_size <= n:
    raise ValueError(f"run_probe: batch_size {cfg.batch_size} must be in [2, {n}] (the number of items)")
  params = _init_params(features, cfg)
  wd_mask = {"f": True, "scalars": {k: False for k in params["scalars"]}}
  tx = optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=wd_mask)
  frozen = {k: (k == "curv" and not cfg.learn_curv) or (k == "logit_scale" and cfg.freeze_logit_scale)
            for k in params["scalars"]}
  if any(frozen.values()):
    tx = optax.chain(optax.masked(optax.set_to_zero(), {"f": False, "scalars": frozen}), tx)
  opt = tx.init(params)

  def loss_fn(params, idx_b):
    embs, c, s = _lift_all(params, idx_b)
    return losses.hysac_loss(*embs, c, s, loss_cfg)

  @jax.jit
  def step(params, opt, idx_b):
    # Clamp first (as the trainer's pre_step): gradients and updates apply to the clamped values.
    params = {"f": params["f"], "scalars": scalars_lib.clamp_scalars(params["scalars"])}
    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, idx_b)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, {"loss": total, **terms}

  record = jax.jit(lambda p: _record(p, loss_cfg))
  rng = np.random.default_rng(cfg.seed)
  per_epoch = n // cfg.batch_size
  order, history = None, []
  for i in range(cfg.steps):
    if i % per_epoch == 0:
      order = rng.permutation(n)
    j = i % per_epoch
    params, opt, m = step(params, opt, jnp.asarray(order[j * cfg.batch_size:(j + 1) * cfg.batch_size]))
    if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps:
      rec = {k: float(v) for k, v in jax.device_get({**m, **record(params)}).items()}
      history.append({"step": i + 1, **rec})
  embs, c, _ = jax.jit(_lift_all)(params)
  root_d = {k: np.asarray(root_distance(e, c)) for k, e in zip(KEYS, embs)}
  final = {**(history[-1] if history else {}), **hierarchy_stats(root_d)}
  return ProbeResult(root_distance=root_d, history=history, final=final)


__all__ = ["KEYS", "ProbeConfig", "ProbeResult", "hierarchy_stats", "run_probe"]
