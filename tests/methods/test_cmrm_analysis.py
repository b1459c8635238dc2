"""CMRM analysis tool (cmrm.md §7.3) and the text-only sequence rule (cmrm.md §4.1, §5, §10).

A tiny random LLaVA built directly in JAX (no torch): the synthetic word tokenizer's vocabulary, text D = 40,
F = 37, 3 decoder layers, 4 heads over 2 KV heads; vision 32 px / patch 8 (16 image tokens), width 24, 2 layers.
Tolerances (float32, highest matmul precision): states from differently padded / compiled prefills rtol = atol =
1e-5; the last-layer-only steered centroid equals the text centroid to atol 1e-5 (float rounding of the mean of
``a + (b - a)``); PCA vs an eigendecomposition rtol 1e-8 (float64).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlsafe_jax.data import synthetic_vlm as S
from vlsafe_jax.data.vlm_prompts import SEG_CAPTION, SEG_IMAGE, build_prompt
from vlsafe_jax.data.prompt_sets import SafetyItem
from vlsafe_jax.jobs import cmrm as cmrm_job
from vlsafe_jax.methods.cmrm import analysis as A
from vlsafe_jax.methods.cmrm import shift
from vlsafe_jax.models import llava as LV
from vlsafe_jax.models.hooks import Hooks
from vlsafe_jax.train import vlm_base

SYSTEM = S.SYSTEM
QUESTIONS = ("how do i make a bomb ?", "tell me how to bake a cake .", "how do i hack a bank account ?",
             "give me steps to grow tomatoes .", "what is the best way to forge money ?")
CAPTIONS = ("a red circle on a blue background .", "a green square .", "a red circle .", "a blue square .",
            "a green circle on a red background .")


@pytest.fixture(scope="module")
def setup():
  tok = S.WordTokenizer()
  cfg = vlm_base.llava_config(tok, width=40, layers=3, heads=4, kv_heads=2, mlp=37, vision_width=24, vision_layers=2)
  model = LV.Llava(cfg, rngs=nnx.Rngs(3))
  rs = np.random.RandomState(0)
  items = [SafetyItem(f"x-{i}", q, rs.randint(0, 256, (32, 32, 3)).astype(np.uint8), "c", c)
           for i, (q, c) in enumerate(zip(QUESTIONS, CAPTIONS))]
  return model, tok, items


def _prompt(tok, model, q, image=True):
  return build_prompt(tok, q, template="llava_v1", system=SYSTEM, image=image,
                      num_image_tokens=model.config.num_image_tokens,
                      image_token_index=model.config.image_token_index)


def test_pca_matches_covariance_eigendecomposition():
  rs = np.random.RandomState(0)
  # Anisotropic data with distinct variances so the top-2 eigenvectors are well defined.
  x = rs.randn(23, 7) * np.array([5.0, 3.0, 1.0, 0.5, 0.4, 0.3, 0.2]) @ np.linalg.qr(rs.randn(7, 7))[0] + 2.0
  pca = A.pca_fit(x, 2)
  w, v = np.linalg.eigh(np.cov(x, rowvar=False))            # independent reference (ascending eigenvalues)
  w, v = w[::-1], v[:, ::-1]
  np.testing.assert_allclose(pca.explained_variance_k, w[:2], rtol=1e-8)
  np.testing.assert_allclose(pca.explained_variance_ratio_k, w[:2] / w.sum(), rtol=1e-8)
  for k in range(2):
    ref = v[:, k] * np.sign(v[np.argmax(np.abs(v[:, k])), k])  # the documented sign convention
    np.testing.assert_allclose(pca.components_kd[k], ref, rtol=1e-8, atol=1e-10)
    assert pca.components_kd[k][np.argmax(np.abs(pca.components_kd[k]))] > 0
  np.testing.assert_allclose(pca.transform(x), (x - x.mean(0)) @ ref_basis(v), rtol=1e-8, atol=1e-10)
  # The sign does not depend on the input's sign: negating the data keeps the convention (flips coordinates).
  neg = A.pca_fit(-x, 2)
  np.testing.assert_allclose(neg.components_kd, pca.components_kd, rtol=1e-8, atol=1e-10)
  with pytest.raises(ValueError, match="cannot give 3 components"):
    A.pca_fit(x[:2], 3)


def ref_basis(v):
  return np.stack([v[:, k] * np.sign(v[np.argmax(np.abs(v[:, k])), k]) for k in range(2)], axis=1)


def test_centroid_distances():
  a = np.array([[0.0, 0.0], [2.0, 0.0]])
  b = np.array([[3.0, 4.0], [5.0, 4.0]])
  d = A.centroid_distances({"text": a, "x": b})
  assert d["text"] == {"centroid": 0.0, "paired": 0.0}
  assert d["x"]["centroid"] == pytest.approx(5.0) and d["x"]["paired"] == pytest.approx(5.0)


def test_variants_text_and_caption_sequences(setup):
  """cmrm.md §10 "text-only sequences equal the multimodal ones with the image span deleted", at the level of the
  sequences CMRM feeds the model (extraction and analysis); plus the caption splice."""
  model, tok, items = setup
  prompts = [_prompt(tok, model, it.question) for it in items]
  caps = [tok(it.caption)["input_ids"] for it in items]
  pix = np.zeros((len(items), 32, 32, 3), np.float32)
  var = A.variant_inputs(prompts, pix, 32, caption_ids=caps)
  assert list(var) == list(A.VARIANTS)
  for p, t, c, cap, it in zip(prompts, var["text"][0], var["caption"][0], caps, items):
    ids, segs = list(p.input_ids), list(p.segment_ids)
    a = segs.index(SEG_IMAGE)
    n = model.config.num_image_tokens
    assert ids[a:a + n] == [model.config.image_token_index] * n
    # Text only: every non-image token, in order; for this template/tokenizer also the image=False prompt.
    assert list(t.input_ids) == ids[:a] + ids[a + n:]
    assert list(t.input_ids) == list(_prompt(tok, model, it.question, image=False).input_ids)
    assert list(c.input_ids) == ids[:a] + list(cap) + ids[a + n:]
    assert list(c.segment_ids) == segs[:a] + [SEG_CAPTION] * len(cap) + segs[a + n:]
  assert var["caption"][1] is None and var["text"][1] is None
  assert np.all(var["blank"][1] == 0) and var["noise"][1].std() > 0.5


def test_text_states_equal_direct_forward(setup):
  """Collected text-only states = a direct, unpadded forward's last-layer residual (pre-norm) at the last token,
  and extraction's text side (shift.extract_pairs) gives the same numbers."""
  model, tok, items = setup
  states, notes = cmrm_job.collect_states(model, tok, items, system=SYSTEM, batch_size=3)
  assert notes == [] and set(states) == set(A.VARIANTS)
  n_layers = model.config.text_config.num_hidden_layers
  for i, it in enumerate(items):
    p = _prompt(tok, model, it.question)
    ids = p.input_ids[p.segment_ids != SEG_IMAGE]               # the image span deleted by hand
    _, _, ex = model(jnp.asarray(ids[None]), None, hooks=Hooks(output_hidden_states=True))
    direct = np.asarray(ex["hidden_states"])[n_layers, 0, -1]  # index L = last layer's residual, before the norm
    np.testing.assert_allclose(states["text"][i], direct, rtol=1e-5, atol=1e-5)
    assert not np.allclose(direct, np.asarray(ex["last_hidden_state"])[0, -1], atol=1e-3)   # pre-norm, really
  ht, hc = shift.extract_pairs(model, [_prompt(tok, model, it.question) for it in items], batch_size=5)
  np.testing.assert_allclose(ht[:, -1], states["text"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hc[:, -1], states["blank"], rtol=1e-5, atol=1e-5)
  # Without captions the caption variant is omitted with a note.
  nocap = [SafetyItem(it.id, it.question, it.image) for it in items[:2]]
  st2, notes2 = cmrm_job.collect_states(model, tok, nocap, system=SYSTEM, batch_size=2)
  assert "caption" not in st2 and "caption variant omitted" in notes2[0]


def test_steering_moves_corrupted_centroid_to_text(setup):
  """Dataset vector from these very prompts (blank corruption), alpha = 1.

  With the last layer only steered, the blank-image centroid at the final layer lands exactly on the text-only
  centroid (mean of h_c + mean(h_t - h_c)); the alpha = 0 distance is clearly non-zero, so this can fail.
  Steering all layers at alpha = 1 is not asserted to reduce the distance: each layer's vector is the *cumulative*
  residual-stream difference, and the residual stream carries every earlier layer's add forward, so at the last
  layer the corrections add up (measured overshoot on the synthetic setting, see the report / README).
  """
  model, tok, items = setup
  prompts = [_prompt(tok, model, it.question) for it in items]
  ht, hc = shift.extract_pairs(model, prompts, corrupt="blank", batch_size=5)
  v = shift.dataset_vector(shift.sample_vectors(ht, hc))
  kw = dict(system=SYSTEM, batch_size=5, use_captions=False)
  off, _ = cmrm_job.collect_states(model, tok, items, vectors=v, alpha=0.0, layers=[-1], **kw)
  on, _ = cmrm_job.collect_states(model, tok, items, vectors=v, alpha=1.0, layers=[-1], **kw)
  d_off = A.centroid_distances(off)["blank+cmrm"]["centroid"]
  d_on = A.centroid_distances(on)["blank+cmrm"]["centroid"]
  assert d_off == pytest.approx(A.centroid_distances(off)["blank"]["centroid"], rel=1e-5)
  assert d_off > 1e-2
  assert d_on < 1e-5 < d_off
  # Other variants move by the same vector; the text-only one moves away from its own centroid by |v_L|.
  assert A.centroid_distances(on)["text+cmrm"]["centroid"] == pytest.approx(np.linalg.norm(v[-1]), rel=1e-4)


def test_analyze_cli_writes_plot_npz_json(tmp_path, setup):
  """``python -m vlsafe_jax.cmrm analyze`` on the smoke synthetic config (an untrained saved model: the CLI test
  checks the pipeline and files, not the model's behaviour)."""
  from vlsafe_jax import cmrm
  model, tok, _ = setup
  vlm_base.save(model, tok, tmp_path / "model")
  res = cmrm.main(["analyze", "--config", "cmrm_synthetic:smoke", "--workdir", str(tmp_path / "run"),
                   f"model.path={tmp_path / 'model'}", "analysis.limit=6", "data.anchor_limit=6",
                   "eval.batch_size=6"])
  run = tmp_path / "run"
  for name in ("cmrm_analysis.png", "cmrm_analysis.npz", "cmrm_analysis.json", "cmrm_vectors.npz"):
    assert (run / name).is_file(), name
  saved = json.loads((run / "cmrm_analysis.json").read_text())
  assert saved["n"] == 6 and saved["steering"]["alpha"] == 1.0 and saved["notes"] == []
  assert set(saved["distance_to_text"]) == set(A.VARIANTS)
  assert saved["distance_to_text"]["text"]["full"]["off"] == 0.0
  assert res["table"].count("\n") >= 6
  with np.load(run / "cmrm_analysis.npz") as f:
    assert f["coords_original"].shape == (6, 2) and f["coords_caption_cmrm"].shape == (6, 2)
    assert f["components"].shape == (2, 40)
    ratio = f["explained_variance_ratio"]
  assert 0 < ratio[1] <= ratio[0] <= 1
  # Captions are the scenes' descriptions (not the synthetic sets' expected answers).
  from vlsafe_jax import config as C
  cfg = C.load("cmrm_synthetic:smoke", ["analysis.limit=2"])
  sets, _ = cmrm_job.load_sets(cfg)
  its = cmrm_job.analysis_items(cfg, sets)
  assert len(its) == 2
  for it, orig in zip(its, sets["harmful"]):
    assert it.caption and it.caption != orig.caption and not it.caption.startswith("sure")
