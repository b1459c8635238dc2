"""VLM safety evaluation harness: prompt sets -> batched LLaVA generation -> judge -> rates (``cmrm.md`` §7,
``tga.md`` §7).

Prompt sets (:class:`~vlsafe_jax.data.prompt_sets.SafetyItem` and its readers) live in
:mod:`vlsafe_jax.data.prompt_sets`.

:func:`generate_responses` runs :func:`vlsafe_jax.models.llava.generate` over batches (images optional per
item, mixed batches allowed) with an optional ``steer_fn`` hook (CMRM plugs its vectors there);
:func:`evaluate_responses` judges them and reports, overall and per category, the **unsafe rate** (mode
``response``, CMRM) or the **defense success rate** (mode ``refusal``, TGA), with the judge named and its config;
:func:`write_eval` writes ``eval.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vlsafe_jax.checkpoint import json_default
from vlsafe_jax.data import images as images_lib
from vlsafe_jax.data.prompt_sets import SafetyItem
from vlsafe_jax.data.vlm_prompts import build_prompt, collate
from vlsafe_jax.eval import judge as judge_lib
from vlsafe_jax.models import llava as llava_lib


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PromptBatch:
  """One generation batch: the items, their tokenised prompts (vlm_prompts.Prompt) and pixels (I, h, w, C) or None
  (one image per item with ``use_image`` True, in item order)."""
  items: list[SafetyItem]
  prompts: list[Any]
  pixels: np.ndarray | None
  input_ids: np.ndarray | None = None          # (B, T) int32, left-padded (set by generate_responses)
  attention_mask: np.ndarray | None = None     # (B, T) int32, 1 = prompt token


def build_batches(items: Sequence[SafetyItem], tokenizer, model_config, *, batch_size: int = 8,
                  template: str = "llava_v1", system: str | None = None, use_images: bool = True,
                  image_fn: Callable[[SafetyItem], np.ndarray] | None = None, image_mean=None, image_std=None):
  """Yields :class:`PromptBatch` es. ``image_fn(item) -> normalised (h, w, C) float32`` overrides image loading
  (default: :func:`vlsafe_jax.data.images.preprocess` of the path / array at the model's image size)."""
  size = model_config.vision_config.image_size
  kw = {}
  if image_mean is not None:
    kw["mean"] = image_mean
  if image_std is not None:
    kw["std"] = image_std
  for s in range(0, len(items), batch_size):
    chunk = list(items[s:s + batch_size])
    prompts, pix = [], []
    for it in chunk:
      with_img = use_images and it.has_image
      prompts.append(build_prompt(tokenizer, it.question, template=template, image=with_img,
                                  num_image_tokens=model_config.num_image_tokens,
                                  image_token_index=model_config.image_token_index, system=system))
      if with_img:
        if image_fn is not None:
          pix.append(np.asarray(image_fn(it), np.float32))
        else:
          try:
            pix.append(images_lib.preprocess(it.image, size, **kw)[0])
          except (OSError, ValueError) as e:
            raise ValueError(f"item {it.id!r}: cannot load image {it.image if isinstance(it.image, str) else ''}"
                             f" ({e})") from e
    yield PromptBatch(chunk, prompts, np.stack(pix) if pix else None)


def decode_tokens(tokenizer, tokens_bn, lengths_b) -> list[str]:
  """Decodes generated tokens (dropping EOS/padding) with ``tokenizer.decode(ids, skip_special_tokens=True)``."""
  toks, lens = np.asarray(tokens_bn), np.asarray(lengths_b)
  return [tokenizer.decode(toks[i, :lens[i]].tolist(), skip_special_tokens=True).strip() for i in range(len(lens))]


def generate_responses(model, tokenizer, items: Sequence[SafetyItem], *, batch_size: int = 8,
                       max_new_tokens: int = 512, template: str = "llava_v1", system: str | None = None,
                       use_images: bool = True, steer_fn: Callable[[PromptBatch], Mapping[str, Any]] | None = None,
                       image_fn=None, progress: bool = False, desc: str = "generate", eos_token_id=None,
                       **generate_kwargs) -> list[str]:
  """Greedy (by default) responses for ``items``, one string per item, in order.

  Args:
    model: :class:`vlsafe_jax.models.llava.Llava`. tokenizer: HF-style (see ``vlm_prompts.build_prompt``).
    use_images: False = text-only prompts for every item (the image span deleted).
    steer_fn: ``PromptBatch -> extra llava.generate kwargs`` (``{"hooks": models.hooks.Hooks(...)}``, steering
      vectors, alpha, prompt mask); None = unsteered.
    generate_kwargs: passed to :func:`vlsafe_jax.models.llava.generate` (``min_bucket``, ``bucket_step``, ...).
  """
  batches = build_batches(items, tokenizer, model.config, batch_size=batch_size, template=template, system=system,
                          use_images=use_images, image_fn=image_fn)
  total = -(-len(items) // batch_size)
  if progress:
    batches = tqdm(batches, total=total, desc=desc)
  if eos_token_id is None:
    eos_token_id = getattr(tokenizer, "eos_token_id", None)
  out: list[str] = []
  pad = model.config.text_config.pad_token_id or 0
  for batch in batches:
    arr = collate(batch.prompts, pad, side="left")
    batch.input_ids, batch.attention_mask = arr["input_ids"], arr["attention_mask"]
    kw = dict(generate_kwargs)
    if steer_fn is not None:
      kw.update(steer_fn(batch))
    if eos_token_id is not None:
      kw.setdefault("eos_token_id", eos_token_id)
    res = llava_lib.generate(model, batch.input_ids, batch.pixels, batch.attention_mask,
                             max_new_tokens=max_new_tokens, **kw)
    out += decode_tokens(tokenizer, res.tokens, res.lengths)
  return out


# --------------------------------------------------------------------------------------------------------------
# Judging and rates
# --------------------------------------------------------------------------------------------------------------

RATE_NAMES = {"response": "unsafe_rate", "refusal": "defense_success_rate", "content": "unsafe_rate"}


def evaluate_responses(items: Sequence[SafetyItem], responses: Sequence[str], judge, *, mode: str = "response",
                       ) -> dict[str, Any]:
  """Judges ``responses`` and aggregates.

  Returns ``{"judge": name, "judge_config", "mode", "metric": "unsafe_rate" | "defense_success_rate",
  "overall": summary, "per_category": {cat: summary}, "items": [per-item rows]}``; a summary is
  :func:`vlsafe_jax.eval.judge.summarize` plus the metric name as a key holding ``rate`` (%).
  """
  if len(items) != len(responses):
    raise ValueError(f"{len(items)} items but {len(responses)} responses")
  verdicts = judge.judge(mode, list(responses), [it.question for it in items])
  metric = RATE_NAMES[mode]

  def summary(vs):
    s = judge_lib.summarize(vs)
    s[metric] = s["rate"]
    return s

  cats: dict[str, list] = {}
  for it, v in zip(items, verdicts):
    cats.setdefault(it.category, []).append(v)
  rows = [{"id": it.id, "category": it.category, "image": it.image if isinstance(it.image, (str, type(None)))
           else "<array>", "question": it.question, "response": r, **v.to_dict()}
          for it, r, v in zip(items, responses, verdicts)]
  return {"judge": judge.name, "judge_config": judge.config(), "mode": mode, "metric": metric,
          "overall": summary(verdicts), "per_category": {c: summary(vs) for c, vs in sorted(cats.items())},
          "items": rows}


def write_eval(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
  """Writes ``results`` as indented JSON (NaN kept as JSON ``NaN``)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2, default=json_default))
  return path


def run_safety_eval(model, tokenizer, items: Sequence[SafetyItem], judge, *, mode: str = "response",
                    **gen_kwargs) -> dict[str, Any]:
  """:func:`generate_responses` then :func:`evaluate_responses` (one call for notebooks)."""
  responses = generate_responses(model, tokenizer, items, **gen_kwargs)
  return evaluate_responses(items, responses, judge, mode=mode)


__all__ = ["PromptBatch", "build_batches", "decode_tokens", "generate_responses",
           "evaluate_responses", "write_eval", "run_safety_eval", "RATE_NAMES"]
