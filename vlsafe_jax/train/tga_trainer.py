"""TGA training (tga.md §2, §4, §5): ``python -m vlsafe_jax.train --config configs/tga_*.py``.

``run(cfg, workdir)`` is the ``trainer="tga"`` entry. For each variant in ``cfg.variants`` (``"tga"``, and
optionally ``"plain"`` = standard LLaVA alignment: no retrieved text, no auxiliary terms, the baseline) it runs
the stages of ``cfg.stages``:

* ``pretrain`` (stage 1): projector only, ``plain`` prompt "Retrieved Text: r. <image>" -> caption;
* ``finetune`` (stage 2): projector + decoder (full fine-tuning), conversation template; vision tower frozen.

One jitted, state-donating step per update (``make_train_step``): for each micro-batch (gradient accumulation is
a ``lax.scan`` over micro-batches) the text-only reference pass runs the decoder up to the deepest loss layer
only, under ``stop_gradient``; the training pass embeds the images (per-row scatter), runs the decoder with the
retrieved-text and image masks so their per-layer float32 means are accumulated *inside the layer scan*, and the
loss of :mod:`vlsafe_jax.methods.tga.loss` is taken with ``rho = step / total_steps``. Parameters are float32
masters sharded by the logical table (FSDP over ``mesh.fsdp``, tensor parallel over ``mesh.model``); compute runs
in ``tga.dtype`` (bf16 on accelerators). Logged per step: every loss term, rho, token accuracy, per-layer
cos(v, c) and cos(r, c), lr, grad norm, examples/s.

After training, ``evaluate`` writes ``eval.json``: held-out instruction loss / token accuracy (general ability)
and the defense success rate per scene on the toxic-image prompt set with the harness's judge.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import sharding
from vlsafe_jax.methods.tga import loss as loss_lib
from vlsafe_jax.methods.tga import prompt as prompt_lib
from vlsafe_jax.models.llava import Llava, llava_prefill_flops
from vlsafe_jax.train import common

STAGES = prompt_lib.STAGES
VARIANTS = ("tga", "plain")


# --------------------------------------------------------------------------------------------------------------
# Model pieces used inside the step
# --------------------------------------------------------------------------------------------------------------

def embed_rows(model: Llava, input_ids_bt: jax.Array, pixels_bhwc: jax.Array) -> jax.Array:
  """Decoder inputs (B, T, D) with one image per row: row b's image-token positions take image b's features.

  Unlike HF's batch-global ``masked_scatter`` order, rows without image tokens (text-only rows, which still carry
  a dummy image so shapes stay static) consume no features, so a text-only row never shifts another row's image.
  """
  cfg = model.config
  image_bt = input_ids_bt == cfg.image_token_index
  x_btd = model.language_model.embed(jnp.where(image_bt, 0, input_ids_bt))
  feats_bnd = model.image_features(pixels_bhwc).astype(x_btd.dtype)
  pos_bt = jnp.clip(jnp.cumsum(image_bt.astype(jnp.int32), axis=1) - 1, 0, feats_bnd.shape[1] - 1)
  g_btd = jnp.take_along_axis(feats_bnd, pos_bt[..., None], axis=1)
  return jnp.where(image_bt[..., None], g_btd, x_btd)


def caption_means(model: Llava, batch: Mapping[str, jax.Array], layers: Sequence[int]) -> jax.Array:
  """Reference pass (tga.md §3.3): caption-token means (B, |layers|, D) float32 under stop_gradient.

  Runs only the first ``max(layers)`` decoder layers (no final norm, no LM head) on the text-only prompt.
  """
  lm = model.language_model
  _, _, ex = lm(batch["ref_ids"], attention_mask_bt=batch["ref_attention_mask"],
                hidden_masks_bmt=batch["caption_mask"][:, None, :], logits="none", num_layers=max(layers))
  return jax.lax.stop_gradient(loss_lib.select_layers(ex["hidden_masked_means"], layers)[:, :, 0])


def forward_terms(model: Llava, batch: Mapping[str, jax.Array], rho, cfg: loss_lib.TGALossConfig
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and terms for one (micro-)batch (see :func:`vlsafe_jax.methods.tga.loss.tga_loss`)."""
  c_bld = caption_means(model, batch, cfg.layers)
  x_btd = embed_rows(model, batch["input_ids"], batch["pixels"])
  masks_bmt = jnp.stack([batch["retrieved_mask"], batch["image_mask"]], axis=1)
  logits, _, ex = model.language_model(inputs_embeds_btd=x_btd, attention_mask_bt=batch["attention_mask"],
                                       hidden_masks_bmt=masks_bmt)
  means = loss_lib.select_layers(ex["hidden_masked_means"], cfg.layers)        # (B, |L|, 2, D)
  return loss_lib.tga_loss(logits, batch["labels"], means[:, :, 1], means[:, :, 0], c_bld, batch["aux_weight"],
                           rho, cfg, batch.get("diag_weight"))


