"""Where does UWM's vision edit fail on the synthetic benchmark? Probe + per-tower edits over seeds (synthetic).

  PYTHONPATH=. python scripts/uwm_vision_probe.py SETTING [--seeds 0 1 2] [--out runs/uwmvis]

For each seed: trains (or reuses) a reduced stage-1 CLIP (``configs/uwm_synthetic.py:smoke``'s architecture, seed =
the stage-1 training seed: initialisation and data order), then
1. probes the vision scores apart from the model: per fc2 layer the median unsafe/safe score ratio R, the share of
   the score mass carried by the top 1% of weights, and the fraction of weights that tau = 0.02 selects (flat
   scores select ~tau of the weights; concentrated scores fewer); plus how many of the image's patches the hazard
   motif touches in the calibration images;
2. evaluates the base model and three edits (text tower only, vision tower only, both = UWM), each calibrated on
   the same pairs (vision after text for "both", the reference order), on the test split: SafeGround, safe R@10,
   synthetic zero-shot.

SETTINGs (each changes ONE thing from "base"; why each follows from the real setting: notes/uwmvis-readme.md):
  base      today's smoke setting: "patch" unsafe images (motif side 35-55% of the image), 2 layers, width 32
  cover     the hazard motif spans the whole unsafe image (motif_scale (1, 1))
  deep      6 transformer layers in both towers (6 vision fc2 layers instead of 2)
  rewrite   the ViSU-like unsafe variant (I* a new rendering of T*'s scene + motif), motif scale unchanged
  cover_deep  cover and deep together (after each was measured alone)

Writes ``<out>/<SETTING>/seed<k>.json`` and ``<out>/<SETTING>/summary.json`` (mean and std over seeds of every
metric for every edit, and of the edit-minus-base deltas). Results are labelled synthetic.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vlsafe_jax import config as config_lib
from vlsafe_jax.data import sources
from vlsafe_jax.data.transform import QuadrupletTransform
from vlsafe_jax.jobs import uwm as uwm_job
from vlsafe_jax.methods.uwm import calibrate as cal
from vlsafe_jax.models.clip import CLIP

# Stage-1 overrides of uwm_synthetic:smoke (kept here so the setting does not change if that config does).
SMOKE_STAGE1 = ("clip_model.width=32", "clip_model.layers=2", "clip_model.heads=4", "clip_model.embed_dim=32",
                "data.train_size=1024", "clip_stage.batch_size=32", "clip_stage.epochs=6", "train.progress=False")

# name -> (stage-1 overrides, data overrides shared by the stage-1 data and the UWM calibration/evaluation data)
SETTINGS = {
    "base": ((), ()),
    "cover": ((), ("data.motif_scale=(1.0, 1.0)",)),
    "deep": (("clip_model.layers=6",), ()),
    "rewrite": ((), ("data.unsafe_variant=rewrite",)),
    "cover_deep": (("clip_model.layers=6",), ("data.motif_scale=(1.0, 1.0)",)),   # both causes together
}
EDITS = ("base", "text", "vision", "both")
REPORT = ("P^t_s", "P^t_u", "P^v_s", "P^v_u", "Txt_s", "Img_s", "GS", "T_s-V_s R@10", "V_s-T_s R@10", "zero-shot")


def flat(res: dict) -> dict[str, float]:
  out = {k: float(v) for k, v in res["safeground"].items()}
  for col in ("T_s-V_s", "V_s-T_s"):
    out[f"{col} R@10"] = float(res["retrieval"][col]["R@10"])
  out["zero-shot"] = float(res["zeroshot"]["synthetic shapes"])
  return out


def score_probe(scores: dict, tau: float) -> dict[str, dict[str, float]]:
  """Per layer: median R, share of sum(R) in the top 1% of weights, fraction of weights tau selects."""
  out = {}
  for path, r in sorted(scores.items()):
    r = np.sort(np.asarray(r, np.float64).ravel())[::-1]
    c = np.cumsum(r) / r.sum()
    out[path] = {"median_R": float(np.median(r)), "max_R": float(r[0]),
                 "top1pct_mass": float(c[max(1, r.size // 100) - 1]),
                 "selected_frac": float((np.searchsorted(c, tau) + 1) / r.size)}
  return out


def motif_coverage(src, n: int, patch: int) -> dict[str, float]:
  """Mean fraction of the ``patch``-px patches of I* that the motif touches (any pixel) / covers (> half)."""
  touched, covered = [], []
  for i in range(min(n, len(src))):
    m = src.item(i)["motif_mask"].astype(np.float32)
    g = m.shape[0] // patch
    frac = m[:g * patch, :g * patch].reshape(g, patch, g, patch).mean(axis=(1, 3))
    touched.append(float(np.mean(frac > 0)))
    covered.append(float(np.mean(frac > 0.5)))
  return {"patches_touched": float(np.mean(touched)), "patches_covered_over_half": float(np.mean(covered))}


def run_seed(setting: str, seed: int, out_dir: Path) -> dict:
  s1_over, data_over = SETTINGS[setting]
  wd = out_dir / setting / f"seed{seed}"
  cfg = config_lib.load("uwm_synthetic:smoke", ["progress=False"] + list(data_over))
  cfg.model.stage1_overrides = tuple(SMOKE_STAGE1) + tuple(s1_over) + tuple(data_over) + (f"seed={seed}",)
  cfg.model.stage1_workdir = str(wd / "stage1")
  t0 = time.perf_counter()
  model_dir = uwm_job.base_clip_dir(cfg)
  t_train = time.perf_counter() - t0
  model = CLIP.from_pretrained(model_dir)
  tok = sources.make_text_encoder(cfg.data, model_dir)
  transform = QuadrupletTransform(tok, image_size=cfg.data.image_size)
  srcs = sources.calibration_sources(cfg.data, cfg.calib, cfg.towers)
  fac, totals = uwm_job.pair_factories(srcs, transform, cfg)
  ucfg = uwm_job.uwm_config(cfg.uwm)
  test = sources.split_source(cfg.data, "test")
  zs = uwm_job.zeroshot_datasets(cfg)
  t1 = time.perf_counter()
  res = {"base": flat(uwm_job.evaluate(model, cfg, tok, test, zs))}
  probes = {}
  for edit_name, towers in (("text", ("text",)), ("vision", ("vision",)), ("both", ("text", "vision"))):
    r = cal.uwm_clip(model, {t: fac[t] for t in towers}, ucfg)
    res[edit_name] = flat(uwm_job.evaluate(r.model, cfg, tok, test, zs))
    if edit_name != "both":
      probes[edit_name] = score_probe(r.scores, ucfg.tower(edit_name).tau)
  patch = 8   # clip_model.patch_size of hysac_synthetic
  rec = {"setting": setting, "seed": seed, "synthetic": True, "metrics": res, "probe": probes,
         "motif": motif_coverage(srcs["vision"], 256, patch), "train_s": t_train,
         "edit_eval_s": time.perf_counter() - t1}
  wd.mkdir(parents=True, exist_ok=True)
  (wd.parent / f"seed{seed}.json").write_text(json.dumps(rec, indent=1))
  return rec


def summarize(recs: list[dict]) -> dict:
  out = {"seeds": [r["seed"] for r in recs], "synthetic": True}
  for e in EDITS:
    for k in REPORT:
      v = np.array([r["metrics"][e][k] for r in recs])
      out[f"{e} {k}"] = [round(float(v.mean()), 2), round(float(v.std()), 2)]
      if e != "base":
        d = v - np.array([r["metrics"]["base"][k] for r in recs])
        out[f"delta {e} {k}"] = [round(float(d.mean()), 2), round(float(d.std()), 2)]
  for tower in ("vision", "text"):
    for q in ("median_R", "top1pct_mass", "selected_frac"):
      v = [np.mean([p[q] for p in r["probe"][tower].values()]) for r in recs]
      out[f"probe {tower} {q}"] = [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)]
  for q in ("patches_touched", "patches_covered_over_half"):
    out[f"motif {q}"] = round(float(np.mean([r["motif"][q] for r in recs])), 3)
  return out


def parse_args(description: str) -> argparse.Namespace:
  """``SETTING [--seeds ...] [--out DIR]``: the command line shared with scripts/uwm_fc2_bound.py."""
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("setting", choices=sorted(SETTINGS))
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--out", default="runs/uwmvis")
  return ap.parse_args()


def main():
  a = parse_args(__doc__.splitlines()[0])
  out_dir = Path(a.out)
  recs = []
  for s in a.seeds:
    rec = run_seed(a.setting, s, out_dir)
    recs.append(rec)
    m = rec["metrics"]
    print(f"[{a.setting} seed {s}] train {rec['train_s']:.0f}s edit+eval {rec['edit_eval_s']:.0f}s motif {rec['motif']}")
    for e in EDITS:
      print(f"  {e:7s}", " ".join(f"{k}={m[e][k]:.1f}" for k in REPORT))
    for t in ("vision", "text"):
      print(f"  probe {t}:", {p.split('.')[3]: {q: round(v, 4) for q, v in d.items()}
                               for p, d in rec["probe"][t].items()})
  summ = summarize(recs)
  (out_dir / a.setting / "summary.json").write_text(json.dumps(summ, indent=1))
  print(json.dumps(summ, indent=1))


if __name__ == "__main__":
  main()
