"""The UWM job behind ``python -m vlsafe_jax.uwm``: calibrate, edit, evaluate before/after, save; resumable.

Steps (config keys in brackets; see ``configs/uwm_synthetic.py`` and ``configs/uwm_clip_l14_visu.py``):
1. base CLIP [model.path, or the synthetic stage-1 CLIP: reused from ``<model.stage1_workdir>/clip_base`` when
   present, else trained there by the existing stage-"clip" trainer];
2. stage ``edit``: calibration pairs [calib.*] (the synthetic train split, a UWM manifest per tower, or the ViSU
   train split; ``data/sources.calibration_sources``), then the edit [method = uwm | g_unsafe | g_safe_clip,
   uwm.*], text tower first, then vision; writes ``edited_clip/`` (converted CLIP dir) and ``masks.npz`` (bool,
   Flax layout, keyed by layer path);
3. stages ``evaluate_before`` / ``evaluate_after``: the base and the edited model [eval.*]: SafeGround, the
   Safe-CLIP retrieval columns (R@1/5/10/20), zero-shot accuracy (synthetic shapes split, class-per-directory
   folders, prepared tfds datasets);
4. report: ``eval.json``, optional ``hf_export/`` [export_hf], and a printed before/after table.

Run directory: ``config.json``, ``metrics.jsonl`` (one record per tower edit and one per evaluated model, keyed by
``stage`` and ``step``), ``stages/<stage>.json`` (completed stages; a rerun reloads them, ``jobs/stages.py``), and
the files above. The after-evaluation always reads the edited model back from ``edited_clip/``, so a resumed run
evaluates exactly what an uninterrupted one does. A finished run prints its results again.
"""
from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from checkpoints_convert import clip as convert
from vlsafe_jax import config as config_lib
from vlsafe_jax import perf
from vlsafe_jax.checkpoint import write_text_atomic
from vlsafe_jax.data import classification, sources, synthetic
from vlsafe_jax.data.transform import QuadrupletTransform
from vlsafe_jax.eval import retrieval, safeground, zeroshot
from vlsafe_jax.jobs.stages import Stages
from vlsafe_jax.methods.uwm import baselines
from vlsafe_jax.methods.uwm import calibrate as cal
from vlsafe_jax.methods.uwm import edit
from vlsafe_jax.models.clip import CLIP
from vlsafe_jax.train import clip_trainer, common

SG_KEYS = ("P^t_s", "P^t_u", "P^v_s", "P^v_u", "Txt_s", "Img_s", "PS", "PU", "GS")
RET_COLUMNS = ("T_s-V_s", "V_s-T_s", "T_u-V_{u+s}", "V_u-T_{u+s}")
STAGES = ("edit", "evaluate_before", "evaluate_after")


def uwm_config(c: ml_collections.ConfigDict) -> edit.UWMConfig:
  """``cfg.uwm`` -> :class:`edit.UWMConfig`."""
  def tower(t):
    return edit.TowerConfig(tuple(t.targets), tau=float(t.tau), alpha=float(t.alpha), eps=float(t.eps),
                            magnitude_prior=bool(t.magnitude_prior))
  return edit.UWMConfig(vision=tower(c.vision), text=tower(c.text), aggregation=c.aggregation)


# --------------------------------------------------------------------------------------------------------------
# Model and data

def base_clip_dir(cfg: ml_collections.ConfigDict) -> Path:
  """The base CLIP directory: ``model.path``, or the synthetic stage-1 CLIP (reused, or trained once)."""
  if cfg.model.path:
    p = Path(cfg.model.path)
    if not (p / "config.json").exists():
      raise FileNotFoundError(f"model.path={p}: not a CLIP directory (no config.json)")
    return p
  if cfg.data.kind != "synthetic":
    raise ValueError(f"model.path is required for data.kind={cfg.data.kind!r} (the HF CLIP directory to edit); "
                     f"only the synthetic benchmark has a built-in base model")
  stage1 = config_lib.load(cfg.model.stage1_config, list(cfg.model.stage1_overrides))
  wd = Path(cfg.model.stage1_workdir or Path("runs") / stage1.name)
  out = wd / "clip_base"
  done = wd / "checkpoints" / clip_trainer.STAGE / "done.json"
  if (out / "config.json").exists() and done.exists():
    print(f"[uwm] base CLIP: reusing the stage-1 CLIP {out}")
    return out
  print(f"[uwm] base CLIP: training the synthetic stage-1 CLIP into {wd} ({cfg.model.stage1_config})")
  common.prepare_workdir(wd, stage1)
  return clip_trainer.train_clip(stage1, wd, common.MetricsWriter(wd / "metrics.jsonl"))


