"""LLaVA prompt building: conversation templates -> token ids with exact per-token segment ids.

Templates (cmrm.md §5, tga.md §2):
  * ``llava_v1`` (LLaVA-1.5 / Vicuna): ``{system} USER: <image>\\n{question} ASSISTANT:``;
  * ``llava_llama_2`` (LLaVA Llama-2 / TGA's Mistral): ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<image>\\n{question}
    [/INST]``;
  * ``mistral_instruct``: ``[INST] <image>\\n{question} [/INST]``;
  * ``plain`` (stage-1 pre-training): ``<image>{question}``;
  * ``chat_template``: the tokenizer's own ``apply_chat_template`` (``add_generation_prompt=True``); the user turn
    holds the literal ``<image>`` placeholder, which is split out after rendering.

Segments are tokenised separately and concatenated (as LLaVA's ``tokenizer_image_token`` splits at ``<image>``),
and ``<image>`` becomes N = ``num_image_tokens`` copies of ``image_token_index`` (576 at 336 px), so every span
is exact by construction (may differ from tokenising the whole string at a segment boundary). Per-token segment
ids (tga.md §3.5, plus a question id): :data:`SEG_OTHER` 0 (template, system, BOS), :data:`SEG_RETRIEVED` 1
(retrieved text only), :data:`SEG_IMAGE` 2 (all N image positions), :data:`SEG_CAPTION` 3, :data:`SEG_QUESTION` 4.
:meth:`Prompt.without_image` deletes the image span (CMRM's text-only counterpart, cmrm.md §4.1).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SEG_OTHER, SEG_RETRIEVED, SEG_IMAGE, SEG_CAPTION, SEG_QUESTION = 0, 1, 2, 3, 4
IMAGE_PLACEHOLDER = "<image>"

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
TEMPLATES = ("llava_v1", "llava_llama_2", "mistral_instruct", "plain", "chat_template")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One tokenised prompt: ``input_ids`` int32 (T,), ``segment_ids`` int32 (T,), the rendered ``text``."""
  input_ids: np.ndarray
  segment_ids: np.ndarray
  text: str

  @property
  def image_mask(self) -> np.ndarray:
    return self.segment_ids == SEG_IMAGE

  def without_image(self) -> "Prompt":
    """The same token sequence with the image span removed (every other position kept exactly)."""
    keep = ~self.image_mask
    return Prompt(self.input_ids[keep], self.segment_ids[keep], self.text.replace(IMAGE_PLACEHOLDER, ""))


def _pieces(template: str, question: str, image: bool, system: str | None, retrieved: str | None):
  """[(text or None for the image, segment id)] of one single-turn generation prompt."""
  img = [(None, SEG_IMAGE)] if image else []
  user: list[tuple[str | None, int]] = []
  if retrieved is not None:
    user += [("Retrieved Text: ", SEG_OTHER), (retrieved, SEG_RETRIEVED), (". ", SEG_OTHER)]
  if template == "plain":
    return img + user + [(question, SEG_QUESTION)]
  user += img + ([("\n", SEG_OTHER)] if image else []) + [(question, SEG_QUESTION)]
  if template == "llava_v1":
    sys_text = LLAVA_V1_SYSTEM if system is None else system
    return [(sys_text + " USER: ", SEG_OTHER)] + user + [(" ASSISTANT:", SEG_OTHER)]
  if template == "llava_llama_2":
    sys_text = LLAVA_LLAMA_2_SYSTEM if system is None else system
    return [(f"[INST] <<SYS>>\n{sys_text}\n<</SYS>>\n\n", SEG_OTHER)] + user + [(" [/INST]", SEG_OTHER)]
  if template == "mistral_instruct":
    return [("[INST] ", SEG_OTHER)] + user + [(" [/INST]", SEG_OTHER)]
  raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")


