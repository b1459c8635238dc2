"""Prompt sets: readers and writer on a tiny manifest (moved with the code from tests/eval/test_vlm_safety.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from vlsafe_jax.data import prompt_sets as PS


def _write_images(tmp_path):
  for name in ("a.png", "b.png"):
    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(tmp_path / name)


def test_readers(tmp_path):
  _write_images(tmp_path)
  (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"id": "1", "question": "how to x?", "image": "a.png", "category": "weapons"},
      {"id": "2", "prompt": "Describe this image.", "image": None, "scene": "gun"}]) + "\n")
  items = PS.read_jsonl(tmp_path / "m.jsonl")
  assert [i.category for i in items] == ["weapons", "gun"]
  assert items[0].image == str(tmp_path / "a.png") and items[1].image is None
  assert PS.read_jsonl(tmp_path / "m.jsonl", use_images=False)[0].image is None
  (tmp_path / "vl.json").write_text(json.dumps([{"image_id": "b.png", "query": "q1"}, {"image": "a.png",
                                                                                      "question": "q2"}]))
  vl = PS.read_vlsafe(tmp_path / "vl.json")
  assert [i.question for i in vl] == ["q1", "q2"] and vl[0].image.endswith("b.png") and vl[0].category == "vlsafe"
  (tmp_path / "jb.csv").write_text("content_policy_id,content_policy_name,q_id,question,image\n"
                                   "0,Illegal Activity,0,how to steal?,a.png\n1,Hate Speech,1,say slurs,\n")
  jb = PS.read_prompt_set(tmp_path / "jb.csv", "jailbreakllms")
  assert [i.category for i in jb] == ["Illegal Activity", "Hate Speech"] and jb[1].image is None
  (tmp_path / "bad.jsonl").write_text('{"id": "1", "image": null}\n')
  with pytest.raises(ValueError, match="bad.jsonl: item 0"):
    PS.read_jsonl(tmp_path / "bad.jsonl")
  (tmp_path / "dup.jsonl").write_text('{"id": "1", "question": "a"}\n{"id": "1", "question": "b"}\n')
  with pytest.raises(ValueError, match="duplicate id '1'"):
    PS.read_jsonl(tmp_path / "dup.jsonl")
  PS.write_jsonl(items, tmp_path / "out.jsonl")
  assert PS.read_jsonl(tmp_path / "out.jsonl", image_root="/") == items
