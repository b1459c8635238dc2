"""``python -m vlsafe_jax.uwm [--config CONFIG] [--workdir DIR] [key=value ...]``: UWM edit + evaluation.

Loads a ``get_config()`` file (default ``configs/uwm_synthetic.py``), applies overrides and runs
``vlsafe_jax.methods.uwm.run.run`` into ``runs/<config name>/`` (or ``--workdir``).
"""
from __future__ import annotations

import sys

from vlsafe_jax import config as config_lib

DEFAULT_CONFIG = "uwm_synthetic"


def main(argv: list[str]) -> dict:
  cfg, workdir, _ = config_lib.load_cli(argv, DEFAULT_CONFIG)
  from vlsafe_jax.methods.uwm import run  # after config parsing: a bad flag fails fast
  return run.run(cfg, workdir)


if __name__ == "__main__":
  main(sys.argv[1:])
