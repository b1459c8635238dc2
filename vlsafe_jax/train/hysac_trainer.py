"""Stage "hysac": LoRA + learned-scalar fine-tuning of a CLIP with the seven-term loss; then evaluation.

``run(cfg, workdir)`` is the ``trainer="hysac"`` entry of ``python -m vlsafe_jax.train``: it runs the stages named
in ``cfg.stages`` (``clip`` -> ``hysac`` -> ``evaluate``). Stage "hysac" trains the main model and each ablation
of ``cfg.ablations`` ("wo_ent", "wo_sent"; ``hysac.md`` §3.3) from the same base, each with its own checkpoints.

Per step (``hysac.md`` §5.2, inside ONE jitted, state-donating function): clamp the four scalars -> encode the two
images and the two captions (towers in ``hysac.dtype``, float32 from the projections on) -> lift -> seven terms ->
gradients (averaged over the global batch) -> AdamW (wd on LoRA only). Dropout keys are ``fold_in(rng, step)``
split per LoRA site; with JAX's partitionable threefry every device draws the bits of its own batch shard from that
global key, so the masks do not depend on the device count (a sharded step equals the single-device step).

Public pieces for the benchmark (``bench/hysac_step.py``): :func:`build_hysac` (model + optimizer state from a
CLIP) and :func:`make_train_step` (the exact jitted step the trainer runs).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import sharding
from vlsafe_jax.methods.hysac import diagnostics, losses
from vlsafe_jax.methods.hysac import model as hysac_model
from vlsafe_jax.methods.hysac import scalars as scalars_lib
from vlsafe_jax.models.clip import CLIP, clip_image_flops, clip_text_flops
from vlsafe_jax.train import common

ABLATIONS = losses.ABLATIONS
LABELS = {"hysac": "HySAC", "wo_ent": "HySAC w/o Ent", "wo_sent": "HySAC w/o S-Ent"}
CLIP_LABEL = "CLIP (stage 1, cosine)"


# --------------------------------------------------------------------------------------------------------------
# Building blocks (also used by the benchmark)
# --------------------------------------------------------------------------------------------------------------

def options_from_cfg(h: ml_collections.ConfigDict) -> hysac_model.HySACOptions:
  targets = h.lora.targets if isinstance(h.lora.targets, str) else tuple(h.lora.targets)
  alpha_init = h.scalars.alpha_init
  if alpha_init not in ("inv_sqrt_embed_dim", "inv_sqrt_512"):
    alpha_init = float(alpha_init)   # the config key is a string; a number means alpha itself
  return hysac_model.HySACOptions(
      lora_rank=h.lora.rank, lora_alpha=h.lora.alpha, lora_dropout=h.lora.dropout, lora_targets=targets,
      alpha_init=alpha_init, curv_init=h.scalars.curv_init, learn_curv=h.scalars.learn_curv,
      freeze_logit_scale=h.scalars.freeze_logit_scale)


def loss_config(h: ml_collections.ConfigDict, variant: str, per_device_batch: int | None
                ) -> losses.HySACLossConfig:
  """``HySACLossConfig`` from ``cfg.hysac.loss`` + an ablation; local negatives use ``per_device_batch`` groups."""
  if variant not in ABLATIONS:
    raise ValueError(f"unknown HySAC variant {variant!r}; known: {sorted(ABLATIONS)}")
  l = h.loss
  return losses.HySACLossConfig(
      eta=l.eta, entailment_lambda=l.entailment_lambda, weighting=l.weighting, negatives=l.negatives,
      radial=l.get("radial", "none"), radial_margin=l.get("radial_margin", 0.0),
      per_device_batch=per_device_batch if l.negatives == "local" else None, **ABLATIONS[variant])


@dataclasses.dataclass
class HySACSetup:
  """Everything a training step needs. ``state = {"params", "opt", "step"}`` (donated); ``frozen`` = base CLIP
  weights, frozen scalars and dropout-stream state (pure dict, never donated)."""
  graphdef: Any
  state: dict
  frozen: Any
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  state_sh: dict
  mesh: Mesh
  loss_cfg: losses.HySACLossConfig
  step_fn: Any
  options: hysac_model.HySACOptions


def make_loss_fn(graphdef, loss_cfg: losses.HySACLossConfig):
  """The step's objective ``(params, frozen, batch, key) -> (total, aux)``: merge, reseed dropout with ``key``, embed
  the quadruplet, lift, seven terms. ``params`` must already be clamped (:func:`clamp_params`); ``aux`` holds the
  terms, curvature, alphas, logit scale and the cone-collapse diagnostics (``methods/hysac/diagnostics.py``: the
  share of each set in the saturated-aperture zone, mean root distances, the share of T* behind I, scalars at a
  clamp) as 0-d arrays."""
  def loss_fn(params, frozen, batch, key):
    model = nnx.merge(graphdef, params, frozen)
    nnx.reseed(model, dropout=key)
    e_i, e_iu, e_t, e_tu = model.embed_quadruplet(batch)
    c, s = model.curvature(), model.logit_scale()
    total, terms = losses.hysac_loss(e_i, e_iu, e_t, e_tu, c, s, loss_cfg)
    a_img, a_txt = model.scalars.alphas()
    # Cone-collapse diagnostics ride along (comparisons and means: no gradient, negligible cost).
    diag = diagnostics.embedding_diagnostics(*jax.lax.stop_gradient((e_i, e_iu, e_t, e_tu, c)),
                                             min_radius=loss_cfg.min_radius)
    diag.update(diagnostics.scalar_clamp_flags(*jax.lax.stop_gradient((c, a_img, a_txt))))
    return total, {**terms, "curvature": c, "alpha_image": a_img, "alpha_text": a_txt, "logit_scale": s, **diag}
  return loss_fn


def clamp_params(params: dict) -> dict:
  """The reference clamps of the four scalars (``hysac.md`` §4), applied before every forward pass."""
  return scalars_lib.clamp_scalars(params, scalars_lib.ScalarBounds())


def make_train_step(graphdef, loss_cfg: losses.HySACLossConfig, tx: optax.GradientTransformation, *,
                    state_sh: dict, mesh: Mesh, lr_fn: optax.Schedule | None = None, nonfinite: str = "raise"):
  """The jitted HySAC step ``(state, frozen, batch, rng) -> (state, metrics)``; ``state`` is donated.

  ``batch`` holds ``safe_image``/``unsafe_image`` (B, h, w, 3) float32 and ``safe_ids``/``unsafe_ids`` (B, T) int32,
  sharded over the batch axes. Metrics: total loss, the seven terms, curvature, alphas, logit scale, lr, grad
  norm, ``finite``. The objective is :func:`make_loss_fn` at :func:`clamp_params` of the state's params.
  """
  return common.make_update_fn(make_loss_fn(graphdef, loss_cfg), tx, state_sh=state_sh, mesh=mesh, lr_fn=lr_fn,
                               nonfinite=nonfinite, pre_step=clamp_params)


def build_hysac(clip: CLIP, *, options: hysac_model.HySACOptions, loss_cfg: losses.HySACLossConfig,
                optim: ml_collections.ConfigDict, total_steps: int, mesh: Mesh, seed: int = 0,
                nonfinite: str = "raise") -> HySACSetup:
  """Wraps ``clip`` with LoRA + scalars, places trainable/frozen state on ``mesh`` and builds optimizer + step.

  Weight decay (``optim.weight_decay``) applies to LoRA parameters only, never to the scalars (mask by
  variable type). Frozen base weights follow the logical sharding table (replicated, or FSDP with
  ``mesh.fsdp > 1``); trainable state and optimizer moments are sharded like their parameters.
  """
  model = hysac_model.HySAC.from_clip(clip, options, seed=seed)
  graphdef, trainable, frozen = nnx.split(model, hysac_model.TRAINABLE, ...)
  wd_mask = hysac_model.trainable_mask_wd(trainable)
  param_sh = common.pure_shardings(trainable, mesh)
  frozen_sh = common.pure_shardings(frozen, mesh)
  params = sharding.put(nnx.to_pure_dict(trainable), param_sh)
  frozen = sharding.put(nnx.to_pure_dict(frozen), frozen_sh)
  tx, lr_fn = common.make_optimizer(optim, total_steps, wd_mask)
  scalar_mult = float(optim.get("scalar_lr_multiplier", 1.0))
  if scalar_mult != 1.0:
    # The four scalars' lr = lr * multiplier: they get no weight decay, so scaling their AdamW update is exactly
    # scaling their lr (a short, high-lr LoRA schedule can keep the scalars near the reference's 1e-4).
    scalar_mask = jax.tree.map(lambda decayed: not decayed, wd_mask)
    tx = optax.chain(tx, optax.masked(optax.scale(scalar_mult), scalar_mask))
  abs_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = common.train_state_shardings(tx, abs_params, param_sh, mesh)
  state = common.init_train_state(tx, params, state_sh)
  step_fn = make_train_step(graphdef, loss_cfg, tx, state_sh=state_sh, mesh=mesh, lr_fn=lr_fn, nonfinite=nonfinite)
  return HySACSetup(graphdef, state, frozen, tx, lr_fn, state_sh, mesh, loss_cfg, step_fn, options)


def eval_model(setup: HySACSetup, params=None) -> hysac_model.HySAC:
  """A HySAC in eval mode (no dropout) with the given (default: current) trainable params, scalars clamped."""
  params = setup.state["params"] if params is None else params
  # jax arrays only: the clamp below writes in place, and host numpy copies (device_get) are read-only.
  as_jax = lambda t: jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, t)
  model = nnx.merge(setup.graphdef, as_jax(params), as_jax(setup.frozen))
  model.clamp_scalars_()
  model.eval()
  return model


def text_encoder(cfg: ml_collections.ConfigDict, base_dir: Path):
  """The caption tokenizer for ``cfg.data``: None for the synthetic benchmark (its own word tokenizer), else the
  base CLIP directory's HF tokenizer."""
  if cfg.data.kind == "synthetic":
    return None
  from vlsafe_jax.data import tokenize, visu
  return visu.HFTextEncoder(tokenize.load_tokenizer(base_dir), cfg.data.max_length)


