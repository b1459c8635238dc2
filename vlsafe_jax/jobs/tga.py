"""The TGA job (tga.md §2, §5, §7): ``python -m vlsafe_jax.train --config configs/tga_*.py`` (``trainer="tga"``).

:func:`run` trains, for each variant in ``cfg.variants`` (``"tga"``, and optionally ``"plain"`` = standard LLaVA
alignment: no retrieved text, no auxiliary terms, the baseline), the stages of ``cfg.stages`` from a fresh base
model (:func:`vlsafe_jax.train.tga_trainer.train_stage`), saves the model to ``<workdir>/final/<variant>`` and
evaluates it: ``eval.json`` holds the held-out instruction loss / token accuracy (general ability) and the defense
success rate per scene on the toxic-image prompt set with the harness's judge; a table is printed.

Settings (:func:`load_setting`): ``data.kind="llava_json"`` (an HF LLaVA + LLaVA JSON rows + a toxic-image
manifest) or ``"synthetic"`` (:mod:`vlsafe_jax.data.tga_synthetic`, with the text-aligned base model of
:func:`vlsafe_jax.train.vlm_base.train_or_load_tga_base`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from checkpoints_convert.llava import LLAVA_FAMILY
from vlsafe_jax import perf
from vlsafe_jax.data import images as images_lib
from vlsafe_jax.data import prompt_sets, tga_rows, tga_synthetic, tokenize
from vlsafe_jax.eval import judge as judge_lib
from vlsafe_jax.eval import vlm_safety
from vlsafe_jax.methods.tga import analysis, forward, retrieval
from vlsafe_jax.methods.tga import loss as loss_lib
from vlsafe_jax.models.llava import Llava
from vlsafe_jax.train import common, tga_trainer, vlm_base

# --------------------------------------------------------------------------------------------------------------
# Settings: model, tokenizer, rows, evaluation sets
# --------------------------------------------------------------------------------------------------------------

def bag_of_words_retrieve(pool: list[str], captions: list[str]) -> list[str]:
  """The synthetic setting's retrieved texts: the nearest other pool caption by bag-of-words cosine."""
  return retrieval.nearest_other_texts(pool, captions, tga_synthetic.bag_of_words(pool + captions),
                                       encoder_id="bag-of-words")


def synthetic_setting(cfg: ml_collections.ConfigDict, *, dtype, mesh: Mesh, workdir: Path | None = None
                      ) -> dict[str, Any]:
  """The synthetic setting dict (see :func:`load_setting`) with the text-aligned base model, trained once and
  cached under ``cfg.data.base_dir`` (default ``<workdir>/base``; a converted LLaVA directory + vocabulary)."""
  d = cfg.data
  data = tga_synthetic.TGASynthetic(d.seed, d.train_size, d.eval_size, d.image_size)
  base_dir = Path(d.base_dir) if d.base_dir else Path(workdir or ".") / "base"
  model, tok = vlm_base.train_or_load_tga_base(cfg, mesh, base_dir)
  if dtype != jnp.float32:
    model = Llava.from_pretrained(base_dir, dtype=dtype, param_dtype=jnp.float32)
  rows = {s: data.stage_rows(s, bag_of_words_retrieve) for s in ("pretrain", "finetune")}
  fn = data.image_fn()
  return {"model": model, "tokenizer": tok, "rows": rows, "image_fn": {"pretrain": fn, "finetune": fn},
          "heldout_rows": data.heldout_rows(), "safety_items": data.toxic_items(),
          "eval_image_fn": lambda item: images_lib.preprocess(item.image, d.image_size)[0]}


