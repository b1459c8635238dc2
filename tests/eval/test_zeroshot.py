"""Zero-shot evaluation (uwm.md §9.3): templates, image-folder reader, classifier reuse, accuracy goldens."""
import numpy as np
import pytest
from PIL import Image

from vlsafe_jax.data import classification
from vlsafe_jax.eval import zeroshot as zs


def test_templates_follow_the_spec_table():
  spec = {  # uwm.md §9.3, written out again here
      "Flowers102": "a photo of a {}, a type of flower.", "OxfordPets": "a photo of a {}, a type of pet.",
      "Food101": "a photo of {}, a type of food.", "FGVC-Aircraft": "a photo of a {}, a type of aircraft.",
      "EuroSAT": "a centered satellite photo of {}.", "UCF101": "a video of {}.", "DTD": "a photo of a {} texture.",
      "ImageNet": "a photo of a {}.", "CIFAR-10": "a photo of a {}.", "SUN397": "a photo of a {}.",
  }
  for name, tpl in spec.items():
    assert zs.template_for(name) == tpl, name
  assert len(zs.DATASETS) == 17
  assert zs.class_prompts(["golden retriever"], zs.template_for("oxford_pets")) == [
      "a photo of a golden retriever, a type of pet."]
  with pytest.raises(ValueError, match="slot"):
    zs.class_prompts(["x"], "no slot")
  with pytest.raises(ValueError, match="empty"):
    zs.class_prompts(["x", " "], "a {}")


def test_accuracy_on_hand_built_embeddings():
  cls = np.eye(3, dtype=np.float32)
  # rows: clearly class 0, class 2 (scaled: cosine ignores norm), class 1 vs 2 tie -> lowest index 1, class 0
  emb = np.array([[1, 0.1, 0], [0, 0, 5], [0, 1, 1], [2, 1, 0]], np.float32)
  labels = np.array([0, 2, 2, 1])
  # predictions 0, 2, 1, 0 -> 2 of 4 correct
  assert zs.accuracy(emb, labels, cls) == pytest.approx(50.0)
  np.testing.assert_array_equal(np.asarray(zs.predict(emb, cls)), [0, 2, 1, 0])
  with pytest.raises(ValueError, match="labels"):
    zs.accuracy(emb, np.array([0, 1, 2, 3]), cls)
  with pytest.raises(ValueError, match="do not fit"):
    zs.accuracy(emb[:, :2], labels, cls)


def _write_folder(root, classes, per_class, size=9):
  rng = np.random.RandomState(0)
  for c, colour in classes.items():
    (root / c).mkdir(parents=True)
    for k in range(per_class):
      img = np.zeros((size + k, size, 3), np.uint8) + np.array(colour, np.uint8)
      Image.fromarray(img).save(root / c / f"{k}.png")
  (root / "notes.txt").write_text("not a class")
  return rng


def test_image_folder_reader_and_classifier_reuse(tmp_path):
  classes = {"dark_red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200)}
  _write_folder(tmp_path / "ds", classes, per_class=3)
  src = classification.ImageFolder(tmp_path / "ds")
  assert src.class_names == ["blue", "dark red", "green"] and len(src) == 9
  assert src[0]["label"] == 0 and src[3]["label"] == 1 and src[8]["key"].startswith("green")

  calls = []

  def encode_text(ids, mask):
    calls.append(ids.shape[0])
    return ids[:, :3].astype(np.float32)            # prompt "k" -> one-hot of its class (fake tokenizer below)

  def tokenizer(texts):
    names = {"a photo of a blue.": 2, "a photo of a dark red.": 0, "a photo of a green.": 1}
    ids = np.zeros((len(texts), 4), np.int32)
    for i, t in enumerate(texts):
      ids[i, names[t]] = 1                           # embedding axis = RGB channel of that colour
    return ids, np.ones_like(ids)

  def encode_image(px):
    assert px.shape[1:] == (8, 8, 3)                  # resized + centre-cropped to the model size
    return px.mean(axis=(1, 2))                       # mean normalised RGB: the dominant channel wins

  ev = zs.ZeroShotEvaluator(encode_image, encode_text, tokenizer, image_size=8, batch_size=4)
  acc = ev.evaluate(src, src.class_names, zs.template_for("imagenet"))
  acc2 = ev.evaluate(src, src.class_names, zs.template_for("imagenet"))
  assert acc == acc2 == pytest.approx(100.0)
  assert calls == [3]                                # the classifier was encoded once and reused
  allres = ev.evaluate_all({"a": (src, src.class_names, "a photo of a {}."),
                            "b": (src, src.class_names, "a photo of a {}.")})
  assert allres["mean"] == pytest.approx(100.0) and calls == [3]


def test_image_folder_errors_name_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing_root"):
    classification.ImageFolder(tmp_path / "missing_root")
  (tmp_path / "ds" / "cat").mkdir(parents=True)
  with pytest.raises(ValueError, match="'cat' holds no images"):
    classification.ImageFolder(tmp_path / "ds")
  with pytest.raises(ValueError, match="2 class names for 1"):
    classification.ImageFolder(tmp_path / "ds", class_names=["a", "b"])


def test_synthetic_zero_shot_split_runs_through_the_evaluator():
  from vlsafe_jax.data import synthetic
  src = synthetic.ZeroShotShapes(size=12, image_size=16)
  labels = np.array([src[i]["label"] for i in range(12)])
  k = len(src.class_names)

  # An oracle image encoder that knows the label from the item order (the evaluator keeps source order).
  order = iter(range(100))

  def encode_image(px):
    idx = [next(order) for _ in range(px.shape[0])]
    return np.eye(k, dtype=np.float32)[labels[np.minimum(idx, 11)]]

  def tokenizer(texts):
    ids = np.array([[src.prompts().index(t)] for t in texts], np.int32)
    return ids, np.ones_like(ids)

  ev = zs.ZeroShotEvaluator(encode_image, lambda i, m: np.eye(k, dtype=np.float32)[i[:, 0]], tokenizer,
                            image_size=16, batch_size=5)
  assert ev.evaluate(src, src.class_names, src.template) == pytest.approx(100.0)
