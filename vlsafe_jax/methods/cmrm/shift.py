"""CMRM shift extraction and vectors (``cmrm.md`` §2-§4.1).

Convention (cmrm.md §2): vectors are ``v^l = h_t^l - h_c^l`` (text-only minus corrupted-image) and are applied as
``h^l <- h^l + alpha * v^l``, always towards the text-only region; alpha = 0 is the identity. Layer l = 1..L is the
residual output of decoder layer l (HF ``hidden_states[l]``); embeddings are never steered.

Extraction runs the **unsteered** model in prefill-only jitted passes (``logits="none"``, no cache) that return,
at every layer, either the state at the last prompt token (``last``: left padding puts it at column T-1 for every
row) or the float32 mean over non-image tokens (``text_mean``). The text-only input is the multimodal token
sequence with the image span deleted (``Prompt.without_image``), so both positions sets correspond exactly.

Shape legend: N anchor prompts, B batch, T tokens, L decoder layers, D decoder width, h/w image side.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from vlsafe_jax import model_io, sharding
from vlsafe_jax.data.vlm_prompts import SEG_IMAGE, collate
from vlsafe_jax.methods.cmrm import masks
from vlsafe_jax.models import decoding
from vlsafe_jax.models.hooks import Hooks

EXTRACT_MODES = ("last", "text_mean")
CORRUPT_KINDS = ("blank", "noise")


# --------------------------------------------------------------------------------------------------------------
# Corrupted images
# --------------------------------------------------------------------------------------------------------------

def corrupted_pixels(n: int, image_size: int, kind: str = "blank", *, seed: int = 0, start: int = 0
                     ) -> np.ndarray:
  """Normalised NHWC float32 (n, size, size, 3) meaningless images (cmrm.md §5).

  ``blank``: all zeros in normalised space (the preprocessing mean colour). ``noise``: i.i.d. N(0, 1) in
  normalised space, sample ``start + i`` drawn from ``default_rng([seed, start + i])`` so a sample's noise does not
  depend on its batch.
  """
  if kind == "blank":
    return np.zeros((n, image_size, image_size, 3), np.float32)
  if kind == "noise":
    return np.stack([np.random.default_rng([int(seed), int(start + i)]).standard_normal(
        (image_size, image_size, 3)).astype(np.float32) for i in range(n)]) if n else \
        np.zeros((0, image_size, image_size, 3), np.float32)
  raise ValueError(f"cmrm corrupt kind {kind!r} unknown; expected one of {CORRUPT_KINDS}")


# --------------------------------------------------------------------------------------------------------------
# Extraction (jitted prefill-only)
# --------------------------------------------------------------------------------------------------------------

@nnx.jit(static_argnames=("mode",))
def _states_jit(model, ids_bt, mask_bt, pixels, text_mask_bt, steer: Hooks | None = None, *, mode: str):
  decoding.TRACE_COUNTS["cmrm_extract"] += 1
  b, t = ids_bt.shape
  # Extraction proper never steers (steer=None); the analysis tool (analysis.py) reuses this pass with steering
  # hooks on to see where CMRM moves the states.
  hooks = Hooks() if steer is None else steer
  if mode == "last":
    pos_bp = jnp.full((b, 1), t - 1, jnp.int32)
    _, _, ex = model(ids_bt, pixels, attention_mask_bt=mask_bt, hooks=hooks.replace(hidden_positions_bp=pos_bp),
                     logits="none")
    return ex["hidden_at_positions"][:, :, 0].astype(jnp.float32)
  _, _, ex = model(ids_bt, pixels, attention_mask_bt=mask_bt,
                   hooks=hooks.replace(hidden_masks_bmt=text_mask_bt[:, None, :]), logits="none")
  return ex["hidden_masked_means"][:, :, 0]


def prompt_states(model, prompts: Sequence[Any], pixels: np.ndarray | None, *, mode: str = "last",
                  min_bucket: int = 16, bucket_step: int = 64, mesh=None, steer_vectors=None,
                  steer_alpha: float = 1.0, steer_apply: str = "all") -> jax.Array:
  """Per-layer states (B, L, D) float32 of a batch of ``vlm_prompts.Prompt`` s (one prefill).

  Prompts are left-padded to a length bucket (few compilations). ``pixels``: one image per prompt with an image
  span, in order, or None. ``mesh``: shard the batch over the mesh's batch axes (the batch must divide).
  ``steer_vectors``: optional (L, D) or (B, L, D) CMRM vectors added during this prefill (``steer_alpha``;
  ``steer_apply`` ``all`` = every real token, ``new_tokens`` = the last prompt token only, cmrm.md §4.2); None
  (extraction) runs the unsteered model.
  """
  if mode not in EXTRACT_MODES:
    raise ValueError(f"cmrm extract mode {mode!r} unknown; expected one of {EXTRACT_MODES}")
  pad = model.config.text_config.pad_token_id or 0
  n = max(len(p.input_ids) for p in prompts)
  length = decoding.bucket_length(n, min_bucket=min_bucket, step=bucket_step)
  arr = collate(prompts, pad, side="left", length=length)
  ids = np.where(arr["attention_mask"] > 0, arr["input_ids"], 0 if pad == model.config.image_token_index else pad)
  text_mask = ((arr["attention_mask"] > 0) & (arr["segment_ids"] != SEG_IMAGE)).astype(np.float32)
  inputs = [jnp.asarray(ids, jnp.int32), jnp.asarray(arr["attention_mask"], jnp.int32),
            None if pixels is None else jnp.asarray(pixels, jnp.float32), jnp.asarray(text_mask)]
  if mesh is not None:
    inputs = [None if x is None else jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in inputs]
  steer = None
  if steer_vectors is not None:
    steer = Hooks(steer_vectors=jnp.asarray(steer_vectors, jnp.float32),
                  steer_alpha=jnp.asarray(steer_alpha, jnp.float32),
                  steer_mask_bt=jnp.asarray(masks.prompt_steer_mask(arr["attention_mask"], steer_apply), jnp.int32))
  return _states_jit(model, *inputs, steer, mode=mode)


def extract_pairs(model, prompts: Sequence[Any], *, mode: str = "last", corrupt: str = "blank",
                  noise_seed: int = 0, batch_size: int = 16, start: int = 0, progress: bool = False,
                  mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """(h_text (N, L, D), h_corrupted (N, L, D)) float32 for multimodal ``prompts`` (each with one image span).

  The corrupted pass feeds every prompt a :func:`corrupted_pixels` image; the text pass deletes the image span.
  ``start`` offsets the noise sample index (so batched sample-level extraction matches the anchor numbering).
  """
  if not prompts:
    raise ValueError("cmrm extraction needs at least one prompt")
  for i, p in enumerate(prompts):
    if not p.image_mask.any():
      raise ValueError(f"cmrm extraction prompt {start + i} has no image span (build it with image=True)")
  size = model.config.vision_config.image_size
  ht, hc = [], []
  it = range(0, len(prompts), batch_size)
  if progress:
    it = tqdm(it, desc="cmrm extract")
  for s in it:
    chunk = list(prompts[s:s + batch_size])
    pix = corrupted_pixels(len(chunk), size, corrupt, seed=noise_seed, start=start + s)
    hc.append(np.asarray(prompt_states(model, chunk, pix, mode=mode, mesh=mesh)))
    ht.append(np.asarray(prompt_states(model, [p.without_image() for p in chunk], None, mode=mode, mesh=mesh)))
  return np.concatenate(ht), np.concatenate(hc)


# --------------------------------------------------------------------------------------------------------------
# Vectors (pure functions)
# --------------------------------------------------------------------------------------------------------------

def sample_vectors(h_text_nld, h_corrupt_nld):
  """Per-sample vectors ``h_t - h_c`` (N, L, D) float32 (cmrm.md §3.2)."""
  return (np.asarray(h_text_nld, np.float32) - np.asarray(h_corrupt_nld, np.float32))


def dataset_vector(diffs_nld) -> np.ndarray:
  """Mean difference per layer (L, D) float32 (cmrm.md §3.1)."""
  d = np.asarray(diffs_nld, np.float64)
  if d.ndim != 3 or d.shape[0] == 0:
    raise ValueError(f"differences must be (N >= 1, L, D), got {d.shape}")
  return d.mean(0).astype(np.float32)


def pca_vector(diffs_nld, center: bool = False) -> np.ndarray:
  """First principal direction per layer, sign-aligned and scaled by the mean's projection (cmrm.md §3.1).

  Per layer: ``u`` = top right singular vector of the (N, D) difference matrix (centred first when ``center``),
  sign chosen so ``u . mean >= 0``, returned as ``(mean . u) u`` (L, D) float32. On a rank-1 matrix whose rows are
  positive multiples of one direction this equals the mean exactly (up to float rounding).
  """
  d = np.asarray(diffs_nld, np.float64)
  if d.ndim != 3 or d.shape[0] == 0:
    raise ValueError(f"differences must be (N >= 1, L, D), got {d.shape}")
  out = np.zeros(d.shape[1:], np.float64)
  for l in range(d.shape[1]):
    m = d[:, l]
    mean = m.mean(0)
    x = m - mean if center else m
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    u = vt[0]
    if u @ mean < 0:
      u = -u
    out[l] = (mean @ u) * u
  return out.astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Vector files
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CMRMVectors:
  """A dataset-level vector ``(L, D)`` float32 plus metadata (model id, anchor hash, position rule, corrupt kind,
  method, N)."""
  vectors: np.ndarray
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
    """Writes ``<path>.npz`` (key ``vectors``) and ``<path>.json`` (metadata + shape); ``path`` may end in .npz
    (``model_io.save_vectors``)."""
    return model_io.save_vectors(path, self.vectors, self.meta)

  @classmethod
  def load(cls, path: str | os.PathLike, *, num_layers: int | None = None, hidden_size: int | None = None
           ) -> "CMRMVectors":
    """Reads a pair written by :meth:`save`; checks the shape against the model's layer count and width."""
    return cls(*model_io.load_vectors(path, num_layers=num_layers, hidden_size=hidden_size))


