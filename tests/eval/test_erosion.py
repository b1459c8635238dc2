"""Erosion measurements (vlsafe_jax.eval.erosion) on a tiny untrained synthetic LLaVA (eager forwards: 40 s + 22 s
measured on 2 cores shared with a training job, hence slow)."""
import numpy as np
import pytest
from flax import nnx

from vlsafe_jax.data import synthetic_vlm
from vlsafe_jax.data.vlm_prompts import build_prompt
from vlsafe_jax.eval import erosion
from vlsafe_jax.models.llava import Llava
from vlsafe_jax.train import vlm_base


def _tiny():
  st = synthetic_vlm.SyntheticVLM(0, n_train_images=1)
  cfg = vlm_base.llava_config(st.tokenizer, vision_width=16, width=16, layers=1, heads=2, kv_heads=1, mlp=32)
  return Llava(cfg, rngs=nnx.Rngs(0)), st


@pytest.mark.slow
def test_norm_ratio_scales_with_the_projector_output():
  model, st = _tiny()
  items = st.eval_set("harmful", 3)
  before = erosion.norm_ratio(model, st.tokenizer, items)
  lin = model.multi_modal_projector.linear_2
  lin.kernel.value = lin.kernel.value * 2.0
  lin.bias.value = lin.bias.value * 2.0
  after = erosion.norm_ratio(model, st.tokenizer, items)
  np.testing.assert_allclose(after["image_norm"], 2 * before["image_norm"], rtol=1e-5)
  np.testing.assert_allclose(after["text_norm"], before["text_norm"], rtol=1e-6)
  np.testing.assert_allclose(after["norm_ratio"], 2 * before["norm_ratio"], rtol=1e-5)


@pytest.mark.slow
def test_first_token_probs_match_an_unpadded_forward():
  model, st = _tiny()
  items = st.eval_set("harmful", 3)
  got = erosion.first_token_probs(model, st.tokenizer, items, "text")
  tok = st.tokenizer
  refuse, comply = tok.encode(synthetic_vlm.REFUSAL)[0], tok.encode(synthetic_vlm.HELPFUL)[0]
  pr, pc = [], []
  for it in items:       # one item at a time: no padding
    ids = build_prompt(tok, it.question, template="llava_v1", image=False, system=synthetic_vlm.SYSTEM).input_ids
    logits, _, _ = model(np.asarray([ids], np.int32))
    p = np.exp(logits[0, -1] - logits[0, -1].max())
    p = p / p.sum()
    pr.append(p[refuse])
    pc.append(p[comply])
  np.testing.assert_allclose(got["p_refuse"], np.mean(pr), rtol=1e-4)
  np.testing.assert_allclose(got["p_comply"], np.mean(pc), rtol=1e-4)
  assert abs(got["p_refuse"] + got["p_comply"] + got["p_other"] - 1) < 1e-6
