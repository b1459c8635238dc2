"""Zero-shot classification accuracy (UWM knowledge preservation, ``uwm.md`` §9.3).

One prompt template per dataset (no ensembling): the class prompts are encoded ONCE into a text-embedding
classifier ``(C, P)`` (L2-normalised rows) that is reused for every image batch; the prediction is the arg-max
cosine similarity (the logit scale does not change top-1). Accuracy is top-1 x 100.

Data sources (random access, items ``{"image": uint8 (H, W, 3) | path, "label": int, "index": int}``):
- :class:`ImageFolder`: a class-per-directory tree ``root/<class>/<image>`` (class order = sorted directory names,
  or the user's list);
- :class:`TfdsSource`: a PREPARED tensorflow-datasets directory in the ArrayRecord format, read through
  ``builder.as_data_source()`` (numpy records, no TensorFlow; ``tensorflow-datasets`` is an optional dependency
  imported only when such a source is built);
- ``vlsafe_jax.data.synthetic.ZeroShotShapes``: the synthetic split of the embedded benchmark.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TEMPLATE = "a photo of a {}."
# uwm.md §9.3; keys are normalised dataset names (lower case, alphanumerics only).
TEMPLATES = {
    "flowers102": "a photo of a {}, a type of flower.",
    "oxfordpets": "a photo of a {}, a type of pet.",
    "food101": "a photo of {}, a type of food.",
    "fgvcaircraft": "a photo of a {}, a type of aircraft.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a video of {}.",
    "dtd": "a photo of a {} texture.",
}
DATASETS = ("imagenet", "imagenetv2", "imagenetr", "imageneta", "imagenetsketch", "caltech101", "oxfordpets",
            "food101", "flowers102", "cifar10", "cifar100", "eurosat", "stanfordcars", "fgvcaircraft", "dtd",
            "sun397", "ucf101")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def normalise_name(dataset: str) -> str:
  """``"FGVC-Aircraft"`` -> ``"fgvcaircraft"`` (template lookup key)."""
  return re.sub(r"[^a-z0-9]", "", dataset.lower())


def template_for(dataset: str) -> str:
  """The dataset's single prompt template (``{}`` = class name); the CLIP default for unlisted datasets."""
  return TEMPLATES.get(normalise_name(dataset), DEFAULT_TEMPLATE)


def class_prompts(class_names: Sequence[str], template: str) -> list[str]:
  """``[template.format(name) ...]``; raises if the template has no ``{}`` slot or a name is empty."""
  if "{}" not in template:
    raise ValueError(f"zero-shot template {template!r} has no '{{}}' slot for the class name")
  bad = [i for i, c in enumerate(class_names) if not str(c).strip()]
  if bad:
    raise ValueError(f"zero-shot class names at positions {bad} are empty")
  return [template.format(c) for c in class_names]


