"""TGA substitute retriever: jitted top-k equals a NumPy brute force, the 8-device sharded top-k equals the
single-device one (corpus size not divisible by 8, ties included), the index cache is reused only when the texts
and encoder match, and CLIP-text-tower embedding + retrieval with caption exclusion works end to end."""
import jax.numpy as jnp
import numpy as np
import pytest

from vlsafe_jax import sharding
from vlsafe_jax.methods.tga import retrieval as R


def _brute(q, c, k):
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  cn = c / np.linalg.norm(c, axis=-1, keepdims=True)
  s = qn.astype(np.float64) @ cn.astype(np.float64).T
  order = np.stack([np.lexsort((np.arange(len(c)), -row))[:k] for row in s])
  return np.take_along_axis(s, order, -1), order


def _data(seed=0, q=6, n=53, e=11):
  rs = np.random.RandomState(seed)
  c = rs.randn(n, e).astype(np.float32)
  c[17] = c[4] * 2.0                 # exact tie in cosine with row 4 -> the lower index first
  return rs.randn(q, e).astype(np.float32), c


def test_topk_matches_numpy():
  q, c = _data()
  q[0] = c[4]                        # query hits the tie
  vals, idx = R.topk(q, c, 5)
  want_v, want_i = _brute(q, c, 5)
  np.testing.assert_allclose(np.asarray(vals), want_v, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(idx), want_i)
  assert int(idx[0, 0]) == 4 and int(idx[0, 1]) == 17


@pytest.mark.parametrize("mesh_shape", [dict(data=8, fsdp=1), dict(data=2, fsdp=4)])
def test_sharded_topk_equals_single_device(mesh_shape):
  q, c = _data(1)
  q[2] = c[17]
  mesh = sharding.make_mesh(**mesh_shape)
  v1, i1 = R.topk(q, c, 4)
  v8, i8 = R.topk(q, c, 4, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(i8), np.asarray(i1))
  # Cosines of 11-d unit vectors: per-shard kernels may sum the 11 products in another order, |error| <= 11 u ~ 7e-7.
  np.testing.assert_allclose(np.asarray(v8), np.asarray(v1), rtol=1e-6, atol=1e-6)
  # k larger than a shard's rows (53 rows / 8 shards -> 7 per shard).
  v9, i9 = R.topk(q, c, 9, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(i9), _brute(q, c, 9)[1])
  with pytest.raises(ValueError, match="k=60"):
    R.topk(q, c, 60, mesh=mesh)


def test_index_cache(tmp_path):
  calls = []

  def enc(texts):
    calls.append(len(texts))
    return np.stack([np.array([len(t), t.count("a") + 1.0, 1.0], np.float32) for t in texts])
  texts = ["a cat", "the dog barks", "banana"]
  path = tmp_path / "idx.npz"
  i1 = R.build_index(texts, enc, batch_size=2, encoder_id="toy", cache=path)
  assert calls == [2, 2] and path.exists()
  i2 = R.build_index(texts, enc, batch_size=2, encoder_id="toy", cache=path)
  assert calls == [2, 2]             # reused
  np.testing.assert_array_equal(i1.embeddings, i2.embeddings)
  R.build_index(texts + ["new"], enc, batch_size=2, encoder_id="toy", cache=path)
  assert calls == [2, 2, 2, 2]       # texts changed -> rebuilt
  R.build_index(texts + ["new"], enc, batch_size=2, encoder_id="other", cache=path)
  assert len(calls) == 6             # encoder changed -> rebuilt
  path.write_bytes(b"junk")
  with pytest.raises(ValueError, match="idx.npz"):
    R.RetrievalIndex.load(path)


def test_clip_text_tower_retrieval_with_exclusion():
  from flax import nnx
  from vlsafe_jax.data.tokenize import build_clip_bpe_tokenizer
  from vlsafe_jax.models.clip import CLIP, CLIPConfig, CLIPTextConfig
  from pathlib import Path
  tok = build_clip_bpe_tokenizer(Path(__file__).parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz", 16)
  cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=24,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              max_position_embeddings=16),
                   vision_config=None, projection_dim=8)
  clip = CLIP(cfg, rngs=nnx.Rngs(0))
  texts = ["a red square", "a blue circle", "a knife on a table", "a green tree", "two cats"]
  index = R.build_index(texts, R.clip_text_encoder(clip, tok, 16), batch_size=4, encoder_id="tiny")
  # Querying with a corpus caption's own embedding returns it first; excluding it returns the next best.
  q = index.embeddings[[2, 4]]
  top = R.retrieve_texts(index, q, k=1)
  assert top == [["a knife on a table"], ["two cats"]]
  nxt = R.retrieve_texts(index, q, k=1, exclude=["a knife on a table", "two cats"])
  _, want = _brute(q, index.embeddings, 2)
  assert nxt == [[texts[want[0, 1]]], [texts[want[1, 1]]]]
