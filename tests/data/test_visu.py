"""Tests for the ViSU / plain / calibration readers (vlsafe_jax.data.visu) on tiny fixtures in the released layout."""
import csv
import json
import random

import numpy as np
import pytest
from PIL import Image

from vlsafe_jax.data import synthetic, transform, visu

TOK = synthetic.SyntheticTokenizer(max_length=16)


def _jpeg(path, seed, size=(20, 17)):
  path.parent.mkdir(parents=True, exist_ok=True)
  arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(arr).save(path, quality=95)
  return path


@pytest.fixture()
def visu_tree(tmp_path):
  """COCO ids 1 (train2017), 2 (val2017), 3 (both: train2017 wins); unsafe images relative and absolute."""
  coco = tmp_path / "coco"
  _jpeg(coco / "train2017" / "000000000001.jpg", 1)
  _jpeg(coco / "val2017" / "000000000002.jpg", 2)
  _jpeg(coco / "train2017" / "000000000003.jpg", 3)
  _jpeg(coco / "val2017" / "000000000003.jpg", 4)
  unsafe = tmp_path / "nsfw"
  _jpeg(unsafe / "a.jpg", 5)
  _jpeg(unsafe / "b.jpg", 6)
  absolute = _jpeg(tmp_path / "elsewhere" / "c.png", 7)
  items = {
      "0": {"coco_id": 1, "nsfw_im_path": "a.jpg", "safe": "a red circle", "nsfw": "a red circle with drugs",
            "tag": "illegal activity"},
      "1": {"coco_id": 2, "nsfw_im_path": "b.jpg", "safe": "a blue square", "nsfw": "a blue square with blood",
            "tag": "violence"},
      "2": {"coco_id": 3, "nsfw_im_path": str(absolute), "safe": "a green ring", "nsfw": "a green ring naked",
            "tag": "sexual"},
  }
  return tmp_path, coco, unsafe, items


def _write_json(path, obj):
  path.write_text(json.dumps(obj))
  return path


def test_released_layouts_coco_rule_and_unsafe_paths(visu_tree):
  root, coco, unsafe, items = visu_tree
  wrapped = _write_json(root / "visu_test.json", {"info": {"split": "test"}, "data": items})
  bare = _write_json(root / "bare.json", items)
  a = visu.ViSUQuadruplets(wrapped, coco, unsafe)
  b = visu.ViSUQuadruplets(bare, coco, unsafe)
  assert len(a) == len(b) == 3
  expected_safe = [coco / "train2017" / "000000000001.jpg", coco / "val2017" / "000000000002.jpg",
                   coco / "train2017" / "000000000003.jpg"]
  expected_unsafe = [unsafe / "a.jpg", unsafe / "b.jpg", root / "elsewhere" / "c.png"]
  for i in range(3):
    ra, rb = a[i], b[i]
    assert ra["safe_image"] == rb["safe_image"] == str(expected_safe[i])
    assert ra["unsafe_image"] == str(expected_unsafe[i])
    assert ra["safe_caption"] == items[str(i)]["safe"] and ra["unsafe_caption"] == items[str(i)]["nsfw"]
    assert a.tag_names[ra["tag_id"]] == items[str(i)]["tag"] and ra["key"] == str(i)
  assert a.tag_names == ("illegal activity", "sexual", "violence")
  # Decode + tokenise through the transform (what grain workers run).
  t = transform.QuadrupletTransform(TOK, image_size=20)
  out = t(a[1])
  assert out["safe_image"].shape == (20, 20, 3) and out["safe_image"].dtype == np.float32
  np.testing.assert_array_equal(out["safe_ids"], TOK(["a blue square"])[0][0])
  np.testing.assert_array_equal(out["unsafe_ids"], TOK(["a blue square with blood"])[0][0])
  assert out["tag"] == a.tag_names.index("violence") and out["index"] == 1
  # Text-only reading (ViSU-Text, text calibration) needs no images.
  texts = visu.ViSUQuadruplets(bare, require_images=False)
  assert "safe_image" not in texts[0] and texts[2]["unsafe_caption"] == "a green ring naked"


