"""TGA's logit-lens analysis (tga.md §1): where does the safety mechanism activate, for images vs text?

For each toxic item two prompts are run:
* image condition: "Describe this image." with the real image;
* text condition: "Describe this scene : {description}" with an **all-zero** pixel tensor (image tokens present).

At every decoder layer l (HF hidden-state index, 1..L) the last-position hidden state goes through the shared final
norm and LM head (logit lens) -> probabilities p^l over the vocabulary. For the configured refusal token ids:
* rank of each refusal id in p^l (0 = top-1), and its probability;
* rank of each refusal id in the layer-to-layer increase ``p^l - p^{l-1}`` (l >= 2);
* **start layer**: the first l >= 2 where a refusal id is within the top ``top_increase`` (5) of the increase;
  **end layer**: the first l >= start where a refusal id is top-1 of p^l (-1: never);
* per-layer cosine between the mean image-token hidden state (image condition) and the mean description-token
  hidden state (text condition).

Pure functions on arrays first (tested against NumPy); :func:`analyze` runs a model over items (batched, jitted);
:func:`write_outputs` writes ``analysis.json``, a text table and ``analysis.png`` (matplotlib Agg).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlsafe_jax import perf
from vlsafe_jax.data import images as images_lib
from vlsafe_jax.data import vlm_prompts as VP
from vlsafe_jax.methods.tga.loss import cosine
from vlsafe_jax.models import decoding
from vlsafe_jax.models.hooks import Hooks

TEXT_TEMPLATE = "Describe this scene : {}"
IMAGE_QUESTION = "Describe this image."
DEFAULT_REFUSAL_IDS = (7371, 315)     # Mistral ids used by the reference (tga.md §1; decoded and printed at start)


def ranks_of(values_xv: jax.Array, ids_r: Sequence[int]) -> jax.Array:
  """Rank (0 = largest) of entries ``ids_r`` along the last axis: (..., V) -> (..., R) int32.

  Rank = number of entries strictly larger (ties share the better rank).
  """
  ids = jnp.asarray(ids_r, jnp.int32)
  sel = values_xv[..., ids]                                               # (..., R)
  return jnp.sum(values_xv[..., None, :] > sel[..., :, None], axis=-1).astype(jnp.int32)


def lens_stats(probs_lbv: jax.Array, ids_r: Sequence[int]) -> dict[str, jax.Array]:
  """Per-layer refusal statistics from logit-lens probabilities (L, B, V) (layer axis = HF index 1..L).

  Returns ``rank`` (L, B, R), ``prob`` (L, B, R), ``inc_rank`` (L, B, R) (rank in p^l - p^{l-1}; row 0 has no
  predecessor and is set to V).
  """
  ids = jnp.asarray(ids_r, jnp.int32)
  inc = probs_lbv[1:] - probs_lbv[:-1]
  inc_rank = jnp.concatenate([jnp.full((1,) + probs_lbv.shape[1:2] + (len(ids_r),), probs_lbv.shape[-1],
                                       jnp.int32), ranks_of(inc, ids_r)], axis=0)
  return {"rank": ranks_of(probs_lbv, ids_r), "prob": probs_lbv[..., ids], "inc_rank": inc_rank}


def safety_layers(rank_lbr: np.ndarray, inc_rank_lbr: np.ndarray, top_increase: int = 5) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
  """Start and end layers (HF indices; -1 = not found) per item from (L, B, R) ranks (layer axis = index 1..L)."""
  rank = np.asarray(rank_lbr).min(-1)                    # best refusal id per (layer, item)
  inc = np.asarray(inc_rank_lbr).min(-1)
  n_l, b = rank.shape
  start = np.full((b,), -1, np.int64)
  end = np.full((b,), -1, np.int64)
  for i in range(b):
    for l in range(1, n_l):                              # array row l = HF layer l + 1 >= 2
      if inc[l, i] < top_increase:
        start[i] = l + 1
        break
    if start[i] > 0:
      for l in range(start[i] - 1, n_l):
        if rank[l, i] == 0:
          end[i] = l + 1
          break
  return start, end


def layer_cosines(img_bld: jax.Array, txt_bld: jax.Array) -> jax.Array:
  """Per-item, per-layer cosine (B, L) between image-token and description-token means (float32)."""
  return cosine(img_bld, txt_bld)


def _lens_fn(model):
  """Jitted ``(ids, mask, pixels, span_mask) -> (probs (L, B, V), span means (B, L, D))`` for left-padded rows."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, ids, mask, pixels, span):
    m = nnx.merge(graphdef, state)
    t = ids.shape[1]
    pos = jnp.full((ids.shape[0], 1), t - 1, jnp.int32)    # left padding: every row ends at T - 1
    _, _, ex = m(ids, pixels, attention_mask_bt=mask, hooks=Hooks(hidden_positions_bp=pos,
                                                                   hidden_masks_bmt=span[:, None]), logits="none")
    h_lbd = jnp.swapaxes(ex["hidden_at_positions"][:, :, 0], 0, 1)              # (L, B, D)
    lm = m.language_model
    logits = lm.logits_from_hidden(lm.model.norm(h_lbd.astype(lm.dtype)))       # (L, B, V)
    return jax.nn.softmax(logits, axis=-1), ex["hidden_masked_means"][:, :, 0]
  return lambda *a: fn(state, *a)


