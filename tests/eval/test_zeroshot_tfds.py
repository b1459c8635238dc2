"""Zero-shot tfds ArrayRecord source (no TensorFlow): a tiny custom builder prepared offline, read back, scored.

The builder is defined here (``skip_registration``: nothing leaks into the tfds registry), prepared with
``file_format="array_record"`` into a temporary data_dir, and read through ``classification.TfdsSource`` as a user's
prepared dataset would be (``builder_from_directory``: no builder code needed at read time).
"""
import io
import sys

import numpy as np
import pytest
from PIL import Image

from vlsafe_jax.data import classification
from vlsafe_jax.eval import zeroshot as zs

CLASSES = ("dark_red", "green", "blue")
COLOURS = {0: (200, 0, 0), 1: (0, 200, 0), 2: (0, 0, 200)}
BUILDER = "vlsafe_zs_tiny"


def _examples():
  """7 examples over 3 classes, odd sizes; example 6 is labelled blue but painted green (a known miss)."""
  out = []
  for i in range(7):
    label = i % 3
    colour = COLOURS[1] if i == 6 else COLOURS[label]
    img = np.zeros((5 + i, 7, 3), np.uint8) + np.array(colour, np.uint8)
    img[0, 0] = (i, i, i)   # makes every image unique, so items can be matched back to their example
    out.append({"image": img, "label": label, "index": i})
  return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  # tensorflow-datasets is an optional extra ([tfds]): only the tests that read a prepared dataset need it, and
  # they skip without it; the path resolution and the missing-package error below run everywhere.
  tfds = pytest.importorskip("tensorflow_datasets")

  class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = BUILDER
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=list(CLASSES)),
          "index": tfds.features.Scalar(dtype=np.int64),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for ex in _examples():
        buf = io.BytesIO()   # PNG bytes: encoding a numpy image would need TensorFlow, PNG bytes do not
        Image.fromarray(ex["image"]).save(buf, format="png")
        yield ex["index"], {"image": buf.getvalue(), "label": ex["label"], "index": ex["index"]}

  data_dir = tmp_path_factory.mktemp("tfds")
  builder = Tiny(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  assert "tensorflow" not in sys.modules   # the whole point: no TensorFlow anywhere
  return data_dir, data_dir / BUILDER / "1.0.0"


def test_reader_returns_the_generated_images_labels_and_class_names(prepared):
  data_dir, builder_dir = prepared
  src = classification.TfdsSource(builder_dir, "test")
  assert classification.resolve_tfds_dir(data_dir, BUILDER) == builder_dir
  assert classification.TfdsSource(data_dir, "test", builder=BUILDER + ":1.0.0").class_names == ["dark red", "green", "blue"]
  assert src.class_names == ["dark red", "green", "blue"] and len(src) == 7
  expected = {ex["index"]: ex for ex in _examples()}
  seen = set()
  for i in range(len(src)):
    item = src[i]
    k = int(item["image"][0, 0, 0])   # the example id painted into pixel (0, 0)
    assert item["image"].dtype == np.uint8 and item["index"] == i and item["key"] == f"test/{i}"
    np.testing.assert_array_equal(item["image"], expected[k]["image"])
    assert item["label"] == expected[k]["label"]
    seen.add(k)
  assert seen == set(expected)
  assert "tensorflow" not in sys.modules
  with pytest.raises(IndexError, match="out of range"):
    src[7]


def test_zero_shot_accuracy_through_the_tfds_source(prepared):
  _, builder_dir = prepared
  src = classification.TfdsSource(builder_dir, "test", class_names=["red", "green", "blue"])
  template = zs.template_for("CIFAR-10")
  prompts = zs.class_prompts(src.class_names, template)

  def encode_image(px):
    # channel means of the CLIP-normalised pixels: the painted colour's channel is the only positive one
    return px.mean(axis=(1, 2))

  def tokenizer(texts):
    ids = np.array([[prompts.index(t)] for t in texts], np.int32)
    return ids, np.ones_like(ids)

  ev = zs.ZeroShotEvaluator(encode_image, lambda i, m: np.eye(3, dtype=np.float32)[i[:, 0]], tokenizer,
                            image_size=8, batch_size=3)
  # 6 of 7 images show their class colour; example 6 (labelled blue, painted green) is the one miss
  assert ev.evaluate(src, src.class_names, template) == pytest.approx(100.0 * 6 / 7)


def test_bad_tfds_inputs_give_clear_errors(prepared, tmp_path):
  data_dir, builder_dir = prepared
  with pytest.raises(KeyError, match="no split 'validation'.*'test'"):
    classification.TfdsSource(builder_dir, "validation")
  with pytest.raises(KeyError, match="no image feature 'img'"):
    classification.TfdsSource(builder_dir, "test", image_key="img")
  with pytest.raises(ValueError, match="'index' is a Scalar, not a ClassLabel"):
    classification.TfdsSource(builder_dir, "test", label_key="index")
  with pytest.raises(ValueError, match="2 class names for the 3 classes"):
    classification.TfdsSource(builder_dir, "test", class_names=["a", "b"])
  with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
    classification.TfdsSource(data_dir, "test")
  with pytest.raises(FileNotFoundError, match="no prepared dataset 'cifar10'"):
    classification.TfdsSource(data_dir, "test", builder="cifar10")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    classification.TfdsSource(tmp_path / "nowhere", "test")


def test_missing_tensorflow_datasets_is_a_clear_import_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # as if not installed (whether it is or not)
  with pytest.raises(ImportError, match="tensorflow_datasets.*not installed"):
    classification.TfdsSource(tmp_path, "test")


def test_resolve_tfds_dir_picks_the_highest_prepared_version(tmp_path):
  """Pure path logic (no tfds needed): a fake data_dir with two prepared versions, one unprepared and a stray."""
  data_dir = tmp_path / "data"
  for version, prepared in (("1.2.0", True), ("1.10.0", True), ("2.0.0", False), ("latest", True)):
    d = data_dir / BUILDER / version
    d.mkdir(parents=True)
    if prepared:
      (d / "dataset_info.json").write_text("{}")
  newest = data_dir / BUILDER / "1.10.0"        # numeric order (1.10 > 1.2); 2.0.0 has no dataset_info.json
  assert classification.resolve_tfds_dir(data_dir, BUILDER) == newest
  assert classification.resolve_tfds_dir(data_dir, BUILDER + ":1.2.0") == data_dir / BUILDER / "1.2.0"
  assert classification.resolve_tfds_dir(newest) == newest                       # the builder directory itself
  with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
    classification.resolve_tfds_dir(data_dir)
  with pytest.raises(FileNotFoundError, match="no prepared dataset 'cifar10'"):
    classification.resolve_tfds_dir(data_dir, "cifar10")
  with pytest.raises(FileNotFoundError, match="no prepared dataset"):
    classification.resolve_tfds_dir(data_dir, BUILDER + ":2.0.0")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    classification.resolve_tfds_dir(tmp_path / "nowhere", BUILDER)


def test_uwm_config_wires_tfds_sources(prepared):
  from vlsafe_jax import config as config_lib
  from vlsafe_jax.jobs import uwm as uwm_job
  data_dir, _ = prepared
  cfg = config_lib.load("uwm_synthetic:smoke", [
      "eval.synthetic_zeroshot=False", f"eval.zeroshot_tfds=(('CIFAR-10', '{data_dir}', 'test', '{BUILDER}'),)"])
  sets = uwm_job.zeroshot_datasets(cfg)
  src, names, template = sets["CIFAR-10"]
  assert list(sets) == ["CIFAR-10"] and len(src) == 7
  assert names == ["dark red", "green", "blue"] and template == "a photo of a {}."
  cfg = config_lib.load("uwm_synthetic:smoke", ["eval.synthetic_zeroshot=False",
                                                f"eval.zeroshot_tfds=(('X', '{data_dir}'),)"])
  with pytest.raises(ValueError, match="must be a tuple"):
    uwm_job.zeroshot_datasets(cfg)
