"""``python -m vlsafe_jax.cmrm [--config CONFIG] [--workdir DIR] [extract|generate|evaluate|sweep|analyze] [key=value ...]``.

Loads a ``get_config()`` file (default ``configs/cmrm_synthetic.py``), applies overrides and runs
:func:`vlsafe_jax.methods.cmrm.run.run` into ``runs/<config name>/`` (or ``--workdir``). ``analyze`` writes the
PCA of the five input variants with and without CMRM (``cmrm_analysis.{png,npz,json}``, cmrm.md §7.3).
"""
from __future__ import annotations

import sys
from pathlib import Path

from vlsafe_jax import config as config_lib

DEFAULT_CONFIG = "cmrm_synthetic"
COMMANDS = ("extract", "generate", "evaluate", "sweep", "analyze")


def main(argv: list[str]) -> dict:
  flags, rest = config_lib.split_cli(argv)
  commands = [a for a in rest if a in COMMANDS]
  overrides = [a for a in rest if a not in COMMANDS]
  if len(commands) > 1:
    raise SystemExit(f"give one command of {COMMANDS}, got {commands}")
  command = commands[0] if commands else "evaluate"
  unknown = set(flags) - {"config", "workdir"}
  if unknown:
    raise SystemExit(f"unknown option(s) {sorted('--' + u for u in unknown)}; use --config, --workdir, key=value")
  cfg = config_lib.load(flags.get("config", DEFAULT_CONFIG), overrides)
  from vlsafe_jax.methods.cmrm import run  # after config parsing: a bad flag fails fast
  return run.run(cfg, Path(flags.get("workdir", Path("runs") / cfg.name)), command)


if __name__ == "__main__":
  main(sys.argv[1:])
