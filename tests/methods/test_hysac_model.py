"""HySAC model: trainable set, L/14 LoRA count, float32 lifting with clamped scalars, root distance, scores,
trainable-state files (hysac.md §2, §4.2, §7)."""
import re
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlsafe_jax.geometry import lorentz
from vlsafe_jax.methods.hysac import model as H
from vlsafe_jax.methods.hysac import scalars as S
from vlsafe_jax.models import clip as C
from vlsafe_jax.models import lora as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from _clip_configs import L14, TINY  # noqa: E402

OPTS = H.HySACOptions(lora_rank=3, lora_dropout=0.0)


def _model(seed=0, options=OPTS, dtype=jnp.float32, lora_seed=None):
  m = H.HySAC.from_clip(C.CLIP(TINY, dtype=dtype, rngs=nnx.Rngs(seed)), options,
                        seed=seed if lora_seed is None else lora_seed)
  m.eval()
  return m


def _inputs(b=3):
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.normal(size=(b, 10, 10, 3)), jnp.float32)
  ids = rng.integers(1, 50, size=(b, 7))
  ids[:, -1] = 52
  return pixels, jnp.asarray(ids, jnp.int32)


def test_l14_lora_count_and_scalars():
  abstract = H.abstract_hysac(L14)
  assert H.trainable_param_count(abstract) == {"lora": 8_676_544, "scalars": 4}
  # Exactly LoRA + the four scalars are trainable; alpha init uses embed_dim 768.
  names = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(abstract, H.TRAINABLE))}
  assert names == {"lora_a", "lora_b", *S.SCALAR_NAMES}


def test_frozen_scalars_are_not_trainable():
  m = _model(options=H.HySACOptions(lora_rank=3, learn_curv=False, freeze_logit_scale=True))
  names = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(m, H.TRAINABLE))}
  assert "curv" not in names and "logit_scale" not in names
  assert float(m.logit_scale()) == pytest.approx(np.exp(S.LOGIT_SCALE_MAX), rel=1e-6)


def test_wd_mask_excludes_scalars():
  m = _model()
  mask = H.trainable_mask_wd(nnx.state(m, H.TRAINABLE))
  assert mask["scalars"] == {n: False for n in S.SCALAR_NAMES}
  lora_leaves = jax.tree.leaves(mask["clip"])
  assert lora_leaves and all(lora_leaves)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_encode_is_lift_of_clip_features_in_float32(dtype):
  m = _model(dtype=dtype)
  # Out-of-range scalars are clamped by clamp_scalars_ (as after loading).
  m.scalars.curv[...] = jnp.float32(5.0)
  m.scalars.visual_alpha[...] = jnp.float32(0.7)
  m.clamp_scalars_()
  assert float(m.curvature()) == pytest.approx(10.0, rel=1e-6)
  pixels, ids = _inputs()
  x = m.encode_image(pixels)
  t = m.encode_text(ids)
  chex.assert_type([x, t], jnp.float32)
  chex.assert_shape([x, t], (3, 11))
  f = m.clip.encode_image(pixels).astype(jnp.float32)
  expect = lorentz.exp_map0(1.0 * f, 10.0)   # alpha clamped to exp(0) = 1
  np.testing.assert_allclose(np.asarray(x), np.asarray(expect), rtol=1e-6, atol=1e-7)
  ft = m.clip.encode_text(ids).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(t), np.asarray(lorentz.exp_map0(ft * np.exp(-0.5 * np.log(11)), 10.0)),
                             rtol=1e-5, atol=1e-7)


def test_root_distance_matches_geometry():
  rng = np.random.default_rng(1)
  # Below exp_map0's cap (sqrt(c) ||v|| < asinh(2^15) = 11.09).
  v = rng.normal(size=(5, 7)) * np.array([[0.1], [0.5], [1.0], [1.5], [2.0]])
  assert np.sqrt(2.0) * np.linalg.norm(v, axis=-1).max() < 11.0
  for c in (0.3, 1.0, 2.0):
    x = lorentz.exp_map0(jnp.asarray(v), c)
    d = H.root_distance(x, c)
    # Geodesic distance of exp0(v) from the root is ||v||; and equals ||log0(x)||.
    np.testing.assert_allclose(np.asarray(d), np.linalg.norm(v, axis=-1), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(d), np.linalg.norm(np.asarray(lorentz.log_map0(x, c)), axis=-1),
                               rtol=2e-4)