def load_setting(cfg: ml_collections.ConfigDict, mesh: Mesh, workdir: Path | None = None) -> dict[str, Any]:
  """``{"model", "tokenizer", "rows": {stage: rows}, "image_fn": {stage: fn}, "heldout_rows", "safety_items",
  "eval_image_fn"}`` for ``cfg.data.kind``."""
  dtype = jnp.bfloat16 if cfg.tga.dtype == "bfloat16" else jnp.float32
  d = cfg.data
  if d.kind == "synthetic":
    return synthetic_setting(cfg, dtype=dtype, mesh=mesh, workdir=workdir)
  if d.kind != "llava_json":
    raise ValueError(f"data.kind must be 'synthetic' or 'llava_json', got {d.kind!r}")
  if not cfg.model.path:
    raise ValueError("model.path is required (an HF LLaVA directory, e.g. a Mistral-7B-Instruct + CLIP-L/14-336 "
                     "LLaVA after the stage-1 projector init)")
  model = Llava.from_pretrained(cfg.model.path, dtype=dtype, param_dtype=jnp.float32, mesh=mesh)
  tokenizer = tokenize.load_tokenizer(cfg.model.path)
  size = model.config.vision_config.image_size
  rows = {s: tga_rows.read_rows(d[f"{s}_json"]) for s in cfg.stages if d.get(f"{s}_json")}
  missing = [s for s in cfg.stages if s not in rows]
  if missing:
    raise ValueError(f"data.{missing[0]}_json is required for stage {missing[0]!r}")
  return {
      "model": model, "tokenizer": tokenizer, "rows": rows,
      "image_fn": {"pretrain": tga_rows.file_image_fn(d.image_folder, size, pad_square=False),
                   "finetune": tga_rows.file_image_fn(d.image_folder, size, pad_square=True)},
      "heldout_rows": tga_rows.read_rows(d.heldout_json) if d.heldout_json else [],
      "safety_items": prompt_sets.read_jsonl(d.toxic_manifest, default_question=cfg.eval.question)
      if d.toxic_manifest else [],
      "eval_image_fn": None,
  }


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------