class ImageFolder:
  """Class-per-directory image dataset: ``root/<class_dir>/<file>``.

  Args:
    root: the dataset directory.
    class_names: display names in label order; default the sorted directory names with ``_`` -> space.
    class_dirs: directory names in label order (default sorted); must match ``class_names`` in length.

  Items: ``{"image": path str, "label": int, "index": int, "key": relative path}``.

  Raises:
    FileNotFoundError / ValueError naming the root or the class directory (missing root, no classes, a class
    without images, a class directory absent).
  """

  def __init__(self, root: str | os.PathLike, class_names: Sequence[str] | None = None,
               class_dirs: Sequence[str] | None = None):
    self.root = Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(f"zero-shot image folder {self.root} does not exist")
    dirs = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if class_dirs is None else list(class_dirs)
    if not dirs:
      raise ValueError(f"zero-shot image folder {self.root} has no class sub-directories")
    names = [d.replace("_", " ") for d in dirs] if class_names is None else list(class_names)
    if len(names) != len(dirs):
      raise ValueError(f"zero-shot image folder {self.root}: {len(names)} class names for {len(dirs)} class "
                       f"directories")
    self.class_names = names
    self.items: list[tuple[str, int]] = []
    for label, d in enumerate(dirs):
      cdir = self.root / d
      if not cdir.is_dir():
        raise FileNotFoundError(f"zero-shot image folder {self.root}: class directory {d!r} is missing")
      files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
      if not files:
        raise ValueError(f"zero-shot image folder {self.root}: class directory {d!r} holds no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
      self.items += [(str(f), label) for f in files]

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, label = self.items[int(index)]
    return {"image": path, "label": label, "index": int(index), "key": os.path.relpath(path, self.root)}


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # optional and heavy (pyarrow): only imported for a tfds source
  except ImportError as e:
    raise ImportError("zero-shot tfds source: the 'tensorflow_datasets' package is not installed; install it "
                      "(pip install tensorflow-datasets; TensorFlow itself is NOT needed for ArrayRecord data) or "
                      "give the dataset as an image folder (eval.zeroshot_folders)") from e
  return tfds


def _version_key(name: str) -> tuple[int, ...]:
  return tuple(int(p) for p in name.split("."))


def resolve_tfds_dir(path: str | os.PathLike, builder: str = "") -> Path:
  """The prepared builder directory (the one holding ``dataset_info.json``) for a tfds dataset.

  Args:
    path: either that directory itself (``<data_dir>/<name>[/<config>]/<version>``) or a tfds ``data_dir``.
    builder: with a ``data_dir``: ``"name"``, ``"name/config"``, optionally ``":version"`` (default: the highest
      prepared version, e.g. ``1.0.0``).

  Raises:
    FileNotFoundError naming the path and what was looked for.
  """
  root = Path(path)
  if (root / "dataset_info.json").is_file():
    return root
  if not root.is_dir():
    raise FileNotFoundError(f"zero-shot tfds source: directory {root} does not exist")
  if not builder:
    raise FileNotFoundError(f"zero-shot tfds source: {root} holds no dataset_info.json; give the prepared builder "
                            f"directory (<data_dir>/<name>/<version>) or a data_dir plus the builder name")
  name, _, version = builder.partition(":")
  bdir = root / name
  if version:
    cands = [bdir / version]
  else:
    cands = sorted((p for p in bdir.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", p.name)),
                   key=lambda p: _version_key(p.name)) if bdir.is_dir() else []
  cands = [p for p in cands if (p / "dataset_info.json").is_file()]
  if not cands:
    raise FileNotFoundError(f"zero-shot tfds source: no prepared dataset {builder!r} under data_dir {root} "
                            f"(looked for {bdir}/{version or '<x.y.z>'}/dataset_info.json)")
  return cands[-1]


class TfdsSource:
  """A prepared tfds dataset (ArrayRecord files) as a zero-shot source; no TensorFlow involved.

  Opens the builder with ``tfds.builder_from_directory`` (no builder code, no downloads) and reads the split via
  ``builder.as_data_source()[split]`` (random access, numpy records decoded by PIL).

  Args:
    path: the prepared builder directory or a tfds ``data_dir`` (see :func:`resolve_tfds_dir`).
    split: split name, e.g. ``"test"`` (tfds slicing such as ``"test[:10%]"`` is accepted).
    builder: ``"name[/config][:version]"`` when ``path`` is a ``data_dir``.
    image_key / label_key: the feature names of the image (decoded to uint8 ``(H, W, 3)``; grayscale is repeated
      to 3 channels) and of the ``ClassLabel``.
    class_names: display names in label order; default the ``ClassLabel`` names with ``_`` -> space.

  Items: ``{"image": uint8 (H, W, 3), "label": int, "index": int, "key": "<split>/<index>"}``.

  Raises:
    ImportError when ``tensorflow_datasets`` is missing; FileNotFoundError / KeyError / ValueError naming the
    directory, split or feature (unknown split, missing feature, label not a ClassLabel, not an ArrayRecord
    dataset, wrong number of class names).
  """

  def __init__(self, path: str | os.PathLike, split: str, builder: str = "", image_key: str = "image",
               label_key: str = "label", class_names: Sequence[str] | None = None):
    tfds = _import_tfds()
    self.dir = resolve_tfds_dir(path, builder)
    self.builder = tfds.builder_from_directory(str(self.dir))
    where = f"zero-shot tfds source {self.dir}"
    features = self.builder.info.features
    for key, what in ((image_key, "image"), (label_key, "label")):
      if key not in features:
        raise KeyError(f"{where}: no {what} feature {key!r}; features are {sorted(features.keys())}")
    label_feature = features[label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
      raise ValueError(f"{where}: label feature {label_key!r} is a {type(label_feature).__name__}, not a "
                       f"ClassLabel (class names come from it)")
    splits = self.builder.info.splits
    base_split = re.split(r"[\[+]", split)[0]
    if base_split not in splits:
      raise KeyError(f"{where}: no split {split!r}; splits are {sorted(splits.keys())}")
    fmt = getattr(self.builder.info, "file_format", None)
    fmt_name = getattr(fmt, "value", fmt)
    if fmt_name is not None and str(fmt_name) != "array_record":
      raise ValueError(f"{where}: files are in the {fmt_name!r} format; only 'array_record' can be read without "
                       f"TensorFlow (prepare it with file_format='array_record')")
    names = [n.replace("_", " ") for n in label_feature.names] if class_names is None else list(class_names)
    if len(names) != label_feature.num_classes:
      raise ValueError(f"{where}: {len(names)} class names for the {label_feature.num_classes} classes of "
                       f"{label_key!r}")
    self.class_names = names
    self.split, self.image_key, self.label_key = split, image_key, label_key
    self._source = self.builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"zero-shot tfds source {self.dir} [{self.split}]: index {index} out of range "
                       f"[0, {len(self)})")
    rec = self._source[index]
    image = np.asarray(rec[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise ValueError(f"zero-shot tfds source {self.dir} [{self.split}] item {index}: image {self.image_key!r} "
                       f"has shape {image.shape}, expected (H, W, 3) or (H, W, 1)")
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    return {"image": image.astype(np.uint8), "label": int(rec[self.label_key]), "index": index,
            "key": f"{self.split}/{index}"}


def _normalise_rows(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def text_classifier(encode_text: Callable[[np.ndarray, np.ndarray], Any], tokenizer: Callable, prompts:
                    Sequence[str], batch_size: int = 256) -> np.ndarray:
  """Encodes the class prompts once: float32 ``(C, P)`` with unit rows.

  Args:
    encode_text: ``(ids (B, T), mask (B, T)) -> embeddings (B, P)``.
    tokenizer: ``texts -> (ids, mask)`` (``SyntheticTokenizer`` / ``visu.HFTextEncoder``).
  """
  out = []
  for i in range(0, len(prompts), batch_size):
    ids, mask = tokenizer(list(prompts[i:i + batch_size]))
    out.append(np.asarray(_normalise_rows(jnp.asarray(encode_text(ids, mask)))))
  cls = np.concatenate(out, 0)
  if not np.all(np.isfinite(cls)):
    raise ValueError("zero-shot classifier: a class prompt has a zero or non-finite text embedding")
  return cls


@jax.jit
def predict(image_emb_np: jax.Array, classifier_cp: jax.Array) -> jax.Array:
  """Arg-max cosine class per image: ``(N, P), (C, P) unit rows -> int32 (N,)`` (ties: lowest class index)."""
  return jnp.argmax(_normalise_rows(image_emb_np) @ classifier_cp.T, axis=-1).astype(jnp.int32)


def accuracy(image_emb_np: Any, labels_n: Any, classifier_cp: Any) -> float:
  """Top-1 accuracy x 100 of image embeddings ``(N, P)`` against a classifier ``(C, P)``.

  Raises:
    ValueError: shapes disagree or a label is outside ``[0, C)``.
  """
  e, y, c = np.asarray(image_emb_np), np.asarray(labels_n), np.asarray(classifier_cp)
  if e.ndim != 2 or c.ndim != 2 or e.shape[1] != c.shape[1] or y.shape != (e.shape[0],):
    raise ValueError(f"zero-shot accuracy: image embeddings {e.shape}, labels {y.shape}, classifier {c.shape} "
                     f"do not fit ((N, P), (N,), (C, P))")
  if y.size == 0:
    raise ValueError("zero-shot accuracy: no images")
  if y.min() < 0 or y.max() >= c.shape[0]:
    raise ValueError(f"zero-shot accuracy: labels must be in [0, {c.shape[0]}), got [{y.min()}, {y.max()}]")
  return 100.0 * float(np.mean(np.asarray(predict(e, c)) == y))


def _image_batches(source, image_size: int, batch_size: int, limit: int | None):
  from vlsafe_jax.data import visu  # the shared image transform (normalise / preprocess)
  tf = visu.QuadrupletTransform(None, image_size=image_size)
  n = len(source) if not limit else min(int(limit), len(source))
  for i in range(0, n, batch_size):
    recs = [tf({"image": source[j]["image"], "label": source[j]["label"], "index": j,
                "key": str(source[j].get("key", j))}) for j in range(i, min(i + batch_size, n))]
    yield np.stack([r["image"] for r in recs]), np.array([r["label"] for r in recs], np.int32)


class ZeroShotEvaluator:
  """Zero-shot accuracy of one model on several datasets; each dataset's classifier is computed once.

  Args:
    encode_image: ``pixels NHWC (B, S, S, 3) -> (B, P)``.
    encode_text: ``(ids, mask) -> (B, P)``.
    tokenizer: ``texts -> (ids, mask)``.
    image_size: model input side S.
    batch_size: images per forward; the last batch is padded to it (one compilation).
  """

  def __init__(self, encode_image, encode_text, tokenizer, image_size: int, batch_size: int = 256):
    self.encode_image, self.encode_text, self.tokenizer = encode_image, encode_text, tokenizer
    self.image_size, self.batch_size = int(image_size), int(batch_size)
    self._classifiers: dict[tuple[str, ...], np.ndarray] = {}

  def classifier(self, class_names: Sequence[str], template: str) -> np.ndarray:
    """The cached ``(C, P)`` classifier for these prompts (encoded on first use only)."""
    prompts = tuple(class_prompts(class_names, template))
    if prompts not in self._classifiers:
      self._classifiers[prompts] = text_classifier(self.encode_text, self.tokenizer, prompts)
    return self._classifiers[prompts]

  def embed_images(self, source, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    embs, labels = [], []
    for px, y in _image_batches(source, self.image_size, self.batch_size, limit):
      n = px.shape[0]
      if n < self.batch_size:
        px = np.concatenate([px, np.repeat(px[-1:], self.batch_size - n, 0)])
      embs.append(np.asarray(self.encode_image(px))[:n])
      labels.append(y)
    return np.concatenate(embs), np.concatenate(labels)

  def evaluate(self, source, class_names: Sequence[str], template: str, limit: int | None = None) -> float:
    """Top-1 accuracy x 100 on ``source``."""
    cls = self.classifier(class_names, template)
    e, y = self.embed_images(source, limit)
    return accuracy(e, y, cls)

  def evaluate_all(self, datasets: Mapping[str, tuple[Any, Sequence[str], str]], limit: int | None = None
                   ) -> dict[str, float]:
    """``{name: (source, class_names, template)}`` -> ``{name: acc, ..., "mean": unweighted mean}``."""
    out = {name: self.evaluate(src, names, tpl, limit) for name, (src, names, tpl) in datasets.items()}
    if out:
      out["mean"] = float(np.mean(list(out.values())))
    return out


def clip_evaluator(model, tokenizer, image_size: int, batch_size: int = 256) -> ZeroShotEvaluator:
  """A :class:`ZeroShotEvaluator` over a ``vlsafe_jax.models.clip.CLIP`` (jitted encoders)."""
  from flax import nnx
  graphdef, state = nnx.split(model)
  img = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
  txt = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode_text(i, m))
  return ZeroShotEvaluator(lambda x: img(state, x), lambda i, m: txt(state, i, m), tokenizer, image_size,
                           batch_size)


__all__ = [
    "DEFAULT_TEMPLATE", "TEMPLATES", "DATASETS", "normalise_name", "template_for", "class_prompts", "ImageFolder",
    "resolve_tfds_dir", "TfdsSource", "text_classifier", "predict", "accuracy", "ZeroShotEvaluator", "clip_evaluator",
]
