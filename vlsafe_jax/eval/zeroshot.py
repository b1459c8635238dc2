"""Zero-shot classification accuracy (UWM knowledge preservation, ``uwm.md`` §9.3).

One prompt template per dataset (no ensembling): the class prompts are encoded ONCE into a text-embedding
classifier ``(C, P)`` (L2-normalised rows) that is reused for every image batch; the prediction is the arg-max
cosine similarity (the logit scale does not change top-1). Accuracy is top-1 x 100.

Data sources (random access, items ``{"image": uint8 (H, W, 3) | path, "label": int, "index": int}``):
``vlsafe_jax.data.classification.ImageFolder`` / ``TfdsSource`` and ``vlsafe_jax.data.synthetic.ZeroShotShapes``.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlsafe_jax.data.sources import pad_rows
from vlsafe_jax.data.transform import QuadrupletTransform

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


def _normalise_rows(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def text_classifier(encode_text: Callable[[np.ndarray, np.ndarray], Any], tokenizer: Callable, prompts:
                    Sequence[str], batch_size: int = 256) -> np.ndarray:
  """Encodes the class prompts once: float32 ``(C, P)`` with unit rows.

  Args:
    encode_text: ``(ids (B, T), mask (B, T)) -> embeddings (B, P)``.
    tokenizer: ``texts -> (ids, mask)`` (``SyntheticTokenizer`` / ``transform.HFTextEncoder``).
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
  tf = QuadrupletTransform(None, image_size=image_size)   # the shared image transform (normalise / preprocess)
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
      embs.append(np.asarray(self.encode_image(pad_rows(px, self.batch_size)))[:n])
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


# Module level, graphdef static: evaluators of models with the same structure (before / after an edit, every alpha of
# a sweep) reuse the compiled encoders instead of compiling fresh closures.
@functools.partial(jax.jit, static_argnums=0)
def _clip_image(graphdef, state, x):
  return nnx.merge(graphdef, state).encode_image(x)


@functools.partial(jax.jit, static_argnums=0)
def _clip_text(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state).encode_text(ids, mask)


def clip_evaluator(model, tokenizer, image_size: int, batch_size: int = 256) -> ZeroShotEvaluator:
  """A :class:`ZeroShotEvaluator` over a ``vlsafe_jax.models.clip.CLIP`` (jitted encoders; the model's weights
  as they are now)."""
  graphdef, state = nnx.split(model)
  return ZeroShotEvaluator(lambda x: _clip_image(graphdef, state, x), lambda i, m: _clip_text(graphdef, state, i, m),
                           tokenizer, image_size, batch_size)


__all__ = [
    "DEFAULT_TEMPLATE", "TEMPLATES", "DATASETS", "normalise_name", "template_for", "class_prompts", "text_classifier", "predict", "accuracy", "ZeroShotEvaluator", "clip_evaluator",
]
