"""Tests for the synthetic safe/unsafe benchmark (vlsafe_jax.data.synthetic)."""
import hashlib
import itertools
import subprocess
import sys

import numpy as np
import pytest

from vlsafe_jax.data import images, synthetic, visu
from vlsafe_jax.train import clip_trainer

N_SMALL = 21  # 3 full cycles of the 7 categories


def _digest(src, n):
  h = hashlib.sha256()
  for i in range(n):
    rec = src[i]
    h.update(rec["safe_image"].tobytes())
    h.update(rec["unsafe_image"].tobytes())
    h.update((rec["safe_caption"] + "|" + rec["unsafe_caption"] + "|" + rec["tag"]).encode())
  return h.hexdigest()


def test_deterministic_across_calls_orders_and_processes():
  a = synthetic.SyntheticQuadruplets("train", size=50, seed=7)
  b = synthetic.SyntheticQuadruplets("train", size=50, seed=7)
  # Item i is a pure function of (seed, split, i): reading in a different order changes nothing.
  rev = {i: b[i] for i in reversed(range(10))}
  for i in range(10):
    np.testing.assert_array_equal(a[i]["unsafe_image"], rev[i]["unsafe_image"])
    assert a[i]["unsafe_caption"] == rev[i]["unsafe_caption"]
  code = ("from vlsafe_jax.data import synthetic as s; import tests.data.test_synthetic as t; "
          "print(t._digest(s.SyntheticQuadruplets('train', size=50, seed=7), 10))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
  assert out.stdout.strip().splitlines()[-1] == _digest(a, 10)
  assert _digest(synthetic.SyntheticQuadruplets("train", size=50, seed=8), 10) != _digest(a, 10)


def test_splits_are_disjoint():
  train = synthetic.SyntheticQuadruplets("train", size=40)
  val = synthetic.SyntheticQuadruplets("val", size=40)
  test = synthetic.SyntheticQuadruplets("test", size=40)
  seen = {}
  for name, src in (("train", train), ("val", val), ("test", test)):
    for i in range(len(src)):
      key = src[i]["safe_image"].tobytes()
      assert key not in seen, f"{name}[{i}] repeats {seen[key]}"
      seen[key] = (name, i)
  assert (len(train), len(val), len(test)) == (40, 40, 40)
  assert len(synthetic.SyntheticQuadruplets("train")) == synthetic.DEFAULT_SPLIT_SIZES["train"]


def test_shapes_dtypes_and_bad_arguments():
  src = synthetic.SyntheticQuadruplets("val", size=5, image_size=23)
  rec = src[4]
  for f in ("safe_image", "unsafe_image"):
    assert rec[f].shape == (23, 23, 3) and rec[f].dtype == np.uint8
  assert isinstance(rec["safe_caption"], str) and rec["index"] == 4
  with pytest.raises(IndexError, match="out of range"):
    src[5]
  with pytest.raises(ValueError, match="unknown split"):
    synthetic.SyntheticQuadruplets("dev")


def test_every_category_present_with_its_own_motif():
  src = synthetic.SyntheticQuadruplets("train", size=N_SMALL)
  tags = [src[i]["tag"] for i in range(N_SMALL)]
  assert set(tags) == set(synthetic.CATEGORIES)
  # Motifs differ pairwise: compare alpha-weighted colour of each category's pattern on the same patch.
  feats = {}
  for c in synthetic.CATEGORIES:
    alpha, rgb = synthetic.motif_pattern(c, 16, np.random.default_rng(0))
    feats[c] = np.concatenate([alpha.ravel(), (alpha[..., None] * rgb / 255.0).ravel()])
  for c1, c2 in itertools.combinations(synthetic.CATEGORIES, 2):
    assert np.abs(feats[c1] - feats[c2]).mean() > 0.05, (c1, c2)
  # Each item's changed pixels carry its category's palette: nearest-centroid classification of the changed
  # region's mean colour against the 7 motif colours recovers the tag for most items (blending with the scene
  # and random intensity blur it; chance is 1/7).
  centroids = {}
  for c in synthetic.CATEGORIES:
    alpha, rgb = synthetic.motif_pattern(c, 16, np.random.default_rng(0))
    centroids[c] = (alpha[..., None] * rgb).sum((0, 1)) / alpha.sum() / 255.0
  src = synthetic.SyntheticQuadruplets("train", size=70)
  hits = 0
  for i in range(70):
    it = src.item(i)
    colour = it["unsafe_image"][it["motif_mask"]].astype(float).mean(0) / 255.0
    hits += min(centroids, key=lambda c: np.linalg.norm(colour - centroids[c])) == it["tag"]
  assert hits >= 56, hits


def test_unsafe_image_differs_only_where_the_motif_is():
  src = synthetic.SyntheticQuadruplets("test", size=N_SMALL)
  fracs = []
  for i in range(N_SMALL):
    it = src.item(i)
    diff = np.any(it["safe_image"] != it["unsafe_image"], axis=-1)
    assert not np.any(diff & ~it["motif_mask"]), f"item {i}: pixels changed outside the motif"
    fracs.append(diff.mean())
    # The motif is a patch, not a pixel: at least 3% of the image (~30 pixels at 32 px) changes.
    assert diff.mean() > 0.03, (i, diff.mean())
  assert np.std(fracs) > 0  # random scale/position


def test_unsafe_caption_is_safe_caption_plus_own_hazard_phrase():
  src = synthetic.SyntheticQuadruplets("train", size=N_SMALL)
  for i in range(N_SMALL):
    rec = src[i]
    assert rec["unsafe_caption"].startswith(rec["safe_caption"] + " ")
    phrase = rec["unsafe_caption"][len(rec["safe_caption"]) + 1:]
    assert phrase in synthetic.HAZARD_PHRASES[rec["tag"]]
    assert rec["tag_id"] == synthetic.CATEGORIES.index(rec["tag"])
  for c1, c2 in itertools.combinations(synthetic.CATEGORIES, 2):
    assert not set(synthetic.HAZARD_PHRASES[c1]) & set(synthetic.HAZARD_PHRASES[c2])


def test_scenes_vary_enough():
  src = synthetic.SyntheticQuadruplets("test", size=300)
  caps = [src[i]["safe_caption"] for i in range(300)]
  assert len(set(caps)) >= 295  # near-unique captions: retrieval is not a lookup of repeated strings
  n_shapes = {c.count(" and ") + sum(c.count(f" {r} ") for r in synthetic.RELATIONS) for c in caps}
  assert n_shapes == {0, 1, 2}


def test_tokenizer_round_trip_and_eos_is_max_id():
  tok = synthetic.SyntheticTokenizer()
  assert tok.eos_token_id == tok.vocab_size - 1 and tok.eos_token_id != 2
  src = synthetic.SyntheticQuadruplets("train", size=200)
  texts = [src[i][f] for i in range(200) for f in ("safe_caption", "unsafe_caption")]
  assert tok.lengths(texts).max() <= synthetic.max_caption_tokens() <= tok.max_length
  ids, mask = tok(texts)
  assert ids.shape == mask.shape == (400, tok.max_length) and ids.dtype == np.int32
  assert not np.any(ids == tok.unk_token_id)
  # EOS is both the argmax of ids (CLIP's legacy rule) and the last unmasked position.
  np.testing.assert_array_equal(ids.argmax(-1), mask.sum(-1) - 1)
  np.testing.assert_array_equal(ids[np.arange(400), mask.sum(-1) - 1], tok.eos_token_id)
  assert np.all(ids[:, 0] == tok.bos_token_id) and np.all(ids[mask == 0] == tok.pad_token_id)
  assert [tok.decode(r) for r in ids] == texts
  # Truncation keeps EOS last.
  short = synthetic.SyntheticTokenizer(max_length=5)
  ids5, _ = short([texts[1]])
  assert ids5[0, -1] == short.eos_token_id and short.decode(ids5[0]) == " ".join(texts[1].split()[:3])
  zs = synthetic.ZeroShotShapes(size=12)
  zids, _ = tok(zs.prompts())
  assert not np.any(zids == tok.unk_token_id)
  cfg = clip_trainer.synthetic_clip_sizes(image_size=32)
  assert cfg["vocab_size"] == tok.vocab_size and cfg["eos_token_id"] == tok.eos_token_id


def test_zero_shot_split():
  zs = synthetic.ZeroShotShapes(size=12, image_size=24)
  labels = [zs[i]["label"] for i in range(12)]
  assert sorted(set(labels)) == list(range(len(zs.class_names)))
  assert zs[0]["image"].shape == (24, 24, 3)
  # default split: the label is the background, prompts use the captions' phrasing "... on a <bg> background"
  assert zs.class_names == tuple(synthetic.BACKGROUNDS)
  assert zs.prompts() == [f"a picture of a {b} background" for b in synthetic.BACKGROUNDS]
  bg_rgb = np.array(list(synthetic.BACKGROUNDS.values()), np.float32)
  for i in range(12):
    img = zs[i]["image"].astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])   # shapes rarely reach the border
    nearest = np.argmin(np.linalg.norm(np.median(border, 0)[None] - bg_rgb, axis=1))
    assert nearest == zs[i]["label"], i
  np.testing.assert_array_equal(synthetic.ZeroShotShapes(size=12, image_size=24)[5]["image"], zs[5]["image"])
  kind = synthetic.ZeroShotShapes(size=12, image_size=24, attribute="kind")
  assert kind.class_names == synthetic.SHAPE_KINDS and kind.prompts()[0] == "a photo of a circle."
  assert [kind[i]["label"] for i in range(6)] == list(range(6))
  with pytest.raises(ValueError, match="unknown attribute 'colour'"):
    synthetic.ZeroShotShapes(attribute="colour")