def trainable_filter(stage: str):
  """Stage 1 trains the projector; stage 2 the projector and the decoder. The vision tower is always frozen."""
  proj = nnx.PathContains("multi_modal_projector")
  if stage == "pretrain":
    return nnx.All(nnx.Param, proj)
  if stage == "finetune":
    return nnx.All(nnx.Param, nnx.Any(proj, nnx.PathContains("language_model")))
  raise ValueError(f"TGA stage must be one of {STAGES}, got {stage!r}")


# --------------------------------------------------------------------------------------------------------------
# The jitted step
# --------------------------------------------------------------------------------------------------------------

def _split_micro(x: jax.Array, accum: int) -> jax.Array:
  """(B, ...) -> (A, B/A, ...) taking rows {i*A + a} for micro-batch a, so each device's contiguous batch block
  contributes equally to every micro-batch (no cross-device reshuffle when B/A is a multiple of the devices)."""
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)


def make_train_step(graphdef, loss_cfg: loss_lib.TGALossConfig, tx: optax.GradientTransformation, *,
                    state_sh: dict, mesh: Mesh, total_steps: int, accum: int = 1,
                    lr_fn: optax.Schedule | None = None, nonfinite: str = "raise"):
  """``(state, frozen, batch, rng) -> (state, metrics)``, jitted, state donated.

  ``batch``: the arrays of :func:`vlsafe_jax.methods.tga.prompt.collate` plus ``pixels`` (B, h, w, 3).
  ``rho = step / total_steps`` (step = completed updates). Metrics are 0-d (per-layer cosines split into
  ``cos_vc_l{k}`` / ``cos_rc_l{k}`` with k the HF hidden-state index).
  """
  if nonfinite not in ("raise", "skip"):
    raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
  repl = NamedSharding(mesh, P())
  keys = [k for k in ("input_ids", "attention_mask", "labels", "retrieved_mask", "image_mask", "ref_ids",
                      "ref_attention_mask", "caption_mask", "aux_weight", "diag_weight", "pixels")]

  def loss_fn(params, frozen, batch, rho):
    model = nnx.merge(graphdef, params, frozen)
    return forward_terms(model, batch, rho, loss_cfg)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, frozen, batch, rng):
    del rng                                        # deterministic model (no dropout)
    params = state["params"]
    batch = {k: batch[k] for k in keys}
    rho = state["step"].astype(jnp.float32) / float(max(total_steps, 1))
    if accum == 1:
      (loss, aux), grads = grad_fn(params, frozen, batch, rho)
    else:
      micro = jax.tree.map(lambda x: _split_micro(x, accum), batch)

      def body(acc, mb):
        (l, a), g = grad_fn(params, frozen, mb, rho)
        return jax.tree.map(jnp.add, acc, (l, a, g)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, frozen,
                                                                            jax.tree.map(lambda x: x[0], micro),
                                                                            rho)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    updates, opt = tx.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = common.global_norm(grads)
    (new_params, opt), guard = common.guard_nonfinite(nonfinite, loss, grad_norm, (new_params, opt),
                                                      (params, state["opt"]))
    metrics = {"loss": loss, "rho": rho, "grad_norm": grad_norm, **guard,
               "token_acc": aux["n_correct"] / jnp.maximum(aux["n_tokens"], 1)}
    for k in ("ce", "align", "pairwise", "align_raw", "pairwise_raw", "w_align", "w_pairwise"):
      metrics[k] = aux[k]
    for i, layer in enumerate(loss_cfg.layers):
      metrics[f"cos_vc_l{layer}"] = aux["cos_vc_l"][i]
      metrics[f"cos_rc_l{layer}"] = aux["cos_rc_l"][i]
    if lr_fn is not None:
      metrics["lr"] = lr_fn(state["step"])
    return {"params": new_params, "opt": opt, "step": state["step"] + 1}, metrics

  return jax.jit(step, donate_argnums=(0,), out_shardings=(state_sh, repl))


