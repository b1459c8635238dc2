"""``python -m vlsafe_jax.uwm [--config CONFIG] [--workdir DIR] [key=value ...]``: UWM edit + evaluation.

Loads a ``get_config()`` file (default ``configs/uwm_synthetic.py``), applies overrides and runs
:func:`vlsafe_jax.jobs.uwm.run` into ``runs/<config name>/`` (or ``--workdir``); re-running resumes.
"""
from __future__ import annotations

import sys

from vlsafe_jax import config as config_lib
from vlsafe_jax.jobs import uwm as uwm_job

DEFAULT_CONFIG = "uwm_synthetic"


def main(argv: list[str]) -> dict:
  cfg, workdir, _ = config_lib.load_cli(argv, DEFAULT_CONFIG)
  return uwm_job.run(cfg, workdir)


if __name__ == "__main__":
  main(sys.argv[1:])
