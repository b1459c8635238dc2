"""``python -m vlsafe_jax.train [--config CONFIG] [--workdir DIR] [key=value ...]``.

Loads a ``get_config()`` file (default below), applies overrides and hands it to the job named by the config's
``trainer`` field. The run directory defaults to ``runs/<config name>/``.
"""
from __future__ import annotations

import sys

from vlsafe_jax import config as config_lib
from vlsafe_jax.jobs import hysac as hysac_job
from vlsafe_jax.jobs import tga as tga_job
from vlsafe_jax.train import lorentz_demo

# The project's main job: HySAC end to end on the embedded synthetic benchmark (configs/hysac_synthetic.py).
DEFAULT_CONFIG = "hysac_synthetic"

JOBS = {
    "lorentz_demo": lorentz_demo.run,
    "hysac": hysac_job.run,
    "tga": tga_job.run,
}


def main(argv: list[str]) -> dict:
  cfg, workdir, _ = config_lib.load_cli(argv, DEFAULT_CONFIG)
  if cfg.trainer not in JOBS:
    raise SystemExit(f"config {cfg.name} names unknown trainer {cfg.trainer!r}; known: {sorted(JOBS)}")
  return JOBS[cfg.trainer](cfg, workdir)


if __name__ == "__main__":
  main(sys.argv[1:])
