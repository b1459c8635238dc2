"""``python -m vlsafe_jax.train [--config CONFIG] [--workdir DIR] [key=value ...]``.

Loads a ``get_config()`` file (default below), applies overrides and hands it to the trainer named by the
config's ``trainer`` field. The run directory defaults to ``runs/<config name>/``.
"""
from __future__ import annotations

import importlib
import sys

from vlsafe_jax import config as config_lib

# The project's main job: HySAC end to end on the embedded synthetic benchmark (configs/hysac_synthetic.py).
DEFAULT_CONFIG = "hysac_synthetic"

TRAINERS = {
    "lorentz_demo": "vlsafe_jax.train.lorentz_demo:run",
    "hysac": "vlsafe_jax.train.hysac_trainer:run",
    "tga": "vlsafe_jax.jobs.tga:run",
}


def main(argv: list[str]) -> dict:
  cfg, workdir, _ = config_lib.load_cli(argv, DEFAULT_CONFIG)
  if cfg.trainer not in TRAINERS:
    raise SystemExit(f"config {cfg.name} names unknown trainer {cfg.trainer!r}; known: {sorted(TRAINERS)}")
  module, fn = TRAINERS[cfg.trainer].split(":")
  return getattr(importlib.import_module(module), fn)(cfg, workdir)


if __name__ == "__main__":
  main(sys.argv[1:])
