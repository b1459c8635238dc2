"""Substitute retriever for TGA (tga.md §3.1): embed a caption corpus with a text encoder (our CLIP text tower, or
any ``list[str] -> (N, E)`` function), then retrieve the top-k texts for each training image by cosine similarity.

The top-k is one jitted program; over a mesh the corpus is split row-wise across the batch axes ``('data',
'fsdp')`` with ``jax.shard_map``: each device scores its corpus shard against all queries and keeps its local
top-k, the candidates are all-gathered (n_shards x k per query, tiny) and reduced to the global top-k. Ties
resolve to the lower corpus index in both the single-device and the sharded program, so results are identical.

The reference used BEiT-3 over ~1.16 M captions, which is not ported; texts retrieved this way differ from the
authors' and results must be labelled so. The index (normalised embeddings + a SHA-256 of the texts and the
encoder id) is cached to disk as ``.npz`` and reused only when both match.
"""
from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlsafe_jax import sharding
from vlsafe_jax.data import tokenize


def l2_normalize(x_ne: np.ndarray | jax.Array, eps: float = 1e-12):
  """Unit rows (float32); zero rows stay zero."""
  x = jnp.asarray(x_ne, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def texts_hash(texts: Sequence[str], encoder_id: str = "") -> str:
  """SHA-256 over the encoder id and the texts (length-prefixed, so boundaries matter)."""
  h = hashlib.sha256(encoder_id.encode())
  for t in texts:
    b = t.encode()
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()


def _topk_local(q_qe, c_ne, valid_n, k):
  """Scores (Q, N) = q . c (float32, highest precision), invalid rows at -inf, then ``lax.top_k``."""
  s_qn = jnp.einsum("qe,ne->qn", q_qe.astype(jnp.float32), c_ne.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  s_qn = jnp.where(valid_n[None, :], s_qn, -jnp.inf)
  return jax.lax.top_k(s_qn, k)


def _merge(vals_qk, idx_qk, k):
  """Global top-k of candidate lists; ties go to the lower corpus index (as ``lax.top_k`` on the full row)."""
  # Sort by (-score, index): lexsort over two keys in one stable argsort pass each.
  order = jnp.lexsort((idx_qk, -vals_qk), axis=-1)[:, :k]
  return jnp.take_along_axis(vals_qk, order, -1), jnp.take_along_axis(idx_qk, order, -1)


def topk(queries_qe, corpus_ne, k: int, *, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """Top-k cosine matches of each query among the corpus rows.

  Args:
    queries_qe: (Q, E) query embeddings (normalised here).
    corpus_ne: (N, E) corpus embeddings (normalised here).
    k: matches per query, 1 <= k <= N.
    mesh: shard the corpus over the mesh's ``('data', 'fsdp')`` axes (None: one device).
  Returns: ``(scores (Q, k) float32 descending, indices (Q, k) int32 into the corpus)``.
  """
  n = int(np.shape(corpus_ne)[0])
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, corpus size {n}]")
  if np.shape(queries_qe)[-1] != np.shape(corpus_ne)[-1]:
    raise ValueError(f"query width {np.shape(queries_qe)[-1]} != corpus width {np.shape(corpus_ne)[-1]}")
  q = l2_normalize(queries_qe)
  c = l2_normalize(corpus_ne)
  if mesh is None or mesh.size == 1:
    vals, idx = _single(q, c, jnp.ones((n,), bool), k)
    return vals, idx.astype(jnp.int32)
  axes = tuple(a for a in sharding.BATCH_AXES if mesh.shape[a] > 1)
  shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  pad = (-n) % shards
  c = jnp.pad(c, ((0, pad), (0, 0)))
  valid = jnp.arange(n + pad) < n
  per = (n + pad) // shards
  k_local = min(k, per)
  spec = axes if len(axes) > 1 else (axes[0] if axes else None)
  c = jax.device_put(c, NamedSharding(mesh, P(spec, None)))
  valid = jax.device_put(valid, NamedSharding(mesh, P(spec)))
  q = jax.device_put(q, NamedSharding(mesh, P()))
  return _sharded_fn(mesh, axes, k_local, k, per)(q, c, valid)


@functools.partial(jax.jit, static_argnums=(3,))
def _single(q, c, valid, k):
  return _topk_local(q, c, valid, k)


_SHARDED_CACHE: dict = {}


def _sharded_fn(mesh, axes, k_local, k, per):
  key = (mesh, axes, k_local, k, per)
  if key in _SHARDED_CACHE:
    return _SHARDED_CACHE[key]
  spec = axes if len(axes) > 1 else (axes[0] if axes else None)

  def local(q, c, valid):
    vals, idx = _topk_local(q, c, valid, k_local)
    offset = jax.lax.axis_index(axes) * per if axes else 0
    idx = (idx + offset).astype(jnp.int32)
    if axes:
      vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)
      idx = jax.lax.all_gather(idx, axes, axis=1, tiled=True)
    return _merge(vals, idx, k)

  # After the all-gather every device holds the same candidates and reduces them identically, so the outputs
  # are replicated; JAX types all_gather's result as device-varying, hence check_vma=False.
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(spec, None), P(spec)), out_specs=(P(), P()),
                             check_vma=False))
  _SHARDED_CACHE[key] = fn
  return fn


