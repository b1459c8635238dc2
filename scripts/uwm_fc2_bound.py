"""Diagnostic (synthetic): how far can ANY edit of the vision fc2 layers move SafeGround in a trained setting?

  PYTHONPATH=. python scripts/uwm_fc2_bound.py SETTING [--seeds 0 1 2] [--out runs/uwmvis]

Reuses the stage-1 CLIPs that ``scripts/uwm_vision_probe.py SETTING`` trained, scores the vision fc2 layers once
(UWM, the config's defaults), then edits the vision tower only with larger shares than the paper's tau = 0.02
(0.1, 0.3) and, as the extreme, every fc2 weight (tau = 1: alpha -1 negates the whole layer, alpha 0 removes the
MLP branch). Not a tuning sweep (the defaults stay tau 0.02, alpha -1): it bounds what an fc2-only edit can do
when the hazard signal also reaches the embedding through the residual stream (patch embedding, attention).
Writes ``<out>/<SETTING>/fc2_bound.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from vlsafe_jax import config as config_lib
from vlsafe_jax.data import sources
from vlsafe_jax.data.transform import QuadrupletTransform
from vlsafe_jax.jobs import uwm as uwm_job
from vlsafe_jax.methods.uwm import calibrate as cal
from vlsafe_jax.models.clip import CLIP

from uwm_vision_probe import SETTINGS, SMOKE_STAGE1, flat, parse_args   # scripts/ is on sys.path when run as a script

EDITS = ((0.02, -1.0), (0.1, -1.0), (0.3, -1.0), (1.0, -1.0), (1.0, 0.0))
KEYS = ("P^t_s", "P^t_u", "P^v_s", "P^v_u", "Txt_s", "Img_s", "GS", "T_s-V_s R@10", "V_s-T_s R@10", "zero-shot")


def main():
  a = parse_args(__doc__.splitlines()[0])
  s1_over, data_over = SETTINGS[a.setting]
  rows = {}
  for seed in a.seeds:
    cfg = config_lib.load("uwm_synthetic:smoke", ["progress=False"] + list(data_over))
    cfg.model.stage1_overrides = tuple(SMOKE_STAGE1) + tuple(s1_over) + tuple(data_over) + (f"seed={seed}",)
    cfg.model.stage1_workdir = str(Path(a.out) / a.setting / f"seed{seed}" / "stage1")
    model_dir = uwm_job.base_clip_dir(cfg)
    model = CLIP.from_pretrained(model_dir)
    tok = sources.make_text_encoder(cfg.data, model_dir)
    srcs = sources.calibration_sources(cfg.data, cfg.calib, ("vision",))
    fac, _ = uwm_job.pair_factories(srcs, QuadrupletTransform(tok, image_size=cfg.data.image_size), cfg)
    ucfg = uwm_job.uwm_config(cfg.uwm)
    res = cal.uwm_clip(model, {"vision": fac["vision"]}, ucfg)   # scores once; edits below reuse them
    test, zs = sources.split_source(cfg.data, "test"), uwm_job.zeroshot_datasets(cfg)
    rows.setdefault("base", []).append(flat(uwm_job.evaluate(model, cfg, tok, test, zs)))
    graphdef, state = nnx.split(model)
    for tau, alpha in EDITS:
      new_state, _ = cal.edit_params(state, res.scores, tau, alpha)
      m = flat(uwm_job.evaluate(nnx.merge(graphdef, new_state), cfg, tok, test, zs))
      rows.setdefault(f"tau {tau} alpha {alpha}", []).append(m)
      print(f"[{a.setting} seed {seed}] tau {tau} alpha {alpha}:", " ".join(f"{k}={m[k]:.1f}" for k in KEYS),
            flush=True)
  summ = {"setting": a.setting, "seeds": a.seeds, "synthetic": True}
  for name, ms in rows.items():
    summ[name] = {k: [round(float(np.mean([m[k] for m in ms])), 2), round(float(np.std([m[k] for m in ms])), 2)]
                  for k in KEYS}
  out = Path(a.out) / a.setting / "fc2_bound.json"
  out.write_text(json.dumps(summ, indent=1))
  for name in rows:
    print(f"{name:22s}", " ".join(f"{k}={v[0]:.1f}±{v[1]:.1f}" for k, v in summ[name].items()))


if __name__ == "__main__":
  main()
