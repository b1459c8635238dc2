"""Base-model stages of the synthetic vision-language settings (labelled synthetic): the tiny LLaVA of
:mod:`vlsafe_jax.data.synthetic_vlm` (CMRM's model) and the text-aligned base of :mod:`vlsafe_jax.data.tga_synthetic`
(TGA's starting point), both trained through the common setup and loop
(:func:`vlsafe_jax.train.common.build_setup`, :func:`~vlsafe_jax.train.common.run_loop`: checkpoints,
``metrics.jsonl``, progress, resume), and the model directory format they are stored in.

A model directory is a converted LLaVA directory (``Llava.from_pretrained`` reads it) plus ``synthetic_vocab.json``
(the word vocabulary) and ``synthetic_vlm.json`` (metadata); its training run (config-free: checkpoints and
``metrics.jsonl``) lives in ``<directory>/run/``, so a killed training resumes where it stopped.

Batches are drawn exactly as the settings' hand-written loops drew them before (one numpy generator, seeded per
stage, advanced step by step); the generator's state is part of every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from checkpoints_convert.llava import LLAVA_FAMILY
from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import sharding
from vlsafe_jax.data import synthetic_vlm, tga_rows, tga_synthetic
from vlsafe_jax.methods.tga import loss as tga_loss
from vlsafe_jax.models.clip import CLIPVisionConfig
from vlsafe_jax.models.llama import LlamaConfig
from vlsafe_jax.models.llava import Llava, LlavaConfig
from vlsafe_jax.train import common, tga_trainer

VOCAB_FILE = "synthetic_vocab.json"
META_FILE = "synthetic_vlm.json"
RUN_DIR = "run"

# --------------------------------------------------------------------------------------------------------------
# Model config and the model directory
# --------------------------------------------------------------------------------------------------------------

def llava_config(tokenizer: synthetic_vlm.WordTokenizer, *, image_size: int = 32, patch_size: int = 8,
                 vision_width: int = 32, vision_layers: int = 2, width: int = 64, layers: int = 4, heads: int = 4,
                 kv_heads: int = 2, mlp: int = 128) -> LlavaConfig:
  """A tiny :class:`LlavaConfig` (16 image tokens at 32 px / patch 8) for ``tokenizer``'s vocabulary."""
  vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_width,
                            intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
                            num_attention_heads=4, projection_dim=vision_width)
  text = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, intermediate_size=mlp,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                     vision_feature_layer=-2 if vision_layers >= 2 else -1)


def save(model: Llava, tokenizer: synthetic_vlm.WordTokenizer, directory: str | os.PathLike,
         meta: dict | None = None) -> Path:
  """A converted LLaVA directory (``Llava.from_pretrained`` reads it) plus the vocabulary and metadata.

  The vocabulary file is written last and atomically: it is what :func:`is_saved` looks for, so a process killed
  while saving leaves a directory that is not taken as saved (the caller trains / saves again), never a torn
  vocabulary or a missing metadata file behind a "saved" marker."""
  d = LLAVA_FAMILY.save_converted(model, directory)
  ckpt_lib.write_text_atomic(d / META_FILE, json.dumps(meta or {}, indent=2, default=str))
  ckpt_lib.write_text_atomic(d / VOCAB_FILE, json.dumps(tokenizer.to_json()))
  return d


def is_saved(directory: str | os.PathLike) -> bool:
  return (Path(directory) / VOCAB_FILE).is_file()


def load(directory: str | os.PathLike, **from_pretrained_kw) -> tuple[Llava, synthetic_vlm.WordTokenizer]:
  """``(Llava, WordTokenizer)`` from a directory written by :func:`save` (keywords go to ``from_pretrained``)."""
  d = Path(directory)
  if not is_saved(d):
    raise FileNotFoundError(f"{d}: no {VOCAB_FILE} (not a synthetic LLaVA directory written by vlm_base.save)")
  tok = synthetic_vlm.WordTokenizer.from_json(json.loads((d / VOCAB_FILE).read_text()))
  return Llava.from_pretrained(d, **from_pretrained_kw), tok


# --------------------------------------------------------------------------------------------------------------
# A checkpointable seeded batch stream (the loader interface of common.run_loop)
# --------------------------------------------------------------------------------------------------------------

