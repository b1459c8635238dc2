"""``python -m vlsafe_jax.bench suite``: the GPU preset's plan (dry run) against perf.md's FLOP models, and the
cpu-smoke preset end to end on tiny shapes (every row, record fields, parity flags). No timing is asserted."""
import json
import math

import numpy as np
import pytest

from vlsafe_jax import perf
from vlsafe_jax.bench import clip as clip_bench
from vlsafe_jax.bench import llava as llava_bench
from vlsafe_jax.bench import suite
from vlsafe_jax.models import clip as C
from vlsafe_jax.models import llava as LV
from vlsafe_jax.train import hysac_trainer

GPU_ROWS = ["clip_image_b1", "clip_image_b64", "clip_image_b256", "clip_text_b1", "clip_text_b64", "clip_text_b256",
            "hysac_step_b32", "lorentz_b256", "lorentz_b1024", "lorentz_b4096", "uwm_calibration",
            "llava_prefill_b1", "llava_decode_b1", "llava_decode_b8", "cmrm_dataset_b8", "cmrm_sample_b8",
            "tga_step"]


@pytest.fixture(scope="module")
def gpu_plan():
  return {r.name: r for r in suite.plan("gpu")}


def test_gpu_plan_rows_and_shapes(gpu_plan):
  assert list(gpu_plan) == GPU_ROWS
  assert gpu_plan["clip_image_b256"].shapes["tokens"] == 257
  assert gpu_plan["llava_prefill_b1"].shapes == {"batch": 1, "image_tokens": 576, "text_tokens": 64, "prompt": 640}
  assert gpu_plan["tga_step"].shapes["decoder_layers"] == 4 and gpu_plan["tga_step"].shapes["width"] == 4096
  assert all(r.dtype == "bfloat16" for n, r in gpu_plan.items() if n.startswith(("clip", "hysac", "llava", "cmrm")))


def test_gpu_plan_flops_are_perf_md_models(gpu_plan):
  """FLOPs per row equal the FLOP models (perf.md §3 numbers within 1-2%)."""
  cfg = suite._clip_config(clip_bench.PRESETS["l14"])
  for b in (1, 64, 256):
    img, txt = gpu_plan[f"clip_image_b{b}"], gpu_plan[f"clip_text_b{b}"]
    assert img.flops == b * C.clip_image_flops(cfg.vision_config, cfg.projection_dim)
    assert txt.flops == b * C.clip_text_flops(cfg.text_config, 77, cfg.projection_dim)
    np.testing.assert_allclose(img.flops / b, 162.03e9, rtol=0.01)
    np.testing.assert_allclose(txt.flops / b, 13.3e9, rtol=0.01)
  h = gpu_plan["hysac_step_b32"]
  assert h.flops == 32 * hysac_trainer.step_flops(cfg, 77)
  np.testing.assert_allclose(h.flops / 32, 701e9, rtol=0.01)
  for b in (256, 1024, 4096):
    assert gpu_plan[f"lorentz_b{b}"].flops == 12 * 2.0 * b * b * 769
  lcfg = llava_bench.config(llava_bench.PRESETS["7b"])
  assert gpu_plan["llava_prefill_b1"].flops == LV.llava_prefill_flops(lcfg, 64)
  # perf.md §3: ~8.3 TFLOP for 616 tokens + 381.9 GFLOP vision; here 640 tokens and the LM head on every position.
  assert 8.5e12 < gpu_plan["llava_prefill_b1"].flops < 9.5e12
  for b in (1, 8):
    d = gpu_plan[f"llava_decode_b{b}"]
    assert d.flops == b * perf.llama_prefill_flops(lcfg.text_config, 1)
    assert d.decode_bytes == perf.llama_decode_bytes(lcfg.text_config, 640 + 32, 2, batch=b)
  # perf.md §3: 13.5 GB of bf16 weights read per token at batch 1 (+ ~3% KV cache).
  np.testing.assert_allclose(gpu_plan["llava_decode_b1"].decode_bytes, 13.5e9, rtol=0.03)
  u = gpu_plan["uwm_calibration"]
  assert u.shapes["pairs_projected"] == 8192
  np.testing.assert_allclose(u.flops / u.items, 2 * 162.03e9, rtol=0.01)    # two ViT-L/14 forwards per pair


