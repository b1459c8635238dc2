"""The UWM job behind ``python -m vlsafe_jax.uwm``: calibrate, edit, evaluate before/after, save.

Steps (config keys in brackets; see ``configs/uwm_synthetic.py`` and ``configs/uwm_clip_l14_visu.py``):
1. base CLIP [model.path, or the synthetic stage-1 CLIP: reused from ``<model.stage1_workdir>/clip_base`` when
   present, else trained there by the existing stage-"clip" trainer];
2. calibration pairs [calib.*]: the synthetic train split, a UWM manifest (``visu.CalibrationPairs``) per tower,
   or the ViSU train split (``random.Random(seed)`` shuffle, first ``n_pairs``);
3. the edit [method = uwm | g_unsafe | g_safe_clip, uwm.*]: text tower first, then vision;
4. evaluation of the base and edited models [eval.*]: SafeGround, the Safe-CLIP retrieval columns (R@1/5/10/20),
   zero-shot accuracy (synthetic shapes split, and/or class-per-directory folders);
5. outputs in the run directory: ``edited_clip/`` (converted CLIP dir), ``masks.npz`` (bool, Flax layout, keyed
   by layer path), ``eval.json``, optional ``hf_export/`` [export_hf], and a printed before/after table.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from vlsafe_jax.methods.uwm import calibrate as cal
from vlsafe_jax.methods.uwm import edit

SG_KEYS = ("P^t_s", "P^t_u", "P^v_s", "P^v_u", "Txt_s", "Img_s", "PS", "PU", "GS")
RET_COLUMNS = ("T_s-V_s", "V_s-T_s", "T_u-V_{u+s}", "V_u-T_{u+s}")


class _Subset:
  """The first ``n`` items of a random-access source, in an optional index order."""

  def __init__(self, source, indices):
    self.source, self.indices = source, list(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[self.indices[int(i)]]


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
  from vlsafe_jax import config as config_lib
  from vlsafe_jax.train import clip_trainer, common
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


def text_encoder(cfg, model_dir: Path):
  from vlsafe_jax.data import synthetic, visu
  if cfg.data.kind == "synthetic":
    return synthetic.SyntheticTokenizer(cfg.data.max_length)
  from vlsafe_jax.data import tokenize
  return visu.HFTextEncoder(tokenize.load_tokenizer(cfg.data.tokenizer or model_dir), cfg.data.max_length)


def _shuffled(source, n: int, seed: int):
  idx = list(range(len(source)))
  random.Random(seed).shuffle(idx)   # uwm.md §2: Python random, seed 0, then the first n_pairs
  return _Subset(source, idx[:n])


def calibration_sources(cfg) -> dict[str, Any]:
  """``{tower: random-access source}`` of calibration records (images and/or captions)."""
  from vlsafe_jax.data import synthetic, visu
  c, d = cfg.calib, cfg.data
  if d.kind == "synthetic":
    src = synthetic.SyntheticQuadruplets("train", c.n_pairs, seed=d.seed, image_size=d.image_size)
    return {"text": src, "vision": src}
  out = {}
  for tower, manifest, kind in (("text", c.text_manifest, "text"), ("vision", c.vision_manifest, "image")):
    if manifest:
      out[tower] = visu.CalibrationPairs(manifest, kind, c.image_root or None, n_pairs=c.n_pairs, seed=c.seed)
    elif d.train_json:
      out[tower] = _shuffled(visu.ViSUQuadruplets(d.train_json, d.coco_root or None, d.unsafe_root or None,
                                                  require_images=(tower == "vision")), c.n_pairs, c.seed)
  if not out:
    raise ValueError("UWM calibration data: give calib.text_manifest / calib.vision_manifest (JSONL "
                     "{'safe','unsafe','tag'}) or data.train_json (ViSU train split)")
  return out


def test_source(cfg):
  from vlsafe_jax.data import synthetic, visu
  d = cfg.data
  if d.kind == "synthetic":
    return synthetic.SyntheticQuadruplets("test", d.test_size, seed=d.seed, image_size=d.image_size)
  if not d.test_json:
    return None
  return visu.ViSUQuadruplets(d.test_json, d.coco_root or None, d.unsafe_root or None)


def batches(source, transform, batch_size: int) -> Iterable[dict[str, np.ndarray]]:
  """Unshuffled batches over a source (last one short)."""
  from vlsafe_jax.data import pipeline
  return pipeline.make_loader(source, min(batch_size, len(source)), seed=0, shuffle=False, num_epochs=1,
                              drop_remainder=False, transform=transform, shard_index=0, shard_count=1)


def pair_factories(sources, transform, cfg) -> tuple[dict[str, Callable], dict[str, int]]:
  fac, totals = {}, {}
  for tower, src in sources.items():
    bs = cfg.calib.vision_batch_size if tower == "vision" else cfg.calib.text_batch_size
    fac[tower] = (lambda src=src, bs=bs, tower=tower:
                  (cal.pairs_from_batch(b, tower) for b in batches(src, transform, bs)))
    totals[tower] = -(-len(src) // bs)
  return fac, totals


# --------------------------------------------------------------------------------------------------------------
# Evaluation

def embed_quadruplets(model, source, transform, batch_size: int) -> dict[str, np.ndarray]:
  """``{"TS", "TU", "IS", "IU"}`` projected embeddings ``(N, P)`` of a quadruplet split (one compilation)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def enc(state, b):
    m = nnx.merge(graphdef, state)
    return (m.encode_text(b["safe_ids"], b["safe_mask"]), m.encode_text(b["unsafe_ids"], b["unsafe_mask"]),
            m.encode_image(b["safe_image"]), m.encode_image(b["unsafe_image"]))

  outs = {k: [] for k in ("TS", "TU", "IS", "IU")}
  keys = ("safe_ids", "safe_mask", "unsafe_ids", "unsafe_mask", "safe_image", "unsafe_image")
  for b in batches(source, transform, batch_size):
    n = b["safe_image"].shape[0]
    pad = {k: np.concatenate([b[k], np.repeat(b[k][-1:], batch_size - n, 0)]) if n < batch_size else b[k]
           for k in keys}
    for k, e in zip(outs, jax.device_get(enc(state, pad))):
      outs[k].append(np.asarray(e[:n], np.float32))
  return {k: np.concatenate(v) for k, v in outs.items()}