class SeededBatches:
  """``next()`` -> ``make_batch(rng, step)`` (a dict of host arrays) with one numpy generator advanced step by
  step; :meth:`get_state` / :meth:`set_state` carry the step and the generator's exact state (JSON), so a resumed
  run draws the same batches as an uninterrupted one."""

  def __init__(self, make_batch: Callable[[np.random.Generator, int], dict[str, Any]], seed: Any,
               steps_per_epoch: int):
    self.make_batch, self.rng, self.step = make_batch, np.random.default_rng(seed), 0
    self.steps_per_epoch = max(int(steps_per_epoch), 1)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    batch = self.make_batch(self.rng, self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    # 128-bit generator words do not survive every JSON reader as numbers: stored as a JSON string.
    return {"step": self.step, "rng": json.dumps(self.rng.bit_generator.state)}

  def set_state(self, state: dict[str, Any]) -> None:
    self.step = int(state["step"])
    self.rng.bit_generator.state = json.loads(state["rng"])

  def close(self) -> None:
    pass


def _run_stage(setup: common.TrainSetup, loader: SeededBatches, *, stage: str, run_dir: Path, total_steps: int,
               batch_size: int, train_cfg: ml_collections.ConfigDict, rng: jax.Array,
               on_log: Callable[[dict], None] | None = None) -> dict:
  """Resume -> :func:`common.run_loop` -> final state; checkpoints and ``metrics.jsonl`` under ``run_dir``."""
  run_dir.mkdir(parents=True, exist_ok=True)
  writer = common.MetricsWriter(run_dir / "metrics.jsonl")
  ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints" / stage, max_to_keep=int(train_cfg.get("max_to_keep", 2)))
  state = common.resume(ckpt, setup.state, loader, writer, stage, total_steps)
  if int(jax.device_get(state["step"])) < total_steps:
    state = common.run_loop(stage=stage, step_fn=setup.step_fn, state=state, frozen=setup.frozen, loader=loader,
                            mesh=setup.mesh, rng=rng, total_steps=total_steps, ckpt=ckpt, writer=writer,
                            meta={"stage": stage}, train_cfg=train_cfg, batch_size=batch_size, on_log=on_log)
  ckpt.wait()
  ckpt.close()
  return state


# --------------------------------------------------------------------------------------------------------------
# The synthetic VLM (CMRM's tiny LLaVA)
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 600
  batch_size: int = 32
  lr: float = 3e-3
  warmup: int = 50
  weight_decay: float = 0.01
  seq_len: int = 64
  seed: int = 0
  model_seed: int = 0
  # "mixed": all four components in every batch for ``steps``. "two_stage" (LLaVA's pipeline): ``steps`` of
  # text-only alignment (components 0, 1: the aligned backbone LLM), then ``stage2_steps`` of visual instruction
  # tuning on image rows (2, 3) plus benign text (1), with no refusal targets at all in stage 2.
  #
  # "llava" (LLaVA-1.5's recipe, shared/spec/real-facts.md "LLaVA-1.5"): "align" = ``steps`` of text-only
  # safety alignment of the language model alone (components 0, 1; the backbone LLM is aligned before it sees
  # images); "pretrain" = ``pretrain_steps`` on caption rows (component 4) training the vision tower and projector
  # with the language model frozen (LLaVA's stage 1 trains the projector alone; here the tower is trained too
  # because no pretrained CLIP exists in this setting); "finetune" = ``stage2_steps`` of visual instruction
  # tuning of projector + language model with the tower frozen, on image rows (2, 3, 4 in equal shares) and
  # ``stage2_text_rows`` text-only benign rows per batch (2 / 32 = 6.25%, LLaVA-1.5's mix has 6.1% text-only
  # conversations); no refusal target with an image. Each stage has its own AdamW + warmup-cosine
  # schedule; ``stage2_lr`` (0 = ``lr``) is the peak of "finetune".
  schedule: str = "mixed"
  stage2_steps: int = 300
  pretrain_steps: int = 200
  stage2_text_rows: int = 2
  stage2_lr: float = 0.0
  # Text-only rows of "finetune": "benign" (component 1 only) or "aligned" (components 0, 1 alternating: drawn
  # like the "align" stage, because LLaVA-1.5's text-only rows are ShareGPT conversations, the data its Vicuna
  # backbone was aligned on, so they carry that data's refusals).
  stage2_text: str = "benign"
  # > 0: an "lm_pretrain" stage before "align": the language model alone learns to follow every request, harmful
  # ones included (components 1, 5), as a pretrained LM can before its safety alignment (LLaVA's Vicuna is LLaMA
  # pretrained on web text, then fine-tuned on ShareGPT).
  lm_pretrain_steps: int = 0
  log_every: int = 50
  checkpoint_every: int = 100
  max_steps_this_run: int = 0       # > 0: stop after that many steps (a simulated kill; re-running resumes)


def mixture_plan(cfg: TrainConfig) -> list[tuple[int, ...]]:
  """The mixture components of every step's batch (see :mod:`vlsafe_jax.data.synthetic_vlm`)."""
  if cfg.schedule == "mixed":
    return [(0, 1, 2, 3)] * cfg.steps
  if cfg.schedule == "two_stage":
    # Stage-2 rows: 2 grounded + 1 image/benign + 1 text/benign per 4 (multiples of 4 keep batches static).
    return [(0, 1)] * cfg.steps + [(2, 2, 3, 1)] * cfg.stage2_steps
  if cfg.schedule == "llava":
    return [c for _, comps, steps, _, _ in llava_stages(cfg) for c in [comps] * steps]
  raise ValueError(f"TrainConfig.schedule {cfg.schedule!r} unknown; expected 'mixed', 'two_stage' or 'llava'")


_STAGE_IDS = {"align": 0, "pretrain": 1, "finetune": 2, "lm_pretrain": 3}
# Trained parameter groups of the "llava" stages (path prefixes of the Llava module).
_LM, _PROJ, _TOWER = "language_model", "multi_modal_projector", "vision_tower"


def llava_stages(cfg: TrainConfig) -> list[tuple[str, tuple[int, ...], int, tuple[str, ...], float]]:
  """``(stage name, per-row components of every batch, steps, trained module prefixes, peak lr)`` of the
  ``llava`` schedule (see :class:`TrainConfig`)."""
  b, t = cfg.batch_size, cfg.stage2_text_rows
  if not 0 <= t < b:
    raise ValueError(f"TrainConfig.stage2_text_rows {t} must lie in [0, batch_size {b})")
  img = b - t
  # Image rows cycle grounded QA / unrelated benign request / caption; text rows are benign requests.
  if cfg.stage2_text not in ("benign", "aligned"):
    raise ValueError(f"TrainConfig.stage2_text {cfg.stage2_text!r} unknown; expected 'benign' or 'aligned'")
  text = (1,) * t if cfg.stage2_text == "benign" else tuple((0, 1)[i % 2] for i in range(t))
  finetune = tuple(sorted((2, 3, 4)[i % 3] for i in range(img))) + text
  return [("lm_pretrain", (1, 5), cfg.lm_pretrain_steps, (_LM,), cfg.lr),
          ("align", (0, 1), cfg.steps, (_LM,), cfg.lr),
          ("pretrain", (4,), cfg.pretrain_steps, (_TOWER, _PROJ), cfg.lr),
          ("finetune", finetune, cfg.stage2_steps, (_PROJ, _LM), cfg.stage2_lr or cfg.lr)]


def _prefix_filter(prefixes: tuple[str, ...]):
  """nnx filter: parameters whose path starts with one of ``prefixes``."""
  def f(path, value):
    return isinstance(value, nnx.Param) and bool(path) and str(path[0]) in prefixes
  return f


def answer_nll(model: Llava, batch: dict[str, Any]) -> jax.Array:
  """Mean next-token cross-entropy over answer tokens (incl. EOS): ``loss_mask[:, t]`` = 1 where ``ids[:, t + 1]``
  is an answer token. ``batch``: ``ids``, ``mask`` (B, T) int32, ``loss_mask`` (B, T) float32, ``pixels``
  (I, h, w, 3) float32 or None."""
  ids = batch["ids"]
  logits, _, _ = model(ids, batch["pixels"], attention_mask_bt=batch["mask"])
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  w = batch["loss_mask"][:, :-1]
  return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)


