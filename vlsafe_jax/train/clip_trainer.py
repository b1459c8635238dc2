"""Stage "clip": a small CLIP trained from scratch with the Euclidean InfoNCE loss on the synthetic benchmark.

Both pairs of every quadruplet, (I, T) and (I*, T*), are training pairs: like real CLIP, the "pretrained" base has
seen unsafe content, so it retrieves unsafe items for unsafe queries. One step contrasts the 2B pairs of B
quadruplets against each other (symmetric cross-entropy on ``exp(logit_scale) * cosine``). The result is written as
a converted CLIP directory (``CLIP.from_pretrained`` loads it; HySAC and UWM start from it).

Banner order (style.md rule 6): mesh -> data -> abstract shapes -> sharded init -> jitted update -> resume -> loop.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from checkpoints_convert.clip import CLIP_FAMILY
from vlsafe_jax import _compat, checkpoint as ckpt_lib
from vlsafe_jax.data import sources, synthetic
from vlsafe_jax.models.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, clip_image_flops, \
    clip_text_flops
from vlsafe_jax.train import common

STAGE = "clip"


def synthetic_clip_sizes(image_size: int = 32, max_length: int = 32) -> dict[str, int]:
  """Sizes a small CLIP needs for the synthetic benchmark (vocab, context length, image size, special ids)."""
  tok = synthetic.SyntheticTokenizer(max_length)
  return {"vocab_size": tok.vocab_size, "max_position_embeddings": max_length, "image_size": image_size,
          "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
          "pad_token_id": tok.pad_token_id, "num_categories": len(synthetic.CATEGORIES)}


def synthetic_clip_config(model: ml_collections.ConfigDict, data: ml_collections.ConfigDict) -> CLIPConfig:
  """The small CLIP of ``cfg.clip_model`` sized for the synthetic language and images."""
  sc = synthetic_clip_sizes(data.image_size, data.max_length)
  common_kw = dict(hidden_size=model.width, intermediate_size=model.width * model.mlp_ratio,
                   num_hidden_layers=model.layers, num_attention_heads=model.heads, projection_dim=model.embed_dim)
  text = CLIPTextConfig(vocab_size=sc["vocab_size"], max_position_embeddings=data.max_length,
                        eos_token_id=sc["eos_token_id"], bos_token_id=sc["bos_token_id"],
                        pad_token_id=sc["pad_token_id"], **common_kw)
  vision = CLIPVisionConfig(image_size=data.image_size, patch_size=model.patch_size, **common_kw)
  return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model.embed_dim,
                    logit_scale_init_value=float(model.get("logit_scale_init", 2.6592)))


def clip_contrastive_loss(model: CLIP, batch: dict) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE over the 2B pairs ``[(I, T); (I*, T*)]`` of a quadruplet batch (float32 logits)."""
  pixels = jnp.concatenate([batch["safe_image"], batch["unsafe_image"]], 0)
  ids = jnp.concatenate([batch["safe_ids"], batch["unsafe_ids"]], 0)
  logits_it, logits_ti = model(pixels, ids)
  labels = jnp.arange(pixels.shape[0])
  ce = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()
  loss = 0.5 * (ce(logits_it) + ce(logits_ti))
  acc = jnp.mean(jnp.argmax(logits_it, -1) == labels)
  return loss, {"acc_i2t": acc, "logit_scale": model.logit_scale[...]}


def clamp_logit_scale(max_log_scale: float = 4.6052):
  """``pre_step`` clamping the log logit scale to [0, max] (CLIP's own cap is log 100, as in open_clip)."""
  def clamp(params):
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, max_log_scale)}
  return clamp


def train_clip(cfg: ml_collections.ConfigDict, workdir: Path, writer: common.MetricsWriter) -> Path:
  """Runs (or resumes, or skips when finished) stage "clip"; returns the converted CLIP directory."""
  out_dir = workdir / "clip_base"
  done_file = workdir / "checkpoints" / STAGE / "done.json"
  if done_file.exists() and (out_dir / "config.json").exists():
    return out_dir
  sc = cfg.clip_stage

  # ---------------------------------------------------------------------------------------------- mesh
  mesh = common.make_mesh(cfg)

  # ---------------------------------------------------------------------------------------------- data
  data = sources.make_sources(cfg.data)
  loader = common.make_train_loader(data.train, data.transform, sc.batch_size, cfg.data, cfg.seed)
  total_steps = sc.epochs * loader.steps_per_epoch

  # --------------------------------------------------------------------------------------- abstract shapes
  clip_cfg = synthetic_clip_config(cfg.clip_model, cfg.data)
  abstract = _compat.eval_shape(lambda: CLIP(clip_cfg, rngs=nnx.Rngs(cfg.seed)))
  graphdef, abs_params = nnx.split(abstract, nnx.Param)
  param_sh = common.pure_shardings(abs_params, mesh)
  decay = jax.tree.map(lambda x: x.ndim >= 2, nnx.to_pure_dict(abs_params))   # no wd on norms/biases/scalar
  tx, lr_fn = common.make_optimizer(sc.optim, total_steps, decay)
  state_sh = common.train_state_shardings(tx, nnx.to_pure_dict(abs_params), param_sh, mesh)

  # ---------------------------------------------------------------------------------------- sharded init
  def init_params():
    return nnx.to_pure_dict(nnx.state(CLIP(clip_cfg, rngs=nnx.Rngs(cfg.seed)), nnx.Param))
  params = jax.jit(init_params, out_shardings=param_sh)()
  state = common.init_train_state(tx, params, state_sh)

  # ---------------------------------------------------------------------------------------- jitted update
  def loss_fn(params, frozen, batch, key):
    del frozen, key   # no frozen weights, no dropout in stage 1
    return clip_contrastive_loss(nnx.merge(graphdef, params), batch)

  step_fn = common.make_update_fn(loss_fn, tx, state_sh=state_sh, mesh=mesh, lr_fn=lr_fn,
                                  nonfinite=cfg.train.nonfinite,
                                  pre_step=clamp_logit_scale(sc.get("logit_scale_max", 4.6052)))

  # ---------------------------------------------------------------------------------------------- resume
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints" / STAGE, max_to_keep=cfg.train.max_to_keep)
  state = common.resume(ckpt, state, loader, writer, STAGE, total_steps)

  # ------------------------------------------------------------------------------------------------ loop
  v, t = clip_cfg.vision_config, clip_cfg.text_config
  flops = 3 * 2 * (clip_image_flops(v, clip_cfg.projection_dim) + clip_text_flops(t, projection_dim=clip_cfg.projection_dim))
  state = common.run_loop(stage=STAGE, step_fn=step_fn, state=state, frozen={}, loader=loader, mesh=mesh,
                          rng=jax.random.key(cfg.seed), total_steps=total_steps, ckpt=ckpt, writer=writer,
                          meta={"stage": STAGE}, train_cfg=cfg.train, batch_size=sc.batch_size,
                          flops_per_example=flops)
  ckpt.close()
  loader.close()

  # ------------------------------------------------------------------------------------------------ export
  model = nnx.merge(graphdef, state["params"])
  if jax.process_index() == 0:
    CLIP_FAMILY.save_converted(model, out_dir)
    done_file.write_text(json.dumps({"steps": int(jax.device_get(state["step"]))}))
  return out_dir


__all__ = ["synthetic_clip_sizes", "synthetic_clip_config", "clip_contrastive_loss", "train_clip"]
