"""``python -m vlsafe_jax.uwm [--config CONFIG] [--workdir DIR] [key=value ...]``: UWM edit + evaluation.

Loads a ``get_config()`` file (default ``configs/uwm_synthetic.py``), applies overrides and runs
``vlsafe_jax.methods.uwm.run.run`` into ``runs/<config name>/`` (or ``--workdir``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from vlsafe_jax import config as config_lib

DEFAULT_CONFIG = "uwm_synthetic"


def main(argv: list[str]) -> dict:
  flags, overrides = config_lib.split_cli(argv)
  unknown = set(flags) - {"config", "workdir"}
  if unknown:
    raise SystemExit(f"unknown option(s) {sorted('--' + u for u in unknown)}; use --config, --workdir, key=value")
  cfg = config_lib.load(flags.get("config", DEFAULT_CONFIG), overrides)
  from vlsafe_jax.methods.uwm import run  # after config parsing: a bad flag fails fast
  return run.run(cfg, Path(flags.get("workdir", Path("runs") / cfg.name)))


if __name__ == "__main__":
  main(sys.argv[1:])
