"""The ``hysac_step`` benchmark's parity check on a tiny CLIP (no timing).

JAX runs the trainer's jitted HySAC step; PyTorch runs HF CLIP towers + PEFT LoRA + the torch loss of
``bench/lorentz.py`` + ``torch.optim.AdamW``, both from the same random HF weights, LoRA A/B and batch. Float32,
dropout off, two steps. Tolerances (the bench's own): total and the seven terms ``1e-4 * |torch| + 1e-6`` at both
steps, gradient norm 1e-3 relative. Per-tensor gradient norms at step 1 (this file, not the bench): GRAD_RTOL below.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlsafe_jax import sharding
from vlsafe_jax.bench import hysac_step as hs
from vlsafe_jax.methods.hysac import losses as H
from vlsafe_jax.methods.hysac import scalars as scalars_lib
from vlsafe_jax.models import lora as lora_lib
from vlsafe_jax.train import hysac_trainer

# Odd/prime-ish sizes so that transposed or mis-split axes cannot line up by accident.
TINY = dict(
    text=dict(vocab_size=101, hidden_size=40, intermediate_size=84, num_hidden_layers=2, num_attention_heads=5,
              max_position_embeddings=11, eos_token_id=2),
    vision=dict(image_size=24, patch_size=8, hidden_size=42, intermediate_size=90, num_hidden_layers=2,
                num_attention_heads=3),
    projection_dim=23, seq_len=11, lora_rank=4)


BATCH, SEED = 5, 0

# Per-tensor gradient tolerance, from float32 arithmetic: unit roundoff u = 2^-24 ~ 6.0e-8. A gradient entry here
# is a chain of ~10 reductions (2 layers x attention + MLP, forward and backward, the projection, the loss), each
# summing <= ~110 terms (10 sequences x 11 tokens; widths <= 90), so the worst-case bound n u per reduction gives
# ~10 x 110 x u ~ 6.6e-5 relative per side and ~1.3e-4 for the difference of two independent float32
# implementations: 2e-4. (Observed on CPU: <= 1.1e-5, the largest on the scalar gradients.) Unlike the loss after
# AdamW, which normalises each gradient entry by its own magnitude, this sees a wrong scale on any single tensor.
GRAD_RTOL = 2e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """The random HF CLIP both sides load (written once, so the gradient test sees the parity check's weights)."""
  d = tmp_path_factory.mktemp("hysac_step_hf")
  hs.write_hf_clip(TINY, str(d), SEED)
  return str(d)


@pytest.fixture(scope="module")
def parity(hf_dir):
  return hs.parity_check(TINY, batch=BATCH, hf_dir=hf_dir, seed=SEED, verbose=False)


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


def _jax_step1_grads(setup, host):
  """Step-1 gradients of the JAX trainer's objective (make_loss_fn at clamp_params of the initial params, key
  fold_in(rng, 0), exactly as make_update_fn takes them), keyed like the PEFT/torch parameters."""
  loss_fn = hysac_trainer.make_loss_fn(setup.graphdef, setup.loss_cfg)
  params = hysac_trainer.clamp_params(setup.state["params"])
  key = jax.random.fold_in(jax.random.key(SEED), 0)
  with jax.default_matmul_precision("highest"):
    grads, _ = jax.jit(jax.grad(loss_fn, has_aux=True))(params, setup.frozen,
                                                        sharding.shard_batch(host, setup.mesh), key)
  # The gradient tree has the params' structure: merged into the model, the bench's own PEFT exporter gives the
  # LoRA gradients in PEFT names and torch layout.
  model = nnx.merge(setup.graphdef, grads, setup.frozen)
  out = lora_lib.export_peft(model.clip, prefix="base_model.model.")
  out.update({k: np.asarray(getattr(model.scalars, k)[...]) for k in scalars_lib.SCALAR_NAMES})
  return out


def _torch_step1_grads(module, opt, host):
  """``.grad`` of every trainable torch parameter after the reference's first step (clamp, forward, backward,
  AdamW; the step leaves the gradients in place), keyed without the tower attribute (``visual.``/``textual.``)."""
  step = hs.make_torch_step(module, opt, hs.torch_batch(host, "cpu"), device="cpu", bf16=False)
  step()
  out = {}
  for name, p in module.named_parameters():
    if p.requires_grad:
      assert p.grad is not None, name
      out[name.split(".", 1)[1] if name.startswith(("visual.", "textual.")) else name] = p.grad.detach().numpy()
  return out


@pytest.mark.torch
def test_step1_gradients_match_torch_per_tensor(parity, hf_dir):
  """Per-tensor gradient norms at step 1, JAX trainer vs the torch reference, from the parity check's weights and
  batch. The global norm and the AdamW-updated loss can hide a wrong gradient on one small tensor (a 2x error on
  a 3e-4-norm tensor moves the 0.14 global norm by ~1e-5 relative, and Adam's first update ~ sign(g))."""
  host = hs.synthetic_batch(TINY, BATCH, SEED + 1)
  setup = hs.build_jax(hf_dir, TINY, batch=BATCH, dtype=jnp.float32, dropout=0.0, seed=SEED, lora_b_std=0.05)
  lora, scalars = hs.jax_trainables(setup)
  gj = _jax_step1_grads(setup, host)
  module = hs.build_torch(hf_dir, TINY, lora, scalars, device="cpu", dropout=0.0)
  gt = _torch_step1_grads(module, hs.torch_optimizer(module, "cpu"), host)
  assert set(gj) == set(gt) and len(gt) == len(lora) + 4, sorted(set(gj) ^ set(gt))   # LoRA A/B + 4 scalars
  norm = lambda g: float(np.linalg.norm(np.asarray(g, np.float64)))   # noqa: E731
  # Same setup as the parity fixture: both global norms reproduce its grad_norm@1 (the JAX one is the trainer's
  # own step metric, so these gradients are the step's).
  glob_j, glob_t = (math.sqrt(sum(norm(g) ** 2 for g in d.values())) for d in (gj, gt))
  np.testing.assert_allclose(glob_j, parity["jax"]["grad_norm@1"], rtol=1e-5)
  np.testing.assert_allclose(glob_t, parity["torch"]["grad_norm@1"], rtol=1e-6)
  for k in sorted(gt):
    nj, nt = norm(gj[k]), norm(gt[k])
    assert nt > 0, k                                        # every tensor gets a gradient: the check is active
    assert abs(nj - nt) <= GRAD_RTOL * nt, (k, nj, nt)


def test_l14_preset_flops_match_perf_md():
  """perf.md §3: a HySAC step costs ~701 GFLOP per quadruplet (4N) and ~1,052 GFLOP as 6N at ViT-L/14, 77 tokens."""
  spec = hs.PRESETS["l14"]
  f4 = hysac_trainer.step_flops(hs._clip_config(spec), spec["seq_len"])
  np.testing.assert_allclose(f4, 701e9, rtol=0.01)
  np.testing.assert_allclose(1.5 * f4, 1052e9, rtol=0.01)