def _chat_template_pieces(tokenizer, question: str, image: bool, system: str | None):
  """Renders the tokenizer's chat template around sentinel strings, then cuts it into pieces."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("template 'chat_template' needs a tokenizer with a chat_template (tokenizer_config.json / "
                     "chat_template.jinja); use 'llava_v1' or 'llava_llama_2' instead")
  q_mark = "\x00QUESTION\x00"
  content = (IMAGE_PLACEHOLDER + "\n" if image else "") + q_mark
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  if text.count(q_mark) != 1 or text.count(IMAGE_PLACEHOLDER) != int(image):
    raise ValueError("the tokenizer's chat template did not keep the user message verbatim; cannot locate the "
                     "image and question spans")
  pieces = []
  before, after = text.split(q_mark)
  if image:
    pre, post = before.split(IMAGE_PLACEHOLDER)
    pieces += [(pre, SEG_OTHER), (None, SEG_IMAGE), (post, SEG_OTHER)]
  else:
    pieces.append((before, SEG_OTHER))
  return pieces + [(question, SEG_QUESTION), (after, SEG_OTHER)]


def build_prompt(tokenizer, question: str, *, template: str = "llava_v1", image: bool = True,
                 num_image_tokens: int = 576, image_token_index: int = 32000, system: str | None = None,
                 retrieved: str | None = None, add_bos: bool | None = None) -> Prompt:
  """Tokenises one single-turn generation prompt (ends where the assistant's answer starts).

  Args:
    tokenizer: an HF tokenizer (``vlsafe_jax.data.tokenize.load_tokenizer(ckpt_dir)``).
    question: the user text (must not contain ``<image>``; images are placed by the template).
    template: one of :data:`TEMPLATES`. image: include the image span.
    num_image_tokens / image_token_index: from the model config (``LlavaConfig.num_image_tokens`` and
      ``.image_token_index``).
    system: override the template's system prompt. retrieved: TGA's retrieved text (segment 1).
    add_bos: prepend ``tokenizer.bos_token_id`` (default: yes for the fixed templates when the tokenizer has a
      BOS; the chat template renders its own).
  Returns: :class:`Prompt`.
  """
  if IMAGE_PLACEHOLDER in question:
    raise ValueError(f"question contains the {IMAGE_PLACEHOLDER!r} placeholder; pass image=True instead")
  if template == "chat_template":
    pieces = _chat_template_pieces(tokenizer, question, image, system)
    add_bos = False if add_bos is None else add_bos
  else:
    pieces = _pieces(template, question, image, system, retrieved)
    add_bos = add_bos if add_bos is not None else tokenizer.bos_token_id is not None
  ids: list[int] = [int(tokenizer.bos_token_id)] if add_bos else []
  segs: list[int] = [SEG_OTHER] * len(ids)
  for text, seg in pieces:
    if text is None:
      tok = [int(image_token_index)] * int(num_image_tokens)
    elif not text:
      continue
    else:
      tok = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids += tok
    segs += [seg] * len(tok)
  rendered = "".join(IMAGE_PLACEHOLDER if t is None else t for t, _ in pieces)
  return Prompt(np.asarray(ids, np.int32), np.asarray(segs, np.int32), rendered)


def collate(prompts: Sequence[Prompt], pad_id: int, *, side: str = "left", length: int | None = None):
  """Pads prompts into arrays: ``input_ids``, ``attention_mask``, ``segment_ids`` (padding: -1), int32 (B, T).

  ``side="left"`` for generation (decoding convention); ``"right"`` works for plain forwards.
  """
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  n = max(len(p.input_ids) for p in prompts)
  t = n if length is None else length
  if t < n:
    raise ValueError(f"length {t} is shorter than the longest prompt ({n} tokens)")
  ids = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  segs = np.full((len(prompts), t), -1, np.int32)
  for i, p in enumerate(prompts):
    k = len(p.input_ids)
    sl = slice(t - k, t) if side == "left" else slice(0, k)
    ids[i, sl], mask[i, sl], segs[i, sl] = p.input_ids, 1, p.segment_ids
  return {"input_ids": ids, "attention_mask": mask, "segment_ids": segs}


__all__ = ["Prompt", "build_prompt", "collate", "TEMPLATES", "SEG_OTHER", "SEG_RETRIEVED", "SEG_IMAGE",
           "SEG_CAPTION", "SEG_QUESTION", "LLAVA_V1_SYSTEM", "LLAVA_LLAMA_2_SYSTEM", "IMAGE_PLACEHOLDER"]
