"""`python -m vlsafe_jax.train` entry: config dispatch, overrides, run-directory files."""
import json

import pytest

from vlsafe_jax.train.__main__ import main


def test_demo_runs_and_writes_run_directory(tmp_path):
  out = main(["--config", "lorentz_demo:smoke", "--workdir", str(tmp_path / "run"), "n_quadruplets=64",
              "batch_size=32", "ablations=('hysac',)"])
  res = out["results"]
  assert [r["variant"] for r in res] == ["hysac"]
  for f in ("config.json", "metrics.jsonl", "results.json"):
    assert (tmp_path / "run" / f).exists(), f
  recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert recs and all(k in recs[0] for k in ("loss", "curv", "logit_scale", "entail_i_tu"))
  # The learned scalars stay inside their clamps after the final clamp.
  assert 0.1 - 1e-6 <= res[0]["curvature"] <= 10 + 1e-6


def test_unknown_override_and_option_fail_loudly(tmp_path):
  with pytest.raises(KeyError, match="unknown config key 'stepz'"):
    main(["--config", "lorentz_demo", "stepz=3"])
  with pytest.raises(SystemExit, match="unknown option"):
    main(["--bogus", "1"])
