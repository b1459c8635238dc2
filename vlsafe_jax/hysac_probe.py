"""``python -m vlsafe_jax.hysac_probe [--config CONFIG] [--workdir DIR] [key=value ...]``: the free-embedding probe.

Before a long HySAC run: can the configured loss and scalars reach the hierarchy T < I < T* < I* from this model's
embeddings? Trains each item's four embeddings as free parameters (no towers) in seconds and prints the ordering and
the cone-collapse diagnostics (``vlsafe_jax/methods/hysac/probe.py``). Default config ``hysac_synthetic``; the base
CLIP is ``base_path`` or ``DIR/clip_base``.
"""
from __future__ import annotations

import sys

from vlsafe_jax import config as config_lib
from vlsafe_jax.train import hysac_probe

DEFAULT_CONFIG = "hysac_synthetic"


def main(argv: list[str]) -> dict:
  cfg, workdir, _ = config_lib.load_cli(argv, DEFAULT_CONFIG)
  return hysac_probe.run(cfg, workdir)


if __name__ == "__main__":
  main(sys.argv[1:])
