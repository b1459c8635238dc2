"""CMRM job: extract (or load) vectors, generate with and without steering, judge, table (``cmrm.md`` §6-§7).

Commands: ``extract`` (vectors only), ``generate`` / ``evaluate`` (unsteered, text-only reference, dataset-level
and optional sample-level rows; evaluate = generate + judge + table, they share the code), ``sweep`` (dataset-level
over ``cmrm.sweep_alphas``), ``analyze`` (PCA of last-token final-layer states for the five input variants with
and without CMRM, :mod:`vlsafe_jax.methods.cmrm.analysis`; no generation). Results:
``<workdir>/cmrm_vectors.{npz,json}``, ``eval.json``, ``cmrm_analysis.{png,npz,json}``, ``config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlsafe_jax import config as config_lib
from vlsafe_jax.data import prompt_sets
from vlsafe_jax.eval import judge as judge_lib
from vlsafe_jax.eval import vlm_safety as V
from vlsafe_jax.methods.cmrm import shift, steer

COMMANDS = ("extract", "generate", "evaluate", "sweep", "analyze")


def load_model(cfg, workdir: Path):
  """(model, tokenizer, model_id) for ``cfg.model.kind`` ``synthetic`` (trained on first use) or ``hf``."""
  if cfg.model.kind == "synthetic":
    from vlsafe_jax.train import vlm_base
    path = Path(cfg.model.path) if cfg.model.path else workdir / "model"
    tc = vlm_base.TrainConfig(steps=cfg.model.train_steps, batch_size=cfg.model.train_batch_size, seed=cfg.seed)
    model, tok = vlm_base.train_or_load(path, seed=cfg.seed, train_cfg=tc, model_kwargs=dict(cfg.model.sizes),
                                 progress=cfg.progress)
    return model, tok, f"synthetic:{path}"
  if cfg.model.kind == "hf":
    import jax.numpy as jnp
    from vlsafe_jax.data.tokenize import load_tokenizer
    from vlsafe_jax.models.llava import Llava
    model = Llava.from_pretrained(cfg.model.path, dtype=getattr(jnp, cfg.model.dtype))
    return model, load_tokenizer(cfg.model.path), cfg.model.path
  raise ValueError(f"model.kind {cfg.model.kind!r} unknown; expected 'synthetic' or 'hf'")


def load_sets(cfg) -> tuple[dict[str, list[V.SafetyItem]], list[V.SafetyItem]]:
  """({eval set name: items}, anchor items)."""
  if cfg.data.kind == "synthetic":
    from vlsafe_jax.data import synthetic_vlm as S
    st = S.SyntheticVLM(cfg.seed)
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
  from vlsafe_jax.data.vlm_prompts import build_prompt
  return [build_prompt(tok, it.question, template=cfg.prompt.template, system=cfg.prompt.system or None,
                       num_image_tokens=model.config.num_image_tokens,
                       image_token_index=model.config.image_token_index) for it in items]


def get_vectors(model, tok, anchors, cfg, workdir: Path, model_id: str) -> shift.CMRMVectors:
  path = Path(cfg.cmrm.vectors) if cfg.cmrm.vectors else workdir / "cmrm_vectors"
  tc = model.config.text_config
  if path.with_suffix(".npz").is_file():
    return shift.CMRMVectors.load(path, num_layers=tc.num_hidden_layers, hidden_size=tc.hidden_size)
  vec = shift.extract_dataset_vector(model, _prompts(anchors, tok, model, cfg), mode=cfg.cmrm.extract,
                                     corrupt=cfg.cmrm.corrupt, method=cfg.cmrm.method,
                                     pca_center=cfg.cmrm.pca_center, noise_seed=cfg.cmrm.noise_seed,
                                     batch_size=cfg.eval.batch_size, model_id=model_id, progress=cfg.progress)
  vec.save(path)
  return vec


def _utility(items, responses):
  """Exact-match accuracy (%) against ``caption`` (the expected answer) where present, else None."""
  pairs = [(r, it.caption) for it, r in zip(items, responses) if it.caption]
  return 100.0 * sum(r.strip() == c.strip() for r, c in pairs) / len(pairs) if pairs else None


def _synthetic_scene_captions(items, seed: int):
  """Synthetic items with ``caption`` = their scene's description (``synthetic_vlm.scene_image`` facts).

  The synthetic sets use ``caption`` for the expected *answer* (utility scoring), which must not leak into a
  caption+query prompt; the scene description is what cmrm.md §1's caption variant needs. The scene comes from the
  item id (``synthetic_vlm.eval_scene``) and is checked against the item's image, so a numbering change fails loudly
  instead of pairing wrong captions.
  """
  import dataclasses
  from vlsafe_jax.data import synthetic_vlm as S
  out = []
  for it in items:
    img, facts = S.eval_scene(seed, it.id, np.asarray(it.image).shape[0])
    if not np.array_equal(img, np.asarray(it.image)):
      raise ValueError(f"synthetic item {it.id!r}: its image is not the scene its id names "
                       "(SyntheticVLM.eval_set numbering changed?); cannot attach the scene caption")
    out.append(dataclasses.replace(it, caption=facts["caption"]))
  return out


def analysis_items(cfg, sets) -> list[V.SafetyItem]:
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


def analyze(model, tok, sets, vec: shift.CMRMVectors, cfg, workdir: Path, model_id: str) -> dict[str, Any]:
  """``analyze`` command: :func:`vlsafe_jax.methods.cmrm.analysis.analyze` with the config's steering."""
  from vlsafe_jax.methods.cmrm import analysis
  items = analysis_items(cfg, sets)
  res = analysis.analyze(model, tok, items, workdir, vectors=vec.vectors, alpha=cfg.cmrm.alpha,
                         layers=cfg.cmrm.layers, apply=cfg.cmrm.apply, template=cfg.prompt.template,
                         system=cfg.prompt.system or None, noise_seed=cfg.cmrm.noise_seed,
                         batch_size=cfg.eval.batch_size, meta={"model": model_id, "vectors": vec.meta})
  print(res["table"])
  for note in res["notes"]:
    print("note:", note)
  print("wrote", ", ".join(res["files"]))
  return res