def test_written_split_reads_back_identically(tmp_path):
  src = synthetic.SyntheticQuadruplets("val", size=9, seed=3)
  manifest = synthetic.write_plain(src, tmp_path)
  plain = visu.PlainQuadruplets(manifest)
  assert len(plain) == 9 and plain.num_skipped == 0
  transform = synthetic.default_transform()
  for i in range(9):
    a, b = src[i], plain[i]
    for f in ("safe_image", "unsafe_image"):
      np.testing.assert_array_equal(images.to_rgb_array(b[f]), a[f])
    for f in ("safe_caption", "unsafe_caption", "tag"):
      assert a[f] == b[f]
    ta, tb = transform(a), transform(b)
    for k in ("safe_image", "unsafe_image", "safe_ids", "unsafe_ids"):
      np.testing.assert_array_equal(ta[k], tb[k])
    assert plain.tag_names[tb["tag"]] == a["tag"]
  # The transform normalises with CLIP mean/std: undoing it recovers the uint8 pixels.
  px = ta["safe_image"] * np.array(images.CLIP_STD) + np.array(images.CLIP_MEAN)
  np.testing.assert_allclose(px * 255.0, src[8]["safe_image"], atol=1e-3)


def test_rewrite_variant_is_visu_like_and_keeps_the_safe_half():
  patch = synthetic.SyntheticQuadruplets("train", 60, seed=4)
  rewrite = synthetic.SyntheticQuadruplets("train", 60, seed=4, unsafe_variant="rewrite")
  assert "rewrite" in repr(rewrite)
  tok = synthetic.SyntheticTokenizer(synthetic.max_caption_tokens())
  not_suffix = dropped = 0
  for i in range(60):
    p, r = patch.item(i), rewrite.item(i)
    # The safe half and the tag are those of the "patch" variant (its own random stream).
    assert p["safe_caption"] == r["safe_caption"] and p["tag"] == r["tag"]
    np.testing.assert_array_equal(p["safe_image"], r["safe_image"])
    phrase = p["unsafe_caption"][len(p["safe_caption"]) + 1:]
    assert phrase in r["unsafe_caption"], (i, r["unsafe_caption"])
    not_suffix += not r["unsafe_caption"].startswith(r["safe_caption"])
    shapes, background, _ = r["scene"]
    dropped += len(shapes) == 3 and r["unsafe_caption"].count(" and a ") == 0
    assert f"{background} background" in r["unsafe_caption"]
    tok([r["unsafe_caption"]])  # every word is in the vocabulary and fits the context
    # I* is a new rendering: it differs from I outside the motif's pixels (the patch variant never does).
    outside = ~r["motif_mask"]
    assert np.abs(r["unsafe_image"].astype(int) - r["safe_image"].astype(int))[outside].mean() > 3.0
  assert not_suffix >= 20 and dropped >= 3, (not_suffix, dropped)
  with pytest.raises(ValueError, match="unsafe_variant"):
    synthetic.SyntheticQuadruplets("train", 4, unsafe_variant="suffix")