def zeroshot_datasets(cfg) -> dict[str, tuple[Any, list[str], str]]:
  from vlsafe_jax.data import synthetic
  from vlsafe_jax.eval import zeroshot as zs
  out = {}
  if cfg.eval.synthetic_zeroshot:
    src = synthetic.ZeroShotShapes(cfg.eval.zeroshot_size, seed=cfg.data.seed, image_size=cfg.data.image_size,
                                   attribute=cfg.eval.get("zeroshot_attribute", "background"))
    out["synthetic shapes"] = (src, list(src.class_names), src.template)
  for spec in cfg.eval.zeroshot_folders:
    name, _, path = spec.partition("=")
    if not path:
      raise ValueError(f"eval.zeroshot_folders entry {spec!r} must be 'Name=/path/to/class_folders'")
    src = zs.ImageFolder(path)
    out[name] = (src, src.class_names, zs.template_for(name))
  for spec in cfg.eval.get("zeroshot_tfds", ()):
    # (name, path, split[, builder[, image_key[, label_key]]]); name picks the uwm.md §9.3 template
    if isinstance(spec, str) or not 3 <= len(spec) <= 6:
      raise ValueError(f"eval.zeroshot_tfds entry {spec!r} must be a tuple (name, path, split[, builder"
                       f"[, image_key[, label_key]]]), path = a prepared tfds builder dir or a data_dir")
    name, path, split, *rest = (str(v) for v in spec)
    rest += ["", "image", "label"][len(rest):]
    src = zs.TfdsSource(path, split, builder=rest[0], image_key=rest[1], label_key=rest[2])
    out[name] = (src, src.class_names, zs.template_for(name))
  return out