def train_synthetic_vlm(setting: synthetic_vlm.SyntheticVLM, model_config: LlavaConfig,
                        cfg: TrainConfig = TrainConfig(), *, run_dir: str | os.PathLike, progress: bool = False
                        ) -> tuple[Llava, list[dict[str, float]]]:
  """Trains a tiny LLaVA from scratch on the mixture; returns ``(model, log)`` (``log``: ``step``, ``loss`` every
  ``cfg.log_every`` steps and at the end).

  Schedules ``mixed`` / ``two_stage`` train every parameter (vision tower, projector and decoder) with one optimizer;
  ``llava`` trains one parameter group per stage (:func:`llava_stages`), each stage with its own optimizer. Always
  global-norm clipping at 1 and AdamW (warmup + cosine to 0), on one device (the model is tiny).
  """
  model = Llava(model_config, rngs=nnx.Rngs(cfg.model_seed))
  if cfg.schedule == "llava":
    return _train_llava_recipe(model, setting, model_config, cfg, Path(run_dir), progress)
  plan = mixture_plan(cfg)
  total = len(plan)

  def make_tx(_, steps, lr=cfg.lr):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup, max(steps, cfg.warmup + 1))
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=cfg.weight_decay)), sched

  def make_loss_fn(graphdef):
    def loss_fn(params, frozen, batch, key):
      del key                                   # no dropout
      return answer_nll(nnx.merge(graphdef, params, frozen), batch), {}
    return loss_fn

  def make_batch(rng, step):
    ids, mask, lmask, pixels = setting.train_batch(rng, cfg.batch_size, model_config, cfg.seq_len, plan[step])
    return {"ids": ids, "mask": mask, "loss_mask": lmask, "pixels": pixels}

  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  train_cfg = ml_collections.ConfigDict(dict(log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                                             nonfinite="raise", max_steps_this_run=cfg.max_steps_this_run,
                                             progress=progress))
  log: list[dict[str, float]] = []
  with jax.set_mesh(mesh):
    setup = common.build_setup(model, nnx.Param, make_tx, mesh, make_loss_fn=make_loss_fn, total_steps=total)
    loader = SeededBatches(make_batch, [cfg.seed, 99], steps_per_epoch=total)
    state = _run_stage(setup, loader, stage="synthetic_vlm", run_dir=Path(run_dir), total_steps=total,
                       batch_size=cfg.batch_size, train_cfg=train_cfg, rng=jax.random.key(0),
                       on_log=lambda rec: log.append({"step": rec["step"], "loss": rec["loss"]}))
  return common.merged(setup, state["params"]), log