@dataclasses.dataclass
class TGASetup:
  """Everything one stage needs; ``state = {"params", "opt", "step"}`` is donated, ``frozen`` never is."""
  graphdef: Any
  state: dict
  frozen: Any
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  state_sh: dict
  mesh: Mesh
  step_fn: Any


def build_stage(model: Llava, stage: str, *, loss_cfg: loss_lib.TGALossConfig, optim: ml_collections.ConfigDict,
                total_steps: int, mesh: Mesh, accum: int = 1, nonfinite: str = "raise") -> TGASetup:
  """Splits ``model`` into trainable / frozen parts for ``stage``, places them on ``mesh`` (logical table) and
  builds AdamW (warmup + cosine from ``optim``) and the jitted step."""
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(stage), ...)
  param_sh = common.pure_shardings(trainable, mesh)
  frozen_sh = common.pure_shardings(frozen, mesh)
  params = sharding.put(nnx.to_pure_dict(trainable), param_sh)
  frozen = sharding.put(nnx.to_pure_dict(frozen), frozen_sh)
  tx, lr_fn = common.make_optimizer(optim, total_steps)
  abs_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = common.train_state_shardings(tx, abs_params, param_sh, mesh)
  state = common.init_train_state(tx, params, state_sh)
  step_fn = make_train_step(graphdef, loss_cfg, tx, state_sh=state_sh, mesh=mesh, total_steps=total_steps,
                            accum=accum, lr_fn=lr_fn, nonfinite=nonfinite)
  return TGASetup(graphdef, state, frozen, tx, lr_fn, state_sh, mesh, step_fn)


def merge_params(model: Llava, setup: TGASetup, params=None) -> Llava:
  """Writes trained params back into ``model`` (in place) and returns it."""
  params = setup.state["params"] if params is None else params
  nnx.update(model, nnx.state(nnx.merge(setup.graphdef, params, setup.frozen)))
  return model


def step_flops(model_cfg, seq_len: int, ref_len: int, stage: str, n_layers_ref: int) -> float:
  """Training FLOPs per example (perf.md §2, analytic, 2/MAC): forward of vision + projector + decoder over
  ``seq_len`` and the truncated reference pass; backward 2x forward for the trainable decoder (stage 2), or
  only the activation-gradient 1x through the decoder for stage 1 (frozen decoder weights, "4N"-style)."""
  from vlsafe_jax.models.llama import llama_prefill_flops
  import dataclasses as dc
  n_img = model_cfg.num_image_tokens
  fwd = llava_prefill_flops(model_cfg, max(seq_len - n_img, 0))
  ref_cfg = dc.replace(model_cfg.text_config, num_hidden_layers=n_layers_ref)
  ref = llama_prefill_flops(ref_cfg, ref_len) - 2.0 * ref_len * model_cfg.text_config.hidden_size * \
      model_cfg.text_config.vocab_size
  back = 2.0 if stage == "finetune" else 1.0
  return fwd * (1.0 + back) + ref


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------

