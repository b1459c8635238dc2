"""Base-model stages of the synthetic VLM settings (train/vlm_base.py): the seeded batch stream restores exactly,
and a killed synthetic-VLM training resumes to the same parameters and log as an uninterrupted one (the common loop:
checkpoints, metrics.jsonl, resume); save / load round-trip."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from vlsafe_jax.data import synthetic_vlm as S
from vlsafe_jax.train import common
from vlsafe_jax.train import vlm_base as V

SIZES = dict(width=24, layers=2, heads=2, kv_heads=1, mlp=40, vision_width=16, vision_layers=1)


def test_seeded_batches_restore_the_same_stream():
  make = lambda rng, step: {"x": rng.integers(1000, size=3) + step}
  a = V.SeededBatches(make, [0, 5], steps_per_epoch=4)
  next(a), next(a)
  state = json.loads(json.dumps(a.get_state()))          # what a checkpoint stores
  rest = [next(a)["x"] for _ in range(3)]
  b = V.SeededBatches(make, [0, 5], steps_per_epoch=4)
  b.set_state(state)
  for x in rest:
    np.testing.assert_array_equal(next(b)["x"], x)


def _params(model):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}


@pytest.mark.slow
def test_killed_training_resumes_bit_identically_and_round_trips(tmp_path):
  setting = S.SyntheticVLM(0, n_train_images=8)
  cfg = V.llava_config(setting.tokenizer, **SIZES)
  # "mixed": every batch has images, so each run compiles one step (two_stage would add a text-only compile).
  tc = V.TrainConfig(steps=4, schedule="mixed", batch_size=4, warmup=1, log_every=1, checkpoint_every=2)
  full, log_full = V.train_synthetic_vlm(setting, cfg, tc, run_dir=tmp_path / "full")
  with pytest.raises(common.StopAfterSteps):
    V.train_synthetic_vlm(setting, cfg, dataclasses.replace(tc, max_steps_this_run=3),
                          run_dir=tmp_path / "killed")
  resumed, _ = V.train_synthetic_vlm(setting, cfg, tc, run_dir=tmp_path / "killed")
  a, b = _params(full), _params(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  timing = ("examples_per_s", "examples_per_s_per_device", "mfu", "timed_steps")   # differ between runs
  recs = lambda d: [{k: v for k, v in json.loads(l).items() if k not in timing}
                    for l in (d / "metrics.jsonl").read_text().splitlines()]
  assert recs(tmp_path / "full") == recs(tmp_path / "killed")
  assert [r["step"] for r in log_full] == [1, 2, 3, 4]
  V.save(full, setting.tokenizer, tmp_path / "model", {"kind": "test"})
  loaded, tok = V.load(tmp_path / "model")
  assert tok.id_to_token == setting.tokenizer.id_to_token
  c = _params(loaded)
  for k in a:
    np.testing.assert_array_equal(c[k], a[k], err_msg=k)
