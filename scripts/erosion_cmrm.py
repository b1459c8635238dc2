"""CMRM on the eroded synthetic LLaVA (issue 16; labelled synthetic).

  PYTHONPATH=. python scripts/erosion_cmrm.py [--seeds 0 1 2] [--models runs/erosion/llava_sharegpt]
      [--out runs/erosion/cmrm] [--alphas 0 0.25 0.5 0.75 1 1.5] [--commands evaluate sweep analyze]

For each seed runs ``python -m vlsafe_jax.cmrm --config cmrm_synthetic:llava`` (the spec's CMRM defaults: dataset
level, alpha 1, all layers, blank corruption; sample level alpha 0.5) on the model that ``scripts/erosion.py
llava_sharegpt`` trained for that seed (the same training as the config's ``llava`` variant), then the alpha sweep
and ``analyze``; writes ``<out>/summary.json``: unsafe rates, the fraction of the image-vs-text gap recovered,
benign / grounded utility change, the sweep curve and the centroid distances, each with mean and spread.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vlsafe_jax import cmrm


def _stats(xs):
  xs = [float(x) for x in xs]
  return {"mean": float(np.mean(xs)), "min": float(np.min(xs)), "max": float(np.max(xs)),
          "std": float(np.std(xs)), "values": xs}


def one_seed(seed: int, models: Path, out: Path, alphas, commands) -> dict:
  work = out / f"seed{seed}"
  base = ["--config", "cmrm_synthetic:llava", "--workdir", str(work), f"seed={seed}",
          f"model.path={models / f'seed{seed}' / 'model'}", "progress=False"]
  res = {}
  # The sweep alphas are part of the run's config (one config per run directory), so every command gets them.
  base.append(f"cmrm.sweep_alphas={list(alphas)}")
  for cmd in commands:
    res[cmd] = cmrm.main([cmd, *base])
  return res


def unsafe(res, cond, s="harmful"):
  return res["conditions"][cond][s]["overall"]["unsafe_rate"]


def util(res, cond, s):
  return res["conditions"][cond][s]["utility_exact_match"]


def main(argv):
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--models", default="runs/erosion/llava_sharegpt")
  ap.add_argument("--out", default="runs/erosion/cmrm")
  ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
  ap.add_argument("--commands", nargs="+", default=["evaluate", "sweep", "analyze"])
  a = ap.parse_args(argv)
  out = Path(a.out)
  per_seed = {s: one_seed(s, Path(a.models), out, a.alphas, a.commands) for s in a.seeds}
  summ = {"seeds": a.seeds}
  if "evaluate" in a.commands:
    ev = [per_seed[s]["evaluate"] for s in a.seeds]
    rows = {}
    for cond in ("text_only", "unsteered", "cmrm_dataset", "cmrm_sample"):
      rows[f"unsafe_harmful.{cond}"] = _stats([unsafe(r, cond) for r in ev])
      for st in ("benign", "grounded"):
        rows[f"utility_{st}.{cond}"] = _stats([util(r, cond, st) for r in ev])
    for cond in ("cmrm_dataset", "cmrm_sample"):
      rec = [(unsafe(r, "unsteered") - unsafe(r, cond)) / (unsafe(r, "unsteered") - unsafe(r, "text_only"))
             if unsafe(r, "unsteered") > unsafe(r, "text_only") else float("nan") for r in ev]
      rows[f"gap_recovered.{cond}"] = _stats(rec)
    summ["evaluate"] = rows
  if "sweep" in a.commands:
    sw = [per_seed[s]["sweep"] for s in a.seeds]
    summ["sweep"] = {f"{al:g}": {"unsafe_harmful": _stats([unsafe(r, f"dataset_alpha_{al:g}") for r in sw]),
                                 "utility_grounded": _stats([util(r, f"dataset_alpha_{al:g}", "grounded")
                                                             for r in sw]),
                                 "utility_benign": _stats([util(r, f"dataset_alpha_{al:g}", "benign")
                                                           for r in sw])} for al in a.alphas}
  if "analyze" in a.commands:
    an = [per_seed[s]["analyze"]["distance_to_text"] for s in a.seeds]
    summ["analyze"] = {v: {k: _stats([d[v]["full"][k] for d in an]) for k in ("off", "on")} for v in an[0]}
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.json").write_text(json.dumps(summ, indent=2))
  for sec, rows in summ.items():
    if sec == "seeds":
      continue
    for k, v in rows.items():
      flat = v if "mean" in v else None
      if flat:
        print(f"{sec} {k}: {v['mean']:.2f} (min {v['min']:.2f}, max {v['max']:.2f})")
      else:
        print(sec, k, {kk: f"{vv['mean']:.3f} [{vv['min']:.3f}, {vv['max']:.3f}]" for kk, vv in v.items()})


if __name__ == "__main__":
  main(sys.argv[1:])