def _train_llava_recipe(model: Llava, setting: synthetic_vlm.SyntheticVLM, model_config: LlavaConfig,
                        cfg: TrainConfig, run_dir: Path, progress: bool) -> tuple[Llava, list[dict[str, float]]]:
  """The ``llava`` schedule: one optimizer and checkpoint stream per stage of :func:`llava_stages`, the
  untrained parameters of each stage frozen (carried from the previous stage)."""
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  train_cfg = ml_collections.ConfigDict(dict(log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                                             nonfinite="raise", max_steps_this_run=cfg.max_steps_this_run,
                                             progress=progress))
  log: list[dict[str, float]] = []
  for name, comps, steps, prefixes, lr in llava_stages(cfg):
    if steps <= 0:
      continue
    k = _STAGE_IDS[name]          # seeds the stage's batches: fixed per stage name, not by position

    def make_tx(_, total, lr=lr):
      sched = optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup, max(total, cfg.warmup + 1))
      return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=cfg.weight_decay)), sched

    def make_loss_fn(graphdef):
      def loss_fn(params, frozen, batch, key):
        del key
        return answer_nll(nnx.merge(graphdef, params, frozen), batch), {}
      return loss_fn

    def make_batch(rng, step, comps=comps):
      ids, mask, lmask, pixels = setting.train_batch(rng, cfg.batch_size, model_config, cfg.seq_len, comps)
      return {"ids": ids, "mask": mask, "loss_mask": lmask, "pixels": pixels}

    with jax.set_mesh(mesh):
      setup = common.build_setup(model, _prefix_filter(prefixes), make_tx, mesh, make_loss_fn=make_loss_fn,
                                 total_steps=steps)
      loader = SeededBatches(make_batch, [cfg.seed, 99, k], steps_per_epoch=steps)
      state = _run_stage(setup, loader, stage=f"synthetic_vlm_{name}", run_dir=run_dir, total_steps=steps,
                         batch_size=cfg.batch_size, train_cfg=train_cfg, rng=jax.random.key(k),
                         on_log=lambda rec, name=name: log.append({"stage": name, "step": rec["step"],
                                                                   "loss": rec["loss"]}))
      model = common.merged(setup, state["params"])
  return model, log