def pair_factories(srcs, transform, cfg) -> tuple[dict[str, Callable], dict[str, int]]:
  """Per tower: a factory of calibration-pair iterators (one pass each) and its number of batches."""
  fac, totals = {}, {}
  for tower, src in srcs.items():
    bs = cfg.calib.vision_batch_size if tower == "vision" else cfg.calib.text_batch_size
    fac[tower] = (lambda src=src, bs=bs, tower=tower:
                  (cal.pairs_from_batch(b, tower) for b in sources.batches(src, transform, bs)))
    totals[tower] = -(-len(src) // bs)
  return fac, totals


# --------------------------------------------------------------------------------------------------------------
# Evaluation

# Module level, graphdef static: models of the same structure (the base and the edited CLIP, a MaskedDense model at
# every alpha of a sweep) share one compiled program instead of compiling a fresh closure per call.
@functools.partial(jax.jit, static_argnums=0)
def _encode_quadruplets(graphdef, state, b):
  m = nnx.merge(graphdef, state)
  return (m.encode_text(b["safe_ids"], b["safe_mask"]), m.encode_text(b["unsafe_ids"], b["unsafe_mask"]),
          m.encode_image(b["safe_image"]), m.encode_image(b["unsafe_image"]))


def embed_quadruplets(model, source, transform, batch_size: int) -> dict[str, np.ndarray]:
  """``{"TS", "TU", "IS", "IU"}`` projected embeddings ``(N, P)`` of a quadruplet split (one compilation per
  model structure and batch size)."""
  graphdef, state = nnx.split(model)
  enc = functools.partial(_encode_quadruplets, graphdef)
  outs = {k: [] for k in ("TS", "TU", "IS", "IU")}
  keys = ("safe_ids", "safe_mask", "unsafe_ids", "unsafe_mask", "safe_image", "unsafe_image")
  for b in sources.batches(source, transform, batch_size):
    n = b["safe_image"].shape[0]
    for k, e in zip(outs, jax.device_get(enc(state, sources.pad_batch(b, batch_size, keys)))):
      outs[k].append(np.asarray(e[:n], np.float32))
  return {k: np.concatenate(v) for k, v in outs.items()}


def zeroshot_datasets(cfg) -> dict[str, tuple[Any, list[str], str]]:
  """``{name: (source, class names, template)}`` of the configured zero-shot sets [eval.*]."""
  out = {}
  if cfg.eval.synthetic_zeroshot:
    src = synthetic.ZeroShotShapes(cfg.eval.zeroshot_size, seed=cfg.data.seed, image_size=cfg.data.image_size,
                                   attribute=cfg.eval.get("zeroshot_attribute", "background"))
    out["synthetic shapes"] = (src, list(src.class_names), src.template)
  for spec in cfg.eval.zeroshot_folders:
    name, _, path = spec.partition("=")
    if not path:
      raise ValueError(f"eval.zeroshot_folders entry {spec!r} must be 'Name=/path/to/class_folders'")
    src = classification.ImageFolder(path)
    out[name] = (src, src.class_names, zeroshot.template_for(name))
  for spec in cfg.eval.get("zeroshot_tfds", ()):
    # (name, path, split[, builder[, image_key[, label_key]]]); name picks the uwm.md §9.3 template
    if isinstance(spec, str) or not 3 <= len(spec) <= 6:
      raise ValueError(f"eval.zeroshot_tfds entry {spec!r} must be a tuple (name, path, split[, builder"
                       f"[, image_key[, label_key]]]), path = a prepared tfds builder dir or a data_dir")
    name, path, split, *rest = (str(v) for v in spec)
    rest += ["", "image", "label"][len(rest):]
    src = classification.TfdsSource(path, split, builder=rest[0], image_key=rest[1], label_key=rest[2])
    out[name] = (src, src.class_names, zeroshot.template_for(name))
  return out


def evaluate(model, cfg, tokenizer, test, zs_sets) -> dict[str, Any]:
  """SafeGround + retrieval columns on the test split, zero-shot accuracies; one model."""
  res: dict[str, Any] = {}
  if test is not None:
    tf = QuadrupletTransform(tokenizer, image_size=cfg.data.image_size)
    e = embed_quadruplets(model, test, tf, cfg.eval.batch_size)
    res["safeground"] = safeground.safeground(e["TS"], e["TU"], e["IS"], e["IU"])
    res["retrieval"] = retrieval.safe_clip_columns(e["TS"], e["TU"], e["IS"], e["IU"])
    res["n_test"] = int(e["TS"].shape[0])
  if zs_sets:
    ev = zeroshot.clip_evaluator(model, tokenizer, cfg.data.image_size, cfg.eval.batch_size)
    res["zeroshot"] = ev.evaluate_all(zs_sets, limit=cfg.eval.zeroshot_limit or None)
  return res


def flat_metrics(res: dict[str, Any]) -> dict[str, float]:
  """One evaluation as a flat ``{metric name: value}`` record (the names of :func:`results_rows`)."""
  out = {f"SafeGround {k}": float(v) for k, v in res.get("safeground", {}).items()}
  for col, rs in res.get("retrieval", {}).items():
    out.update({f"{col} {r}": float(v) for r, v in rs.items()})
  out.update({f"zero-shot {k}": float(v) for k, v in res.get("zeroshot", {}).items()})
  return out


def results_rows(before: dict, after: dict) -> list[list[Any]]:
  rows = []
  for k in SG_KEYS:
    if "safeground" in before:
      rows.append([f"SafeGround {k}", before["safeground"][k], after["safeground"][k],
                   after["safeground"][k] - before["safeground"][k]])
  for col in RET_COLUMNS:
    if "retrieval" in before:
      for r in ("R@1", "R@5", "R@10", "R@20"):
        b, a = before["retrieval"][col][r], after["retrieval"][col][r]
        rows.append([f"{col} {r}", b, a, a - b])
  for name in before.get("zeroshot", {}):
    b, a = before["zeroshot"][name], after["zeroshot"][name]
    rows.append([f"zero-shot {name}", b, a, a - b])
  return [[n, round(b, 2), round(a, 2), round(d, 2)] for n, b, a, d in rows]


def print_results(out: dict[str, Any], workdir: Path) -> None:
  """Prints the before/after table of an ``eval.json`` dict."""
  label = " (SYNTHETIC benchmark: a demonstration, not the paper's evaluation)" if out["synthetic"] else ""
  print(f"\n[uwm] {out['method']} on {out['base_model']}{label}; edit {out['edit_seconds']:.1f}s; run dir {workdir}")
  for tower, info in out["edit"].items():
    print(f"[uwm] {tower}: {info}")
  print(perf.format_table(["metric", "before", "after", "delta"], results_rows(out["before"], out["after"])))


# --------------------------------------------------------------------------------------------------------------
# The job

def compute_edit(cfg, model, tok) -> cal.UWMResult:
  """The edit of stage ``edit`` without its files: calibration pairs [calib.*], then ``cfg.method`` on ``model``
  (text tower first, then vision). Returns the :class:`~vlsafe_jax.methods.uwm.calibrate.UWMResult`: the new
  model (``model`` is untouched), ``masks`` and ``scores`` ``{layer_path: (d_in, d_out)}`` in Flax layout, per-tower
  info. The notebooks call this to plot the scores the job does not store."""
  transform = QuadrupletTransform(tok, image_size=cfg.data.image_size)
  srcs = sources.calibration_sources(cfg.data, cfg.calib, cfg.towers)
  if cfg.method == "uwm":
    fac, totals = pair_factories(srcs, transform, cfg)
    return cal.uwm_clip(model, fac, uwm_config(cfg.uwm), progress=cfg.progress, totals=totals)
  if cfg.data.kind != "synthetic" and not cfg.data.train_json:
    raise ValueError(f"method={cfg.method!r} needs quadruplets (image and text of both sides): use the "
                     f"synthetic data or data.train_json (ViSU)")
  quad = {t: (lambda src=src, bs=cfg.calib.baseline_batch_size: sources.batches(src, transform, bs))
          for t, src in srcs.items()}
  return baselines.baseline_clip(model, quad, cfg.method, uwm_config(cfg.uwm), progress=cfg.progress)


def edit_stage(cfg, model, tok, model_dir: Path, workdir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Calibrates and edits ``model`` (:func:`compute_edit`); writes ``edited_clip/`` and ``masks.npz``; returns
  (result, records)."""
  t_edit = time.perf_counter()
  res = compute_edit(cfg, model, tok)
  edit_s = time.perf_counter() - t_edit
  convert.save_converted(res.model, workdir / "edited_clip", src=model_dir)
  np.savez_compressed(workdir / "masks.npz", **{k: np.asarray(v) for k, v in res.masks.items()})
  records = [{"tower": tower, **info} for tower, info in res.info.items()]
  return {"info": res.info, "edit_seconds": edit_s}, records


def run(cfg: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  """Runs (or resumes) the UWM job of ``cfg`` in ``workdir``; returns the ``eval.json`` dict."""
  workdir = common.prepare_workdir(Path(workdir), cfg)
  if (workdir / "eval.json").is_file():
    out = json.loads((workdir / "eval.json").read_text())
    print(f"run in {workdir} is finished; its results:")
    print_results(out, workdir)
    return out
  t0 = time.perf_counter()
  model_dir = base_clip_dir(cfg)
  tok = sources.make_text_encoder(cfg.data, model_dir)
  stages = Stages(workdir, common.MetricsWriter(workdir / "metrics.jsonl"), "uwm", len(STAGES), cfg.progress)
  base: list[CLIP] = []

  def base_model() -> CLIP:   # loaded only when a stage that needs it is not stored yet
    if not base:
      base.append(CLIP.from_pretrained(model_dir))
    return base[0]

  edited = stages.run("edit", lambda: edit_stage(cfg, base_model(), tok, model_dir, workdir))
  test = sources.split_source(cfg.data, "test")
  zs_sets = zeroshot_datasets(cfg)

  def evaluate_stage(model_fn):
    res = evaluate(model_fn(), cfg, tok, test, zs_sets)
    return res, [flat_metrics(res)]

  before = stages.run("evaluate_before", lambda: evaluate_stage(base_model))
  edited_model = CLIP.from_pretrained(workdir / "edited_clip")
  after = stages.run("evaluate_after", lambda: evaluate_stage(lambda: edited_model))
  stages.close()

  if cfg.export_hf:
    convert.export_hf(edited_model, workdir / "hf_export", src=model_dir)
  out = {"config": cfg.name, "method": cfg.method, "synthetic": cfg.data.kind == "synthetic",
         "base_model": str(model_dir), "edit": edited["info"], "edit_seconds": edited["edit_seconds"],
         "total_seconds": time.perf_counter() - t0, "before": before, "after": after}
  # Atomic: a rerun takes an existing eval.json as "finished" and reads it back (a torn one would not parse).
  write_text_atomic(workdir / "eval.json", json.dumps(out, indent=2))
  print_results(out, workdir)
  return out


__all__ = ["SG_KEYS", "RET_COLUMNS", "STAGES", "uwm_config", "base_clip_dir", "pair_factories", "embed_quadruplets",
           "zeroshot_datasets", "evaluate", "flat_metrics", "results_rows", "print_results", "compute_edit",
           "edit_stage", "run"]
