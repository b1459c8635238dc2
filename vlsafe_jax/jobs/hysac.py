"""The HySAC job behind ``python -m vlsafe_jax.train`` (``trainer="hysac"``) and ``python -m vlsafe_jax.evaluate``.

:func:`run` runs the stages named in ``cfg.stages`` in order, each resumable: ``clip`` (the synthetic stage-1 CLIP,
``train/clip_trainer.py``) -> ``hysac`` (the main model and each ablation of ``cfg.ablations``,
``train/hysac_trainer.train_variant``) -> ``evaluate`` (:func:`evaluate_run`). A finished run prints its results
again. Run directory: ``config.json``, ``metrics.jsonl``, ``checkpoints/<stage>/``, ``clip_base/``,
``hysac/<variant>/``, ``eval.json``, ``bounds.json``, ``summary.json``, ``plots/``.

:func:`load_run` / :func:`recompute_bounds` re-evaluate a finished run (``python -m vlsafe_jax.evaluate``).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import config as config_lib
from vlsafe_jax.data import sources
from vlsafe_jax.eval import hysac_eval
from vlsafe_jax.methods.hysac import model as hysac_model
from vlsafe_jax.models.clip import CLIP
from vlsafe_jax.perf import format_table
from vlsafe_jax.train import clip_trainer, common, hysac_trainer

LABELS = {"hysac": "HySAC", "wo_ent": "HySAC w/o Ent", "wo_sent": "HySAC w/o S-Ent"}
CLIP_LABEL = "CLIP (stage 1, cosine)"


# --------------------------------------------------------------------------------------------------------------
# Stage "evaluate" and the report
# --------------------------------------------------------------------------------------------------------------

def evaluate_run(cfg: ml_collections.ConfigDict, workdir: Path, base_dir: Path, variant_dirs: Mapping[str, Path]
                 ) -> dict[str, Any]:
  """Embeds the test split (and the training split for bounds) with every model and writes ``eval.json``,
  ``bounds.json`` and ``plots/`` through ``vlsafe_jax.eval.hysac_eval``; prints the results table."""
  data = sources.make_sources(cfg.data, sources.make_text_encoder(cfg.data, base_dir))
  test = data.test if data.test is not None else data.val
  if test is None:
    raise ValueError("evaluation needs data.test_json (or data.val_json)")
  bs, limit = cfg.eval_run.batch_size, cfg.eval_run.bounds_limit or None
  ecfg = dict(cfg.eval.to_dict())
  t0 = time.time()

  clip = CLIP.from_pretrained(base_dir)
  clip_test = common.embed_split(hysac_trainer.make_clip_encoder(clip), test, data.transform, bs)
  tags = clip_test.pop("tags")
  baselines = {CLIP_LABEL: hysac_eval.evaluate_euclidean(clip_test, tags, data.tag_names,
                                                         {**ecfg, "model_name": CLIP_LABEL})}
  results = {}
  for variant in [v for v in variant_dirs if v != "hysac"] + ["hysac"]:
    model = hysac_model.load_hysac(variant_dirs[variant], base_path=base_dir)
    enc = hysac_trainer.make_encoder(model)
    e_test = common.embed_split(enc, test, data.transform, bs)
    e_test.pop("tags")
    e_train = common.embed_split(enc, data.train, data.transform, bs, limit)
    e_train.pop("tags")
    label = LABELS[variant]
    main = variant == "hysac"
    res = hysac_eval.evaluate(e_test, float(model.curvature()), e_train, tags, data.tag_names,
                              {**ecfg, "model_name": label, "plots": main and ecfg.get("plots", True)},
                              out_dir=workdir if main else None, baselines=dict(baselines) if main else None,
                              metrics_path=workdir / "metrics.jsonl")
    results[variant] = res
    if not main:
      baselines[label] = res
  summary = summarize(results, baselines[CLIP_LABEL])
  if jax.process_index() == 0:
    # Atomic: a finished run is recognised by summary.json, so a kill must not leave half of one.
    ckpt_lib.write_text_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
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
# Re-evaluating a finished run (python -m vlsafe_jax.evaluate)
# --------------------------------------------------------------------------------------------------------------

def load_run(workdir: Path, overrides: list[str]) -> tuple[ml_collections.ConfigDict, Path, dict[str, Path]]:
  """``(config, base CLIP dir, {variant: trainable-state dir})`` of a finished training run."""
  cfg_path = workdir / "config.json"
  if not cfg_path.is_file():
    raise SystemExit(f"{workdir}: no config.json (not a run directory written by python -m vlsafe_jax.train)")
  cfg = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
  # Every evaluator option can be overridden (eval.stat=avg, eval.alpha_t=0.7, ...), even if the run's config
  # only set a few of them: add the missing ones with their defaults before locking.
  if "eval" in cfg:
    for f in dataclasses.fields(hysac_eval.EvalConfig):
      if f.name not in cfg.eval:
        cfg.eval[f.name] = f.default
  cfg.lock()
  config_lib.apply_overrides(cfg, overrides, source=str(cfg_path))
  if cfg.get("trainer") != "hysac":
    raise SystemExit(f"{cfg_path}: trainer {cfg.get('trainer')!r} has no HySAC evaluation")
  base_dir = Path(cfg.base_path) if cfg.get("base_path") else workdir / "clip_base"
  if not (base_dir / "config.json").is_file():
    raise SystemExit(f"{workdir}: base CLIP directory {base_dir} is missing (stage 'clip' not finished, or set "
                     f"base_path=...)")
  variants = ("hysac", *cfg.get("ablations", ()))
  dirs = {v: workdir / "hysac" / v for v in variants}
  missing = [str(d) for d in dirs.values() if not (d / hysac_model.TRAINABLE_FILE).is_file()]
  if missing:
    raise SystemExit(f"{workdir}: trained HySAC state missing in {missing} (finish training first: re-run the same "
                     f"python -m vlsafe_jax.train command to resume)")
  return cfg, base_dir, dirs


def recompute_bounds(cfg: ml_collections.ConfigDict, workdir: Path, base_dir: Path, hysac_dir: Path) -> dict:
  """Embeds the training split with the main HySAC model and writes ``workdir/bounds.json``."""
  data = sources.make_sources(cfg.data, sources.make_text_encoder(cfg.data, base_dir))
  model = hysac_model.load_hysac(hysac_dir, base_path=base_dir)
  embs = common.embed_split(hysac_trainer.make_encoder(model), data.train, data.transform,
                            cfg.eval_run.batch_size, cfg.eval_run.bounds_limit or None)
  embs.pop("tags")
  b = hysac_eval.bounds({hysac_eval.BOUND_KEYS[k]: v for k, v in embs.items()}, float(model.curvature()))
  hysac_eval.save_bounds(workdir / "bounds.json", b)
  return b


# --------------------------------------------------------------------------------------------------------------
# The job
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
    base_dir = clip_trainer.train_clip(cfg, workdir, writer)
  if base_dir is None:
    raise ValueError("no base CLIP: set base_path (an HF or converted CLIP directory) or include stage 'clip'")
  variant_dirs = {}
  if "hysac" in cfg.stages:
    for variant in ("hysac", *cfg.ablations):
      variant_dirs[variant] = hysac_trainer.train_variant(cfg, workdir, base_dir, variant, writer)
  summary = {}
  if "evaluate" in cfg.stages:
    summary = evaluate_run(cfg, workdir, base_dir, variant_dirs)
  print(f"total wall time {time.time() - t0:.0f} s")
  return summary


__all__ = ["LABELS", "CLIP_LABEL", "evaluate_run", "summarize", "print_results", "load_run", "recompute_bounds",
           "run"]