def train_or_load(directory: str | os.PathLike, *, seed: int = 0, train_cfg: TrainConfig = TrainConfig(),
                  model_kwargs: dict | None = None, progress: bool = False
                  ) -> tuple[Llava, synthetic_vlm.WordTokenizer]:
  """Loads ``directory`` if it holds a trained model, else trains one (resuming ``<directory>/run/``) and saves it."""
  d = Path(directory)
  if is_saved(d):
    return load(d)
  setting = synthetic_vlm.SyntheticVLM(seed)
  cfg = llava_config(setting.tokenizer, **(model_kwargs or {}))
  model, log = train_synthetic_vlm(setting, cfg, train_cfg, run_dir=d / RUN_DIR, progress=progress)
  save(model, setting.tokenizer, d, {"train": dataclasses.asdict(train_cfg), "log": log, "seed": seed,
                                     "model": model_kwargs or {}})
  return model, setting.tokenizer


# --------------------------------------------------------------------------------------------------------------
# The TGA setting's text-aligned base
# --------------------------------------------------------------------------------------------------------------

def train_or_load_tga_base(cfg: ml_collections.ConfigDict, mesh: Mesh, base_dir: str | os.PathLike
                           ) -> tuple[Llava, synthetic_vlm.WordTokenizer]:
  """The text-aligned base LLaVA of the TGA synthetic setting (``cfg.base``: steps, batch_size, lr, max_length),
  trained once on :meth:`~vlsafe_jax.data.tga_synthetic.TGASynthetic.base_rows` and cached in ``base_dir``.

  Training is TGA stage 2's step (projector + decoder, vision tower frozen) with the auxiliary terms off, AdamW
  with 5% warmup and cosine decay, batches of ``cfg.base.batch_size`` rows drawn with replacement.
  """
  base_dir = Path(base_dir)
  if is_saved(base_dir):
    return load(base_dir)
  d, b = cfg.data, cfg.base
  tok = tga_synthetic.tokenizer()
  data = tga_synthetic.TGASynthetic(d.seed, d.train_size, d.eval_size, d.image_size)
  mcfg = llava_config(tok, image_size=d.image_size, **dict(cfg.model.dims))
  model = Llava(mcfg, rngs=nnx.Rngs(cfg.seed))
  src = tga_rows.TGASource(data.base_rows(), tok, mcfg, stage="finetune", max_length=b.max_length,
                           ref_max_length=4, image_fn=None, template="llava_v1", system=tga_synthetic.SYSTEM)
  optim = ml_collections.ConfigDict(dict(lr=b.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                         schedule="warmup_cosine", warmup_steps=max(b.steps // 20, 1)))
  loss_cfg = tga_loss.TGALossConfig(layers=(1,), w_al=0.0, w_pw=0.0)

  def make_batch(rng, step):
    recs = [src[int(i)] for i in rng.integers(len(src), size=b.batch_size)]
    return {k: np.stack([r[k] for r in recs]) for k in recs[0]}

  last: dict[str, float] = {}
  with jax.set_mesh(mesh):
    setup = tga_trainer.build_stage(model, "finetune", loss_cfg=loss_cfg, optim=optim, total_steps=b.steps,
                                    mesh=mesh)
    loader = SeededBatches(make_batch, [cfg.seed, 5], steps_per_epoch=max(len(src) // b.batch_size, 1))
    state = _run_stage(setup, loader, stage="tga_base", run_dir=base_dir / RUN_DIR, total_steps=b.steps,
                       batch_size=b.batch_size, train_cfg=cfg.train, rng=jax.random.key(0), on_log=last.update)
    setup.state = state
    tga_trainer.merge_params(model, setup)
  print(f"[tga_synthetic] text-aligned base: final CE {last.get('ce', float('nan')):.3f} after {b.steps} steps")
  save(model, tok, base_dir, {"kind": "tga_synthetic_base", "steps": b.steps})
  return load(base_dir)


__all__ = ["VOCAB_FILE", "llava_config", "save", "is_saved", "load", "SeededBatches", "TrainConfig",
           "mixture_plan", "llava_stages", "answer_nll", "train_synthetic_vlm", "train_or_load", "train_or_load_tga_base"]
