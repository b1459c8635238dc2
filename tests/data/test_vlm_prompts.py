"""vlsafe_jax.data.vlm_prompts: template strings (cmrm.md §5, tga.md §2), exact image/text spans, segment ids.

A small word-level fast tokenizer stands in for Llama's (no hub access); expected ids are built from the spec's
template strings with the same tokenizer, segment by segment.
"""
import numpy as np
import pytest

from vlsafe_jax.data import vlm_prompts as VP

N, IMG = 7, 99


@pytest.fixture(scope="module")
def tok():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = ("A chat between a curious human and an artificial intelligence assistant. The gives helpful, detailed, "
           "polite answers to the human's questions. USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> You are "
           "language vision is this safe? what Retrieved Text: cat dog . , ' ? :").split()
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  for w in words + list(".,'?:[]/<>"):
    vocab.setdefault(w, len(vocab))
  t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  out = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  out.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                       " [/INST]{% endif %}{% endfor %}")
  return out


def _ids(tok, text):
  return list(tok(text, add_special_tokens=False)["input_ids"])


def test_llava_v1_spans_and_text_only_counterpart(tok):
  q = "what is this ?"
  p = VP.build_prompt(tok, q, template="llava_v1", num_image_tokens=N, image_token_index=IMG)
  want = ([1] + _ids(tok, VP.LLAVA_V1_SYSTEM + " USER: ") + [IMG] * N + _ids(tok, "\n") + _ids(tok, q)
          + _ids(tok, " ASSISTANT:"))
  np.testing.assert_array_equal(p.input_ids, want)
  assert p.text == VP.LLAVA_V1_SYSTEM + " USER: <image>\n" + q + " ASSISTANT:"
  img = np.flatnonzero(p.segment_ids == VP.SEG_IMAGE)
  assert len(img) == N and np.all(np.diff(img) == 1) and np.all(p.input_ids[img] == IMG)
  np.testing.assert_array_equal(p.input_ids[p.segment_ids == VP.SEG_QUESTION], _ids(tok, q))
  t = p.without_image()
  assert len(t.input_ids) == len(p.input_ids) - N and VP.SEG_IMAGE not in t.segment_ids
  np.testing.assert_array_equal(t.input_ids, p.input_ids[p.segment_ids != VP.SEG_IMAGE])
  no_img = VP.build_prompt(tok, q, template="llava_v1", image=False)
  assert IMG not in no_img.input_ids and no_img.text == VP.LLAVA_V1_SYSTEM + " USER: " + q + " ASSISTANT:"


def test_llama_2_template_with_retrieved_text(tok):
  p = VP.build_prompt(tok, "is this safe ?", template="llava_llama_2", num_image_tokens=N, image_token_index=IMG,
                      retrieved="cat dog")
  assert p.text == (f"[INST] <<SYS>>\n{VP.LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\nRetrieved Text: cat dog. <image>\n"
                    "is this safe ? [/INST]")
  np.testing.assert_array_equal(p.input_ids[p.segment_ids == VP.SEG_RETRIEVED], _ids(tok, "cat dog"))
  # Token order: retrieved text, then the image span, then the question (tga.md §3.2).
  first = {s: np.flatnonzero(p.segment_ids == s)[0] for s in (VP.SEG_RETRIEVED, VP.SEG_IMAGE, VP.SEG_QUESTION)}
  assert first[VP.SEG_RETRIEVED] < first[VP.SEG_IMAGE] < first[VP.SEG_QUESTION]
  assert p.input_ids[0] == 1


def test_tokenizer_chat_template(tok):
  p = VP.build_prompt(tok, "what is this ?", template="chat_template", num_image_tokens=N, image_token_index=IMG)
  want = _ids(tok, "<s>[INST] ") + [IMG] * N + _ids(tok, "\n") + _ids(tok, "what is this ?") + _ids(tok, " [/INST]")
  np.testing.assert_array_equal(p.input_ids, want)
  assert want[0] == 1 and p.text == "<s>[INST] <image>\nwhat is this ? [/INST]"


def test_collate_and_errors(tok):
  a = VP.build_prompt(tok, "what ?", num_image_tokens=N, image_token_index=IMG)
  b = VP.build_prompt(tok, "what is this safe ?", image=False)
  left = VP.collate([a, b], pad_id=0)
  right = VP.collate([a, b], pad_id=0, side="right")
  t = max(len(a.input_ids), len(b.input_ids))
  assert left["input_ids"].shape == (2, t)
  for out, side in ((left, "left"), (right, "right")):
    for i, p in enumerate((a, b)):
      m = out["attention_mask"][i].astype(bool)
      assert m.sum() == len(p.input_ids)
      assert (m[-1] if side == "left" else m[0])
      np.testing.assert_array_equal(out["input_ids"][i][m], p.input_ids)
      np.testing.assert_array_equal(out["segment_ids"][i][m], p.segment_ids)
      assert np.all(out["segment_ids"][i][~m] == -1)
  with pytest.raises(ValueError, match="placeholder"):
    VP.build_prompt(tok, "look <image>")
  with pytest.raises(ValueError, match="unknown prompt template"):
    VP.build_prompt(tok, "x", template="vicuna_v0")
  tok2 = type(tok)(tokenizer_object=tok.backend_tokenizer, bos_token="<s>")
  with pytest.raises(ValueError, match="chat_template"):
    VP.build_prompt(tok2, "x", template="chat_template")