class RetrievalIndex:
  """A caption corpus and its normalised embeddings (float32 (N, E)), with an identity hash."""

  def __init__(self, texts: Sequence[str], embeddings_ne: np.ndarray, encoder_id: str = "", *,
               normalized: bool = False):
    texts = [str(t) for t in texts]
    emb = np.asarray(embeddings_ne, np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
      raise ValueError(f"embeddings shape {emb.shape} does not match {len(texts)} texts (want (N, E))")
    self.texts = texts
    # Normalise once; a loaded index is stored normalised (re-normalising would change the last bit).
    self.embeddings = emb if normalized else np.asarray(l2_normalize(emb))
    self.encoder_id = encoder_id
    self.hash = texts_hash(texts, encoder_id)

  def __len__(self):
    return len(self.texts)

  def save(self, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, embeddings=self.embeddings, texts=np.asarray(json.dumps(self.texts)),
             encoder_id=np.asarray(self.encoder_id), hash=np.asarray(self.hash))

  @classmethod
  def load(cls, path: str | Path) -> "RetrievalIndex":
    path = Path(path)
    try:
      z = np.load(path, allow_pickle=False)
      idx = cls(json.loads(str(z["texts"])), z["embeddings"], str(z["encoder_id"]), normalized=True)
      stored = str(z["hash"])
    except (OSError, KeyError, ValueError) as e:
      raise ValueError(f"retrieval index {path} is unreadable or incomplete: {e}") from e
    if stored != idx.hash:
      raise ValueError(f"retrieval index {path}: stored hash does not match its texts (corrupt file)")
    return idx

  def search(self, queries_qe, k: int = 1, *, mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``(scores (Q, k), indices (Q, k))`` as numpy arrays."""
    vals, idx = topk(queries_qe, self.embeddings, k, mesh=mesh)
    return np.asarray(vals), np.asarray(idx)


def build_index(texts: Sequence[str], encode: Callable[[list[str]], np.ndarray], *, batch_size: int = 256,
                encoder_id: str = "", cache: str | Path | None = None) -> RetrievalIndex:
  """Embeds ``texts`` in fixed-size batches (last one padded: one compilation) or loads a matching cache.

  A cache whose text/encoder hash differs is rebuilt (and overwritten), never silently reused.
  """
  texts = [str(t) for t in texts]
  if not texts:
    raise ValueError("retrieval corpus is empty")
  if cache is not None and Path(cache).exists():
    try:
      idx = RetrievalIndex.load(cache)
      if idx.hash == texts_hash(texts, encoder_id):
        return idx
    except ValueError:
      pass                       # unreadable cache: rebuild below
  chunks = []
  for i in range(0, len(texts), batch_size):
    part = texts[i:i + batch_size]
    padded = part + [part[-1]] * (batch_size - len(part))
    chunks.append(np.asarray(encode(padded), np.float32)[:len(part)])
  idx = RetrievalIndex(texts, np.concatenate(chunks), encoder_id)
  if cache is not None:
    idx.save(cache)
  return idx


def clip_text_encoder(clip, tokenizer, max_length: int = 77) -> Callable[[list[str]], np.ndarray]:
  """``list[str] -> (N, P)`` with a :class:`vlsafe_jax.models.clip.CLIP`'s text tower (jitted once per batch)."""
  graphdef, state = nnx.split(clip)

  @jax.jit
  def enc(state, ids, mask):
    return nnx.merge(graphdef, state).encode_text(ids, mask)

  def encode(texts):
    batch = tokenize.tokenize(tokenizer, list(texts), max_length)
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return np.asarray(enc(state, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))
  return encode


def clip_image_encoder(clip) -> Callable[[np.ndarray], np.ndarray]:
  """``(I, h, w, 3) normalised pixels -> (I, P)`` with the CLIP's image tower (jitted)."""
  graphdef, state = nnx.split(clip)

  @jax.jit
  def enc(state, pixels):
    return nnx.merge(graphdef, state).encode_image(pixels)
  return lambda pixels: np.asarray(enc(state, jnp.asarray(pixels, jnp.float32)))


def retrieve_texts(index: RetrievalIndex, queries_qe, k: int = 1, *, mesh: Mesh | None = None,
                   exclude: Sequence[str] | None = None) -> list[list[str]]:
  """Top-k texts per query; ``exclude[q]`` (e.g. the image's own caption) is skipped when it is retrieved, so
  the result holds the next best text instead (k + 1 candidates are scored)."""
  kk = min(k + (1 if exclude is not None else 0), len(index))
  _, idx = index.search(queries_qe, kk, mesh=mesh)
  out = []
  for q, row in enumerate(idx):
    texts = [index.texts[i] for i in row]
    if exclude is not None:
      texts = [t for t in texts if t.strip() != str(exclude[q]).strip()] or texts
    out.append(texts[:k])
  return out


def nearest_other_texts(pool: Sequence[str], queries: Sequence[str], encode: Callable[[list[str]], np.ndarray],
                        encoder_id: str = "") -> list[str]:
  """The nearest pool text to each query text other than the query itself (top-1 of :func:`retrieve_texts` with
  ``exclude=queries``): the retrieved text when the query is an image's own caption (text-to-text retrieval)."""
  index = RetrievalIndex(list(pool), encode(list(pool)), encoder_id=encoder_id)
  return [r[0] for r in retrieve_texts(index, encode(list(queries)), k=1, exclude=list(queries))]


__all__ = ["RetrievalIndex", "build_index", "topk", "l2_normalize", "texts_hash", "clip_text_encoder",
           "clip_image_encoder", "retrieve_texts", "nearest_other_texts"]
