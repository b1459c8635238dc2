"""TGA training stages (tga.md §2, §4, §5); the job (variants, evaluation, report) is :mod:`vlsafe_jax.jobs.tga`.

For each variant the job runs the stages of ``cfg.stages`` through :func:`train_stage`:

* ``pretrain`` (stage 1): projector only, ``plain`` prompt "Retrieved Text: r. <image>" -> caption;
* ``finetune`` (stage 2): projector + decoder (full fine-tuning), conversation template; vision tower frozen.

One jitted, state-donating step per update (:func:`build_stage`: :func:`vlsafe_jax.train.common.build_setup` with
the TGA objective of :mod:`vlsafe_jax.methods.tga.forward`): for each micro-batch (gradient accumulation is a
``lax.scan`` over micro-batches) the text-only reference pass runs the decoder up to the deepest loss layer only,
under ``stop_gradient``; the training pass embeds the images (per-row scatter), runs the decoder with the
retrieved-text and image masks so their per-layer float32 means are accumulated *inside the layer scan*, and the
loss of :mod:`vlsafe_jax.methods.tga.loss` is taken with ``rho = step / total_steps``. Parameters are float32
masters sharded by the logical table (FSDP over ``mesh.fsdp``, tensor parallel over ``mesh.model``); compute runs
in ``tga.dtype`` (bf16 on accelerators). Logged per step: every loss term, rho, token accuracy, per-layer
cos(v, c) and cos(r, c), lr, grad norm, examples/s.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax.data import tga_prompt, tga_rows
from vlsafe_jax.methods.tga import forward
from vlsafe_jax.methods.tga import loss as loss_lib
from vlsafe_jax.models.llava import Llava, llava_prefill_flops
from vlsafe_jax.perf import llama_prefill_flops
from vlsafe_jax.train import common

STAGES = tga_prompt.STAGES
VARIANTS = ("tga", "plain")


def trainable_filter(stage: str):
  """Stage 1 trains the projector; stage 2 the projector and the decoder. The vision tower is always frozen."""
  proj = nnx.PathContains("multi_modal_projector")
  if stage == "pretrain":
    return nnx.All(nnx.Param, proj)
  if stage == "finetune":
    return nnx.All(nnx.Param, nnx.Any(proj, nnx.PathContains("language_model")))
  raise ValueError(f"TGA stage must be one of {STAGES}, got {stage!r}")


def build_stage(model: Llava, stage: str, *, loss_cfg: loss_lib.TGALossConfig, optim: ml_collections.ConfigDict,
                total_steps: int, mesh: Mesh, accum: int = 1, nonfinite: str = "raise") -> common.TrainSetup:
  """Splits ``model`` into trainable / frozen parts for ``stage``, places them on ``mesh`` (logical table) and
  builds AdamW (warmup + cosine from ``optim``) and the jitted step (:func:`common.make_update_fn` with
  ``accum`` micro-batches, ``rho = step / total_steps`` and the TGA metrics).

  The step is ``(state, frozen, batch, rng) -> (state, metrics)``, state donated; ``batch`` holds the arrays of
  :func:`vlsafe_jax.data.tga_prompt.collate` plus ``pixels`` (B, h, w, 3).
  """
  return common.build_setup(
      model, trainable_filter(stage), optim, mesh, total_steps=total_steps, loss_cfg=loss_cfg,
      make_loss_fn=lambda graphdef: forward.make_loss_fn(graphdef, loss_cfg), accum=accum, nonfinite=nonfinite,
      step_input=forward.rho_schedule(total_steps), metrics_fn=forward.make_metrics_fn(loss_cfg, total_steps))


def merge_params(model: Llava, setup: common.TrainSetup, params=None) -> Llava:
  """Writes trained params back into ``model`` (in place) and returns it."""
  nnx.update(model, nnx.state(common.merged(setup, params)))
  return model


def step_flops(model_cfg, seq_len: int, ref_len: int, stage: str, n_layers_ref: int) -> float:
  """Training FLOPs per example (perf.md §2, analytic, 2/MAC): forward of vision + projector + decoder over
  ``seq_len`` and the truncated reference pass; backward 2x forward for the trainable decoder (stage 2), or
  only the activation-gradient 1x through the decoder for stage 1 (frozen decoder weights, "4N"-style)."""
  n_img = model_cfg.num_image_tokens
  fwd = llava_prefill_flops(model_cfg, max(seq_len - n_img, 0))
  ref_cfg = dataclasses.replace(model_cfg.text_config, num_hidden_layers=n_layers_ref)
  ref = llama_prefill_flops(ref_cfg, ref_len) - 2.0 * ref_len * model_cfg.text_config.hidden_size * \
      model_cfg.text_config.vocab_size
  back = 2.0 if stage == "finetune" else 1.0
  return fwd * (1.0 + back) + ref


def loss_config(cfg: ml_collections.ConfigDict, variant: str) -> loss_lib.TGALossConfig:
  """``TGALossConfig`` from ``cfg.tga.loss``; the ``plain`` variant has no auxiliary terms."""
  loss = cfg.tga.loss
  kw = dict(layers=tuple(loss.layers), w_al=loss.w_al, w_pw=loss.w_pw, decay_al=loss.decay_al,
            decay_pw=loss.decay_pw, stop_grad_retrieved=loss.stop_grad_retrieved, mode=loss.mode, norm=loss.norm)
  if variant == "plain":
    kw.update(w_al=0.0, w_pw=0.0)
  return loss_lib.TGALossConfig(**kw)


def train_stage(cfg, workdir: Path, setting: dict, model: Llava, variant: str, stage: str,
                writer: common.MetricsWriter, mesh: Mesh) -> dict[str, float]:
  """Trains (or resumes, or skips when finished) one stage of one variant; updates ``model`` in place."""
  s_cfg = cfg.tga[stage]
  name = f"{variant}_{stage}"
  ckpt_dir = workdir / "checkpoints" / name
  n_batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  global_batch = s_cfg.batch_size_per_device * n_batch_devices * s_cfg.grad_accum
  source = tga_rows.TGASource(setting["rows"][stage], setting["tokenizer"], model.config, stage=stage,
                              max_length=s_cfg.max_length, ref_max_length=s_cfg.ref_max_length,
                              image_fn=setting["image_fn"][stage], template=cfg.tga.template,
                              system=cfg.tga.system or None, use_retrieved=variant == "tga",
                              halve_identical=cfg.tga.halve_identical_retrieval,
                              exclude_ids_containing=cfg.tga.loss.exclude_ids_containing or None)
  loader = common.make_train_loader(source, None, global_batch, cfg.data, cfg.seed + 1)
  total_steps = s_cfg.epochs * loader.steps_per_epoch if s_cfg.steps <= 0 else s_cfg.steps
  optim = ml_collections.ConfigDict(dict(s_cfg.optim))
  optim.warmup_steps = int(round(optim.warmup_ratio * total_steps))
  setup = build_stage(model, stage, loss_cfg=loss_config(cfg, variant), optim=optim, total_steps=total_steps,
                      mesh=mesh, accum=s_cfg.grad_accum, nonfinite=cfg.train.nonfinite)
  state = setup.state
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=cfg.train.max_to_keep)
  state = common.resume(ckpt, state, loader, writer, name, total_steps)
  if int(jax.device_get(state["step"])) < total_steps:
    flops = step_flops(model.config, s_cfg.max_length, s_cfg.ref_max_length, stage, max(cfg.tga.loss.layers))
    state = common.run_loop(stage=name, step_fn=setup.step_fn, state=state, frozen=setup.frozen, loader=loader,
                            mesh=mesh, rng=jax.random.key(cfg.seed + 2), total_steps=total_steps, ckpt=ckpt,
                            writer=writer, meta={"stage": stage, "variant": variant}, train_cfg=cfg.train,
                            batch_size=global_batch, flops_per_example=flops)
  ckpt.wait()
  ckpt.close()
  loader.close()
  setup.state = state
  merge_params(model, setup)
  return {"steps": total_steps}


__all__ = ["STAGES", "VARIANTS", "trainable_filter", "build_stage", "merge_params", "step_flops", "loss_config",
           "train_stage"]
