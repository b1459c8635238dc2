"""The CMRM job's run directory and resume (``vlsafe_jax/jobs/cmrm.py``) on a tiny random LLaVA saved as the
synthetic model (no training; the smoke-sized end-to-end run is ``tests/methods/test_cmrm_synthetic.py``).

``evaluate`` killed after the first sample-level set and re-run ends with the same ``eval.json`` and
``metrics.jsonl`` as an uninterrupted run and generates only the two missing sets. Sample-level steering uses
noise corruption here, whose per-sample seeds continue across sets, so a resumed run must start them where the
stored set ended.
"""
import json
import sys
from pathlib import Path

import pytest
from flax import nnx

from vlsafe_jax import config as config_lib
from vlsafe_jax.data import synthetic_vlm as S
from vlsafe_jax.eval import vlm_safety
from vlsafe_jax.jobs import cmrm as cmrm_job
from vlsafe_jax.models import llava as LV
from vlsafe_jax.train import vlm_base

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interrupt import Interrupted, records, stop_after_stages  # noqa: E402


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  path = tmp_path_factory.mktemp("model")
  tok = S.WordTokenizer()
  model = LV.Llava(vlm_base.llava_config(tok, width=40, layers=2, heads=4, kv_heads=2, mlp=37, vision_width=24,
                                         vision_layers=1), rngs=nnx.Rngs(3))
  vlm_base.save(model, tok, path)
  return config_lib.load("cmrm_synthetic:smoke", [
      f"model.path={path}", "data.limit=3", "data.anchor_limit=4", "eval.batch_size=4", "eval.max_new_tokens=3",
      "cmrm.corrupt=noise"])


def test_kill_at_a_stage_boundary_and_resume_equals_uninterrupted(cfg, tmp_path, monkeypatch):
  full = cmrm_job.run(cfg, tmp_path / "full", "evaluate")
  run = tmp_path / "killed"
  # Stages in order: vectors, then <condition>.<set> for unsteered, text_only, cmrm_dataset, cmrm_sample x
  # harmful, benign, grounded; stage 11 is cmrm_sample.harmful.
  with monkeypatch.context() as m:
    stop_after_stages(m, 11)
    with pytest.raises(Interrupted, match="cmrm_sample.harmful"):
      cmrm_job.run(cfg, run, "evaluate")
  assert not (run / "eval.json").exists()

  generated = []
  generate = vlm_safety.generate_responses
  monkeypatch.setattr(vlm_safety, "generate_responses",
                      lambda *a, desc="", **k: generated.append(desc) or generate(*a, desc=desc, **k))
  resumed = cmrm_job.run(cfg, run, "evaluate")
  assert generated == ["cmrm_sample/benign", "cmrm_sample/grounded"]

  assert resumed == full
  assert json.loads((run / "eval.json").read_text()) == json.loads((tmp_path / "full/eval.json").read_text())
  got, want = records(run / "metrics.jsonl"), records(tmp_path / "full/metrics.jsonl")
  assert got == want
  stages = [r["stage"] for r in want]
  assert stages[0] == "vectors" and len(stages) == 13 and stages[-1] == "cmrm_sample.grounded"
  last = want[-1]
  assert last["alpha"] == cfg.cmrm.sample_alpha and last["n"] == len(full["conditions"]["cmrm_sample"]["grounded"]
                                                                        ["items"])
  assert last["unsafe_rate"] == full["conditions"]["cmrm_sample"]["grounded"]["overall"]["unsafe_rate"]
