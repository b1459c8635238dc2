"""``python -m vlsafe_jax.evaluate --workdir RUN_DIR [--bounds-only] [key=value ...]``: re-evaluate a finished run.

Reads ``RUN_DIR/config.json`` (written by ``python -m vlsafe_jax.train``), applies ``key=value`` overrides (e.g.
``eval.variant=paper``, ``eval.stat=avg``, ``data.test_json=/path``), finds the base CLIP (``base_path`` or the
run's ``clip_base/``) and the trained HySAC variants (``RUN_DIR/hysac/<variant>/``), and re-runs the trainer's
evaluation stage: ``eval.json``, ``bounds.json``, ``summary.json``, ``plots/*.png`` and the results table.
``--bounds-only`` recomputes only ``bounds.json`` (root-distance statistics of the training split, ``hysac.md``
§7.3) with the main HySAC model.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import ml_collections

from vlsafe_jax import config as config_lib


def load_run(workdir: Path, overrides: list[str]) -> tuple[ml_collections.ConfigDict, Path, dict[str, Path]]:
  """``(config, base CLIP dir, {variant: trainable-state dir})`` of a finished training run."""
  from vlsafe_jax.eval import hysac_eval
  from vlsafe_jax.methods.hysac import model as hysac_model
  cfg_path = workdir / "config.json"
  if not cfg_path.is_file():
    raise SystemExit(f"{workdir}: no config.json (not a run directory written by python -m vlsafe_jax.train)")
  cfg = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
  # Every evaluator option can be overridden (eval.stat=avg, eval.alpha_t=0.7, ...), even if the run's config
  # only set a few of them: add the missing ones with their defaults before locking.
  if "eval" in cfg:
    for f in dataclasses.fields(hysac_eval.EvalConfig):
      if f.name not in cfg.eval:
        cfg.eval[f.name] = f.default
  cfg.lock()
  config_lib.apply_overrides(cfg, overrides, source=str(cfg_path))
  if cfg.get("trainer") != "hysac":
    raise SystemExit(f"{cfg_path}: trainer {cfg.get('trainer')!r} has no HySAC evaluation")
  base_dir = Path(cfg.base_path) if cfg.get("base_path") else workdir / "clip_base"
  if not (base_dir / "config.json").is_file():
    raise SystemExit(f"{workdir}: base CLIP directory {base_dir} is missing (stage 'clip' not finished, or set "
                     f"base_path=...)")
  variants = ("hysac", *cfg.get("ablations", ()))
  dirs = {v: workdir / "hysac" / v for v in variants}
  missing = [str(d) for d in dirs.values() if not (d / hysac_model.TRAINABLE_FILE).is_file()]
  if missing:
    raise SystemExit(f"{workdir}: trained HySAC state missing in {missing} (finish training first: re-run the same "
                     f"python -m vlsafe_jax.train command to resume)")
  return cfg, base_dir, dirs


def recompute_bounds(cfg: ml_collections.ConfigDict, workdir: Path, base_dir: Path, hysac_dir: Path) -> dict:
  """Embeds the training split with the main HySAC model and writes ``workdir/bounds.json``."""
  from vlsafe_jax.eval import hysac_eval
  from vlsafe_jax.methods.hysac import model as hysac_model
  from vlsafe_jax.train import common, hysac_trainer
  data = common.build_data(cfg.data, hysac_trainer.text_encoder(cfg, base_dir))
  model = hysac_model.load_hysac(hysac_dir, base_path=base_dir)
  embs = common.embed_split(hysac_trainer.make_encoder(model), data["train"], data["transform"],
                            cfg.eval_run.batch_size, cfg.eval_run.bounds_limit or None)
  embs.pop("tags")
  b = hysac_eval.bounds({hysac_eval.BOUND_KEYS[k]: v for k, v in embs.items()}, float(model.curvature()))
  hysac_eval.save_bounds(workdir / "bounds.json", b)
  return b


def main(argv: list[str]) -> dict:
  bounds_only = "--bounds-only" in argv
  flags, overrides = config_lib.split_cli([a for a in argv if a != "--bounds-only"])
  unknown = set(flags) - {"workdir"}
  if unknown or "workdir" not in flags:
    raise SystemExit("usage: python -m vlsafe_jax.evaluate --workdir RUN_DIR [--bounds-only] [key=value ...]"
                     + (f" (unknown options {sorted(unknown)})" if unknown else ""))
  workdir = Path(flags["workdir"])
  cfg, base_dir, dirs = load_run(workdir, overrides)
  if bounds_only:
    b = recompute_bounds(cfg, workdir, base_dir, dirs["hysac"])
    print(json.dumps(b, indent=2))
    print(f"wrote {workdir / 'bounds.json'}")
    return b
  from vlsafe_jax.train import hysac_trainer
  return hysac_trainer.evaluate_run(cfg, workdir, base_dir, dirs)


if __name__ == "__main__":
  main(sys.argv[1:])
