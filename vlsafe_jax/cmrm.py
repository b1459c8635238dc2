"""``python -m vlsafe_jax.cmrm [--config CONFIG] [--workdir DIR] [extract|generate|evaluate|sweep|analyze] [key=value ...]``.

Loads a ``get_config()`` file (default ``configs/cmrm_synthetic.py``), applies overrides and runs
:func:`vlsafe_jax.jobs.cmrm.run` into ``runs/<config name>/`` (or ``--workdir``); re-running resumes. ``analyze``
writes the PCA of the five input variants with and without CMRM (``cmrm_analysis.{png,npz,json}``, cmrm.md §7.3).
"""
from __future__ import annotations

import sys

from vlsafe_jax import config as config_lib
from vlsafe_jax.jobs import cmrm as cmrm_job

DEFAULT_CONFIG = "cmrm_synthetic"


def main(argv: list[str]) -> dict:
  cfg, workdir, command = config_lib.load_cli(argv, DEFAULT_CONFIG, cmrm_job.COMMANDS)
  return cmrm_job.run(cfg, workdir, command or "evaluate")


if __name__ == "__main__":
  main(sys.argv[1:])
