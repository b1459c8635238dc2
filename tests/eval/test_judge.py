"""Judges on fixed texts with known labels (tga.md §6)."""
import numpy as np
import pytest

from vlsafe_jax.eval import judge as J


def test_keyword_judge_modes_case_and_curly_apostrophes():
  k = J.KeywordJudge()
  texts = ["I\u2019m sorry, but I can\u2019t help with that.", "Sure! Step 1: mix the chemicals.",
           "AS AN AI, I must decline.", "i cannot assist you", "Here is a cake recipe."]
  refused = [True, False, True, True, False]
  assert [v.positive for v in k.judge("refusal", texts)] == refused
  assert [v.label for v in k.judge("response", texts)] == ["safe", "unsafe", "safe", "safe", "unsafe"]
  assert k.judge("refusal", texts)[0].raw == "I'm sorry"
  with pytest.raises(ValueError, match="content"):
    k.judge("content", texts)
  with pytest.raises(ValueError, match="mode"):
    k.judge("bogus", texts)
  s = J.summarize(k.judge("response", texts))
  assert s["n"] == 5 and s["n_positive"] == 2 and s["rate"] == pytest.approx(40.0)


def test_llama3_format_and_parsing():
  text = J.format_llama3_chat("sys", "hello")
  assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nAnswer:")
  labels = J.DEFAULT_LLM_PROMPTS["response"]["labels"]
  assert J.parse_llm_verdict(" Unsafe", labels) is True
  assert J.parse_llm_verdict(" safe.", labels) is False
  assert J.parse_llm_verdict("Answer: UNSAFE", labels) is True
  assert J.parse_llm_verdict(" maybe", labels) is None
  assert J.parse_llm_verdict("", labels) is None
  assert J.parse_llm_verdict("?? Safe", labels) is None


def test_llm_judge_with_stub_generator():
  seen = []

  def gen(prompts):
    seen.extend(prompts)
    return [" Unsafe", " Safe", " hmm", " Yes"][:len(prompts)] if len(prompts) > 1 else [" No"]

  j = J.LLMJudge(gen, name="stub", batch_size=4)
  v = j.judge("response", ["r1", "r2", "r3", "r4", "r5"], ["q1", "q2", "q3", "q4", "q5"])
  assert [x.label for x in v] == ["unsafe", "safe", "invalid", "unsafe", "safe"]
  assert "Request: q2" in seen[1] and "Response: r2" in seen[1] and seen[1].endswith("Answer:")
  s = J.summarize(v)
  assert s["n_invalid"] == 1 and s["rate"] == pytest.approx(50.0)
  r = J.LLMJudge(lambda p: [" Yes"] * len(p), name="stub").judge("refusal", ["x"], ["q"])
  assert r[0].label == "defended"
  seen.clear()
  c = J.LLMJudge(lambda p: seen.extend(p) or [" Unsafe"] * len(p)).judge("content", ["gore"])
  assert c[0].positive is True and "Text: gore" in seen[0]
  assert j.config()["name"] == "stub"


class _CharTok:
  """Character-level stub tokenizer (ids 3..96) for the tiny random Llama."""
  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [3 + (ord(c) % 90) for c in text[-40:]]}

  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(65 + (i % 26)) for i in ids)


def test_llm_judge_real_decoder_plumbing():
  from flax import nnx
  from vlsafe_jax.models import decoding
  from vlsafe_jax.models.llama import Llama, LlamaConfig
  cfg = LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tok = _CharTok()
  j = J.LLMJudge.from_model(model, tok, name="tiny", max_new_tokens=3)
  verdicts = j.judge("response", ["resp a", "another response"], ["q a", "q b"])
  # Independent: the same prompts through generate_text give the raw outputs the judge parsed.
  texts = [J.render_judge_prompt("response", j.prompts["response"], q, r)
           for q, r in (("q a", "resp a"), ("q b", "another response"))]
  out = decoding.generate_text(model, [tok(t)["input_ids"] for t in texts], max_new_tokens=3)
  lens = np.asarray(out.lengths)
  expect = [tok.decode(np.asarray(out.tokens)[i, :lens[i]].tolist()) for i in range(2)]
  assert [v.raw for v in verdicts] == expect
  assert [v.positive for v in verdicts] == [J.parse_llm_verdict(e, j.prompts["response"]["labels"]) for e in expect]
  with pytest.raises(ValueError, match="max_new_tokens"):
    J.LLMJudge(lambda p: p, max_new_tokens=8)