def evaluate(model, cfg, tokenizer, test, zs_sets, progress: bool = True) -> dict[str, Any]:
  """SafeGround + retrieval columns on the test split, zero-shot accuracies; one model."""
  from vlsafe_jax.data import visu
  from vlsafe_jax.eval import retrieval, safeground, zeroshot
  res: dict[str, Any] = {}
  if test is not None:
    tf = visu.QuadrupletTransform(tokenizer, image_size=cfg.data.image_size)
    e = embed_quadruplets(model, test, tf, cfg.eval.batch_size)
    res["safeground"] = safeground.safeground(e["TS"], e["TU"], e["IS"], e["IU"])
    res["retrieval"] = retrieval.safe_clip_columns(e["TS"], e["TU"], e["IS"], e["IU"])
    res["n_test"] = int(e["TS"].shape[0])
  if zs_sets:
    ev = zeroshot.clip_evaluator(model, tokenizer, cfg.data.image_size, cfg.eval.batch_size)
    res["zeroshot"] = ev.evaluate_all(zs_sets, limit=cfg.eval.zeroshot_limit or None)
  return res


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


# --------------------------------------------------------------------------------------------------------------
# The job

def run(cfg: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  """Runs the UWM job of ``cfg`` into ``workdir``; returns the ``eval.json`` dict."""
  from checkpoints_convert import clip as convert
  from vlsafe_jax import perf
  from vlsafe_jax.data import visu
  from vlsafe_jax.models.clip import CLIP
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(json.loads(json.dumps(cfg.to_dict(), default=list)), indent=2))
  t0 = time.perf_counter()

  model_dir = base_clip_dir(cfg)
  model = CLIP.from_pretrained(model_dir)
  tok = text_encoder(cfg, model_dir)
  transform = visu.QuadrupletTransform(tok, image_size=cfg.data.image_size)
  sources = calibration_sources(cfg)
  sources = {t: s for t, s in sources.items() if t in cfg.towers}
  fac, totals = pair_factories(sources, transform, cfg)

  t_edit = time.perf_counter()
  if cfg.method == "uwm":
    res = cal.uwm_clip(model, fac, uwm_config(cfg.uwm), progress=cfg.progress, totals=totals)
  else:
    from vlsafe_jax.methods.uwm import baselines
    if cfg.data.kind != "synthetic" and not cfg.data.train_json:
      raise ValueError(f"method={cfg.method!r} needs quadruplets (image and text of both sides): use the "
                       f"synthetic data or data.train_json (ViSU)")
    quad = {t: (lambda src=src, bs=cfg.calib.baseline_batch_size: batches(src, transform, bs))
            for t, src in sources.items()}
    res = baselines.baseline_clip(model, quad, cfg.method, uwm_config(cfg.uwm), progress=cfg.progress)
  edit_s = time.perf_counter() - t_edit

  test = test_source(cfg)
  zs_sets = zeroshot_datasets(cfg)
  before = evaluate(model, cfg, tok, test, zs_sets)
  after = evaluate(res.model, cfg, tok, test, zs_sets)

  convert.save_converted(res.model, workdir / "edited_clip", src=model_dir)
  np.savez_compressed(workdir / "masks.npz", **{k: np.asarray(v) for k, v in res.masks.items()})
  if cfg.export_hf:
    convert.export_hf(res.model, workdir / "hf_export", src=model_dir)
  out = {"config": cfg.name, "method": cfg.method, "synthetic": cfg.data.kind == "synthetic",
         "base_model": str(model_dir), "edit": res.info, "edit_seconds": edit_s,
         "total_seconds": time.perf_counter() - t0, "before": before, "after": after}
  (workdir / "eval.json").write_text(json.dumps(out, indent=2))
  label = " (SYNTHETIC benchmark: a demonstration, not the paper's evaluation)" if out["synthetic"] else ""
  print(f"\n[uwm] {cfg.method} on {model_dir}{label}; edit {edit_s:.1f}s; run dir {workdir}")
  for tower, info in res.info.items():
    print(f"[uwm] {tower}: {info}")
  print(perf.format_table(["metric", "before", "after", "delta"], results_rows(before, after)))
  return out


__all__ = ["uwm_config", "base_clip_dir", "calibration_sources", "embed_quadruplets", "evaluate", "results_rows",
           "run"]
