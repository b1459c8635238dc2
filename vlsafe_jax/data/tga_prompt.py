"""TGA training prompts (tga.md §3.2-§3.5): token ids, CE labels and the three span masks, for both stages.

Every prompt is assembled from separately tokenised pieces (as :mod:`vlsafe_jax.data.vlm_prompts` does), each
carrying a segment id, so the auxiliary-loss spans are exact by construction and never depend on token positions:

* segment 1 ``SEG_RETRIEVED``: the retrieved string only (not the "Retrieved Text: " prefix, not the closing ".");
* segment 2 ``SEG_IMAGE``: all N image-token positions;
* segment 3 ``SEG_CAPTION``: the caption tokens of the text-only reference pass;
* padding gets segment -1 (never inside a span) and label ``IGNORE_INDEX``.

Stage 1 (projector pre-training, ``plain``; tga.md §3.4):
  ``<s>Retrieved Text: {retrieved}. <image>`` -> target ``{caption}\\n``; reference pass ``<s>{caption}``.
Stage 2 (instruction tuning, conversation template; tga.md §3.2-§3.3), ``llava_llama_2``:
  ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\nRetrieved Text: {retrieved}. <image>\\n{q1} [/INST]{a1}</s>``
  ``<s>[INST] {q2} [/INST]{a2}</s>`` ... with CE on the answers and their ``</s>``; reference pass
  ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<image> {caption}`` where ``<image>`` is plain text (no image features).
  ``llava_v1`` (Vicuna) is offered with the same structure (``{system} USER: ... ASSISTANT: {a}</s>``).

If the retrieved text equals the caption, only its first half (by characters) is used (tga.md §3.1), so the model
cannot copy the answer. Text-only rows (no image) have no retrieved/image spans: CE only (aux weight 0).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlsafe_jax.data.vlm_prompts import (IMAGE_PLACEHOLDER, LLAVA_LLAMA_2_SYSTEM, LLAVA_V1_SYSTEM, SEG_CAPTION,
                                         SEG_IMAGE, SEG_OTHER, SEG_QUESTION, SEG_RETRIEVED)

STAGES = ("pretrain", "finetune")
TEMPLATES = ("llava_llama_2", "llava_v1")
SEG_ANSWER = 5          # assistant tokens (labelled); lives outside vlm_prompts' ids 0-4
SEG_PAD = -1
IGNORE_INDEX = -100    # label of tokens without CE (HF convention); methods/tga/loss.py reads it from here


@dataclasses.dataclass(frozen=True)
class TrainExample:
  """One tokenised training row. Arrays are int32 (T,) / (T_ref,)."""
  input_ids: np.ndarray
  labels: np.ndarray
  segment_ids: np.ndarray
  ref_ids: np.ndarray
  ref_segment_ids: np.ndarray
  has_image: bool
  aux: bool               # takes part in the auxiliary terms (m_b = 1)
  id: str = ""


def halve_if_identical(retrieved: str, caption: str) -> str:
  """The reference rule: a retrieved text equal to the caption is cut to its first half (by characters)."""
  if retrieved.strip() == caption.strip():
    return retrieved[: len(retrieved) // 2]
  return retrieved


class _Builder:
  """Accumulates (ids, segment ids, labels) piece by piece."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.ids: list[int] = []
    self.segs: list[int] = []
    self.labels: list[int] = []

  def text(self, text: str, seg: int = SEG_OTHER, label: bool = False) -> None:
    if not text:
      return
    ids = [int(i) for i in self.tok(text, add_special_tokens=False)["input_ids"]]
    self.raw(ids, seg, label)

  def raw(self, ids: Sequence[int], seg: int = SEG_OTHER, label: bool = False) -> None:
    self.ids += list(ids)
    self.segs += [seg] * len(ids)
    self.labels += list(ids) if label else [IGNORE_INDEX] * len(ids)

  def arrays(self):
    return (np.asarray(self.ids, np.int32), np.asarray(self.labels, np.int32), np.asarray(self.segs, np.int32))


def _special(tokenizer, name: str, where: str) -> int:
  value = getattr(tokenizer, f"{name}_token_id", None)
  if value is None:
    raise ValueError(f"{where}: the tokenizer has no {name} token ({name}_token_id is None)")
  return int(value)


def _retrieved_pieces(b: _Builder, retrieved: str) -> None:
  b.text("Retrieved Text: ")
  b.text(retrieved, SEG_RETRIEVED)
  b.text(". ")


