"""The HySAC model: CLIP + LoRA on both towers + the four learned hyperbolic scalars (``hysac.md`` §2, §4, §7).

``HySAC`` wraps a :class:`vlsafe_jax.models.clip.CLIP` (LoRA applied in place with :func:`models.lora.apply_lora`,
so base weights keep their CLIP paths under ``clip.``) and a :class:`scalars.HyperbolicScalars` under ``scalars.``.
Towers may compute in bf16; everything from the projection outputs on (alpha scaling, ``exp_map0``, distances) runs
in float32: ``CLIP.encode_*`` already return float32 and :func:`losses.lift` keeps float32.

Trainable state = :data:`TRAINABLE` (``nnx.LoRAParam`` + :class:`scalars.HyperbolicScalar`); everything else (the
base CLIP, frozen scalars, dropout rng streams) is frozen. The trainable state alone is what checkpoints store;
the base weights are referenced by the directory they were loaded from (:func:`save_trainable` /
:func:`load_trainable`).

Inference API (space components of hyperboloid points, ``geometry/lorentz.py`` conventions): :meth:`HySAC.encode_image`,
:meth:`HySAC.encode_text`, :meth:`HySAC.curvature`, :func:`root_distance`, :meth:`HySAC.nsfw_score` (= root distance;
the threshold sweep lives in the evaluator), :func:`retrieval_scores` (Lorentzian inner product, or ``-d`` for the
traversal tasks). Shape letters: B batch, P projection (embedding) dim, Q queries, M gallery items.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlsafe_jax import _compat, model_io
from vlsafe_jax.geometry import lorentz
from vlsafe_jax.methods.hysac import losses
from vlsafe_jax.methods.hysac import scalars as scalars_lib
from vlsafe_jax.models import lora as lora_lib
from vlsafe_jax.models.clip import CLIP, CLIPConfig

# The optimizer's filter: LoRA adapters and the learned scalars (frozen scalars are not nnx.Param).
TRAINABLE = nnx.Any(nnx.LoRAParam, scalars_lib.HyperbolicScalar)
TRAINABLE_FORMAT = "vlsafe_jax.hysac.trainable"
# The trainable-state directory (vlsafe_jax.model_io): <name>.safetensors + <name>.json.
TRAINABLE_NAME = "hysac_trainable"
TRAINABLE_FILE = f"{TRAINABLE_NAME}.safetensors"
TRAINABLE_META = f"{TRAINABLE_NAME}.json"


@dataclasses.dataclass(frozen=True)
class HySACOptions:
  """LoRA and scalar options (``hysac.lora.*``, ``hysac.scalars.*``); defaults are the reference's.

  Attributes:
    lora_rank, lora_alpha, lora_dropout: PEFT ``r`` (16), ``lora_alpha`` (1 -> scaling 1/16), dropout (0.1).
    lora_targets: module names (suffixes) or a regex; default k/v/out_proj, fc1, fc2, patch_embedding.
    alpha_init: ``"inv_sqrt_embed_dim"`` | ``"inv_sqrt_512"`` | float (see ``scalars.alpha_init_value``).
    curv_init: initial curvature c (> 0).
    learn_curv: train the curvature.
    freeze_logit_scale: hold ``log s`` at 4.6052.
  """
  lora_rank: int = 16
  lora_alpha: float = 1.0
  lora_dropout: float = 0.1
  lora_targets: tuple[str, ...] | str = lora_lib.DEFAULT_TARGETS
  alpha_init: str | float = "inv_sqrt_embed_dim"
  curv_init: float = 1.0
  learn_curv: bool = True
  freeze_logit_scale: bool = False

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["lora_targets"] = list(self.lora_targets) if not isinstance(self.lora_targets, str) else self.lora_targets
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "HySACOptions":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"HySACOptions: unknown keys {sorted(unknown)}")
    d = dict(d)
    if isinstance(d.get("lora_targets"), list):
      d["lora_targets"] = tuple(d["lora_targets"])
    return cls(**d)


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------

def root_distance(x_bp: jax.Array, curv) -> jax.Array:
  """Geodesic distance from the root, ``d(0, x)``: :func:`vlsafe_jax.geometry.lorentz.root_distance`.

  Args:
    x_bp: ``(..., P)`` space components of hyperboloid points.
    curv: curvature magnitude ``c > 0``.

  Returns:
    ``(...)`` float32 (or wider) distances ``>= 0``.
  """
  return lorentz.root_distance(x_bp, curv)


def retrieval_scores(q_qp: jax.Array, g_mp: jax.Array, curv, kind: str = "inner") -> jax.Array:
  """Retrieval scores ``(Q, M)``, higher = better (``hysac.md`` §7.2).

  Args:
    q_qp, g_mp: query and gallery points (space components).
    curv: curvature c.
    kind: ``"inner"`` = Lorentzian inner product ``<q, g>_L`` (plain retrieval) or ``"neg_dist"`` = ``-d(q, g)``
      (what the reference ranks by after traversal; same order up to the arccosh clamp).
  """
  if kind == "inner":
    return lorentz.pairwise_inner(q_qp, g_mp, curv)
  if kind == "neg_dist":
    return -lorentz.pairwise_dist(q_qp, g_mp, curv)
  raise ValueError(f"retrieval_scores: kind must be 'inner' or 'neg_dist', got {kind!r}")


def trainable_mask_wd(trainable_state: nnx.State) -> Any:
  """Weight-decay mask as a pure dict: True on LoRA parameters, False on the hyperbolic scalars (wd 0)."""
  mask = jax.tree.map(lambda v: not isinstance(v, scalars_lib.HyperbolicScalar), trainable_state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.to_pure_dict(mask) if isinstance(mask, nnx.State) else mask


# --------------------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------------------

class HySAC(nnx.Module):
  """CLIP + LoRA + learned curvature / alphas / logit scale.

  Attributes:
    clip: the CLIP (LoRA sites inserted in place; base weights at their CLIP paths).
    scalars: :class:`scalars.HyperbolicScalars`.
    options: the :class:`HySACOptions` it was built with.
  """

  def __init__(self, clip: CLIP, options: HySACOptions = HySACOptions(), *, rngs: nnx.Rngs):
    """Wraps ``clip`` (modified in place: LoRA sites are added) and creates the scalars.

    Args:
      clip: a two-tower CLIP (from scratch, ``CLIP.from_pretrained`` or abstract under ``nnx.eval_shape``).
      options: LoRA / scalar options.
      rngs: needs ``params`` (LoRA A init) and ``dropout`` (per-site dropout streams).
    """
    if not (hasattr(clip, "vision_model") and hasattr(clip, "text_model")):
      raise ValueError("HySAC needs a two-tower CLIP (image and text); got a single-tower model")
    self.options = options
    self.clip = lora_lib.apply_lora(clip, options.lora_targets, options.lora_rank, options.lora_alpha,
                                    options.lora_dropout, rngs=rngs)
    self.scalars = scalars_lib.HyperbolicScalars(
        embed_dim=clip.config.projection_dim, alpha_init=options.alpha_init, curv_init=options.curv_init,
        learn_curv=options.learn_curv, freeze_logit_scale=options.freeze_logit_scale)

  @property
  def config(self) -> CLIPConfig:
    return self.clip.config

  # Scalars ------------------------------------------------------------------------------------------------
  def curvature(self) -> jax.Array:
    """``c = exp(curv)`` (0-d float32; the traversal's default kappa)."""
    return self.scalars.curvature()

  def logit_scale(self) -> jax.Array:
    """``s = exp(logit_scale)`` (0-d float32)."""
    return self.scalars.scale()

  # Lifting -----------------------------------------------------------------------------------------------
  def lift_image(self, f_bp: jax.Array) -> jax.Array:
    """Projected image features ``(B, P)`` -> hyperboloid space components ``exp0_c(alpha_I f)`` float32."""
    return losses.lift(f_bp, self.scalars.visual_alpha[...], self.curvature())

  def lift_text(self, f_bp: jax.Array) -> jax.Array:
    """Projected text features ``(B, P)`` -> ``exp0_c(alpha_T f)`` float32."""
    return losses.lift(f_bp, self.scalars.textual_alpha[...], self.curvature())

  def encode_image(self, pixels_bhwc: jax.Array) -> jax.Array:
    """CLIP-normalised NHWC pixels ``(B, h, w, 3)`` -> ``(B, P)`` float32 space components on the hyperboloid."""
    return self.lift_image(self.clip.encode_image(pixels_bhwc))

  def encode_text(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None) -> jax.Array:
    """Token ids ``(B, T)`` -> ``(B, P)`` float32 hyperboloid points (HySAC passes no mask, ``hysac.md`` §4.1)."""
    return self.lift_text(self.clip.encode_text(input_ids_bt, attention_mask_bt))

  def embed_quadruplet(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
    """``(e_i, e_iu, e_t, e_tu)`` for a batch with ``safe_image``, ``unsafe_image``, ``safe_ids``, ``unsafe_ids``.

    The two images (and the two captions) go through their tower in one concatenated call: one forward per tower.
    """
    b = batch["safe_image"].shape[0]
    img = self.encode_image(jnp.concatenate([batch["safe_image"], batch["unsafe_image"]], 0))
    txt = self.encode_text(jnp.concatenate([batch["safe_ids"], batch["unsafe_ids"]], 0))
    return img[:b], img[b:], txt[:b], txt[b:]

  # Inference helpers ---------------------------------------------------------------------------------------
  def root_distance(self, x_bp: jax.Array) -> jax.Array:
    """``d(0, x)`` of lifted embeddings (``(B, P)`` -> ``(B,)``) at the model's curvature."""
    return root_distance(x_bp, self.curvature())

  def nsfw_score(self, x_bp: jax.Array) -> jax.Array:
    """NSFW score = root distance (``hysac.md`` §7.7); predict NSFW when above a threshold theta."""
    return self.root_distance(x_bp)

  def scores(self, q_qp: jax.Array, g_mp: jax.Array, kind: str = "inner") -> jax.Array:
    """:func:`retrieval_scores` at the model's curvature."""
    return retrieval_scores(q_qp, g_mp, self.curvature(), kind)

  def clamp_scalars_(self) -> None:
    """Applies the four clamps (after loading; the trainer clamps inside its jitted step)."""
    self.scalars.clamp_()

  # Construction -------------------------------------------------------------------------------------------
  @classmethod
  def from_clip(cls, clip: CLIP, options: HySACOptions = HySACOptions(), *, seed: int = 0) -> "HySAC":
    """HySAC around an existing CLIP; LoRA A init from ``seed``, dropout streams from ``seed + 1``."""
    return cls(clip, options, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

  @classmethod
  def from_pretrained(cls, base_path: str | os.PathLike, options: HySACOptions = HySACOptions(), *,
                      seed: int = 0, dtype: Any = jnp.float32, param_dtype: Any = None, mesh=None) -> "HySAC":
    """Loads the base CLIP (HF or converted directory, ``CLIP.from_pretrained``) and adds fresh LoRA/scalars."""
    clip = CLIP.from_pretrained(base_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    return cls.from_clip(clip, options, seed=seed)


def abstract_hysac(clip_config: CLIPConfig, options: HySACOptions = HySACOptions(), *, dtype=jnp.float32,
                   param_dtype=jnp.float32) -> HySAC:
  """An abstract (``nnx.eval_shape``) HySAC for a CLIP config: shapes only, no memory, no FLOPs."""
  return _compat.eval_shape(lambda: HySAC.from_clip(
      CLIP(clip_config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)), options))


def trainable_param_count(model: HySAC) -> dict[str, int]:
  """``{"lora": n, "scalars": k}`` trainable parameter counts (works on abstract models)."""
  lora = lora_lib.lora_param_count(model)
  sc = jax.tree.leaves(nnx.state(model, scalars_lib.HyperbolicScalar))
  return {"lora": lora, "scalars": int(sum(np.prod(x.shape) for x in sc))}


# --------------------------------------------------------------------------------------------------------------
# Trainable-state files (LoRA + scalars), base weights referenced by path
# --------------------------------------------------------------------------------------------------------------

def _flat_trainable(model: HySAC) -> dict[str, nnx.Variable]:
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, TRAINABLE)):
    out[".".join(str(k) for k in path)] = var
  return out


def save_trainable(model: HySAC, directory: str | os.PathLike, *, base_path: str | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
  """Writes ``hysac_trainable.safetensors`` (LoRA + learned scalars, dotted nnx paths) and
  ``hysac_trainable.json`` (options, base CLIP path, CLIP config, ``extra``). Base weights are not copied."""
  meta = {"base_path": None if base_path is None else str(base_path), "options": model.options.to_json(),
          "clip_config": model.config.to_hf_dict(), **(extra or {})}
  return model_io.save_trainable(directory, _flat_trainable(model), meta, name=TRAINABLE_NAME, fmt=TRAINABLE_FORMAT)


def load_trainable(model: HySAC, directory: str | os.PathLike) -> HySAC:
  """Loads a :func:`save_trainable` directory into a HySAC with the same LoRA sites; clamps the scalars.

  Raises a ValueError naming the file and every missing / unexpected / mis-shaped / non-finite tensor.
  """
  model_io.load_trainable(directory, _flat_trainable(model), name=TRAINABLE_NAME, what="HySAC trainable state")
  model.clamp_scalars_()
  return model


def load_hysac(directory: str | os.PathLike, *, base_path: str | os.PathLike | None = None,
               dtype: Any = jnp.float32) -> HySAC:
  """Rebuilds a trained HySAC from a :func:`save_trainable` directory and the base CLIP it references
  (``base_path`` overrides the recorded path, e.g. after moving files); in eval mode (no dropout)."""
  meta = model_io.read_trainable_meta(directory, name=TRAINABLE_NAME, fmt=TRAINABLE_FORMAT)
  base = base_path or meta.get("base_path")
  if base is None:
    raise ValueError(f"{Path(directory) / TRAINABLE_META}: records no base CLIP path; pass base_path=")
  model = HySAC.from_pretrained(base, HySACOptions.from_json(meta["options"]), dtype=dtype)
  load_trainable(model, directory)
  model.eval()
  return model


__all__ = [
    "TRAINABLE", "HySACOptions", "HySAC", "root_distance", "retrieval_scores", "trainable_mask_wd",
    "abstract_hysac", "trainable_param_count", "save_trainable", "load_trainable", "load_hysac",
]
