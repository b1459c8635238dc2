"""``python -m vlsafe_jax.evaluate --workdir RUN_DIR [--bounds-only] [key=value ...]``: re-evaluate a finished run.

Reads ``RUN_DIR/config.json`` (written by ``python -m vlsafe_jax.train``), applies ``key=value`` overrides (e.g.
``eval.variant=paper``, ``eval.stat=avg``, ``data.test_json=/path``), finds the base CLIP (``base_path`` or the
run's ``clip_base/``) and the trained HySAC variants (``RUN_DIR/hysac/<variant>/``), and re-runs the job's
evaluation stage (``vlsafe_jax.jobs.hysac.evaluate_run``): ``eval.json``, ``bounds.json``, ``summary.json``,
``plots/*.png`` and the results table. ``--bounds-only`` recomputes only ``bounds.json`` (root-distance statistics
of the training split, ``hysac.md`` §7.3) with the main HySAC model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from vlsafe_jax import config as config_lib
from vlsafe_jax.jobs import hysac as hysac_job


def main(argv: list[str]) -> dict:
  bounds_only = "--bounds-only" in argv
  flags, overrides = config_lib.split_cli([a for a in argv if a != "--bounds-only"])
  unknown = set(flags) - {"workdir"}
  if unknown or "workdir" not in flags:
    raise SystemExit("usage: python -m vlsafe_jax.evaluate --workdir RUN_DIR [--bounds-only] [key=value ...]"
                     + (f" (unknown options {sorted(unknown)})" if unknown else ""))
  workdir = Path(flags["workdir"])
  cfg, base_dir, dirs = hysac_job.load_run(workdir, overrides)
  if bounds_only:
    b = hysac_job.recompute_bounds(cfg, workdir, base_dir, dirs["hysac"])
    print(json.dumps(b, indent=2))
    print(f"wrote {workdir / 'bounds.json'}")
    return b
  return hysac_job.evaluate_run(cfg, workdir, base_dir, dirs)


if __name__ == "__main__":
  main(sys.argv[1:])
