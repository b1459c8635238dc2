"""The UWM job's run directory and resume (``vlsafe_jax/jobs/uwm.py``) on a tiny random CLIP (seconds, not the
stage-1 training of ``tests/methods/test_uwm_e2e.py``).

A run killed after its ``evaluate_before`` stage and re-run with the same command ends with the same ``eval.json``
(timings aside) and the same ``metrics.jsonl`` as an uninterrupted run, without recomputing the stored stages.
"""
import json
import sys
from pathlib import Path

import pytest
from flax import nnx

from checkpoints_convert import clip as convert
from configs import hysac_synthetic
from vlsafe_jax import config as config_lib
from vlsafe_jax.jobs import uwm as uwm_job
from vlsafe_jax.methods.uwm import calibrate as cal
from vlsafe_jax.models.clip import CLIP
from vlsafe_jax.train import clip_trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interrupt import Interrupted, records, stop_after_stages  # noqa: E402

TIMING = ("total_seconds", "edit_seconds")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  base = tmp_path_factory.mktemp("base_clip")
  overrides = [f"model.path={base}", "progress=False", "calib.n_pairs=24", "calib.text_batch_size=16",
               "calib.vision_batch_size=16", "data.test_size=20", "eval.batch_size=16", "eval.zeroshot_size=18"]
  c = config_lib.load("uwm_synthetic:smoke", overrides)
  clip_model = hysac_synthetic.get_config("smoke").clip_model     # width 16, one layer
  model = CLIP(clip_trainer.synthetic_clip_config(clip_model, c.data), rngs=nnx.Rngs(0))
  convert.save_converted(model, base)
  return c


def test_kill_at_a_stage_boundary_and_resume_equals_uninterrupted(cfg, tmp_path, monkeypatch, capsys):
  full = uwm_job.run(cfg, tmp_path / "full")
  run = tmp_path / "killed"
  with monkeypatch.context() as m:
    stop_after_stages(m, 2)                                          # edit, evaluate_before
    with pytest.raises(Interrupted, match="evaluate_before"):
      uwm_job.run(cfg, run)
  assert sorted(p.name for p in (run / "stages").iterdir()) == ["edit.json", "evaluate_before.json"]
  assert not (run / "eval.json").exists()

  # The stored stages are reloaded, not recomputed: the edit may not run, one model is evaluated (the edited one).
  evaluated = []
  evaluate = uwm_job.evaluate
  monkeypatch.setattr(cal, "uwm_clip", lambda *a, **k: pytest.fail("the stored edit stage was recomputed"))
  monkeypatch.setattr(uwm_job, "evaluate", lambda model, *a: evaluated.append(model) or evaluate(model, *a))
  resumed = uwm_job.run(cfg, run)
  assert len(evaluated) == 1

  strip = lambda d: {k: v for k, v in d.items() if k not in TIMING}
  assert strip(resumed) == strip(full)
  assert strip(json.loads((run / "eval.json").read_text())) == strip(json.loads((tmp_path / "full/eval.json").read_text()))
  got, want = records(run / "metrics.jsonl"), records(tmp_path / "full/metrics.jsonl")
  assert got == want
  assert [(r["stage"], r["step"]) for r in want] == [("edit", 0), ("edit", 1), ("evaluate_before", 0),
                                                     ("evaluate_after", 0)]
  assert want[0]["tower"] == "text" and want[1]["tower"] == "vision"
  assert want[2]["SafeGround GS"] == full["before"]["safeground"]["GS"]
  assert want[3]["zero-shot synthetic shapes"] == full["after"]["zeroshot"]["synthetic shapes"]

  # A finished run prints its results again.
  capsys.readouterr()
  assert uwm_job.run(cfg, run) == json.loads((run / "eval.json").read_text())
  assert "is finished" in capsys.readouterr().out


@pytest.mark.slow   # 21-33 s on the shared 2-core host (a job run + a second edit + two evaluations)
def test_compute_edit_equals_the_stored_edit_and_evaluation_compiles_once(cfg, tmp_path):
  """``jobs.uwm.compute_edit`` (what the notebooks call to get the scores) gives the masks and weights the job
  stores; evaluating two CLIPs of one structure (base, edited) reuses one compiled encoder."""
  import numpy as np

  from vlsafe_jax.data import sources
  from vlsafe_jax.eval import zeroshot
  uwm_job.run(cfg, tmp_path / "run")
  base_dir = Path(cfg.model.path)
  tok = sources.make_text_encoder(cfg.data, base_dir)
  base = CLIP.from_pretrained(base_dir)
  res = uwm_job.compute_edit(cfg, base, tok)
  stored = np.load(tmp_path / "run" / "masks.npz")
  assert sorted(stored.files) == sorted(res.masks) == sorted(res.scores)
  for k, m in res.masks.items():
    np.testing.assert_array_equal(stored[k], np.asarray(m), err_msg=k)
  assert sum(int(np.sum(m)) for m in res.masks.values()) > 0
  flat = lambda m: {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  want, got = flat(CLIP.from_pretrained(tmp_path / "run" / "edited_clip")), flat(res.model)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(want[k], got[k], err_msg=str(k))

  uwm_job._encode_quadruplets.clear_cache()
  zeroshot._clip_image.clear_cache()
  test, zs = sources.split_source(cfg.data, "test"), uwm_job.zeroshot_datasets(cfg)
  before = uwm_job.evaluate(base, cfg, tok, test, zs)
  # as in the job: the edited model read back from edited_clip/ (res.model's arrays are replicated over the
  # calibration mesh, another input sharding and so another compilation)
  after = uwm_job.evaluate(CLIP.from_pretrained(tmp_path / "run" / "edited_clip"), cfg, tok, test, zs)
  assert uwm_job._encode_quadruplets._cache_size() == 1 and zeroshot._clip_image._cache_size() == 1
  assert before != after     # the same program ran with the edited weights, not the base ones