def test_scores_inner_and_neg_dist_rank_alike():
  rng = np.random.default_rng(2)
  q = lorentz.exp_map0(jnp.asarray(rng.normal(size=(6, 5))), 2.0)
  g = lorentz.exp_map0(jnp.asarray(rng.normal(size=(13, 5))), 2.0)
  s_in = H.retrieval_scores(q, g, 2.0, "inner")
  s_d = H.retrieval_scores(q, g, 2.0, "neg_dist")
  chex.assert_shape([s_in, s_d], (6, 13))
  np.testing.assert_array_equal(np.argsort(-np.asarray(s_in), 1), np.argsort(-np.asarray(s_d), 1))
  with pytest.raises(ValueError, match="kind"):
    H.retrieval_scores(q, g, 2.0, "cosine")


def test_nsfw_score_is_root_distance():
  m = _model()
  pixels, _ = _inputs()
  x = m.encode_image(pixels)
  np.testing.assert_allclose(np.asarray(m.nsfw_score(x)),
                             np.asarray(lorentz.elementwise_dist(jnp.zeros_like(x), x, m.curvature())),
                             atol=5e-4)


def test_trainable_save_load_roundtrip_and_errors(tmp_path):
  m = _model(seed=0)
  # Make the LoRA B non-zero and move a scalar so a round trip is not trivially the init.
  for site in L.lora_sites(m).values():
    site.lora_b[...] = jnp.full(site.lora_b[...].shape, 0.25, jnp.float32)
  m.scalars.curv[...] = jnp.float32(0.5)
  H.save_trainable(m, tmp_path / "t", base_path="/some/base")
  m2 = _model(seed=0, lora_seed=7)   # same base CLIP, different LoRA init
  H.load_trainable(m2, tmp_path / "t")
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(m, H.TRAINABLE)),
                              nnx.to_pure_dict(nnx.state(m2, H.TRAINABLE)))
  pixels, ids = _inputs()
  np.testing.assert_allclose(np.asarray(m.encode_image(pixels)), np.asarray(m2.encode_image(pixels)), rtol=1e-6)
  # A model with a different LoRA rank does not fit: the error names the tensor and both shapes.
  m3 = _model(options=H.HySACOptions(lora_rank=2))
  with pytest.raises(ValueError, match=r"lora_a: file shape \(\d+, 3\) != model shape \(\d+, 2\)"):
    H.load_trainable(m3, tmp_path / "t")
  with pytest.raises(FileNotFoundError, match="hysac_trainable"):
    H.load_trainable(m3, tmp_path)
  # One NaN in the saved state (a diverged run): the error names the file and the tensor.
  from safetensors.numpy import load_file, save_file
  path = tmp_path / "t" / H.TRAINABLE_FILE
  tensors = load_file(str(path))
  key = sorted(k for k in tensors if k.endswith("lora_b"))[0]
  tensors[key] = tensors[key].copy()
  tensors[key][0, 0] = np.nan
  save_file(tensors, str(path), metadata={"format": H.TRAINABLE_FORMAT})
  with pytest.raises(ValueError, match=rf"{H.TRAINABLE_FILE}: (.|\n)*{re.escape(key)}: 1 NaN/Inf"):
    H.load_trainable(m2, tmp_path / "t")


def test_single_tower_clip_rejected():
  cfg = C.CLIPConfig(text_config=TINY.text_config, vision_config=None, projection_dim=11)
  with pytest.raises(ValueError, match="two-tower"):
    H.HySAC.from_clip(C.CLIP(cfg, rngs=nnx.Rngs(0)))
