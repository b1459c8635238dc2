"""Class-labelled image sources for zero-shot classification (``eval/zeroshot.py``; ``uwm.md`` §9.3).

Random-access sources with items ``{"image": uint8 (H, W, 3) | path, "label": int, "index": int, "key": str}`` and
a ``class_names`` list in label order:

- :class:`ImageFolder`: a class-per-directory tree ``root/<class>/<image>`` (class order = sorted directory names,
  or the user's list);
- :class:`TfdsSource`: a PREPARED tensorflow-datasets directory in the ArrayRecord format, read through
  ``builder.as_data_source()`` (numpy records, no TensorFlow; ``tensorflow-datasets`` is an optional dependency
  imported only when such a source is built).
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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


__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "resolve_tfds_dir", "TfdsSource"]