def anchor_hash(prompts: Sequence[Any]) -> str:
  """sha256 (first 16 hex) of the anchor prompts' token ids: identifies the anchor set in the metadata."""
  h = hashlib.sha256()
  for p in prompts:
    h.update(np.asarray(p.input_ids, np.int32).tobytes())
    h.update(b"|")
  return h.hexdigest()[:16]


def extract_dataset_vector(model, prompts: Sequence[Any], *, mode: str = "last", corrupt: str = "blank",
                           method: str = "mean", pca_center: bool = False, noise_seed: int = 0,
                           batch_size: int = 16, model_id: str = "", progress: bool = False,
                           mesh=None) -> CMRMVectors:
  """Anchor prompts -> :class:`CMRMVectors` (``method`` ``mean`` or ``pca``)."""
  ht, hc = extract_pairs(model, prompts, mode=mode, corrupt=corrupt, noise_seed=noise_seed,
                         batch_size=batch_size, progress=progress, mesh=mesh)
  diffs = sample_vectors(ht, hc)
  if method == "mean":
    v = dataset_vector(diffs)
  elif method == "pca":
    v = pca_vector(diffs, center=pca_center)
  else:
    raise ValueError(f"cmrm vector method {method!r} unknown; expected 'mean' or 'pca'")
  meta = {"model_id": model_id, "anchor_hash": anchor_hash(prompts), "n_anchor": len(prompts), "extract": mode,
          "corrupt": corrupt, "method": method, "pca_center": pca_center, "noise_seed": noise_seed,
          "convention": "v = h_text - h_corrupted; applied as h + alpha * v"}
  return CMRMVectors(v, meta)


__all__ = ["EXTRACT_MODES", "CORRUPT_KINDS", "corrupted_pixels", "prompt_states", "extract_pairs",
           "sample_vectors", "dataset_vector", "pca_vector", "CMRMVectors", "anchor_hash",
           "extract_dataset_vector"]