def test_unsafe_root_defaults_to_json_directory(visu_tree):
  root, coco, unsafe, items = visu_tree
  items = {k: dict(v) for k, v in items.items()}
  items["0"]["nsfw_im_path"] = "nsfw/a.jpg"
  items["1"]["nsfw_im_path"] = "nsfw/b.jpg"
  src = visu.ViSUQuadruplets(_write_json(root / "v.json", items), coco)
  assert src[0]["unsafe_image"] == str(root / "nsfw" / "a.jpg")


def test_plain_jsonl_and_csv_agree(visu_tree):
  root, coco, unsafe, _ = visu_tree
  rows = [{"safe_image": "coco/train2017/000000000001.jpg", "unsafe_image": "nsfw/a.jpg",
           "safe_caption": "a red circle", "unsafe_caption": "a red circle with drugs", "tag": "illegal activity"},
          {"safe_image": "coco/val2017/000000000002.jpg", "unsafe_image": str(unsafe / "b.jpg"),
           "safe_caption": "a blue square", "unsafe_caption": "a blue square with blood"}]
  jl = root / "m.jsonl"
  jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  cs = root / "m.csv"
  with open(cs, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(visu.PLAIN_FIELDS) + ["tag"])
    w.writeheader()
    w.writerows(rows)
  a, b = visu.PlainQuadruplets(jl), visu.PlainQuadruplets(cs)
  assert len(a) == len(b) == 2
  for i in range(2):
    for f in ("safe_image", "unsafe_image", "safe_caption", "unsafe_caption", "tag"):
      assert a[i][f] == b[i][f]
  assert a[0]["safe_image"] == str(root / rows[0]["safe_image"]) and a[1]["tag"] == ""
  assert a[0]["key"] == "line 1" and b[1]["key"] == "row 3"


# ---------------------------------------------------------------------------------------------- bad input


def _bad(root, coco, unsafe, items, **kw):
  return visu.ViSUQuadruplets(_write_json(root / "bad.json", items), coco, unsafe, **kw)


@pytest.mark.parametrize("mutate,field,message", [
    (lambda it: it["1"].pop("coco_id"), "coco_id", "missing coco_id"),
    (lambda it: it["1"].update(coco_id=99), "coco_id", "COCO image 99 not found"),
    (lambda it: it["1"].update(nsfw_im_path="missing.jpg"), "nsfw_im_path", "image not found"),
    (lambda it: it["1"].update(safe="  "), "safe", "empty caption"),
    (lambda it: it["1"].pop("nsfw"), "nsfw", "missing caption"),
])
def test_bad_items_raise_named_errors_or_skip(visu_tree, mutate, field, message):
  root, coco, unsafe, items = visu_tree
  items = {k: dict(v) for k, v in items.items()}
  mutate(items)
  with pytest.raises(visu.DataError, match=message) as e:
    _bad(root, coco, unsafe, items)
  assert "bad.json" in str(e.value) and "item '1'" in str(e.value) and f"field '{field}'" in str(e.value)
  assert (e.value.key, e.value.field) == ("1", field)
  skipped = _bad(root, coco, unsafe, items, on_error="skip")
  assert len(skipped) == 2 and skipped.num_skipped == 1 and skipped.skipped[0][:2] == ("1", field)
  assert [r["key"] for r in skipped] == ["0", "2"]