def make_encoder(model: hysac_model.HySAC):
  """A jitted ``batch -> (e_i, e_iu, e_t, e_tu)`` on the hyperboloid for an eval-mode model."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, batch):
    return nnx.merge(graphdef, state).embed_quadruplet(batch)
  return lambda batch: encode(state, batch)


def make_clip_encoder(clip: CLIP):
  """Jitted raw CLIP features ``(f_i, f_iu, f_t, f_tu)`` (the Euclidean baseline)."""
  graphdef, state = nnx.split(clip)

  @jax.jit
  def encode(state, batch):
    m = nnx.merge(graphdef, state)
    b = batch["safe_image"].shape[0]
    img = m.encode_image(jnp.concatenate([batch["safe_image"], batch["unsafe_image"]], 0))
    txt = m.encode_text(jnp.concatenate([batch["safe_ids"], batch["unsafe_ids"]], 0))
    return img[:b], img[b:], txt[:b], txt[b:]
  return lambda batch: encode(state, batch)


def step_flops(clip_config, n_text_tokens: int) -> float:
  """Training FLOPs per quadruplet with the LoRA "4N" convention (perf.md §2): forward 2N plus the activation
  gradient 2N (no weight gradients for the frozen base) for two images and two captions."""
  v, t = clip_config.vision_config, clip_config.text_config
  fwd = 2 * clip_image_flops(v, clip_config.projection_dim) + 2 * clip_text_flops(
      t, n_text_tokens, clip_config.projection_dim)
  return 2.0 * fwd


# --------------------------------------------------------------------------------------------------------------
# Validation and early stopping (hysac.md §5.3)
# --------------------------------------------------------------------------------------------------------------

def validate(setup: HySACSetup, params, source, transform, batch_size: int) -> dict[str, float]:
  """Validation loss (seven-term, eval mode, groups of ``batch_size``) and the recall sum R@1 (t2i + i2t) over
  (T, I), (T, I*), (T*, I), ranking by Lorentzian inner product."""
  from vlsafe_jax.eval import retrieval
  model = eval_model(setup, params)
  embs = common.embed_split(make_encoder(model), source, transform, batch_size)
  c, s = float(model.curvature()), float(model.logit_scale())
  n = (len(embs["I"]) // batch_size) * batch_size
  cfg = dataclasses.replace(setup.loss_cfg, per_device_batch=None, n_groups=max(n // batch_size, 1))
  total, _ = losses.hysac_loss(*(jnp.asarray(embs[k][:n]) for k in ("I", "I*", "T", "T*")), c, s, cfg) \
      if n else (jnp.nan, None)
  score = retrieval.lorentz_inner(c)
  rsum = 0.0
  for t, i in (("T", "I"), ("T", "I*"), ("T*", "I")):
    rsum += retrieval.recall(embs[t], embs[i], (1,), score)["R@1"] + retrieval.recall(embs[i], embs[t], (1,),
                                                                                       score)["R@1"]
  return {"val_loss": float(total), "val_recall_sum": rsum}


class EarlyStopping:
  """Reference rule: save ``best_recall`` / ``best_validation_loss`` on improvement; patience decreases only when
  neither improves; stop at 0. State persists in ``<ckpt dir>/early_stopping.json`` across resumes."""

  def __init__(self, directory: Path, patience: int, max_to_keep: int = 1):
    self.directory, self.patience = Path(directory), int(patience)
    self.file = self.directory / "early_stopping.json"
    self.s = json.loads(self.file.read_text()) if self.file.exists() else {
        "best_recall": -1.0, "best_loss": float("inf"), "left": self.patience}
    self.best = {k: ckpt_lib.Checkpointer(self.directory / k, max_to_keep=max_to_keep)
                 for k in ("best_recall", "best_validation_loss")}

  def update(self, step: int, state, metrics: Mapping[str, float]) -> bool:
    improved = False
    if metrics["val_recall_sum"] > self.s["best_recall"]:
      self.s["best_recall"], improved = metrics["val_recall_sum"], True
      self.best["best_recall"].save(step, arrays={"state": state})
    if metrics["val_loss"] < self.s["best_loss"]:
      self.s["best_loss"], improved = metrics["val_loss"], True
      self.best["best_validation_loss"].save(step, arrays={"state": state})
    self.s["left"] = self.patience if improved else self.s["left"] - 1
    if jax.process_index() == 0:
      self.file.write_text(json.dumps(self.s))
    return self.patience > 0 and self.s["left"] <= 0

  def close(self):
    for c in self.best.values():
      c.close()


def _collapse_warner(stage: str):
  """An ``on_log`` hook printing the cone-collapse warning whenever a logged step shows a failure mode not warned
  about before in this stage (a run typically passes through "T* behind I" into "saturated apertures")."""
  warned: set[str] = set()

  def on_log(rec: Mapping[str, float]) -> None:
    new = set(diagnostics.collapse_modes(rec)) - warned
    if new and jax.process_index() == 0:
      tqdm.write(f"[{stage}] WARNING at step {rec['step']}: {diagnostics.collapse_message(rec)}")
      warned.update(new)
  return on_log


# --------------------------------------------------------------------------------------------------------------
# Stage "hysac" for one variant
# --------------------------------------------------------------------------------------------------------------

def train_variant(cfg: ml_collections.ConfigDict, workdir: Path, base_dir: Path, variant: str,
                  writer: common.MetricsWriter) -> Path:
  """Trains (or resumes / skips when done) one HySAC variant; returns its trainable-state directory."""
  stage = "hysac" if variant == "hysac" else f"hysac_{variant}"
  out_dir = workdir / "hysac" / variant
  ckpt_dir = workdir / "checkpoints" / stage
  if (ckpt_dir / "done.json").exists() and (out_dir / hysac_model.TRAINABLE_FILE).exists():
    return out_dir
  h = cfg.hysac
  dtype = jnp.bfloat16 if h.dtype == "bfloat16" else jnp.float32

  # ---------------------------------------------------------------------------------------------- mesh
  mesh = common.make_mesh(cfg)
  n_batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  global_batch = h.batch_size_per_device * n_batch_devices

  # ---------------------------------------------------------------------------------------------- data
  data = common.build_data(cfg.data, text_encoder(cfg, base_dir))
  loader = common.make_train_loader(data["train"], data["transform"], global_batch, cfg.data, cfg.seed + 1)
  total_steps = h.epochs * loader.steps_per_epoch if h.steps <= 0 else h.steps

  # -------------------------------------------------------------- base weights, abstract shapes, sharded init
  clip = CLIP.from_pretrained(base_dir, dtype=dtype, param_dtype=jnp.float32, mesh=mesh)
  setup = build_hysac(clip, options=options_from_cfg(h), loss_cfg=loss_config(h, variant, h.batch_size_per_device),
                      optim=h.optim, total_steps=total_steps, mesh=mesh, seed=cfg.seed, nonfinite=cfg.train.nonfinite)
  state = setup.state

  # ---------------------------------------------------------------------------------------------- resume
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=cfg.train.max_to_keep)
  state = common.resume(ckpt, state, loader, writer, stage, total_steps)

  # ------------------------------------------------------------------------------------- validation hooks
  stopper = None
  on_epoch_end = None
  if cfg.train.validate and data["val"] is not None:
    stopper = EarlyStopping(ckpt_dir, cfg.train.early_stopping_patience)

    def on_epoch_end(state, epoch):
      m = validate(setup, state["params"], data["val"], data["transform"], h.batch_size_per_device)
      step = int(jax.device_get(state["step"]))
      writer.write({"stage": stage, "step": step, "epoch": epoch, **m})
      return stopper.update(step, state, m)

  # ------------------------------------------------------------------------------------------------ loop
  n_tok = cfg.data.max_length
  state = common.run_loop(stage=stage, step_fn=setup.step_fn, state=state, frozen=setup.frozen, loader=loader,
                          mesh=mesh, rng=jax.random.key(cfg.seed + 2), total_steps=total_steps, ckpt=ckpt,
                          writer=writer, meta={"stage": stage, "variant": variant, "base_path": str(base_dir)},
                          train_cfg=cfg.train, batch_size=global_batch,
                          flops_per_example=step_flops(clip.config, n_tok), on_epoch_end=on_epoch_end,
                          on_log=_collapse_warner(stage))
  ckpt.close()
  loader.close()
  if stopper is not None:
    stopper.close()

  # ------------------------------------------------------------------------------------------------ export
  setup.state = state
  model = eval_model(setup)
  if jax.process_index() == 0:
    hysac_model.save_trainable(model, out_dir, base_path=str(base_dir.resolve()),
                               extra={"variant": variant, "steps": int(jax.device_get(state["step"]))})
    (ckpt_dir / "done.json").write_text(json.dumps({"steps": int(jax.device_get(state["step"]))}))
  return out_dir


# --------------------------------------------------------------------------------------------------------------
# Stage "evaluate"
# --------------------------------------------------------------------------------------------------------------

def evaluate_run(cfg: ml_collections.ConfigDict, workdir: Path, base_dir: Path, variant_dirs: Mapping[str, Path]
                 ) -> dict[str, Any]:
  """Embeds the test split (and the training split for bounds) with every model and writes ``eval.json``,
  ``bounds.json`` and ``plots/`` through ``vlsafe_jax.eval.hysac_eval``; prints the results table."""
  from vlsafe_jax.eval import hysac_eval
  data = common.build_data(cfg.data, text_encoder(cfg, base_dir))
  test = data["test"] if data["test"] is not None else data["val"]
  if test is None:
    raise ValueError("evaluation needs data.test_json (or data.val_json)")
  bs, limit = cfg.eval_run.batch_size, cfg.eval_run.bounds_limit or None
  ecfg = dict(cfg.eval.to_dict())
  t0 = time.time()

  clip = CLIP.from_pretrained(base_dir)
  clip_test = common.embed_split(make_clip_encoder(clip), test, data["transform"], bs)
  tags = clip_test.pop("tags")
  baselines = {CLIP_LABEL: hysac_eval.evaluate_euclidean(clip_test, tags, data["tag_names"],
                                                         {**ecfg, "model_name": CLIP_LABEL})}
  results = {}
  for variant in [v for v in variant_dirs if v != "hysac"] + ["hysac"]:
    model = hysac_model.load_hysac(variant_dirs[variant], base_path=base_dir)
    enc = make_encoder(model)
    e_test = common.embed_split(enc, test, data["transform"], bs)
    e_test.pop("tags")
    e_train = common.embed_split(enc, data["train"], data["transform"], bs, limit)
    e_train.pop("tags")
    label = LABELS[variant]
    main = variant == "hysac"
    res = hysac_eval.evaluate(e_test, float(model.curvature()), e_train, tags, data["tag_names"],
                              {**ecfg, "model_name": label, "plots": main and ecfg.get("plots", True)},
                              out_dir=workdir if main else None, baselines=dict(baselines) if main else None,
                              metrics_path=workdir / "metrics.jsonl")
    results[variant] = res
    if not main:
      baselines[label] = res
  summary = summarize(results, baselines[CLIP_LABEL])
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  print_results(workdir)
  print(f"(evaluation {time.time() - t0:.0f} s)")
  return summary


def summarize(results: Mapping[str, dict], clip_res: dict) -> dict[str, Any]:
  """The numbers the default run is judged on: mean root distances and redirect R@1 per model."""
  task = "T*->I u I*"
  out = {"clip": {"T*->I u I* R@1": clip_res["tasks"][task]["plain"]["R@1"],
                  "T*->I u I* %safe": clip_res["tasks"][task]["plain"].get("%safe"),
                  "T->I R@1": clip_res["tasks"]["T->I"]["plain"]["R@1"]}}
  for v, r in results.items():
    t = r["tasks"][task]
    out[v] = {"root_distance_mean": r["root_distance"]["mean"], "root_distance_std": r["root_distance"]["std"],
              "separation": r["root_distance"]["separation"],
              "ordered_T<I<T*<I*": r["root_distance"]["ordered_T<I<T*<I*"], "curv": r["curv"],
              "T*->I u I* R@1": t["plain"]["R@1"],
              "T*->I u I* R@1 traversal": t.get("traversal", {}).get("R@1"),
              "T*->I u I* %safe traversal": t.get("traversal", {}).get("%safe"),
              "T*->I u I* moved %": t.get("traversal", {}).get("moved"),
              "T->I R@1": r["tasks"]["T->I"]["plain"]["R@1"]}
  return out


def print_results(workdir: Path) -> None:
  """Prints the results table of a finished run (``eval.json`` + ``summary.json``)."""
  from vlsafe_jax.perf import format_table
  ev = json.loads((workdir / "eval.json").read_text())
  summary = json.loads((workdir / "summary.json").read_text())
  print("=" * 110)
  print(ev.get("table_md", ""))
  rows = []
  for v, s in summary.items():
    if v == "clip":
      rows.append([CLIP_LABEL, "-", "-", "-", "-", "-", f"{s['T*->I u I* R@1']:.1f}", "-", f"{s['T->I R@1']:.1f}"])
      continue
    m = s["root_distance_mean"]
    trav = s["T*->I u I* R@1 traversal"]
    rows.append([LABELS[v], *(f"{m[k]:.3f}" for k in ("T", "I", "T*", "I*")),
                 "yes" if s["ordered_T<I<T*<I*"] else "no", f"{s['T*->I u I* R@1']:.1f}",
                 "-" if trav is None else f"{trav:.1f}", f"{s['T->I R@1']:.1f}"])
  print()
  print(format_table(["model", "d(0,T)", "d(0,I)", "d(0,T*)", "d(0,I*)", "T<I<T*<I*", "T*->I∪I* R@1",
                      "with traversal", "T->I R@1"], rows))
  print(f"(synthetic benchmark: {ev.get('synthetic')}; run directory {workdir})")
  print("=" * 110)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

def run(cfg: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  """``python -m vlsafe_jax.train`` with ``trainer="hysac"``: stages ``cfg.stages`` in order, resumable."""
  common.maybe_initialize_distributed(cfg)
  workdir = common.prepare_workdir(Path(workdir), cfg)
  writer = common.MetricsWriter(workdir / "metrics.jsonl")
  if (workdir / "summary.json").exists() and (workdir / "eval.json").exists():
    print(f"run in {workdir} is finished; its results:")
    print_results(workdir)
    return json.loads((workdir / "summary.json").read_text())
  t0 = time.time()
  base_dir = Path(cfg.base_path) if cfg.base_path else None
  if "clip" in cfg.stages:
    from vlsafe_jax.train import clip_trainer
    base_dir = clip_trainer.train_clip(cfg, workdir, writer)
  if base_dir is None:
    raise ValueError("no base CLIP: set base_path (an HF or converted CLIP directory) or include stage 'clip'")
  variant_dirs = {}
  if "hysac" in cfg.stages:
    for variant in ("hysac", *cfg.ablations):
      variant_dirs[variant] = train_variant(cfg, workdir, base_dir, variant, writer)
  summary = {}
  if "evaluate" in cfg.stages:
    summary = evaluate_run(cfg, workdir, base_dir, variant_dirs)
  print(f"total wall time {time.time() - t0:.0f} s")
  return summary


__all__ = [
    "ABLATIONS", "HySACSetup", "options_from_cfg", "loss_config", "make_loss_fn", "clamp_params", "text_encoder",
    "make_train_step", "build_hysac", "eval_model", "make_encoder", "make_clip_encoder", "step_flops", "validate", "EarlyStopping", "train_variant",
    "evaluate_run", "summarize", "print_results", "run",
]
