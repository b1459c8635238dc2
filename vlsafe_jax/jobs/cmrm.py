"""The CMRM job behind ``python -m vlsafe_jax.cmrm``: vectors, generation with and without steering, judge, table
(``cmrm.md`` §6-§7); resumable.

Commands: ``extract`` (vectors only), ``generate`` / ``evaluate`` (unsteered, text-only reference, dataset-level
and optional sample-level rows; evaluate = generate + judge + table, they share the code), ``sweep`` (dataset-level
over ``cmrm.sweep_alphas``), ``analyze`` (PCA of last-token final-layer states for the five input variants with
and without CMRM, :func:`analyze` over :mod:`vlsafe_jax.methods.cmrm.analysis`; no generation).

Run directory: ``config.json``, ``model/`` (the synthetic LLaVA, trained on first use), ``cmrm_vectors.{npz,json}``
(extracted on first use), ``metrics.jsonl`` (stage ``vectors``; one record per condition x evaluation set, keyed
by ``stage`` = ``<condition>.<set>``, with ``alpha`` for steered conditions; stage ``analyze``: one record per
input variant), ``stages/`` (completed stages, reloaded by a rerun: ``jobs/stages.py``), ``eval.json``,
``cmrm_analysis.{png,npz,json}``. Re-running the same command after an interruption generates only what is missing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlsafe_jax.data import prompt_sets, synthetic_vlm
from vlsafe_jax.data.tokenize import load_tokenizer
from vlsafe_jax.data.vlm_prompts import build_prompt
from vlsafe_jax.eval import judge as judge_lib
from vlsafe_jax.eval import plots, vlm_safety
from vlsafe_jax.jobs.stages import Stages
from vlsafe_jax.methods.cmrm import analysis, shift, steer
from vlsafe_jax.models.llava import Llava
from vlsafe_jax.perf import format_table
from vlsafe_jax.train import common, vlm_base

COMMANDS = ("extract", "generate", "evaluate", "sweep", "analyze")
# Plot label and colour of each input variant (analysis.VARIANTS).
VARIANT_STYLES = {"original": ("image + query", "tab:red"), "blank": ("blank image + query", "tab:orange"),
                  "noise": ("noise image + query", "tab:purple"), "caption": ("caption + query", "tab:green"),
                  "text": ("query only", "tab:blue")}


# --------------------------------------------------------------------------------------------------------------
# Model, data, vectors
# --------------------------------------------------------------------------------------------------------------

def load_model(cfg, workdir: Path):
  """(model, tokenizer, model_id) for ``cfg.model.kind`` ``synthetic`` (trained on first use) or ``hf``."""
  if cfg.model.kind == "synthetic":
    path = Path(cfg.model.path) if cfg.model.path else workdir / "model"
    # cfg.model.train (optional): further TrainConfig fields, e.g. the "llava" schedule's stage lengths.
    extra = dict(cfg.model.get("train") or {})
    tc = vlm_base.TrainConfig(steps=cfg.model.train_steps, batch_size=cfg.model.train_batch_size, seed=cfg.seed,
                              checkpoint_every=cfg.model.get("checkpoint_every", vlm_base.TrainConfig.checkpoint_every),
                              **extra)
    model, tok = vlm_base.train_or_load(path, seed=cfg.seed, train_cfg=tc, model_kwargs=dict(cfg.model.sizes),
                                             progress=cfg.progress)
    return model, tok, f"synthetic:{path}"
  if cfg.model.kind == "hf":
    model = Llava.from_pretrained(cfg.model.path, dtype=getattr(jnp, cfg.model.dtype))
    return model, load_tokenizer(cfg.model.path), cfg.model.path
  raise ValueError(f"model.kind {cfg.model.kind!r} unknown; expected 'synthetic' or 'hf'")


def load_sets(cfg) -> tuple[dict[str, list[prompt_sets.SafetyItem]], list[prompt_sets.SafetyItem]]:
  """({eval set name: items}, anchor items)."""
  if cfg.data.kind == "synthetic":
    st = synthetic_vlm.SyntheticVLM(cfg.seed)
    lim = cfg.data.limit or None
    sets = {n: st.eval_set(n, lim) for n in ("harmful", "benign", "grounded")}
    return sets, st.eval_set("anchor", cfg.data.anchor_limit or None)
  sets, anchors = {}, []
  rng = np.random.default_rng(cfg.seed)
  for spec in cfg.data.sets:
    name, kind, path = spec.split(":", 2)
    items = prompt_sets.read_prompt_set(path, kind, image_root=cfg.data.image_root or None)
    perm = rng.permutation(len(items))
    k = int(round(cfg.data.anchor_fraction * len(items)))
    anchors += [items[i] for i in sorted(perm[:k]) if items[i].has_image]
    sets[name] = [items[i] for i in sorted(perm[k:])]
    if cfg.data.limit:
      sets[name] = sets[name][:cfg.data.limit]
  return sets, anchors


def _prompts(items, tok, model, cfg):
  return [build_prompt(tok, it.question, template=cfg.prompt.template, system=cfg.prompt.system or None,
                       num_image_tokens=model.config.num_image_tokens,
                       image_token_index=model.config.image_token_index) for it in items]


def get_vectors(model, tok, anchors, cfg, workdir: Path, model_id: str) -> shift.CMRMVectors:
  """The dataset-level vectors: read from ``cmrm.vectors`` (default ``<workdir>/cmrm_vectors``) when that file
  exists, else extracted on the anchors and saved there; always returned as read back from the file."""
  path = Path(cfg.cmrm.vectors) if cfg.cmrm.vectors else workdir / "cmrm_vectors"
  tc = model.config.text_config
  if not path.with_suffix(".npz").is_file():
    vec = shift.extract_dataset_vector(model, _prompts(anchors, tok, model, cfg), mode=cfg.cmrm.extract,
                                       corrupt=cfg.cmrm.corrupt, method=cfg.cmrm.method,
                                       pca_center=cfg.cmrm.pca_center, noise_seed=cfg.cmrm.noise_seed,
                                       batch_size=cfg.eval.batch_size, model_id=model_id, progress=cfg.progress)
    vec.save(path)
  return shift.CMRMVectors.load(path, num_layers=tc.num_hidden_layers, hidden_size=tc.hidden_size)


def _utility(items, responses):
  """Exact-match accuracy (%) against ``caption`` (the expected answer) where present, else None."""
  pairs = [(r, it.caption) for it, r in zip(items, responses) if it.caption]
  return 100.0 * sum(r.strip() == c.strip() for r, c in pairs) / len(pairs) if pairs else None


# --------------------------------------------------------------------------------------------------------------
# analyze: the five input variants with and without CMRM (cmrm.md §7.3)
# --------------------------------------------------------------------------------------------------------------

def _synthetic_scene_captions(items, seed: int):
  """Synthetic items with ``caption`` = their scene's description (``synthetic_vlm.scene_image`` facts).

  The synthetic sets use ``caption`` for the expected *answer* (utility scoring), which must not leak into a
  caption+query prompt; the scene description is what cmrm.md §1's caption variant needs. The scene comes from the
  item id (``synthetic_vlm.eval_scene``) and is checked against the item's image, so a numbering change fails loudly
  instead of pairing wrong captions.
  """
  out = []
  for it in items:
    img, facts = synthetic_vlm.eval_scene(seed, it.id, np.asarray(it.image).shape[0])
    if not np.array_equal(img, np.asarray(it.image)):
      raise ValueError(f"synthetic item {it.id!r}: its image is not the scene its id names "
                       "(SyntheticVLM.eval_set numbering changed?); cannot attach the scene caption")
    out.append(dataclasses.replace(it, caption=facts["caption"]))
  return out


def analysis_items(cfg, sets) -> list[prompt_sets.SafetyItem]:
  """Items for ``analyze``: the image-bearing items of eval set ``analysis.set`` (empty: the first set), the first
  ``analysis.limit`` of them (0: all)."""
  acfg = cfg.get("analysis") or {}
  name, limit = acfg.get("set", "") or next(iter(sets)), acfg.get("limit", 0)
  if name not in sets:
    raise ValueError(f"analysis.set {name!r} is not an evaluation set of this config; have {sorted(sets)}")
  items = [it for it in sets[name] if it.has_image][:limit or None]
  if not items:
    raise ValueError(f"analysis.set {name!r} has no item with an image")
  if cfg.data.kind == "synthetic":
    items = _synthetic_scene_captions(items, cfg.seed)
  return items


def collect_states(model, tokenizer, items: Sequence[Any], *, vectors=None, alpha: float = 1.0,
                   layers: Any = "all", apply: str = "all", layer: int = -1, template: str = "llava_v1",
                   system: str | None = None, noise_seed: int = 0, batch_size: int = 16,
                   use_captions: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
  """Hidden states of every variant: ``({group: (N, D) float32}, notes)``.

  Args:
    model: a :class:`vlsafe_jax.models.llava.Llava`. tokenizer: the prompt tokenizer.
    items: :class:`vlsafe_jax.eval.prompt_sets.SafetyItem` s, each with an image (``caption`` optional).
    vectors: (L, D) CMRM vectors; None = unsteered groups only. alpha / layers / apply: as ``steer.steer_hooks``.
    layer: 0-based decoder layer whose residual output is collected (-1 = the last; before the final norm).
    use_captions: build the ``caption`` variant when every item has a caption.
  Groups: ``analysis.VARIANTS`` (``caption`` possibly omitted, see ``notes``) and, with ``vectors``, the same names
  suffixed ``analysis.STEERED_SUFFIX``.
  """
  if not items:
    raise ValueError("cmrm analysis needs at least one item")
  missing = [it.id for it in items if not it.has_image]
  if missing:
    raise ValueError(f"cmrm analysis items need an image; without one: {missing[:5]}")
  notes = []
  captions = use_captions and all(it.caption for it in items)
  if use_captions and not captions:
    notes.append("caption variant omitted: not every item has a caption "
                 f"({sum(not it.caption for it in items)} of {len(items)} without)")
  steer_v = None
  if vectors is not None:
    v = steer.dataset_vectors(vectors, model.config.text_config)
    steer_v = steer.steer_hooks(v, alpha, layers=layers).steer_vectors
    if apply not in steer.APPLY_MODES:
      raise ValueError(f"cmrm.apply {apply!r} unknown; expected one of {steer.APPLY_MODES}")
  size = model.config.vision_config.image_size
  groups: dict[str, list[np.ndarray]] = {}
  start = 0
  for batch in vlm_safety.build_batches(items, tokenizer, model.config, batch_size=batch_size, template=template,
                               system=system, use_images=True):
    cap_ids = [list(tokenizer(it.caption, add_special_tokens=False)["input_ids"]) for it in batch.items] \
        if captions else None
    for name, (prompts, pix) in analysis.variant_inputs(batch.prompts, batch.pixels, size, caption_ids=cap_ids,
                                               noise_seed=noise_seed, start=start).items():
      h = shift.prompt_states(model, prompts, pix, mode="last")
      groups.setdefault(name, []).append(np.asarray(h[:, layer]))
      if steer_v is not None:
        h = shift.prompt_states(model, prompts, pix, mode="last", steer_vectors=steer_v, steer_alpha=alpha,
                                steer_apply=apply)
        groups.setdefault(name + analysis.STEERED_SUFFIX, []).append(np.asarray(h[:, layer]))
    start += len(batch.items)
  return {k: np.concatenate(v).astype(np.float32) for k, v in groups.items()}, notes


def scatter_plot(coords: Mapping[str, np.ndarray], path: str | os.PathLike, *, explained=None,
                 title: str = "CMRM: last-token final-layer hidden states (PCA)") -> Path:
  """Scatter of 2-D ``coords`` (group -> (N, 2)); steered groups hollow in their variant's colour, centroids
  as large markers with an arrow from each unsteered centroid to its steered one."""
  return plots.paired_scatter(coords, path, styles=VARIANT_STYLES, suffix=analysis.STEERED_SUFFIX,
                              suffix_label=" + CMRM", explained=explained, title=title,
                              note="X: centroid, P: centroid with CMRM; PCA fitted on the unsteered points")


def analyze(model, tokenizer, items: Sequence[Any], out_dir: str | os.PathLike, *, vectors=None,
            alpha: float = 1.0, layers: Any = "all", apply: str = "all", template: str = "llava_v1",
            system: str | None = None, noise_seed: int = 0, batch_size: int = 16,
            meta: Mapping[str, Any] | None = None, stem: str = "cmrm_analysis") -> dict[str, Any]:
  """Collects the variant states, fits the PCA, writes ``<stem>.png``, ``<stem>.npz`` (``coords_<group>`` (N, 2),
  ``components`` (2, D), ``mean`` (D,), ``explained_variance_ratio`` (2,)) and ``<stem>.json``; returns the
  summary (with ``table``, the printable separation table)."""
  states, notes = collect_states(model, tokenizer, items, vectors=vectors, alpha=alpha, layers=layers,
                                 apply=apply, template=template, system=system, noise_seed=noise_seed,
                                 batch_size=batch_size)
  pca, coords, summary = analysis.summarize(states)
  tc = model.config.text_config
  summary.update(
      notes=notes, state=(f"residual output of decoder layer {tc.num_hidden_layers} (last) at the last prompt "
                          "token, before the final RMSNorm"),
      steering=None if vectors is None else {"alpha": float(alpha), "layers": layers, "apply": apply},
      item_ids=[it.id for it in items], meta=dict(meta or {}))
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / f"{stem}.npz", components=pca.components_kd, mean=pca.mean_d,
           explained_variance_ratio=pca.explained_variance_ratio_k,
           **{f"coords_{g.replace(analysis.STEERED_SUFFIX, '_cmrm')}": c for g, c in coords.items()})
  summary["table"] = analysis.separation_table(summary)
  (out / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str))
  scatter_plot(coords, out / f"{stem}.png", explained=pca.explained_variance_ratio_k)
  summary["files"] = [str(out / f"{stem}.{e}") for e in ("png", "npz", "json")]
  return summary


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------

def _analysis_records(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
  return [{"variant": v, "centroid_off": d["full"]["off"], "centroid_on": d["full"]["on"],
           "reduction": d["full"]["reduction"], "paired_off": d["paired"]["off"], "paired_on": d["paired"]["on"]}
          for v, d in summary["distance_to_text"].items()]


def conditions(cfg, model, vec: shift.CMRMVectors, command: str) -> list[tuple[str, dict, Any, float | None]]:
  """``(name, generation kwargs, steerer or None, alpha or None)`` of the rows of ``command``."""
  rows = [("unsteered", dict(use_images=True), None, None), ("text_only", dict(use_images=False), None, None)]
  kw = dict(layers=cfg.cmrm.layers, apply=cfg.cmrm.apply)
  if command == "sweep":
    return rows + [(f"dataset_alpha_{a:g}", dict(use_images=True), steer.Steerer(
        model, level="dataset", vectors=vec.vectors, alpha=a, **kw), float(a)) for a in cfg.cmrm.sweep_alphas]
  rows.append(("cmrm_dataset", dict(use_images=True), steer.Steerer(
      model, level="dataset", vectors=vec.vectors, alpha=cfg.cmrm.alpha, **kw), float(cfg.cmrm.alpha)))
  if cfg.cmrm.sample_level:
    rows.append(("cmrm_sample", dict(use_images=True), steer.Steerer(
        model, level="sample", alpha=cfg.cmrm.sample_alpha, extract=cfg.cmrm.extract, corrupt=cfg.cmrm.corrupt,
        noise_seed=cfg.cmrm.noise_seed, **kw), float(cfg.cmrm.sample_alpha)))
  return rows


def run(cfg, workdir: Path, command: str = "evaluate") -> dict[str, Any]:
  """Runs (or resumes) ``command`` of the CMRM job of ``cfg`` in ``workdir``; returns its results."""
  if command not in COMMANDS:
    raise ValueError(f"unknown command {command!r}; expected one of {COMMANDS}")
  workdir = common.prepare_workdir(Path(workdir), cfg)
  writer = common.MetricsWriter(workdir / "metrics.jsonl")
  model, tok, model_id = load_model(cfg, workdir)
  sets, anchors = load_sets(cfg)
  vec = get_vectors(model, tok, anchors, cfg, workdir, model_id)
  if command == "extract":
    stages = Stages(workdir, writer, "cmrm", 1, cfg.progress)
  elif command == "analyze":
    stages = Stages(workdir, writer, "cmrm", 2, cfg.progress)
  else:
    rows = conditions(cfg, model, vec, command)
    stages = Stages(workdir, writer, "cmrm", 1 + len(rows) * len(sets), cfg.progress)
  scalars = lambda d: {k: v for k, v in d.items() if isinstance(v, (bool, int, float, str))}
  stages.run("vectors", lambda: (vec.meta, [scalars(vec.meta)]))
  if command == "extract":
    stages.close()
    return {"vectors": vec.meta}
  if command == "analyze":
    items = analysis_items(cfg, sets)

    def analyze_stage():
      res = analyze(model, tok, items, workdir, vectors=vec.vectors, alpha=cfg.cmrm.alpha, layers=cfg.cmrm.layers,
                    apply=cfg.cmrm.apply, template=cfg.prompt.template, system=cfg.prompt.system or None,
                    noise_seed=cfg.cmrm.noise_seed, batch_size=cfg.eval.batch_size,
                    meta={"model": model_id, "vectors": vec.meta})
      return res, _analysis_records(res)

    res = stages.run("analyze", analyze_stage)
    stages.close()
    print(res["table"])
    for note in res["notes"]:
      print("note:", note)
    print("wrote", ", ".join(res["files"]))
    return res

  judge = judge_lib.make_judge(dict(cfg.judge))
  gen = dict(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, template=cfg.prompt.template,
             system=cfg.prompt.system or None, progress=cfg.progress)
  results: dict[str, Any] = {"judge": judge.name, "judge_config": judge.config(), "model": model_id,
                             "vectors": vec.meta, "conditions": {}}
  table_rows = []
  for cname, ckw, steerer, alpha in rows:
    results["conditions"][cname] = {}
    for sname, items in sets.items():
      with_img = [it for it in items if it.has_image] if cname.startswith("cmrm_sample") else items

      def generate_stage(cname=cname, ckw=ckw, steerer=steerer, alpha=alpha, sname=sname, with_img=with_img):
        resp = vlm_safety.generate_responses(model, tok, with_img, steer_fn=steerer, desc=f"{cname}/{sname}",
                                             **ckw, **gen)
        ev = vlm_safety.evaluate_responses(with_img, resp, judge, mode="response")
        ev["utility_exact_match"] = _utility(with_img, resp)
        rec = {"condition": cname, "set": sname, "alpha": alpha, "n": len(with_img),
               "unsafe_rate": ev["overall"]["unsafe_rate"], "utility_exact_match": ev["utility_exact_match"]}
        return ev, [rec]

      if stages.done(f"{cname}.{sname}") and steerer is not None:
        steerer.skip(len(with_img))   # sample-level noise seeds continue where the stored set ended
      ev = stages.run(f"{cname}.{sname}", generate_stage)
      results["conditions"][cname][sname] = ev
      table_rows.append([cname, sname, len(with_img), ev["overall"]["unsafe_rate"],
                         "-" if ev["utility_exact_match"] is None else ev["utility_exact_match"]])
  stages.close()
  table = format_table(["condition", "set", "n", f"unsafe % ({judge.name})", "utility exact-match %"], table_rows)
  results["table"] = table
  print(table)
  vlm_safety.write_eval(workdir / "eval.json", results)
  return results


__all__ = ["COMMANDS", "VARIANT_STYLES", "load_model", "load_sets", "get_vectors", "analysis_items",
           "collect_states", "scatter_plot", "analyze", "conditions", "run"]
