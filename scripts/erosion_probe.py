"""First-answer-token probe of trained erosion models (labelled synthetic):
``PYTHONPATH=. python scripts/erosion_probe.py VARIANT [--seeds 0 1 2] [--out runs/erosion]``.

For each seed's model of ``scripts/erosion.py VARIANT`` prints and stores (``<out>/<VARIANT>/probe.json``) the mean
probability of the refusal / compliance first word on the held-out harmful requests under each input condition.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vlsafe_jax.data import synthetic_vlm
from vlsafe_jax.eval import erosion
from vlsafe_jax.train import vlm_base


def main(argv):
  ap = argparse.ArgumentParser()
  ap.add_argument("variant")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--out", default="runs/erosion")
  a = ap.parse_args(argv)
  res = {}
  for s in a.seeds:
    model, tok = vlm_base.load(Path(a.out) / a.variant / f"seed{s}" / "model")
    harm = synthetic_vlm.SyntheticVLM(s, n_train_images=1).eval_set("harmful")
    res[s] = {c: erosion.first_token_probs(model, tok, harm, c) for c in erosion.CONDITIONS}
  summ = {c: {k: [float(np.mean([res[s][c][k] for s in a.seeds])), float(np.min([res[s][c][k] for s in a.seeds])),
                  float(np.max([res[s][c][k] for s in a.seeds]))] for k in res[a.seeds[0]][c]}
          for c in erosion.CONDITIONS}
  (Path(a.out) / a.variant / "probe.json").write_text(json.dumps({"per_seed": res, "mean_min_max": summ}, indent=2))
  for c, d in summ.items():
    print(a.variant, c, {k: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in d.items()})


if __name__ == "__main__":
  main(sys.argv[1:])
