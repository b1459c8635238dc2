"""kill -9 at seeded random moments for the TGA trainer, the UWM job and the CMRM job (the main job's faults are
tests/train/test_faults.py; the subprocess harness is tests/train/faults_harness.py).

Each job runs as a real subprocess of its CLI on 1 CPU device, at the smallest setting that still runs every stage
of the job; a rerun of the same command must resume, and the end must equal an uninterrupted run's bit for bit:
the final weights / edited weights / steering vectors, ``metrics.jsonl`` (timing fields aside) and ``eval.json``.
Outputs that name the run directory (CMRM's ``model_id``, UWM's ``base_model``) are compared with that path
replaced by a placeholder.

Per job: one injected kill at a chosen point (TGA: while its 3rd checkpoint is being written; UWM / CMRM: in the
middle of appending a stage record to ``metrics.jsonl``), then ``N_RANDOM_KILLS`` (10) kills at seeded random moments
over the measured duration T of an uninterrupted run (warm compilation cache), then the same command to the end.
A kill costs on average T / 2 (a restart redoes the import and the tracing) and the final rerun about T; the
reference runs cost T plus a cold run that pays the compilation.
"""
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from faults_harness import Harness, assert_tree_equal, random_kills, records, reference_runs

pytestmark = pytest.mark.slow

# Fields that legitimately differ between two runs of the same job (wall-clock time and throughput).
TIMING = ("examples_per_s", "examples_per_s_per_device", "mfu", "timed_steps", "total_seconds", "edit_seconds")
N_RANDOM_KILLS = 10

JOBS = {
    # TGA (python -m vlsafe_jax.train, trainer "tga"): the text-aligned base (4 steps), stage 1 (4 steps) and
    # stage 2 (4 steps, 2 accumulated micro-batches) of the "tga" variant, a checkpoint and a record at every step,
    # then the evaluation (held-out loss, generation + judge). One variant: "plain" runs the same code paths.
    "tga": ("vlsafe_jax.train", ("--config", "tga_synthetic:smoke", "train.progress=False", "variants=('tga',)",
                                 "train.checkpoint_every=1", "train.log_every=1")),
    # UWM: the stage-1 CLIP (the main job's smoke CLIP: 2 epochs x 2 steps, a checkpoint every step), the edit
    # (both towers), the before / after evaluations. The stage-1 run directory is per run (inside it).
    "uwm": ("vlsafe_jax.uwm", ("--config", "uwm_synthetic:smoke", "progress=False",
                               "model.stage1_workdir={workdir}/stage1",
                               "model.stage1_overrides=('train.progress=False','data.train_size=32',"
                               "'data.val_size=16','data.test_size=16','train.checkpoint_every=1',"
                               "'train.log_every=1')",
                               "calib.n_pairs=24", "calib.text_batch_size=16", "calib.vision_batch_size=16",
                               "data.test_size=20", "eval.batch_size=16", "eval.zeroshot_size=18")),
    # CMRM evaluate: the synthetic LLaVA (6 steps, a checkpoint every 2), the vectors, 4 conditions x 3 sets of
    # generation (sample-level steering with noise corruption: its per-sample seeds continue across sets).
    "cmrm": ("vlsafe_jax.cmrm", ("--config", "cmrm_synthetic:smoke", "model.train_steps=6",
                                 "model.train_batch_size=8", "model.checkpoint_every=2", "data.limit=3",
                                 "data.anchor_limit=4", "eval.batch_size=4", "eval.max_new_tokens=3",
                                 "cmrm.corrupt=noise")),
}
# The injected kill of each job (faults_sitecustomize.py).
# UWM: appends 1-4 are the stage-1 CLIP's (its own metrics.jsonl), 5-6 the edit records (text, vision);
# CMRM: 1 is the synthetic model's (model/run/), 2 the vectors record, 3-5 the unsteered condition's three sets.
FAULTS = {"tga": "checkpoint_commit:3", "uwm": "metrics_append:6", "cmrm": "metrics_append:5"}


def _weights(workdir: Path, job: str) -> dict[str, np.ndarray]:
  """Every array output of a finished run, keyed ``file/tensor``."""
  files = {"tga": ["base/flax_model.safetensors", "final/tga/flax_model.safetensors"],
           "uwm": ["stage1/clip_base/flax_model.safetensors", "edited_clip/flax_model.safetensors", "masks.npz"],
           "cmrm": ["model/flax_model.safetensors", "cmrm_vectors.npz"]}[job]
  out = {}
  for f in files:
    arrays = load_file(workdir / f) if f.endswith(".safetensors") else dict(np.load(workdir / f))
    out.update({f"{f}/{k}": v for k, v in arrays.items()})
  return out


def _json_outputs(workdir: Path, job: str) -> dict[str, object]:
  """metrics.jsonl (timing fields aside) and the JSON results, with the run directory's path replaced."""
  names = {"tga": ["eval.json"], "uwm": ["eval.json", "stages/edit.json"],
           "cmrm": ["eval.json", "cmrm_vectors.json"]}[job]
  norm = lambda o: json.loads(json.dumps(o).replace(str(workdir), "<run>"))
  strip = lambda d: {k: (strip(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in TIMING}
  out = {"metrics.jsonl": norm(records(workdir, TIMING))}
  out.update({n: norm(strip(json.loads((workdir / n).read_text()))) for n in names})
  return out


def _assert_same_result(ref_dir: Path, workdir: Path, job: str) -> None:
  assert_tree_equal(_weights(ref_dir, job), _weights(workdir, job))
  ref, got = _json_outputs(ref_dir, job), _json_outputs(workdir, job)
  for name in ref:
    assert got[name] == ref[name], name


@pytest.fixture(scope="module")
def job_reference(tmp_path_factory):
  """``job -> (harness, reference run directory, its warm wall time)``, built once per job and module."""
  built = {}

  def get(job):
    if job not in built:
      base = tmp_path_factory.mktemp(f"faults_{job}")
      harness = Harness(base, *JOBS[job])
      ref_dir, seconds = reference_runs(harness, base / "reference", 1,
                                        lambda a, b: _assert_same_result(a, b, job))
      built[job] = harness, ref_dir, seconds
    return built[job]
  return get


@pytest.mark.parametrize("job", [pytest.param(j, marks=pytest.mark.xdist_group(f"faults_{j}")) for j in JOBS])
def test_kill9_anywhere_resumes_to_the_uninterrupted_result(job, job_reference, tmp_path):
  harness, ref_dir, ref_seconds = job_reference(job)
  workdir = tmp_path / "killed"
  rc, out, _ = harness(workdir, 1, fault=FAULTS[job])
  assert rc == -signal.SIGKILL, out
  if job == "tga":      # killed while writing the base's 3rd checkpoint: steps 1 and 2 committed, 3 in a temp dir
    ckpts = workdir / "base/run/checkpoints/tga_base"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["1", "2"]
    assert any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir()), list(ckpts.iterdir())
  else:                 # a torn last record in metrics.jsonl
    assert not (workdir / "metrics.jsonl").read_text().endswith("\n")
  kills, runs = random_kills(harness, workdir, lambda i: tmp_path / f"killed{i}", N_RANDOM_KILLS,
                             ref_seconds, lambda w: _assert_same_result(ref_dir, w, job))
  print(f"\n{job}: {kills} random kills + 1 injected over {len(runs)} run(s); reference run {ref_seconds:.1f} s")