def build_pretrain(tokenizer, caption: str, retrieved: str, *, num_image_tokens: int, image_token_index: int,
                   example_id: str = "", halve_identical: bool = True, exclude_ids_containing: str | None = "tox",
                   add_bos: bool = True) -> TrainExample:
  """Stage-1 row: retrieved text + image -> caption; reference pass = the caption text (tga.md §3.4)."""
  where = f"TGA pretrain row {example_id!r}"
  if not caption.strip():
    raise ValueError(f"{where}: empty image_caption")
  retrieved = halve_if_identical(retrieved, caption) if halve_identical else retrieved
  bos = [_special(tokenizer, "bos", where)] if add_bos else []
  b = _Builder(tokenizer)
  b.raw(bos)
  if retrieved.strip():
    _retrieved_pieces(b, retrieved)
  b.raw([image_token_index] * num_image_tokens, SEG_IMAGE)
  b.text(caption + "\n", SEG_ANSWER, label=True)
  r = _Builder(tokenizer)
  r.raw(bos)
  r.text(caption, SEG_CAPTION)
  ids, labels, segs = b.arrays()
  ref_ids, _, ref_segs = r.arrays()
  aux = bool(retrieved.strip()) and not _excluded(example_id, exclude_ids_containing)
  return TrainExample(ids, labels, segs, ref_ids, ref_segs, True, aux, example_id)


def _excluded(example_id: str, needle: str | None) -> bool:
  return bool(needle) and needle in str(example_id)


def _split_conversation(conversations: Sequence[Mapping[str, str]], where: str) -> list[tuple[str, str]]:
  """[(question, answer)] from LLaVA's ``[{"from": "human"|"gpt", "value": ...}]`` list (must alternate)."""
  if not conversations or len(conversations) % 2:
    raise ValueError(f"{where}: 'conversations' must hold human/gpt pairs, got {len(conversations or [])} turns")
  turns = []
  for i in range(0, len(conversations), 2):
    h, g = conversations[i], conversations[i + 1]
    if h.get("from") != "human" or g.get("from") != "gpt":
      raise ValueError(f"{where}: turn {i // 2} must be ('human', 'gpt'), got ({h.get('from')!r}, "
                       f"{g.get('from')!r})")
    turns.append((str(h.get("value", "")), str(g.get("value", ""))))
  return turns


def build_finetune(tokenizer, conversations: Sequence[Mapping[str, str]], *, caption: str | None,
                   retrieved: str | None, has_image: bool, num_image_tokens: int, image_token_index: int,
                   template: str = "llava_llama_2", system: str | None = None, example_id: str = "",
                   halve_identical: bool = True, exclude_ids_containing: str | None = "tox") -> TrainExample:
  """Stage-2 row in a conversation template (tga.md §3.2); the image and retrieved text go in the first turn."""
  where = f"TGA finetune row {example_id!r}"
  if template not in TEMPLATES:
    raise ValueError(f"{where}: template must be one of {TEMPLATES}, got {template!r}")
  turns = _split_conversation(conversations, where)
  bos, eos = _special(tokenizer, "bos", where), _special(tokenizer, "eos", where)
  sys_text = system if system is not None else (LLAVA_LLAMA_2_SYSTEM if template == "llava_llama_2"
                                                else LLAVA_V1_SYSTEM)
  head = f"[INST] <<SYS>>\n{sys_text}\n<</SYS>>\n\n" if template == "llava_llama_2" else f"{sys_text} USER: "
  caption = (caption or "").strip()
  retrieved = (retrieved or "").strip()
  if has_image and caption and retrieved and halve_identical:
    retrieved = halve_if_identical(retrieved, caption)
  b = _Builder(tokenizer)
  for i, (q, a) in enumerate(turns):
    q = q.replace(IMAGE_PLACEHOLDER, "").strip() if i == 0 else q
    if i > 0 and IMAGE_PLACEHOLDER in q:
      raise ValueError(f"{where}: '<image>' outside the first human turn (turn {i}) is not supported")
    if template == "llava_llama_2":
      b.raw([bos])
      b.text(head if i == 0 else "[INST] ")
    else:
      if i == 0:
        b.raw([bos])
      b.text(head if i == 0 else "USER: ")
    if i == 0 and has_image:
      if retrieved:
        _retrieved_pieces(b, retrieved)
      b.raw([image_token_index] * num_image_tokens, SEG_IMAGE)
      b.text("\n")
    b.text(q, SEG_QUESTION)
    b.text(" [/INST]" if template == "llava_llama_2" else " ASSISTANT:")
    b.text(" " + a if template == "llava_v1" else a, SEG_ANSWER, label=True)
    b.raw([eos], SEG_ANSWER, label=True)
  r = _Builder(tokenizer)
  r.raw([bos])
  if has_image and caption:
    # "<image>" is plain text here: the reference pass carries no image features (tga.md §3.3).
    r.text(head + IMAGE_PLACEHOLDER + " ")
    r.text(caption, SEG_CAPTION)
  ids, labels, segs = b.arrays()
  ref_ids, _, ref_segs = r.arrays()
  aux = has_image and bool(caption) and bool(retrieved) and not _excluded(example_id, exclude_ids_containing)
  return TrainExample(ids, labels, segs, ref_ids, ref_segs, has_image, aux, example_id)


