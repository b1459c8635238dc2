"""TGA prompt builder (tga.md §3.2-§3.5): masks cover exactly the retrieved string, every image position and the
caption tokens of the reference pass, for both stages and templates, with padding excluded; labels only on answers.

Expected ids are built independently from the spec's template strings with the same small word-level tokenizer.
"""
import numpy as np
import pytest

from vlsafe_jax.data import vlm_prompts as VP
from vlsafe_jax.data import tga_prompt as TP

N, IMG, PAD = 5, 97, 0


@pytest.fixture(scope="module")
def tok():
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = ("You are a helpful language and vision assistant. able to understand the visual content that user "
           "provides, assist with variety of tasks using natural A chat between curious human an artificial "
           "intelligence The gives detailed, polite answers human's questions. USER: ASSISTANT: [INST] [/INST] "
           "<<SYS>> <</SYS>> <image> Retrieved Text: red cat on mat dog runs what is this it a blue sky").split()
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
  for w in words + list(".,'?:[]/<>"):
    vocab.setdefault(w, len(vocab))
  t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>")


def _ids(tok, text):
  return list(tok(text, add_special_tokens=False)["input_ids"])


def test_halve_rule():
  assert TP.halve_if_identical("red cat on mat", "red cat on mat ") == "red cat"
  assert TP.halve_if_identical("dog runs", "red cat") == "dog runs"


def test_pretrain_spans_and_labels(tok):
  ex = TP.build_pretrain(tok, "red cat on mat", "dog runs", num_image_tokens=N, image_token_index=IMG,
                         example_id="a1")
  want = [1] + _ids(tok, "Retrieved Text: ") + _ids(tok, "dog runs") + _ids(tok, ". ") + [IMG] * N + _ids(
      tok, "red cat on mat\n")
  np.testing.assert_array_equal(ex.input_ids, want)
  np.testing.assert_array_equal(ex.input_ids[ex.segment_ids == TP.SEG_RETRIEVED], _ids(tok, "dog runs"))
  img = np.flatnonzero(ex.segment_ids == TP.SEG_IMAGE)
  assert len(img) == N and np.all(ex.input_ids[img] == IMG)
  lab = ex.labels != -100
  np.testing.assert_array_equal(ex.input_ids[lab], _ids(tok, "red cat on mat"))
  np.testing.assert_array_equal(ex.ref_ids, [1] + _ids(tok, "red cat on mat"))
  np.testing.assert_array_equal(ex.ref_ids[ex.ref_segment_ids == TP.SEG_CAPTION], _ids(tok, "red cat on mat"))
  assert ex.aux
  same = TP.build_pretrain(tok, "red cat on mat", "red cat on mat", num_image_tokens=N, image_token_index=IMG)
  np.testing.assert_array_equal(same.input_ids[same.segment_ids == TP.SEG_RETRIEVED], _ids(tok, "red cat"))


@pytest.mark.parametrize("template", ["llava_llama_2", "llava_v1"])
def test_finetune_spans_labels_reference(tok, template):
  conv = [{"from": "human", "value": "<image>\nwhat is this ?"}, {"from": "gpt", "value": "a red cat"},
          {"from": "human", "value": "what is it"}, {"from": "gpt", "value": "blue sky"}]
  ex = TP.build_finetune(tok, conv, caption="red cat on mat", retrieved="dog runs", has_image=True,
                         num_image_tokens=N, image_token_index=IMG, template=template, example_id="r7")
  if template == "llava_llama_2":
    head = f"[INST] <<SYS>>\n{VP.LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n"
    want = ([1] + _ids(tok, head) + _ids(tok, "Retrieved Text: ") + _ids(tok, "dog runs") + _ids(tok, ". ")
            + [IMG] * N + _ids(tok, "what is this ?") + _ids(tok, " [/INST]") + _ids(tok, "a red cat") + [2]
            + [1] + _ids(tok, "[INST] what is it [/INST]") + _ids(tok, "blue sky") + [2])
  else:
    head = VP.LLAVA_V1_SYSTEM + " USER: "
    want = ([1] + _ids(tok, head) + _ids(tok, "Retrieved Text: dog runs. ") + [IMG] * N
            + _ids(tok, "what is this ? ASSISTANT: a red cat") + [2] + _ids(tok, "USER: what is it ASSISTANT: blue sky")
            + [2])
  np.testing.assert_array_equal(ex.input_ids, want)
  np.testing.assert_array_equal(ex.input_ids[ex.segment_ids == TP.SEG_RETRIEVED], _ids(tok, "dog runs"))
  assert (ex.segment_ids == TP.SEG_IMAGE).sum() == N
  np.testing.assert_array_equal(ex.input_ids[ex.labels != -100], _ids(tok, "a red cat") + [2] + _ids(tok, "blue sky")
                                + [2])
  # Reference pass: "<image>" as plain text, then the caption (segment 3 = caption tokens only).
  np.testing.assert_array_equal(ex.ref_ids, [1] + _ids(tok, head + "<image> ") + _ids(tok, "red cat on mat"))
  np.testing.assert_array_equal(ex.ref_ids[ex.ref_segment_ids == TP.SEG_CAPTION], _ids(tok, "red cat on mat"))
  assert IMG not in ex.ref_ids and ex.aux


