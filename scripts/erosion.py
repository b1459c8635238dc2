"""Safety-erosion experiments on the synthetic LLaVA (issue 16; labelled synthetic).

  PYTHONPATH=. python scripts/erosion.py VARIANT [--seeds 0 1 2] [--out runs/erosion]

Trains (or reloads) the tiny LLaVA of ``vlsafe_jax.train.vlm_base`` for each seed under the training / model
settings of VARIANT (:data:`VARIANTS`), measures refusal with and without images, benign quality and the
image/text token norm ratio (:func:`vlsafe_jax.eval.erosion.measure`), and writes
``<out>/<variant>/seed<k>/erosion.json`` plus ``<out>/<variant>/summary.json`` (mean and spread over seeds).
Each variant changes one thing against the one before it; the real-model property behind it is in
notes/erosion-readme.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from vlsafe_jax.data import synthetic_vlm
from vlsafe_jax.eval import erosion
from vlsafe_jax.train import vlm_base

# name -> (TrainConfig keywords, llava_config keywords)
VARIANTS = {
    # The settings of the README before issue 16 (cmrm_synthetic default and its two-stage variant).
    "mixed": (dict(steps=400, batch_size=32), dict(width=64, layers=4)),
    "two_stage": (dict(steps=200, stage2_steps=300, batch_size=32, schedule="two_stage"), dict(width=64, layers=4)),
    # LLaVA-1.5's recipe: text alignment of the LM alone, projector (+ tower) on captions with the LM frozen,
    # visual instruction tuning of projector + LM with 6.25% text-only benign rows and no refusals.
    "llava": (dict(steps=200, pretrain_steps=150, stage2_steps=200, batch_size=32, schedule="llava"),
              dict(width=64, layers=4)),
    # + stage-2 text-only rows drawn like the alignment data (ShareGPT is Vicuna's alignment data).
    "llava_sharegpt": (dict(steps=200, pretrain_steps=150, stage2_steps=200, batch_size=32, schedule="llava",
                            stage2_text="aligned"), dict(width=64, layers=4)),
    # + an LM that can comply before it is aligned (pretraining precedes safety alignment).
    "llava_capable": (dict(lm_pretrain_steps=150, steps=200, pretrain_steps=150, stage2_steps=200, batch_size=32,
                           schedule="llava", stage2_text="aligned"), dict(width=64, layers=4)),
}


def _share_stages(variant: str, seed: int, out: Path, d: Path) -> None:
  """Copies the finished ``align`` / ``pretrain`` checkpoints of another ``llava`` variant with the same settings
  for those stages and the same seed (resume then starts at ``finetune``; the copied stages are bit-identical to
  training them again, because every stage is seeded by (seed, stage index) alone)."""
  tkw, mkw = VARIANTS[variant]
  if tkw.get("schedule") != "llava":
    return
  keys = ("lm_pretrain_steps", "steps", "pretrain_steps", "batch_size", "lr", "warmup")
  for other, (okw, omkw) in VARIANTS.items():
    src = out / other / f"seed{seed}" / "model" / "run" / "checkpoints"
    if other == variant or okw.get("schedule") != "llava" or omkw != mkw or not src.is_dir() or \
        any(okw.get(k) != tkw.get(k) for k in keys):
      continue
    dst = d / "model" / "run" / "checkpoints"
    for stage in ("synthetic_vlm_lm_pretrain", "synthetic_vlm_align", "synthetic_vlm_pretrain"):
      if (src / stage).is_dir() and not (dst / stage).exists() and any((src / stage).iterdir()):
        shutil.copytree(src / stage, dst / stage)
    return


def run_one(variant: str, seed: int, out: Path) -> dict:
  tkw, mkw = VARIANTS[variant]
  d = out / variant / f"seed{seed}"
  res_path = d / "erosion.json"
  if res_path.is_file():
    return json.loads(res_path.read_text())
  if not (d / "model").exists():
    _share_stages(variant, seed, out, d)
  t0 = time.time()
  model, tok = vlm_base.train_or_load(d / "model", seed=seed, train_cfg=vlm_base.TrainConfig(seed=seed, **tkw),
                                      model_kwargs=mkw)
  t1 = time.time()
  res = erosion.measure(model, tok, synthetic_vlm.SyntheticVLM(seed))
  res.update(variant=variant, seed=seed, train_s=round(t1 - t0, 1), eval_s=round(time.time() - t1, 1))
  d.mkdir(parents=True, exist_ok=True)
  res_path.write_text(json.dumps(res, indent=2))
  return res


def summarize(rows: list[dict]) -> dict:
  keys = [k for k, v in rows[0].items() if isinstance(v, float) and k not in ("train_s", "eval_s")]
  return {k: {"mean": float(np.mean([r[k] for r in rows])), "min": float(np.min([r[k] for r in rows])),
              "max": float(np.max([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows])),
              "values": [r[k] for r in rows]} for k in keys}


def main(argv):
  ap = argparse.ArgumentParser()
  ap.add_argument("variant", choices=sorted(VARIANTS))
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--out", default="runs/erosion")
  a = ap.parse_args(argv)
  out = Path(a.out)
  rows = []
  for s in a.seeds:
    r = run_one(a.variant, s, out)
    rows.append(r)
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "examples"}))
    print("  examples:", r["examples"], flush=True)
  summ = summarize(rows)
  (out / a.variant / "summary.json").write_text(json.dumps({"seeds": a.seeds, **summ}, indent=2))
  for k, v in summ.items():
    print(f"{a.variant} {k}: {v['mean']:.2f} (min {v['min']:.2f}, max {v['max']:.2f})")


if __name__ == "__main__":
  main(sys.argv[1:])