def analyze(model, tokenizer, items: Sequence[Any], *, refusal_ids: Sequence[int] = DEFAULT_REFUSAL_IDS,
            template: str = "llava_v1", system: str | None = None, batch_size: int = 8, image_fn=None,
            top_increase: int = 5, image_question: str = IMAGE_QUESTION,
            text_template: str = TEXT_TEMPLATE) -> dict[str, Any]:
  """Runs both conditions over ``items`` (harness ``SafetyItem`` s whose ``caption`` holds the description).

  Returns a JSON-able dict: per-layer curves (mean/median refusal rank, mean refusal probability per condition,
  mean cosine), per-item start/end layers per condition, and the decoded refusal tokens.
  """
  cfg = model.config
  size = cfg.vision_config.image_size
  missing = [it.id for it in items if not it.caption]
  if missing:
    raise ValueError(f"analysis items need a description ('caption'/'description' field); missing for {missing[:5]}")
  fn = _lens_fn(model)
  ids_r = [int(i) for i in refusal_ids]
  per = {"image": {"rank": [], "prob": [], "inc_rank": []}, "text": {"rank": [], "prob": [], "inc_rank": []}}
  means = {"image": [], "text": []}
  kw = dict(template=template, num_image_tokens=cfg.num_image_tokens, image_token_index=cfg.image_token_index,
            system=system)
  for s in range(0, len(items), batch_size):
    chunk = list(items[s:s + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)                # fixed batch: one compilation
    for cond in ("image", "text"):
      prompts, spans = [], []
      for it in chunk:
        if cond == "image":
          p = VP.build_prompt(tokenizer, image_question, image=True, **kw)
          span = p.segment_ids == VP.SEG_IMAGE
        else:
          p = VP.build_prompt(tokenizer, text_template.format(it.caption), image=True, **kw)
          # Description tokens = the last k question tokens, k = the description's own token count.
          k = len(tokenizer(it.caption, add_special_tokens=False)["input_ids"])
          q = np.flatnonzero(p.segment_ids == VP.SEG_QUESTION)
          span = np.zeros(len(p.input_ids), bool)
          span[q[-min(k, len(q)):]] = True
        prompts.append(p)
        spans.append(span.astype(np.float32))
      t = decoding.bucket_length(max(len(p.input_ids) for p in prompts))
      batch = VP.collate(prompts, int(tokenizer.pad_token_id or 0), side="left", length=t)
      span_bt = np.zeros((len(chunk), t), np.float32)
      for i, sp in enumerate(spans):
        span_bt[i, t - len(sp):] = sp
      if cond == "image":
        pix = np.stack([np.asarray(image_fn(it), np.float32) if image_fn is not None
                        else images_lib.preprocess(it.image, size)[0] for it in chunk])
      else:
        pix = np.zeros((len(chunk), size, size, 3), np.float32)     # the reference's all-zero image tensor
      ids = np.where(batch["attention_mask"] > 0, batch["input_ids"], 0)
      probs, m = fn(jnp.asarray(ids), jnp.asarray(batch["attention_mask"]), jnp.asarray(pix), jnp.asarray(span_bt))
      st = jax.device_get(lens_stats(probs, ids_r))
      for k in st:
        per[cond][k].append(np.asarray(st[k])[:, :real])
      means[cond].append(np.asarray(m)[:real])
  out: dict[str, Any] = {"refusal_ids": ids_r,
                         "refusal_tokens": [tokenizer.decode([i]) if hasattr(tokenizer, "decode") else str(i)
                                            for i in ids_r],
                         "n_items": len(items), "layers": list(range(1, cfg.text_config.num_hidden_layers + 1))}
  for cond in ("image", "text"):
    rank = np.concatenate(per[cond]["rank"], axis=1)            # (L, N, R)
    prob = np.concatenate(per[cond]["prob"], axis=1)
    inc = np.concatenate(per[cond]["inc_rank"], axis=1)
    start, end = safety_layers(rank, inc, top_increase)
    best = rank.min(-1)
    out[cond] = {"mean_rank": best.mean(1).tolist(), "median_rank": np.median(best, 1).tolist(),
                 "mean_prob": prob.max(-1).mean(1).tolist(), "start_layer": start.tolist(), "end_layer": end.tolist(),
                 "start_found": float((start > 0).mean()), "end_found": float((end > 0).mean())}
  cos = np.asarray(layer_cosines(jnp.asarray(np.concatenate(means["image"])), jnp.asarray(np.concatenate(means["text"]))))
  out["cosine"] = cos.mean(0).tolist()
  out["ids"] = [it.id for it in items]
  return out


def format_table(result: dict[str, Any]) -> str:
  rows = []
  for i, l in enumerate(result["layers"]):
    rows.append([l, f"{result['image']['mean_rank'][i]:.1f}", f"{result['text']['mean_rank'][i]:.1f}",
                 f"{result['image']['mean_prob'][i]:.4f}", f"{result['text']['mean_prob'][i]:.4f}",
                 f"{result['cosine'][i]:.3f}"])
  head = ["layer", "rank (image)", "rank (text)", "p refusal (image)", "p refusal (text)", "cos(img, desc)"]
  summ = lambda c: (f"{c}: start layer found {100 * result[c]['start_found']:.0f}% (median "
                    f"{_median_pos(result[c]['start_layer'])}), end layer found {100 * result[c]['end_found']:.0f}% "
                    f"(median {_median_pos(result[c]['end_layer'])})")
  return perf.format_table(head, rows) + "\n" + summ("image") + "\n" + summ("text")


def _median_pos(v):
  v = [x for x in v if x > 0]
  return "-" if not v else f"{float(np.median(v)):.0f}"


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> Path:
  """``analysis.json``, ``analysis.txt`` (table) and ``analysis.png`` (rank, probability and cosine per layer)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "analysis.json").write_text(json.dumps(result, indent=2))
  (out / "analysis.txt").write_text(format_table(result) + "\n")
  import matplotlib  # lazy: matplotlib is heavy (plots only)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  layers = result["layers"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for cond, style in (("image", "-o"), ("text", "-s")):
    axes[0].plot(layers, result[cond]["mean_rank"], style, label=cond, ms=3)
    axes[1].plot(layers, result[cond]["mean_prob"], style, label=cond, ms=3)
  axes[0].set(xlabel="layer", ylabel="refusal-token rank (mean, best id)", yscale="symlog", title="logit lens rank")
  axes[1].set(xlabel="layer", ylabel="refusal-token probability", title="logit lens probability")
  axes[2].plot(layers, result["cosine"], "-o", ms=3, color="k")
  axes[2].set(xlabel="layer", ylabel="cosine", title="image tokens vs description tokens")
  for a in axes[:2]:
    a.legend()
  fig.tight_layout()
  fig.savefig(out / "analysis.png", dpi=120)
  plt.close(fig)
  return out


__all__ = ["ranks_of", "lens_stats", "safety_layers", "layer_cosines", "analyze", "format_table", "write_outputs",
           "TEXT_TEMPLATE", "IMAGE_QUESTION", "DEFAULT_REFUSAL_IDS"]
