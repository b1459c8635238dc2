"""TGA training step and trainer on a tiny synthetic LLaVA (float32).

* gradients: each auxiliary term alone reaches the projector; the reference (caption) pass carries no gradient;
  ``torch_parity`` gives total gradient == CE gradient; the step's in-scan masked means equal means over the
  returned hidden states;
* the 8-device sharded step (data 2 x FSDP 2 x model 2) with 2 accumulated micro-batches equals the single-device step on
  one micro-batch (metrics rtol = atol = 1e-5; the SGD update, i.e. the gradient, per leaf 1e-4 of its scale);
* ``python -m vlsafe_jax.train --config configs/tga_synthetic.py:smoke`` on 8 simulated devices: the loss goes
  down; a killed and resumed run ends bit-identical (parameters, metrics.jsonl) to an uninterrupted one; the
  logged rho and decay weights equal tga.md's schedule, re-derived here from the spec.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from vlsafe_jax import sharding
from vlsafe_jax.data import tga_rows, tga_synthetic
from vlsafe_jax.jobs import tga as J
from vlsafe_jax.methods.tga import forward as F
from vlsafe_jax.methods.tga import loss as L
from vlsafe_jax.models.hooks import Hooks
from vlsafe_jax.models.llava import Llava
from vlsafe_jax.train import tga_trainer as T
from vlsafe_jax.train import vlm_base

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
  tok = tga_synthetic.tokenizer()
  cfg = vlm_base.llava_config(tok, image_size=16, patch_size=8, vision_width=16, vision_layers=1, width=24,
                              layers=3, heads=2, kv_heads=1, mlp=40)
  data = tga_synthetic.TGASynthetic(seed=0, n_train=4, n_eval=2, image_size=16)
  rows = data.stage_rows("finetune", J.bag_of_words_retrieve)   # 16 rows: text-only, describe, QA safe, QA hazard
  src = tga_rows.TGASource(rows, tok, cfg, stage="finetune", max_length=56, ref_max_length=36,
                           image_fn=data.image_fn(), template="llava_v1", system=tga_synthetic.SYSTEM)
  recs = [src[i] for i in range(8)]
  batch = {k: np.stack([r[k] for r in recs]) for k in recs[0]}
  return tok, cfg, batch


def _model(cfg, seed=0):
  return Llava(cfg, rngs=nnx.Rngs(seed))


def _jb(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_batch_has_all_row_kinds(tiny):
  _, cfg, batch = tiny
  assert batch["aux_weight"].sum() == 6 and batch["has_image"].sum() == 6      # 2 text-only rows
  assert np.all(batch["image_mask"].sum(1)[batch["has_image"] > 0] == cfg.num_image_tokens)


def _grads_by_term(model, batch, lcfg):
  """One jitted forward, then one VJP per term: projector gradients of align, pairwise, ce and the total."""
  graphdef, params, frozen = nnx.split(model, T.trainable_filter("pretrain"), ...)

  @jax.jit
  def f(p):
    def terms(p):
      total, t = F.forward_terms(nnx.merge(graphdef, p, frozen), batch, 0.25, lcfg)
      return jnp.stack([t["align"], t["pairwise"], t["ce"], total])
    out, vjp = jax.vjp(terms, p)
    return out, [vjp(jnp.eye(4)[i])[0] for i in range(4)]
  out, grads = f(params)
  return out, dict(zip(("align", "pairwise", "ce", "total"), grads))


def _max_abs(tree):
  return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))


def test_aux_terms_reach_projector_and_parity_mode(tiny):
  _, cfg, batch = tiny
  model = _model(cfg)
  b = _jb(batch)
  out, g = _grads_by_term(model, b, L.TGALossConfig(layers=(1, 2, 3)))
  assert float(out[0]) > 0 and float(out[1]) > 0
  assert _max_abs(g["align"]) > 0 and _max_abs(g["pairwise"]) > 0 and _max_abs(g["ce"]) > 0
  # torch_parity: same values, auxiliary gradients exactly zero, total gradient == CE gradient.
  p_out, p_g = _grads_by_term(model, b, L.TGALossConfig(layers=(1, 2, 3), mode="torch_parity"))
  np.testing.assert_allclose(np.asarray(p_out), np.asarray(out), rtol=1e-6)
  assert _max_abs(p_g["align"]) == 0.0 and _max_abs(p_g["pairwise"]) == 0.0
  for a, c in zip(jax.tree.leaves(p_g["total"]), jax.tree.leaves(p_g["ce"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_reference_pass_has_no_gradient_and_in_scan_means(tiny):
  _, cfg, batch = tiny
  model = _model(cfg, 1)
  b = _jb(batch)
  graphdef, params, frozen = nnx.split(model, T.trainable_filter("finetune"), ...)
  # Each computation is jitted as a whole (as in the trainer): eagerly, every primitive is dispatched and compiled
  # on its own (pytest on this test alone, 2 cores: 48 -> 34 s CPU).
  g = jax.jit(jax.grad(lambda p: F.caption_means(nnx.merge(graphdef, p, frozen), b, (1, 3)).sum()))(params)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) == 0.0
  # Reference-pass means (truncated at layer 3, in-scan) == means over the full model's returned hidden states.
  c = jax.jit(lambda p: F.caption_means(nnx.merge(graphdef, p, frozen), b, (1, 3)))(params)
  ex = jax.jit(lambda p: nnx.merge(graphdef, p, frozen).language_model(
      b["ref_ids"], attention_mask_bt=b["ref_attention_mask"], hooks=Hooks(output_hidden_states=True))[2])(params)
  for j, k in enumerate((1, 3)):
    want = L.masked_mean(ex["hidden_states"][k], b["caption_mask"])
    np.testing.assert_allclose(np.asarray(c[:, j]), np.asarray(want), rtol=TOL, atol=TOL)
  # Image means of the training pass (per-row scatter) == means over returned hidden states.
  def image_pass(p):
    m = nnx.merge(graphdef, p, frozen)
    x = F.embed_rows(m, b["input_ids"], b["pixels"])
    return m.language_model(inputs_embeds_btd=x, attention_mask_bt=b["attention_mask"],
                            hooks=Hooks(output_hidden_states=True, hidden_masks_bmt=b["image_mask"][:, None]))[2]
  ex2 = jax.jit(image_pass)(params)
  np.testing.assert_allclose(np.asarray(ex2["hidden_masked_means"][:, 1, 0]),
                             np.asarray(L.masked_mean(ex2["hidden_states"][2], b["image_mask"])), rtol=TOL, atol=TOL)


def _optim():
  return ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                        schedule="warmup_cosine", warmup_steps=1))


def _one_step(cfg, batch, mesh, accum=1, stage="finetune"):
  model = _model(cfg, 2)
  with jax.set_mesh(mesh):
    setup = T.build_stage(model, stage, loss_cfg=L.TGALossConfig(layers=(1, 2)), optim=_optim(), total_steps=4,
                          mesh=mesh, accum=accum)
    params0 = jax.device_get(setup.state["params"])
    state, metrics = setup.step_fn(setup.state, setup.frozen, sharding.shard_batch(batch, mesh),
                                   jax.random.key(0))
  return params0, jax.device_get(state["params"]), jax.device_get(metrics)


# 8 devices with 2 accumulated micro-batches vs 1 device on the whole batch: the same sums in another order
# (per-shard partials, a cross-device reduction, two micro-batch halves), so float32 results differ in the last bits
# (u = 2^-24 = 6e-8). Tolerances, derived rather than fitted:
# - the metrics are O(1) means over <= 8 x 56 tokens and a few hundred hidden units (n ~ 1e3-1e4 summands): n u
#   ~ 1e-4 worst case, ~sqrt(n) u ~ 1e-6 typical; TOL = 1e-5 (rtol and atol).
# - the update: with plain SGD (lr 1, constant) it is exactly -gradient, so parameters are compared as gradients,
#   per leaf relative to the leaf's largest element (an element near zero has no meaningful relative error):
#   GRAD_RTOL = 1e-4, n u with n ~ 1e3 summands on the longest path, plus the rounding of p + update (2 u |p|).
#   AdamW would divide each element by its own RMS, so reduction-order noise in a near-zero gradient would become
#   an O(lr) difference: that is why the trainer's AdamW is swapped for SGD here.
GRAD_RTOL = 1e-4


def test_sharded_accumulated_step_equals_single_device(tiny, monkeypatch):
  _, cfg, batch = tiny
  monkeypatch.setattr(T.common, "make_optimizer", lambda optim, total_steps, wd_mask=None: (
      optax.sgd(optax.constant_schedule(1.0)), optax.constant_schedule(1.0)))
  p0, p1, m1 = _one_step(cfg, batch, sharding.make_mesh(data=1, devices=jax.devices()[:1]))
  # 8 devices (data 2 x fsdp 2 x model 2: batch split, parameters FSDP- and tensor-sharded) with 2 accumulated
  # micro-batches. _split_micro puts rows {2i + a} in micro-batch a, so repeating every row twice makes each
  # micro-batch exactly `batch`: the accumulated mean of the two equal micro-batch gradients equals the
  # single-device full-batch gradient.
  doubled = {k: np.repeat(v, 2, axis=0) for k, v in batch.items()}
  _, p8, m8 = _one_step(cfg, doubled, sharding.make_mesh(data=2, fsdp=2, model=2), accum=2)
  for k in ("loss", "ce", "align", "pairwise", "cos_vc_l2", "grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=TOL, atol=TOL, err_msg=k)
  assert m1["align"] > 0 and m1["pairwise"] > 0 and m1["rho"] == 0.0
  flat = jax.tree_util.tree_flatten_with_path(p0)[0]
  for (path, x0), x1, x8 in zip(flat, jax.tree.leaves(p1), jax.tree.leaves(p8)):
    x0 = np.asarray(x0, np.float64)
    g1, g8 = x0 - np.asarray(x1, np.float64), x0 - np.asarray(x8, np.float64)     # SGD, lr 1: the gradients
    scale = np.abs(g1).max()
    assert scale > 0, jax.tree_util.keystr(path)
    tol = GRAD_RTOL * scale + 2 * 2.0 ** -24 * np.abs(x0).max()
    assert np.abs(g8 - g1).max() <= tol, (jax.tree_util.keystr(path), np.abs(g8 - g1).max(), tol)


CONFIG = str(Path(__file__).parents[2] / "configs" / "tga_synthetic.py") + ":smoke"
STEPS = 8                   # a power of 2: rho = k / STEPS is exact in float32, so it is compared with ==
TIMING = ("examples_per_s", "examples_per_s_per_device", "mfu", "timed_steps")


def _smoke_cfg(base_dir, *extra):
  from vlsafe_jax import config as config_lib
  return config_lib.load(CONFIG, ["variants=('tga',)", "stages=('finetune',)", "evaluate=False",
                                  f"tga.finetune.steps={STEPS}", "tga.finetune.optim.lr=0.003",
                                  f"data.base_dir={base_dir}", "train.log_every=1", "train.checkpoint_every=2",
                                  *extra])


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory):
  """An untrained smoke-sized base saved where the trainer caches its base, so no run pays for base training."""
  cfg = _smoke_cfg("unused")
  tok = tga_synthetic.tokenizer()
  mcfg = vlm_base.llava_config(tok, image_size=cfg.data.image_size, **dict(cfg.model.dims))
  d = tmp_path_factory.mktemp("tga_base")
  vlm_base.save(Llava(mcfg, rngs=nnx.Rngs(0)), tok, d, {"kind": "test_untrained_base"})
  return d


def _records(work):
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if r.get("stage") == "tga_finetune"]


def _final_params(work):
  from checkpoints_convert.safetensors_io import SafetensorsFile
  f = SafetensorsFile(work / "final" / "tga" / "flax_model.safetensors")
  return {k: f.get(k) for k in f.shapes()}


def test_smoke_run_reduces_loss_and_killed_run_resumes_bit_identically(smoke_base, tmp_path):
  """python -m vlsafe_jax.train --config configs/tga_synthetic.py:smoke (8 simulated devices, 2 accumulated
  micro-batches). A run killed after step 3 (``max_steps_this_run``; latest checkpoint 2, so step 3 is redone
  from the restored data position) and re-run ends with bit-identical parameters and the same metrics.jsonl
  records (timings aside) as an uninterrupted run: same XLA program, same restored state and data, on CPU."""
  from vlsafe_jax.train import common
  J.run(_smoke_cfg(smoke_base), tmp_path / "full")
  with pytest.raises(common.StopAfterSteps):
    J.run(_smoke_cfg(smoke_base, "train.max_steps_this_run=3"), tmp_path / "killed")
  ckpts = sorted(int(p.name) for p in (tmp_path / "killed/checkpoints/tga_finetune").iterdir() if p.name.isdigit())
  assert ckpts[-1] == 2
  J.run(_smoke_cfg(smoke_base), tmp_path / "killed")
  full, resumed = _records(tmp_path / "full"), _records(tmp_path / "killed")
  assert [r["step"] for r in full] == list(range(1, STEPS + 1))
  assert resumed == full
  a, b = _final_params(tmp_path / "full"), _final_params(tmp_path / "killed")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert full[-1]["ce"] < full[0]["ce"] - 0.3, [r["ce"] for r in full]
  assert all(k in full[0] for k in ("align", "pairwise", "rho", "cos_vc_l1", "cos_rc_l2", "lr", "token_acc"))
  # tga.md §4: rho = global_step / max_steps, global_step = updates completed before this one, so the record of
  # step s has rho = (s - 1) / STEPS; L_al's weight is w_al (1 - rho)^1 and L_pw's w_pw (1 - rho)^2 (tga.md §4.2
  # defaults 1/4 and 1/10). Written from the spec, in float64.
  w_al, w_pw = 0.25, 0.1
  for r in full:
    rho = (r["step"] - 1) / STEPS
    assert r["rho"] == rho, (r["step"], r["rho"])
    assert r["w_align"] == w_al * (1 - rho), (r["step"], r["w_align"])      # exact: a power-of-2 scaling of k/8
    # float32 (0.1 is not representable; the product rounds once): within 4 float32 ulps.
    np.testing.assert_allclose(r["w_pairwise"], w_pw * (1 - rho) ** 2, rtol=4 * 2.0 ** -24, atol=0)
    # The logged terms are those weights times the logged raw sums (means over 2 micro-batches: rounding only).
    np.testing.assert_allclose(r["align"], r["w_align"] * r["align_raw"], rtol=1e-6)
    np.testing.assert_allclose(r["pairwise"], r["w_pairwise"] * r["pairwise_raw"], rtol=1e-6)
