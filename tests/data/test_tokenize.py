"""vlsafe_jax.data.tokenize on the real CLIP vocabulary (tests/assets/bpe_simple_vocab_16e6.txt.gz).

Three independent oracles: the published facts (platform.md §5.2: ids of "a photo of a cat", 49,408 entries,
bos/eos/pad), a small re-implementation of OpenAI's BPE algorithm written here from its description (byte-level
symbols, lowest-rank merge first, ``</w>`` marks word ends; lower-casing and whitespace cleaning, no ftfy), and
transformers' CLIPTokenizer loaded the file-based way (vocab.json + merges.txt through from_pretrained).
"""
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import regex

from vlsafe_jax.data import tokenize as T

ASSET = Path(__file__).resolve().parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"

STRINGS = [
    "a photo of a cat",
    "A PHOTO of TWO dogs, running... on the beach!",
    "it's 2024: 3.14159 is π, don't panic",
    "naïve café — crème brûlée",
    "emoji 🐱🚀 and   multiple    spaces\tand\ttabs",
    "hyphen-ated words/slashes & ampersands (parens) [brackets]",
    "",
]


@pytest.fixture(scope="module")
def tok():
  return T.build_clip_bpe_tokenizer(ASSET)


class ReferenceBPE:
  """Independent CLIP BPE (OpenAI's published scheme), for cross-checking the HF-built tokenizer."""

  PAT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                      r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def __init__(self, gz_path):
    vocab, merges = T.clip_bpe_vocab(gz_path)
    self.encoder = vocab
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.byte_encoder = T.bytes_to_unicode()

  @functools.lru_cache(maxsize=None)
  def bpe(self, token):
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    return tuple(word)

  def encode(self, text):
    text = regex.sub(r"\s+", " ", text).strip().lower()
    ids = [self.encoder[T.CLIP_BOS]]
    for piece in self.PAT.findall(text):
      piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self.bpe(piece))
    return ids + [self.encoder[T.CLIP_EOS]]


def test_published_facts(tok):
  assert len(tok) == 49408
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
  assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
  vocab, merges = T.clip_bpe_vocab(ASSET)
  assert len(merges) == T.CLIP_NUM_MERGES == 48894
  assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0])] == 512


def test_byte_table():
  table = T.bytes_to_unicode()
  assert len(table) == 256 and len(set(table.values())) == 256
  assert table[ord("a")] == "a" and table[0] == chr(256) and table[ord(" ")] == chr(256 + 32)


def test_tokenize_pads_and_truncates(tok):
  long = " ".join(["word"] * 200)
  out = T.tokenize(tok, ["a photo of a cat", long], max_length=77)
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (2, 77)
  np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
  assert (ids[0, 7:] == 49407).all() and mask[0].tolist() == [1] * 7 + [0] * 70
  # truncation keeps <|startoftext|> first and <|endoftext|> last
  assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and mask[1].all()
  assert (ids[1, 1:-1] == tok("word")["input_ids"][1]).all()
  short = T.tokenize(tok, "a photo of a cat", max_length=5)["input_ids"]
  np.testing.assert_array_equal(short, [[49406, 320, 1125, 539, 49407]])


def test_matches_reference_bpe(tok):
  ref = ReferenceBPE(ASSET)
  for s in STRINGS:
    assert tok(s)["input_ids"] == ref.encode(s), s


def test_matches_hf_file_based_tokenizer(tok, tmp_path):
  # Second route: vocab.json + merges.txt on disk, loaded by transformers' own file reader, padded by HF.
  from transformers import CLIPTokenizer
  vocab, merges = T.clip_bpe_vocab(ASSET)
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  hf = CLIPTokenizer.from_pretrained(tmp_path)
  assert len(hf) == 49408
  ref = hf(STRINGS, padding="max_length", truncation=True, max_length=77, return_tensors="np")
  ours = T.tokenize(tok, STRINGS, max_length=77)
  np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
  # and load_tokenizer reads that directory (no tokenizer_config.json: the CLIPTokenizer fallback)
  loaded = T.load_tokenizer(tmp_path)
  np.testing.assert_array_equal(T.tokenize(loaded, STRINGS)["input_ids"], ours["input_ids"])


def test_load_tokenizer_round_trip(tok, tmp_path):
  tok.save_pretrained(tmp_path)
  loaded = T.load_tokenizer(tmp_path)
  np.testing.assert_array_equal(T.tokenize(loaded, STRINGS)["input_ids"], T.tokenize(tok, STRINGS)["input_ids"])


def test_malformed_tokenizer_files_are_named(tok, tmp_path):
  """Invalid JSON, a non-object, a tokenizer.json the tokenizers library rejects, a broken tokenizer_config.json:
  one ValueError that starts with the faulty file's path (transformers alone raises a bare JSONDecodeError or a
  Rust "Model missing." that names no file)."""
  tok.save_pretrained(tmp_path / "good")
  good = json.loads((tmp_path / "good" / "tokenizer.json").read_text())
  no_model = {k: v for k, v in good.items() if k != "model"}
  cases = {
      "truncated": ("tokenizer.json", json.dumps(good)[:200], r"not valid JSON \(line 1, column \d+"),
      "empty": ("tokenizer.json", "", r"not valid JSON \(line 1, column 1"),
      "list": ("tokenizer.json", "[1, 2]", "expected a JSON object at the top level, got list"),
      "no_model": ("tokenizer.json", json.dumps(no_model), r"not a valid tokenizers file \(Model missing"),
      "config": ("tokenizer_config.json", "{", "not valid JSON"),
  }
  for name, (fname, text, pattern) in cases.items():
    d = tmp_path / name
    d.mkdir()
    for f in (tmp_path / "good").iterdir():
      (d / f.name).write_bytes(f.read_bytes())
    (d / fname).write_text(text)
    with pytest.raises(ValueError, match=pattern) as info:
      T.load_tokenizer(d)
    assert str(info.value).startswith(f"{d / fname}: "), (name, str(info.value))


def test_errors(tok, tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*" + tmp_path.name + r".*tokenizer\.json"):
    T.load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    T.load_tokenizer(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope.gz"):
    T.build_clip_bpe_tokenizer(tmp_path / "nope.gz")
  with pytest.raises(TypeError, match=r"items \[1\]"):
    T.tokenize(tok, ["ok", 3])
  with pytest.raises(ValueError, match="empty"):
    T.tokenize(tok, [])