def test_gpu_plan_expected_memory(gpu_plan):
  lw = gpu_plan["llava_decode_b1"].memory["weights"]
  assert 13.0e9 < lw < 14.5e9                       # 7.06 B params in bf16
  kv = gpu_plan["llava_decode_b8"].memory["kv_cache"]
  assert kv == 2 * 32 * 8 * 704 * 32 * 128 * 2
  assert 1.6e9 < gpu_plan["hysac_step_b32"].memory["weights"] < 1.8e9   # CLIP-L/14 in float32
  assert gpu_plan["tga_step"].memory["optimizer"] > gpu_plan["tga_step"].memory["weights"]
  for r in gpu_plan.values():
    assert r.memory["total"] == pytest.approx(sum(v for k, v in r.memory.items() if k != "total"))
  # The attention kernels "auto" will pick on an H100/H200.
  assert gpu_plan["clip_image_b64"].attention_gpu["clip.vision"].startswith("cudnn")
  assert gpu_plan["llava_prefill_b1"].attention_gpu["llama"].startswith("cudnn")
  assert gpu_plan["llava_decode_b8"].attention_gpu["llama"].startswith("xla")


def test_dry_run_cli(tmp_path, capsys):
  suite.main(["--preset", "gpu", "--dry-run", "--out", str(tmp_path)])
  text = capsys.readouterr().out
  for name in GPU_ROWS:
    assert name in text
  assert "162.03" in text and "701.3" in text
  planned = json.loads((tmp_path / "suite_gpu_plan.json").read_text())
  assert [r["row"] for r in planned["rows"]] == GPU_ROWS
  assert all(r["flops_per_call"] > 0 and r["expected_memory_bytes"]["total"] > 0 for r in planned["rows"])


def test_h200_roofline_from_device_name():
  assert perf.device_peak("NVIDIA H200") == (989.4, 4.8)
  assert perf.device_peak("NVIDIA H100 80GB HBM3") == (989.4, 3.35)
  assert perf.device_peak("NVIDIA H100 PCIe") == (756.0, 2.0)
  assert perf.device_peak("cpu") is None


@pytest.mark.slow
@pytest.mark.torch
def test_cpu_smoke_suite_end_to_end(tmp_path):
  """Every row of the smoke preset runs (JAX and eager PyTorch) and the record files hold the fields."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    result = suite.run("cpu-smoke", out_dir=tmp_path, torch_compile="off")
  finally:
    torch.set_num_threads(threads)
  rec = json.loads((tmp_path / "suite_cpu-smoke.json").read_text())
  names = [r.name for r in suite.plan("cpu-smoke")]
  assert [r["row"] for r in rec["rows"]] == names == [r["row"] for r in result["rows"]]
  assert rec["env"]["device_kind"] and rec["env"]["platform"] == "cpu"
  for r in rec["rows"]:
    assert r["status"] == "ok", (r["row"], r["status"], r.get("traceback"))
    for key in ("shapes", "flops_per_call", "expected_memory_bytes", "unit", "torch_baseline", "parity", "ratio",
                "attention", "device"):
      assert key in r, (r["row"], key)
    j, t = r["jax"], r["torch"]
    assert math.isfinite(j["ms"]) and "per_s" in j and "peak_bytes" in j, r["row"]
    assert r["parity"]["ok"] is True, (r["row"], r["parity"])
    if r["row"] == "cmrm_sample_b2":
      assert t is None and r["torch_baseline"].startswith("none")     # no PyTorch implementation exists
      continue
    assert math.isfinite(t["ms"]) and "eager" in r["torch_baseline"], (r["row"], r["torch_baseline"])
  by = {r["row"]: r for r in rec["rows"]}
  assert "hbm_share" in by["llava_decode_b1"]["jax"] and "projected_s" in by["uwm_calibration"]["jax"]
  assert "overhead_vs_off_pct" in by["cmrm_dataset_b2"]["jax"]
  assert by["clip_image_b4"]["attention"]["clip.vision"]["impl"] == "xla"
  md = (tmp_path / "suite_cpu-smoke.md").read_text()
  assert all(n in md for n in names) and "cpu" in md
