"""The free-embedding probe as a job: embed a split with a CLIP, run ``methods/hysac/probe.run_probe``, report.

``python -m vlsafe_jax.hysac_probe [--config CONFIG] [--workdir RUN_DIR] [key=value ...]`` (default config
``hysac_synthetic``). The base CLIP is ``base_path`` (an HF or converted directory, e.g. a real ViT-L/14) or the
run directory's ``clip_base/`` (the synthetic job's stage-1 CLIP). Options are the ``probe.*`` keys; the loss and
the scalars' initialisation are the run's own ``hysac.loss.*`` / ``hysac.scalars.*`` (``probe.variant`` picks an
ablation). Writes ``RUN_DIR/probe/<variant>.json`` (config, history, final) and prints the hierarchy table.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import ml_collections

from vlsafe_jax import perf
from vlsafe_jax.data import sources
from vlsafe_jax.methods.hysac import probe as probe_lib
from vlsafe_jax.models.clip import CLIP
from vlsafe_jax.train import common, hysac_trainer


def probe_config(cfg: ml_collections.ConfigDict) -> probe_lib.ProbeConfig:
  """``ProbeConfig`` from ``cfg.probe`` (optimisation) and ``cfg.hysac.scalars`` (initialisation)."""
  p, s = cfg.probe, cfg.hysac.scalars
  alpha_init = s.alpha_init if s.alpha_init in ("inv_sqrt_embed_dim", "inv_sqrt_512") else float(s.alpha_init)
  return probe_lib.ProbeConfig(
      steps=p.steps, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, seed=p.seed,
      log_every=p.log_every, alpha_init=alpha_init, curv_init=s.curv_init, learn_curv=s.learn_curv,
      freeze_logit_scale=s.freeze_logit_scale)


def embed_features(cfg: ml_collections.ConfigDict, base_dir: Path) -> dict[str, Any]:
  """The base CLIP's raw projected features ``{"I", "I*", "T", "T*"} -> (n, d)`` of ``probe.split``."""
  clip = CLIP.from_pretrained(base_dir)
  data = sources.make_sources(cfg.data, sources.make_text_encoder(cfg.data, base_dir))
  source = data.split(cfg.probe.split)
  if source is None:
    raise ValueError(f"probe.split={cfg.probe.split!r}: the configured data has no such split")
  return common.embed_split(hysac_trainer.make_clip_encoder(clip), source, data.transform,
                            cfg.eval_run.batch_size, limit=cfg.probe.n_items or None)


def run(cfg: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  """Runs the probe for ``cfg.probe.variant``; returns the final record (ordering, gaps, diagnostics)."""
  base_dir = Path(cfg.base_path) if cfg.base_path else workdir / "clip_base"
  if not (base_dir / "config.json").is_file():
    raise SystemExit(f"no base CLIP at {base_dir}: set base_path=DIR or run `python -m vlsafe_jax.train` with this "
                     f"--workdir first (its stage 'clip' writes clip_base/)")
  t0 = time.time()
  feats = embed_features(cfg, base_dir)
  variant = cfg.probe.variant
  pcfg = probe_config(cfg)
  loss_cfg = hysac_trainer.loss_config(cfg.hysac, variant, min(cfg.hysac.batch_size_per_device, pcfg.batch_size))
  result = probe_lib.run_probe({k: feats[k] for k in probe_lib.KEYS}, loss_cfg, pcfg)
  out_dir = workdir / "probe"
  out_dir.mkdir(parents=True, exist_ok=True)
  report = {"base_path": str(base_dir), "items": int(len(feats["I"])), "variant": variant,
            "probe": dataclasses.asdict(pcfg), "loss": dataclasses.asdict(loss_cfg), "history": result.history,
            "final": result.final}
  (out_dir / f"{variant}.json").write_text(json.dumps(report, indent=1))
  print(format_report(result.final, f"probe [{variant}] {len(feats['I'])} items, {pcfg.steps} steps, "
                                    f"{time.time() - t0:.0f} s"))
  return result.final


def format_report(final: dict[str, Any], title: str) -> str:
  """The probe's result as a small table: root distances per set, gaps, separations, diagnostics."""
  sets = [("T", "t"), ("I", "i"), ("T*", "tu"), ("I*", "iu")]
  rows = [[k, f"{final[f'mean_{n}']:.3f} +- {final[f'std_{n}']:.3f}", f"{final.get(f'sat_{n}', float('nan')):.0%}"]
          for k, n in sets]
  table = perf.format_table(["set", "d(0, x)", "saturated"], rows)
  pairs = ", ".join(f"{a}->{b} gap {final[f'gap_{x}_{y}']:+.3f} sep {final[f'sep_{x}_{y}']:+.2f}"
                    for (a, x), (b, y) in zip(sets, sets[1:]))
  return (f"{title}\n{table}\nordered T<I<T*<I*: {final['ordered']}; {pairs}\n"
          f"T* behind I (phi > 3pi/4): {final.get('tu_behind_i', float('nan')):.0%}; d(0,T*) < d(0,I) for "
          f"{final['tu_below_i_share']:.0%}; c {final.get('curvature', float('nan')):.3f}")


__all__ = ["probe_config", "embed_features", "run", "format_report"]
