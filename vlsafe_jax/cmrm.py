"""``python -m vlsafe_jax.cmrm [--config CONFIG] [--workdir DIR] [extract|generate|evaluate|sweep|analyze] [key=value ...]``.

Loads a ``get_config()`` file (default ``configs/cmrm_synthetic.py``), applies overrides and runs
:func:`vlsafe_jax.methods.cmrm.run.run` into ``runs/<config name>/`` (or ``--workdir``). ``analyze`` writes the
PCA of the five input variants with and without CMRM (``cmrm_analysis.{png,npz,json}``, cmrm.md §7.3).
"""
from __future__ import annotations

import sys

from vlsafe_jax import config as config_lib

DEFAULT_CONFIG = "cmrm_synthetic"
COMMANDS = ("extract", "generate", "evaluate", "sweep", "analyze")


def main(argv: list[str]) -> dict:
  cfg, workdir, command = config_lib.load_cli(argv, DEFAULT_CONFIG, COMMANDS)
  from vlsafe_jax.methods.cmrm import run  # after config parsing: a bad flag fails fast
  return run.run(cfg, workdir, command or "evaluate")


if __name__ == "__main__":
  main(sys.argv[1:])
