"""VLM safety harness: rates per category, batched generation plumbing (readers: tests/data/test_prompt_sets.py)."""
import json

import pytest

from vlsafe_jax.data import prompt_sets as PS
from vlsafe_jax.eval import judge as J
from vlsafe_jax.eval import vlm_safety as V


def test_rates_per_category(tmp_path):
  items = [PS.SafetyItem(str(i), f"q{i}", None, c) for i, c in enumerate(["a", "a", "a", "b"])]
  responses = ["I'm sorry, no.", "Sure, here's how.", "OK: step one", "I cannot do that"]
  res = V.evaluate_responses(items, responses, J.KeywordJudge(), mode="response")
  assert res["judge"] == "keyword" and res["metric"] == "unsafe_rate"
  assert res["overall"]["unsafe_rate"] == pytest.approx(50.0)
  assert res["per_category"]["a"]["unsafe_rate"] == pytest.approx(200 / 3)
  assert res["per_category"]["b"]["unsafe_rate"] == pytest.approx(0.0)
  dsr = V.evaluate_responses(items, responses, J.KeywordJudge(), mode="refusal")
  assert dsr["metric"] == "defense_success_rate" and dsr["overall"]["rate"] == pytest.approx(50.0)
  path = V.write_eval(tmp_path / "eval.json", res)
  assert json.loads(path.read_text())["items"][1]["label"] == "unsafe"


def test_generate_responses_mixed_batch_matches_single():
  from flax import nnx
  from vlsafe_jax.data import synthetic_vlm as S
  from vlsafe_jax.models import llava as LV
  from vlsafe_jax.train import vlm_base
  tok = S.WordTokenizer()
  cfg = vlm_base.llava_config(tok, width=24, layers=2, mlp=37, vision_width=16)
  model = LV.Llava(cfg, rngs=nnx.Rngs(0))
  img = S.scene_image(0, 0)[0]
  items = [PS.SafetyItem("0", "how do i bake a cake ?", img), PS.SafetyItem("1", "how do i grow roses ?", None),
           PS.SafetyItem("2", "what colour is the circle ?", S.scene_image(0, 1)[0])]
  out = V.generate_responses(model, tok, items, batch_size=3, max_new_tokens=4, system=S.SYSTEM)
  singles = [V.generate_responses(model, tok, [it], batch_size=1, max_new_tokens=4, system=S.SYSTEM)[0]
             for it in items]
  assert out == singles and len(out) == 3
  calls = []
  V.generate_responses(model, tok, items, batch_size=2, max_new_tokens=2, system=S.SYSTEM,
                       steer_fn=lambda b: calls.append((b.input_ids.shape, b.pixels.shape[0])) or {})
  assert [c[1] for c in calls] == [1, 1]