def from_llava_row(tokenizer, row: Mapping[str, Any], *, stage: str, num_image_tokens: int,
                   image_token_index: int, template: str = "llava_llama_2", system: str | None = None,
                   halve_identical: bool = True, exclude_ids_containing: str | None = "tox") -> TrainExample:
  """A LLaVA pretrain/instruct JSON row (``id``, ``image``?, ``conversations``, ``image_caption``,
  ``retrieved_caption``) -> :class:`TrainExample`. Missing fields raise with the row id and key named."""
  rid = str(row.get("id", "?"))
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  has_image = bool(row.get("image"))
  if has_image:
    for key in ("image_caption", "retrieved_caption"):
      if not isinstance(row.get(key), str):
        raise ValueError(f"TGA row {rid!r}: missing string field {key!r} (TGA rows carry the image caption and the "
                         f"retrieved text; see tga.md §3.1)")
  kw = dict(num_image_tokens=num_image_tokens, image_token_index=image_token_index, example_id=rid,
            halve_identical=halve_identical, exclude_ids_containing=exclude_ids_containing)
  if stage == "pretrain":
    if not has_image:
      raise ValueError(f"TGA pretrain row {rid!r}: no 'image' (stage 1 rows are image-caption pairs)")
    return build_pretrain(tokenizer, row["image_caption"], row["retrieved_caption"], **kw)
  if "conversations" not in row:
    raise ValueError(f"TGA row {rid!r}: missing key 'conversations'")
  return build_finetune(tokenizer, row["conversations"], caption=row.get("image_caption"),
                        retrieved=row.get("retrieved_caption"), has_image=has_image, template=template, system=system,
                        **kw)


def collate(examples: Sequence[TrainExample], pad_id: int, *, max_length: int, ref_max_length: int
            ) -> dict[str, np.ndarray]:
  """Right-pads a batch to fixed lengths (one compilation) and derives the masks.

  Returns int32 arrays ``input_ids``, ``attention_mask``, ``labels``, ``segment_ids`` (B, T), float32
  ``retrieved_mask``, ``image_mask`` (B, T), ``ref_ids``, ``ref_attention_mask`` (B, T_ref), ``caption_mask``
  (B, T_ref) and float32 ``aux_weight`` (m_b), ``diag_weight`` (rows with an image and a caption: logged cosines),
  ``has_image`` (B,).

  Too-long rows: the tail is cut (losing answer tokens, as LLaVA's ``model_max_length``), but a cut through the
  image or retrieved span is an error naming the row; a cut caption keeps its first ``ref_max_length`` tokens.
  """
  b = len(examples)
  out = {k: np.zeros((b, max_length), np.int32) for k in ("input_ids", "attention_mask")}
  out["input_ids"][:] = pad_id
  out["labels"] = np.full((b, max_length), IGNORE_INDEX, np.int32)
  out["segment_ids"] = np.full((b, max_length), SEG_PAD, np.int32)
  out["ref_ids"] = np.full((b, ref_max_length), pad_id, np.int32)
  out["ref_attention_mask"] = np.zeros((b, ref_max_length), np.int32)
  ref_segs = np.full((b, ref_max_length), SEG_PAD, np.int32)
  out["aux_weight"] = np.zeros((b,), np.float32)
  out["diag_weight"] = np.zeros((b,), np.float32)
  out["has_image"] = np.zeros((b,), np.float32)
  for i, ex in enumerate(examples):
    n = len(ex.input_ids)
    if n > max_length:
      lost = ex.segment_ids[max_length:]
      if np.any((lost == SEG_IMAGE) | (lost == SEG_RETRIEVED)):
        raise ValueError(f"TGA row {ex.id!r}: {n} tokens; max_length {max_length} would cut the image or retrieved "
                         f"span (raise data.max_length or shorten the retrieved text)")
      n = max_length
    out["input_ids"][i, :n] = ex.input_ids[:n]
    out["attention_mask"][i, :n] = 1
    out["labels"][i, :n] = ex.labels[:n]
    out["segment_ids"][i, :n] = ex.segment_ids[:n]
    k = min(len(ex.ref_ids), ref_max_length)
    out["ref_ids"][i, :k] = ex.ref_ids[:k]
    out["ref_attention_mask"][i, :k] = 1
    ref_segs[i, :k] = ex.ref_segment_ids[:k]
    caption_kept = bool(np.any(ref_segs[i] == SEG_CAPTION))
    out["aux_weight"][i] = float(ex.aux and caption_kept)
    out["diag_weight"][i] = float(ex.has_image and caption_kept)
    out["has_image"][i] = float(ex.has_image)
  out["retrieved_mask"] = (out["segment_ids"] == SEG_RETRIEVED).astype(np.float32)
  out["image_mask"] = (out["segment_ids"] == SEG_IMAGE).astype(np.float32)
  out["caption_mask"] = (ref_segs == SEG_CAPTION).astype(np.float32)
  return out


__all__ = ["TrainExample", "halve_if_identical", "build_pretrain", "build_finetune", "from_llava_row", "collate",
           "STAGES", "TEMPLATES", "SEG_ANSWER", "SEG_PAD", "SEG_RETRIEVED", "SEG_IMAGE", "SEG_CAPTION", "IGNORE_INDEX"]