def test_malformed_json_and_key_layout(visu_tree):
  root, coco, unsafe, items = visu_tree
  text = json.dumps({"data": items}, indent=1)
  broken = root / "broken.json"
  broken.write_text(text.replace('"tag": "violence"', '"tag": violence', 1))
  line = text[:text.index('"tag": "violence"')].count("\n") + 1
  with pytest.raises(visu.DataError, match=rf"broken.json: malformed JSON at line {line} column \d+"):
    visu.ViSUQuadruplets(broken, coco, unsafe, on_error="skip")  # file-level: raises even in skip mode
  gap = {"0": items["0"], "2": items["2"]}
  with pytest.raises(visu.DataError, match=r"contiguous 0\.\.1; missing \[1\]"):
    _bad(root, coco, unsafe, gap)
  with pytest.raises(visu.DataError, match="stringified integers"):
    _bad(root, coco, unsafe, {"0": items["0"], "x": items["1"]})
  with pytest.raises(visu.DataError, match="expected a JSON object"):
    _bad(root, coco, unsafe, [items["0"]])
  jl = root / "bad.jsonl"
  jl.write_text(json.dumps({"a": 1}) + "\n{oops}\n")
  with pytest.raises(visu.DataError, match=r"bad.jsonl, item 'line 2': malformed JSON at line 2 column 2"):
    visu.PlainQuadruplets(jl)


def test_corrupt_image_detected_by_verify_and_by_transform(visu_tree):
  root, coco, unsafe, items = visu_tree
  (unsafe / "b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  src = _bad(root, coco, unsafe, items)  # existence only: construction succeeds
  t = transform.QuadrupletTransform(TOK, image_size=20)
  with pytest.raises(visu.DataError, match=r"item '1', field 'unsafe_image': corrupt or unreadable image"):
    t(src[1])
  with pytest.raises(visu.DataError, match=r"item '1', field 'unsafe_image': corrupt"):
    _bad(root, coco, unsafe, items, verify_images=True)
  skipped = _bad(root, coco, unsafe, items, verify_images=True, on_error="skip")
  assert len(skipped) == 2 and skipped.num_skipped == 1


def test_over_long_captions(visu_tree):
  root, coco, unsafe, items = visu_tree
  items = {k: dict(v) for k, v in items.items()}
  items["2"]["nsfw"] = " ".join(["red"] * 20)
  tok = synthetic.SyntheticTokenizer(max_length=8)
  with pytest.raises(visu.DataError, match=r"item '2', field 'unsafe_caption': caption has 22 tokens"):
    _bad(root, coco, unsafe, items, check_captions=tok)
  assert _bad(root, coco, unsafe, items, check_captions=tok, on_error="skip").num_skipped == 1
  src = _bad(root, coco, unsafe, items)
  with pytest.raises(visu.DataError, match=r"item '2', field 'unsafe_caption': caption has 22 tokens"):
    transform.QuadrupletTransform(tok, image_size=20, on_long_caption="error")(src[2])
  ids = transform.QuadrupletTransform(tok, image_size=20)(src[2])["unsafe_ids"]  # default truncates, EOS last
  assert ids.shape == (8,) and ids[-1] == tok.eos_token_id


def test_calibration_pairs(tmp_path):
  for i in range(6):
    _jpeg(tmp_path / "img" / f"s{i}.png", i)
    _jpeg(tmp_path / "img" / f"u{i}.png", 10 + i)
  rows = [{"safe": f"img/s{i}.png", "unsafe": f"img/u{i}.png", "tag": f"t{i % 2}"} for i in range(6)]
  m = tmp_path / "calib.jsonl"
  m.write_text("\n".join(json.dumps(r) for r in rows))
  pairs = visu.CalibrationPairs(m, n_pairs=4, seed=0)
  order = list(range(6))
  random.Random(0).shuffle(order)
  assert pairs.kind == "image" and len(pairs) == 4
  assert [p["safe_image"] for p in pairs] == [str(tmp_path / f"img/s{i}.png") for i in order[:4]]
  out = transform.QuadrupletTransform(None, image_size=16)(pairs[0])
  assert out["safe_image"].shape == (16, 16, 3) and "safe_ids" not in out
  texts = tmp_path / "text.jsonl"
  texts.write_text("\n".join(json.dumps({"safe": f"a red circle {i}", "unsafe": "with blood"}) for i in range(3)))
  tp = visu.CalibrationPairs(texts)
  assert tp.kind == "text" and [p["safe_caption"] for p in tp] == [f"a red circle {i}" for i in range(3)]
  assert transform.QuadrupletTransform(TOK)(tp[1])["unsafe_ids"].shape == (16,)
