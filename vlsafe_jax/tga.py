"""``python -m vlsafe_jax.tga analyze --config CONFIG [--workdir DIR] [--model DIR] [--variant V] [key=value ...]``.

The logit-lens analysis of TGA (tga.md §1; :mod:`vlsafe_jax.methods.tga.analysis`) for a trained or pretrained
LLaVA: per-layer refusal-token ranks / probabilities for image vs text conditions, the safety start / end layers,
and the per-layer cosine between image-token and description-token hidden states; writes ``analysis.json``,
``analysis.txt`` and ``analysis.png`` to ``<workdir>/analysis/<variant>/`` (or ``analysis.out_dir``).

Model: ``--model DIR`` (an HF or converted LLaVA directory), else the run's ``<workdir>/final/<variant>``, else
``model.path``. Items: ``analysis.manifest`` (JSONL ``{"id", "image", "caption": description, "scene"?}``), or,
for ``data.kind=synthetic``, the unseen hazard images of the synthetic setting.
"""
from __future__ import annotations

import sys
from pathlib import Path

from vlsafe_jax import config as config_lib
from vlsafe_jax.jobs import tga as tga_job


def main(argv: list[str]) -> dict:
  if not argv or argv[0] != "analyze":
    raise SystemExit("usage: python -m vlsafe_jax.tga analyze --config CONFIG [--workdir DIR] [--model DIR] "
                     "[--variant tga|plain] [key=value ...]")
  flags, overrides = config_lib.split_cli(argv[1:])
  unknown = set(flags) - {"config", "workdir", "model", "variant"}
  if unknown:
    raise SystemExit(f"unknown option(s) {sorted('--' + u for u in unknown)}")
  if "config" not in flags:
    raise SystemExit("--config is required (e.g. configs/tga_synthetic.py)")
  cfg = config_lib.load(flags["config"], overrides)
  workdir = Path(flags.get("workdir", Path("runs") / cfg.name))
  return tga_job.analyze(cfg, workdir, flags.get("model"), flags.get("variant", cfg.variants[0]))


if __name__ == "__main__":
  main(sys.argv[1:])
