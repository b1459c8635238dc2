"""The ``hysac_step`` benchmark's parity check on a tiny CLIP (no timing).

JAX runs the trainer's jitted HySAC step; PyTorch runs HF CLIP towers + PEFT LoRA + the torch loss of
``bench/lorentz.py`` + ``torch.optim.AdamW``, both from the same random HF weights, LoRA A/B and batch. Float32,
dropout off, two steps. Tolerances (the bench's own): total and the seven terms ``1e-4 * |torch| + 1e-6`` at both
steps, gradient norm 1e-3 relative.
"""
import math

import numpy as np
import pytest

from vlsafe_jax.bench import hysac_step as hs
from vlsafe_jax.methods.hysac import losses as H

# Odd/prime-ish sizes so that transposed or mis-split axes cannot line up by accident.
TINY = dict(
    text=dict(vocab_size=101, hidden_size=40, intermediate_size=84, num_hidden_layers=2, num_attention_heads=5,
              max_position_embeddings=11, eos_token_id=2),
    vision=dict(image_size=24, patch_size=8, hidden_size=42, intermediate_size=90, num_hidden_layers=2,
                num_attention_heads=3),
    projection_dim=23, seq_len=11, lora_rank=4)


@pytest.fixture(scope="module")
def parity():
  return hs.parity_check(TINY, batch=5, verbose=False)


@pytest.mark.torch
def test_parity_passes_on_every_value(parity):
  keys = {f"{t}@{k}" for t in ("loss", *H.TERM_NAMES) for k in (1, 2)} | {"grad_norm@1"}
  assert set(parity["torch"]) == keys
  for k in keys:
    j, t = parity["jax"][k], parity["torch"][k]
    tol = hs.GRAD_NORM_RTOL * abs(t) if k.startswith("grad_norm") else hs.LOSS_RTOL * abs(t) + hs.LOSS_ATOL
    assert abs(j - t) <= tol, (k, j, t)
  assert parity["ok"]


@pytest.mark.torch
def test_parity_values_are_informative(parity):
  """The check only means something if every term is active and the AdamW update moved the loss."""
  t = parity["torch"]
  for name in H.TERM_NAMES:
    assert t[f"{name}@1"] > 1e-3, name
  # Reference weighting (hysac.md §3.3): total = sum of the seven terms / 49.
  np.testing.assert_allclose(t["loss@1"], sum(t[f"{n}@1"] for n in H.TERM_NAMES) / 49.0, rtol=1e-6)
  # One AdamW step (lr 1e-4) moves the loss by several tolerances: a skipped or wrong update fails the parity.
  assert abs(t["loss@2"] - t["loss@1"]) > 3 * (hs.LOSS_RTOL * abs(t["loss@1"]) + hs.LOSS_ATOL)
  assert t["grad_norm@1"] > 0 and math.isfinite(t["grad_norm@1"])


@pytest.mark.torch
def test_compare_flags_a_perturbed_value(parity):
  ok, _ = hs.compare(parity["jax"], parity["torch"])
  assert ok
  bad = dict(parity["jax"])
  bad["entail_i_tu@2"] *= 1 + 3 * hs.LOSS_RTOL
  ok, errs = hs.compare(bad, parity["torch"])
  assert not ok and errs["entail_i_tu@2"] > 1
  bad = dict(parity["jax"], **{"grad_norm@1": parity["jax"]["grad_norm@1"] * (1 + 3 * hs.GRAD_NORM_RTOL)})
  assert not hs.compare(bad, parity["torch"])[0]


def test_l14_preset_flops_match_perf_md():
  """perf.md §3: a HySAC step costs ~701 GFLOP per quadruplet (4N) and ~1,052 GFLOP as 6N at ViT-L/14, 77 tokens."""
  from vlsafe_jax.train import hysac_trainer
  spec = hs.PRESETS["l14"]
  f4 = hysac_trainer.step_flops(hs._clip_config(spec), spec["seq_len"])
  np.testing.assert_allclose(f4, 701e9, rtol=0.01)
  np.testing.assert_allclose(1.5 * f4, 1052e9, rtol=0.01)