def test_text_only_and_tox_rows(tok):
  conv = [{"from": "human", "value": "what is it"}, {"from": "gpt", "value": "a cat"}]
  ex = TP.from_llava_row(tok, {"id": "t1", "conversations": conv}, stage="finetune", num_image_tokens=N,
                         image_token_index=IMG)
  assert not ex.has_image and not ex.aux and IMG not in ex.input_ids
  assert not np.any(np.isin(ex.segment_ids, [TP.SEG_RETRIEVED, TP.SEG_IMAGE]))
  row = {"id": "tox_3", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nwhat"},
                                                           {"from": "gpt", "value": "a"}],
         "image_caption": "red cat", "retrieved_caption": "dog"}
  tox = TP.from_llava_row(tok, row, stage="finetune", num_image_tokens=N, image_token_index=IMG)
  assert tox.has_image and not tox.aux
  with pytest.raises(ValueError, match="'r9'.*retrieved_caption"):
    TP.from_llava_row(tok, {"id": "r9", "image": "a.png", "conversations": conv, "image_caption": "c"},
                      stage="finetune", num_image_tokens=N, image_token_index=IMG)
  with pytest.raises(ValueError, match="turn 0"):
    TP.build_finetune(tok, [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], caption=None,
                      retrieved=None, has_image=False, num_image_tokens=N, image_token_index=IMG)


def test_collate_masks_exclude_padding(tok):
  a = TP.build_pretrain(tok, "red cat on mat", "dog runs", num_image_tokens=N, image_token_index=IMG, example_id="0")
  conv = [{"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a cat"}]
  b = TP.build_finetune(tok, conv, caption="blue sky", retrieved="red cat", has_image=True, num_image_tokens=N,
                        image_token_index=IMG, example_id="tox1")
  c = TP.build_finetune(tok, [{"from": "human", "value": "what"}, {"from": "gpt", "value": "cat"}], caption=None,
                        retrieved=None, has_image=False, num_image_tokens=N, image_token_index=IMG)
  t = max(len(e.input_ids) for e in (a, b, c)) + 3
  out = TP.collate([a, b, c], PAD, max_length=t, ref_max_length=80)
  for i, ex in enumerate((a, b, c)):
    n = len(ex.input_ids)
    assert out["attention_mask"][i].sum() == n
    assert not np.any(out["retrieved_mask"][i, n:]) and not np.any(out["image_mask"][i, n:])
    assert not np.any(out["caption_mask"][i, len(ex.ref_ids):])
    np.testing.assert_array_equal(out["input_ids"][i][out["retrieved_mask"][i] > 0],
                                  ex.input_ids[ex.segment_ids == TP.SEG_RETRIEVED])
    assert out["image_mask"][i].sum() == (N if ex.has_image else 0)
    assert np.all(out["labels"][i, n:] == -100)
  np.testing.assert_array_equal(out["ref_ids"][0][out["caption_mask"][0] > 0], _ids(tok, "red cat on mat"))
  np.testing.assert_array_equal(out["aux_weight"], [1, 0, 0])
  np.testing.assert_array_equal(out["diag_weight"], [1, 1, 0])      # logged cosines: every captioned image row
  np.testing.assert_array_equal(out["has_image"], [1, 1, 0])
  with pytest.raises(ValueError, match="'0'.*image or retrieved"):
    TP.collate([a], PAD, max_length=6, ref_max_length=40)