def test_motif_scale_sets_how_much_of_the_unsafe_image_the_hazard_covers():
  default = synthetic.SyntheticQuadruplets("train", 14, seed=2)
  explicit = synthetic.SyntheticQuadruplets("train", 14, seed=2, motif_scale=synthetic.DEFAULT_MOTIF_SCALE)
  assert _digest(default, 14) == _digest(explicit, 14)   # the default items are those of earlier versions
  whole = synthetic.SyntheticQuadruplets("train", 14, seed=2, motif_scale=(1.0, 1.0))
  assert "motif_scale=(1.0, 1.0)" in repr(whole)
  for i in range(14):
    d, w = default.item(i), whole.item(i)
    assert d["safe_caption"] == w["safe_caption"] and d["unsafe_caption"] == w["unsafe_caption"]
    np.testing.assert_array_equal(d["safe_image"], w["safe_image"])
    assert d["motif_mask"].mean() <= 0.55 ** 2 + 1e-6
    if w["tag"] in ("hate", "harassment", "shocking"):   # textures with alpha > 0 on the whole patch
      assert w["motif_mask"].all(), (i, w["tag"])
  for bad in ((0.0, 0.5), (0.6, 0.5), (0.5, 1.2)):
    with pytest.raises(ValueError, match="motif_scale"):
      synthetic.SyntheticQuadruplets("train", 4, motif_scale=bad)