class TGASource:
  """Random-access source of fixed-length training records (prompt.collate of one row + pixels).

  ``rows``: LLaVA-format dicts; ``image_fn(row) -> (h, w, 3) float32`` normalised pixels (called only for rows
  with an image; text-only rows get zeros).
  """

  def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer, model_cfg, *, stage: str, max_length: int,
               ref_max_length: int, image_fn, template: str = "llava_llama_2", system: str | None = None,
               use_retrieved: bool = True, halve_identical: bool = True, exclude_ids_containing: str | None = "tox"):
    self.rows = list(rows)
    self.tok, self.cfg, self.stage = tokenizer, model_cfg, stage
    self.max_length, self.ref_max_length = max_length, ref_max_length
    self.image_fn, self.template, self.system = image_fn, template, system
    self.use_retrieved, self.halve, self.exclude = use_retrieved, halve_identical, exclude_ids_containing
    pad = tokenizer.pad_token_id
    self.pad = int(pad if pad is not None else 0)

  def __len__(self):
    return len(self.rows)

  def example(self, i: int) -> prompt_lib.TrainExample:
    row = dict(self.rows[i])
    if not self.use_retrieved:
      row["retrieved_caption"] = ""              # "plain" baseline: standard LLaVA prompts
    return prompt_lib.from_llava_row(self.tok, row, stage=self.stage, num_image_tokens=self.cfg.num_image_tokens,
                                     image_token_index=self.cfg.image_token_index, template=self.template,
                                     system=self.system, halve_identical=self.halve,
                                     exclude_ids_containing=self.exclude)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    ex = self.example(int(i))
    out = {k: v[0] for k, v in prompt_lib.collate([ex], self.pad, max_length=self.max_length,
                                                  ref_max_length=self.ref_max_length).items()}
    size = self.cfg.vision_config.image_size
    if ex.has_image:
      px = np.asarray(self.image_fn(self.rows[int(i)]), np.float32)
      if px.shape != (size, size, 3):
        raise ValueError(f"row {ex.id!r}: image_fn returned shape {px.shape}, expected ({size}, {size}, 3)")
    else:
      px = np.zeros((size, size, 3), np.float32)
    out["pixels"] = px
    return out


def file_image_fn(image_folder: str | Path, size: int, *, pad_square: bool):
  """LLaVA image loading: ``row["image"]`` under ``image_folder``; stage 2 pads to square with the mean colour
  (``image_aspect_ratio pad``), then CLIP resize / crop / normalise."""
  from vlsafe_jax.data import images as images_lib

  def fn(row):
    path = Path(image_folder) / row["image"]
    try:
      rgb = images_lib.to_rgb_array(images_lib.load_image(path), name=str(path))
    except (OSError, ValueError) as e:
      raise ValueError(f"TGA row {row.get('id')!r}: cannot read image {path}: {e}") from e
    if pad_square:
      rgb = images_lib.pad_to_square(rgb)
    return images_lib.preprocess_one(rgb, size)
  return fn


