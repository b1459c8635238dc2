"""The ``llava`` schedule of the synthetic VLM (issue 16): stage plan, row mixture, trained groups (no training;
< 2 s)."""
import numpy as np
import pytest

from vlsafe_jax.data import synthetic_vlm
from vlsafe_jax.train import vlm_base


def test_llava_stages_follow_the_recipe():
  cfg = vlm_base.TrainConfig(schedule="llava", steps=7, pretrain_steps=5, stage2_steps=3, lm_pretrain_steps=2,
                             batch_size=32, stage2_text_rows=2, stage2_text="aligned", lr=1e-3, stage2_lr=2e-4)
  stages = {name: (comps, steps, groups, lr) for name, comps, steps, groups, lr in vlm_base.llava_stages(cfg)}
  assert list(stages) == ["lm_pretrain", "align", "pretrain", "finetune"]
  # Capability before alignment: harmful requests answered (5), never refused (0), LM alone.
  assert set(stages["lm_pretrain"][0]) == {1, 5} and stages["lm_pretrain"][2] == ("language_model",)
  assert set(stages["align"][0]) == {0, 1} and stages["align"][2] == ("language_model",)
  # Stage 1: captions only, language model frozen.
  assert stages["pretrain"][0] == (4,) and "language_model" not in stages["pretrain"][2]
  # Stage 2: tower frozen; refusals only in text-only rows; 2 / 32 text rows.
  comps, steps, groups, lr = stages["finetune"]
  assert len(comps) == 32 and steps == 3 and lr == 2e-4 and "vision_tower" not in groups
  text = [c for c in comps if c in (0, 1, 5)]
  assert sorted(text) == [0, 1] and 5 not in comps
  assert {c for c in comps if c not in (0, 1)} == {2, 3, 4}
  plan = vlm_base.mixture_plan(cfg)
  assert len(plan) == 2 + 7 + 5 + 3


def test_llava_stage2_benign_text_has_no_refusal():
  cfg = vlm_base.TrainConfig(schedule="llava", batch_size=32, stage2_text_rows=2)
  comps = vlm_base.llava_stages(cfg)[-1][1]
  assert 0 not in comps and comps.count(1) == 2


@pytest.mark.parametrize("kw", [dict(stage2_text="everything"), dict(stage2_text_rows=32)])
def test_llava_stage_errors(kw):
  with pytest.raises(ValueError):
    vlm_base.llava_stages(vlm_base.TrainConfig(schedule="llava", batch_size=32, **kw))


def test_caption_and_capability_rows():
  st = synthetic_vlm.SyntheticVLM(0, n_train_images=4)
  rng = np.random.default_rng(0)
  q, a, img = st._row(4, rng)
  assert q == synthetic_vlm.CAPTION_QUESTION and img is not None and a.endswith(" .")
  assert synthetic_vlm.WordTokenizer.unk_token_id not in st.tokenizer.encode(q + " " + a)
  q, a, img = st._row(5, rng)
  harmful = {r.text for r in st.train_requests if r.harmful}
  assert q in harmful and a.startswith("sure . to") and img is None