def heldout_metrics(model: Llava, source: tga_rows.TGASource, batch_size: int) -> dict[str, float]:
  """General ability on held-out instruction rows: answer-token CE and token accuracy (no aux terms)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, batch):
    m = nnx.merge(graphdef, state)
    x = forward.embed_rows(m, batch["input_ids"], batch["pixels"])
    logits, _, _ = m.language_model(inputs_embeds_btd=x, attention_mask_bt=batch["attention_mask"])
    ce, n, correct = loss_lib.lm_loss(logits, batch["labels"])
    return ce * n, n, correct
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
  judge = judge_lib.make_judge(judge_cfg)
  responses = vlm_safety.generate_responses(model, tokenizer, items, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens, template=template, system=system,
                                            image_fn=image_fn, eos_token_id=eos_token_id)
  out = vlm_safety.evaluate_responses(items, responses, judge, mode="refusal")
  out["responses"] = list(responses)
  return out


def evaluate_variant(cfg, setting: dict, model: Llava, variant: str) -> dict[str, Any]:
  """Held-out metrics and the safety evaluation of one trained variant."""
  out: dict[str, Any] = {"variant": variant}
  tok = setting["tokenizer"]
  if setting.get("heldout_rows"):
    src = tga_rows.TGASource(setting["heldout_rows"], tok, model.config, stage="finetune",
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


def format_results(results: Mapping[str, Any]) -> str:
  """A small text table: variant x (held-out loss, token acc, overall DSR, per-scene DSR)."""
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


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------

def save_final(cfg, model: Llava, tokenizer, out_dir: Path) -> Path:
  """The trained model as a converted LLaVA directory (``Llava.from_pretrained`` reads it; ``python -m
  checkpoints_convert llava-export`` turns it into HF files). Synthetic runs also store their word vocabulary."""
  if jax.process_index() != 0:
    return out_dir
  if cfg.data.kind == "synthetic":
    return vlm_base.save(model, tokenizer, out_dir, {"kind": "tga_synthetic_final"})
  return LLAVA_FAMILY.save_converted(model, out_dir, src=cfg.model.path or None)


def run(cfg: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  """``trainer="tga"``: train every variant through its stages, then evaluate; returns the eval dict."""
  common.maybe_initialize_distributed(cfg)
  workdir = common.prepare_workdir(Path(workdir), cfg)
  writer = common.MetricsWriter(workdir / "metrics.jsonl")
  mesh = common.make_mesh(cfg)
  for v in cfg.variants:
    if v not in tga_trainer.VARIANTS:
      raise ValueError(f"unknown TGA variant {v!r}; known: {tga_trainer.VARIANTS}")
  for s in cfg.stages:
    if s not in tga_trainer.STAGES:
      raise ValueError(f"unknown TGA stage {s!r}; known: {tga_trainer.STAGES}")
  results: dict[str, Any] = {}
  for variant in cfg.variants:
    setting = load_setting(cfg, mesh, workdir)           # fresh base model per variant (same seed / same weights)
    model = setting["model"]
    with jax.set_mesh(mesh):
      for stage in cfg.stages:
        tga_trainer.train_stage(cfg, workdir, setting, model, variant, stage, writer, mesh)
    save_final(cfg, model, setting["tokenizer"], workdir / "final" / variant)
    if cfg.get("evaluate", True):
      results[variant] = evaluate_variant(cfg, setting, model, variant)
  if results and jax.process_index() == 0:
    (workdir / "eval.json").write_text(json.dumps(results, indent=2, default=float))
    print(format_results(results))
  return results


# --------------------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------------------

def analyze(cfg, workdir: Path, model_dir: str | None, variant: str) -> dict:
  """The logit-lens analysis (``python -m vlsafe_jax.tga analyze``, see that module) of one trained variant."""
  a = cfg.get("analysis") or {}
  src = Path(model_dir) if model_dir else workdir / "final" / variant
  if cfg.data.kind == "synthetic":
    if not src.exists():
      raise SystemExit(f"no trained model in {src}; run `python -m vlsafe_jax.train --config ...` first or pass "
                       f"--model")
    model, tok = vlm_base.load(src)
    data = tga_synthetic.TGASynthetic(cfg.data.seed, 1, cfg.data.eval_size, cfg.data.image_size)
    items = data.toxic_items()
    refusal = [tok.token_to_id[w] for w in a.get("refusal_words", ("sorry", "i"))]
    image_question = tga_synthetic.DESCRIBE_IMAGE
    text_template = tga_synthetic.DESCRIBE_TEXT
  else:
    path = src if src.exists() else Path(cfg.model.path)
    if not a.get("manifest"):
      raise SystemExit("analysis.manifest is required: JSONL rows {id, image, caption (the text description)}")
    model = Llava.from_pretrained(path)
    tok = tokenize.load_tokenizer(path if (path / "tokenizer_config.json").exists() else cfg.model.path)
    items = prompt_sets.read_jsonl(a["manifest"], default_question=analysis.IMAGE_QUESTION)
    refusal = list(a.get("refusal_ids", analysis.DEFAULT_REFUSAL_IDS))
    image_question, text_template = analysis.IMAGE_QUESTION, analysis.TEXT_TEMPLATE
  print("refusal tokens:", {i: tok.decode([i]) for i in refusal})
  result = analysis.analyze(model, tok, items, refusal_ids=refusal, template=cfg.tga.template,
                            system=cfg.tga.system or None, batch_size=int(a.get("batch_size", 8)),
                            image_question=image_question, text_template=text_template)
  out = Path(a.get("out_dir") or workdir / "analysis" / variant)
  analysis.write_outputs(result, out)
  print(analysis.format_table(result))
  print(f"wrote {out}/analysis.json, analysis.txt, analysis.png")
  return result


__all__ = ["bag_of_words_retrieve", "synthetic_setting", "load_setting", "heldout_metrics", "safety_eval",
           "evaluate_variant", "format_results", "save_final", "run", "analyze"]