def read_rows(path: str | Path) -> list[dict]:
  """A LLaVA JSON list (or JSONL) of rows; errors name the file."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"TGA data file {path} does not exist")
  text = path.read_text(encoding="utf-8")
  try:
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines()
                                                                   if l.strip()]
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from e
  if not rows:
    raise ValueError(f"{path}: no rows")
  return rows


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------

def heldout_metrics(model: Llava, source: TGASource, batch_size: int) -> dict[str, float]:
  """General ability on held-out instruction rows: answer-token CE and token accuracy (no aux terms)."""
  graphdef, state = nnx.split(model)
  cfg0 = loss_lib.TGALossConfig(layers=(1,), w_al=0.0, w_pw=0.0)

  @jax.jit
  def fn(state, batch):
    m = nnx.merge(graphdef, state)
    x = embed_rows(m, batch["input_ids"], batch["pixels"])
    logits, _, _ = m.language_model(inputs_embeds_btd=x, attention_mask_bt=batch["attention_mask"])
    ce, n, correct = loss_lib.lm_loss(logits, batch["labels"])
    return ce * n, n, correct
  del cfg0
  tot = n_all = hits = 0.0
  for s in range(0, len(source), batch_size):
    idx = list(range(s, min(s + batch_size, len(source))))
    idx += [idx[-1]] * (batch_size - len(idx))            # pad: one compilation; padded rows masked below
    recs = [source[i] for i in idx]
    batch = {k: np.stack([r[k] for r in recs]) for k in ("input_ids", "attention_mask", "labels", "pixels")}
    real = min(batch_size, len(source) - s)
    batch["labels"][real:] = loss_lib.IGNORE_INDEX
    a, b, c = jax.device_get(fn(state, {k: jnp.asarray(v) for k, v in batch.items()}))
    tot, n_all, hits = tot + float(a), n_all + float(b), hits + float(c)
  return {"heldout_loss": tot / max(n_all, 1.0), "heldout_token_acc": hits / max(n_all, 1.0),
          "heldout_tokens": n_all}


def safety_eval(model: Llava, tokenizer, items, judge_cfg, *, template: str, max_new_tokens: int,
                batch_size: int, system: str | None = None, image_fn=None, eos_token_id=None) -> dict[str, Any]:
  """DSR per scene (``category``) with the harness (mode ``refusal``; keyword judge by default)."""
  from vlsafe_jax.eval import judge as judge_lib
  from vlsafe_jax.eval import vlm_safety
  judge = judge_lib.make_judge(judge_cfg)
  responses = vlm_safety.generate_responses(model, tokenizer, items, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens, template=template, system=system,
                                            image_fn=image_fn,
                                            eos_token_id=eos_token_id)
  out = vlm_safety.evaluate_responses(items, responses, judge, mode="refusal")
  out["responses"] = list(responses)
  return out


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

def loss_config(cfg: ml_collections.ConfigDict, variant: str) -> loss_lib.TGALossConfig:
  l = cfg.tga.loss
  kw = dict(layers=tuple(l.layers), w_al=l.w_al, w_pw=l.w_pw, decay_al=l.decay_al, decay_pw=l.decay_pw,
            stop_grad_retrieved=l.stop_grad_retrieved, mode=l.mode, norm=l.norm)
  if variant == "plain":
    kw.update(w_al=0.0, w_pw=0.0)
  return loss_lib.TGALossConfig(**kw)


def load_setting(cfg: ml_collections.ConfigDict, mesh: Mesh, workdir: Path | None = None) -> dict[str, Any]:
  """Model, tokenizer, per-stage rows, held-out rows, safety items and image functions for ``cfg.data.kind``."""
  dtype = jnp.bfloat16 if cfg.tga.dtype == "bfloat16" else jnp.float32
  d = cfg.data
  if d.kind == "synthetic":
    from vlsafe_jax.data import tga_synthetic
    return tga_synthetic.setting(cfg, dtype=dtype, mesh=mesh, workdir=workdir)
  if d.kind != "llava_json":
    raise ValueError(f"data.kind must be 'synthetic' or 'llava_json', got {d.kind!r}")
  if not cfg.model.path:
    raise ValueError("model.path is required (an HF LLaVA directory, e.g. a Mistral-7B-Instruct + CLIP-L/14-336 "
                     "LLaVA after the stage-1 projector init)")
  from vlsafe_jax.data import tokenize
  from vlsafe_jax.eval import vlm_safety
  model = Llava.from_pretrained(cfg.model.path, dtype=dtype, param_dtype=jnp.float32, mesh=mesh)
  tokenizer = tokenize.load_tokenizer(cfg.model.path)
  size = model.config.vision_config.image_size
  rows = {s: read_rows(d[f"{s}_json"]) for s in cfg.stages if d.get(f"{s}_json")}
  missing = [s for s in cfg.stages if s not in rows]
  if missing:
    raise ValueError(f"data.{missing[0]}_json is required for stage {missing[0]!r}")
  return {
      "model": model, "tokenizer": tokenizer, "rows": rows,
      "image_fn": {"pretrain": file_image_fn(d.image_folder, size, pad_square=False),
                   "finetune": file_image_fn(d.image_folder, size, pad_square=True)},
      "heldout_rows": read_rows(d.heldout_json) if d.heldout_json else [],
      "safety_items": vlm_safety.read_jsonl(d.toxic_manifest, default_question=cfg.eval.question)
      if d.toxic_manifest else [],
      "eval_image_fn": None,
  }


def train_stage(cfg, workdir: Path, setting: dict, model: Llava, variant: str, stage: str,
                writer: common.MetricsWriter, mesh: Mesh) -> dict[str, float]:
  """Trains (or resumes, or skips when finished) one stage of one variant; updates ``model`` in place."""
  s_cfg = cfg.tga[stage]
  name = f"{variant}_{stage}"
  ckpt_dir = workdir / "checkpoints" / name
  n_batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  global_batch = s_cfg.batch_size_per_device * n_batch_devices * s_cfg.grad_accum
  source = TGASource(setting["rows"][stage], setting["tokenizer"], model.config, stage=stage,
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


def evaluate_variant(cfg, setting: dict, model: Llava, variant: str) -> dict[str, Any]:
  out: dict[str, Any] = {"variant": variant}
  tok = setting["tokenizer"]
  if setting.get("heldout_rows"):
    src = TGASource(setting["heldout_rows"], tok, model.config, stage="finetune",
                    max_length=cfg.tga.finetune.max_length, ref_max_length=cfg.tga.finetune.ref_max_length,
                    image_fn=setting["image_fn"]["finetune"], template=cfg.tga.template,
                    system=cfg.tga.system or None, use_retrieved=False)
    out.update(heldout_metrics(model, src, cfg.eval.batch_size))
  if setting.get("safety_items"):
    out["safety"] = safety_eval(model, tok, setting["safety_items"], dict(cfg.eval.judge),
                                template=cfg.tga.template, system=cfg.tga.system or None,
                                max_new_tokens=cfg.eval.max_new_tokens,
                                batch_size=cfg.eval.batch_size, image_fn=setting.get("eval_image_fn"),
                                eos_token_id=tok.eos_token_id)
  return out


def run(cfg: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  """``trainer="tga"``: train every variant through its stages, then evaluate; returns the eval dict."""
  common.maybe_initialize_distributed(cfg)
  workdir = common.prepare_workdir(Path(workdir), cfg)
  writer = common.MetricsWriter(workdir / "metrics.jsonl")
  mesh = common.make_mesh(cfg)
  for v in cfg.variants:
    if v not in VARIANTS:
      raise ValueError(f"unknown TGA variant {v!r}; known: {VARIANTS}")
  for s in cfg.stages:
    if s not in STAGES:
      raise ValueError(f"unknown TGA stage {s!r}; known: {STAGES}")
  results: dict[str, Any] = {}
  for variant in cfg.variants:
    setting = load_setting(cfg, mesh, workdir)           # fresh base model per variant (same seed / same weights)
    model = setting["model"]
    with jax.set_mesh(mesh):
      for stage in cfg.stages:
        train_stage(cfg, workdir, setting, model, variant, stage, writer, mesh)
    save_final(cfg, model, setting["tokenizer"], workdir / "final" / variant)
    if cfg.get("evaluate", True):
      results[variant] = evaluate_variant(cfg, setting, model, variant)
  if results and jax.process_index() == 0:
    (workdir / "eval.json").write_text(json.dumps(results, indent=2, default=float))
    print(format_results(results))
  return results


def save_final(cfg, model: Llava, tokenizer, out_dir: Path) -> Path:
  """The trained model as a converted LLaVA directory (``Llava.from_pretrained`` reads it; ``python -m
  checkpoints_convert llava-export`` turns it into HF files). Synthetic runs also store their word vocabulary."""
  if jax.process_index() != 0:
    return out_dir
  if cfg.data.kind == "synthetic":
    from vlsafe_jax.data import synthetic_vlm
    return synthetic_vlm.save(model, tokenizer, out_dir, {"kind": "tga_synthetic_final"})
  from checkpoints_convert import llava as convert
  return convert.save_converted(model, out_dir, src=cfg.model.path or None)


def format_results(results: Mapping[str, Any]) -> str:
  """A small text table: variant x (held-out loss, token acc, overall DSR, per-scene DSR)."""
  from vlsafe_jax import perf
  scenes = sorted({c for r in results.values() for c in r.get("safety", {}).get("per_category", {})})
  head = ["variant", "heldout_loss", "token_acc", "DSR %"] + [f"DSR {s}" for s in scenes]
  rows = []
  for v, r in results.items():
    saf = r.get("safety", {})
    rate = lambda s: s.get("defense_success_rate", s.get("rate", float("nan")))
    rows.append([v, f"{r.get('heldout_loss', float('nan')):.3f}", f"{r.get('heldout_token_acc', float('nan')):.3f}",
                 f"{rate(saf.get('overall', {})):.1f}" if saf else "-"]
                + [f"{rate(saf['per_category'][s]):.1f}" if s in saf.get("per_category", {}) else "-"
                   for s in scenes])
  return perf.format_table(head, rows)


__all__ = ["embed_rows", "caption_means", "forward_terms", "trainable_filter", "make_train_step", "TGASetup",
           "build_stage", "merge_params", "step_flops", "TGASource", "file_image_fn", "read_rows",
           "heldout_metrics", "safety_eval", "loss_config", "save_final", "load_setting", "train_stage", "evaluate_variant",
           "run", "format_results", "VARIANTS"]