def run(cfg, workdir: Path, command: str = "evaluate") -> dict[str, Any]:
  if command not in COMMANDS:
    raise ValueError(f"unknown command {command!r}; expected one of {COMMANDS}")
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2, default=str))
  model, tok, model_id = load_model(cfg, workdir)
  sets, anchors = load_sets(cfg)
  vec = get_vectors(model, tok, anchors, cfg, workdir, model_id)
  if command == "extract":
    return {"vectors": vec.meta}
  if command == "analyze":
    return analyze(model, tok, sets, vec, cfg, workdir, model_id)
  judge = judge_lib.make_judge(dict(cfg.judge))
  gen = dict(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, template=cfg.prompt.template,
             system=cfg.prompt.system or None, progress=cfg.progress)
  conditions = [("unsteered", dict(use_images=True), None), ("text_only", dict(use_images=False), None)]
  kw = dict(layers=cfg.cmrm.layers, apply=cfg.cmrm.apply)
  if command == "sweep":
    conditions = [(f"dataset_alpha_{a:g}", dict(use_images=True), steer.Steerer(
        model, level="dataset", vectors=vec.vectors, alpha=a, **kw)) for a in cfg.cmrm.sweep_alphas]
  else:
    conditions.append(("cmrm_dataset", dict(use_images=True), steer.Steerer(
        model, level="dataset", vectors=vec.vectors, alpha=cfg.cmrm.alpha, **kw)))
    if cfg.cmrm.sample_level:
      conditions.append(("cmrm_sample", dict(use_images=True), steer.Steerer(
          model, level="sample", alpha=cfg.cmrm.sample_alpha, extract=cfg.cmrm.extract, corrupt=cfg.cmrm.corrupt,
          noise_seed=cfg.cmrm.noise_seed, **kw)))
  results: dict[str, Any] = {"judge": judge.name, "judge_config": judge.config(), "model": model_id,
                             "vectors": vec.meta, "conditions": {}}
  rows = []
  for cname, ckw, steerer in conditions:
    results["conditions"][cname] = {}
    for sname, items in sets.items():
      with_img = [it for it in items if it.has_image] if cname.startswith("cmrm_sample") else items
      resp = V.generate_responses(model, tok, with_img, steer_fn=steerer, desc=f"{cname}/{sname}", **ckw, **gen)
      ev = V.evaluate_responses(with_img, resp, judge, mode="response")
      ev["utility_exact_match"] = _utility(with_img, resp)
      results["conditions"][cname][sname] = ev
      rows.append([cname, sname, len(with_img), ev["overall"]["unsafe_rate"],
                   "-" if ev["utility_exact_match"] is None else ev["utility_exact_match"]])
  from vlsafe_jax.perf import format_table
  table = format_table(["condition", "set", "n", f"unsafe % ({judge.name})", "utility exact-match %"], rows)
  results["table"] = table
  print(table)
  V.write_eval(workdir / "eval.json", results)
  return results
