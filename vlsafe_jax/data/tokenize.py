"""Tokenisation from a checkpoint directory, and the real CLIP BPE tokenizer for tests (``platform.md`` §5).

* :func:`load_tokenizer` reads the tokenizer files of a user's HF checkpoint directory through
  ``transformers.AutoTokenizer`` (offline only; never a hub download).
* :func:`tokenize` pads/truncates to a fixed length with the tokenizer's own pad token (CLIP: ``<|endoftext|>``
  = 49407, so pooled features are unaffected by padding) and returns int32 ``input_ids`` / ``attention_mask``.
* :func:`build_clip_bpe_tokenizer` builds OpenAI's CLIP tokenizer (49,408 entries) from
  ``bpe_simple_vocab_16e6.txt.gz`` (shipped MIT-licensed in the open-clip-torch wheel; ``tests/assets/``).
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# A directory is tokenizer-bearing if it holds one of these sets of files.
TOKENIZER_FILE_SETS: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),                 # fast tokenizer (any model)
    ("vocab.json", "merges.txt"),        # byte-level BPE (CLIP, GPT-2 style)
    ("tokenizer.model",),                # SentencePiece (Llama / Mistral)
)

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# 49152 - 256 - 2 merges: the vocabulary then has 256 bytes + 256 end-of-word bytes + merges + 2 specials.
CLIP_NUM_MERGES = 49152 - 256 - 2


def _expected_files() -> str:
  return " or ".join(" + ".join(s) for s in TOKENIZER_FILE_SETS)


def load_tokenizer(ckpt_dir: str | os.PathLike, **kwargs: Any):
  """The tokenizer stored in an HF checkpoint directory (offline).

  Args:
    ckpt_dir: directory holding ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, or ``tokenizer.model``
      (plus, usually, ``tokenizer_config.json`` / ``special_tokens_map.json``).
    **kwargs: passed to ``AutoTokenizer.from_pretrained``.

  Raises:
    FileNotFoundError: the directory does not exist or has none of the expected tokenizer files (the message
      names the directory and the files looked for).
    ValueError: the files exist but transformers cannot load them; a malformed file (invalid JSON, wrong top-level
      type, a tokenizer.json the tokenizers library rejects) is named with the reason.
  """
  d = Path(ckpt_dir)
  if not d.is_dir():
    raise FileNotFoundError(f"tokenizer directory {d} does not exist")
  if not any(all((d / f).is_file() for f in files) for files in TOKENIZER_FILE_SETS):
    present = sorted(p.name for p in d.iterdir())
    raise FileNotFoundError(
        f"no tokenizer files in {d}: expected {_expected_files()} (found: {present or 'nothing'}). Copy the "
        f"tokenizer files of the original HF checkpoint into this directory.")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  # lazy: heavy dependency transformers (imports torch)
  from transformers import AutoTokenizer, CLIPTokenizer
  try:
    return AutoTokenizer.from_pretrained(os.fspath(d), local_files_only=True, **kwargs)
  except Exception as auto_err:  # noqa: BLE001 - re-raised below with the directory named
    # A bare vocab.json + merges.txt (no tokenizer_config.json) cannot be resolved by AutoTokenizer; it is
    # CLIP's own format, so try CLIPTokenizer before giving up.
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
      try:
        return CLIPTokenizer.from_pretrained(os.fspath(d), local_files_only=True, **kwargs)
      except Exception:  # noqa: BLE001 - the AutoTokenizer error is the informative one
        pass
    bad_file = diagnose_tokenizer_files(d)
    raise ValueError(bad_file or f"transformers could not load the tokenizer in {d}: {type(auto_err).__name__}: "
                                 f"{auto_err}") from auto_err


# JSON files AutoTokenizer may read, in the order a fault is reported (config.json: for the tokenizer class).
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "config.json")


def diagnose_tokenizer_files(d: Path) -> str | None:
  """Names the first malformed tokenizer file in ``d`` and why, or None. Run after a failed load: transformers'
  own errors (a bare JSONDecodeError, a Rust "Model missing. at line 1") do not say which file is at fault."""
  for name in TOKENIZER_JSON_FILES:
    path = d / name
    if not path.is_file():
      continue
    try:
      obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
      return f"{path}: not valid JSON ({where})"
    if not isinstance(obj, dict):
      return f"{path}: expected a JSON object at the top level, got {type(obj).__name__}"
  path = d / "tokenizer.json"
  if path.is_file():
    from tokenizers import Tokenizer  # lazy: not a declared dependency (comes with transformers)
    try:
      Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust library raises a bare Exception with the parse position
      return f"{path}: not a valid tokenizers file ({e})"
  return None


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int = 77, *,
             pad_token_id: int | None = None) -> dict[str, np.ndarray]:
  """Tokenises, truncates and pads to exactly ``max_length``.

  Truncation keeps the special tokens (CLIP: ``<|startoftext|>`` first, ``<|endoftext|>`` last); padding is on
  the right with the tokenizer's pad token (CLIP: ``<|endoftext|>`` = 49407).

  Args:
    tokenizer: an HF tokenizer (e.g. from :func:`load_tokenizer` or :func:`build_clip_bpe_tokenizer`).
    texts: one string or a list of strings.
    max_length: output length L (CLIP's context is 77).
    pad_token_id: override for tokenizers without a pad token (e.g. Llama's); otherwise an error is raised.

  Returns:
    ``{"input_ids": int32 (B, L), "attention_mask": int32 (B, L)}`` with 1 for real tokens, 0 for padding.
  """
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if not texts:
    raise ValueError("tokenize: got an empty list of texts")
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad:
    raise TypeError(f"tokenize: texts must be strings; items {bad} are "
                    f"{sorted({type(texts[i]).__name__ for i in bad})}")
  pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
  if pad is None:
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; pass pad_token_id=")
  enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
  ids = np.full((len(texts), max_length), pad, np.int32)
  mask = np.zeros((len(texts), max_length), np.int32)
  for i, row in enumerate(enc["input_ids"]):
    # Padding by hand keeps it on the right and with `pad` whatever the tokenizer's padding_side / pad id.
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return {"input_ids": ids, "attention_mask": mask}


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable-unicode table used by CLIP's BPE.

  Printable bytes ``!``..``~``, ``¡``..``¬``, ``®``..``ÿ`` map to themselves; the other 68 bytes map to
  ``chr(256 + n)`` in byte order. The dict's insertion order (printable first, then the rest) is CLIP's
  vocabulary order.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in printable}
  n = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + n)
      n += 1
  return table


def clip_bpe_vocab(gz_path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocab token -> id, merges as pairs) of OpenAI's CLIP BPE from ``bpe_simple_vocab_16e6.txt.gz``.

  Merges: lines 1..48,894 after the header, split on whitespace. Vocabulary in id order: 256 byte symbols,
  the same with ``</w>``, each merge's concatenation, ``<|startoftext|>``, ``<|endoftext|>`` (49,408 entries).
  """
  path = Path(gz_path)
  if not path.is_file():
    raise FileNotFoundError(f"CLIP BPE file {path} does not exist (bpe_simple_vocab_16e6.txt.gz from the "
                            f"open-clip-torch wheel)")
  try:
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read CLIP BPE file {path}: {e}") from e
  merge_lines = lines[1:1 + CLIP_NUM_MERGES]
  merges = []
  for i, line in enumerate(merge_lines):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}: merge line {i + 2} is not a pair: {line!r}")
    merges.append((parts[0], parts[1]))
  if len(merges) != CLIP_NUM_MERGES:
    raise ValueError(f"{path}: expected {CLIP_NUM_MERGES} merges, found {len(merges)}")
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
  return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_bpe_tokenizer(gz_path: str | os.PathLike, model_max_length: int = 77):
  """OpenAI's CLIP tokenizer (transformers ``CLIPTokenizer``) from the BPE merges file.

  transformers 5 API: ``vocab=`` a dict and ``merges=`` a list of tuples (``vocab_file=`` is silently ignored
  there). bos/eos/pad = 49406/49407/49407; ``"a photo of a cat"`` -> [49406, 320, 1125, 539, 320, 2368, 49407].
  ``save_pretrained(dir)`` writes files that :func:`load_tokenizer` reads back.
  """
  from transformers import CLIPTokenizer  # lazy: heavy dependency transformers (imports torch)
  vocab, merges = clip_bpe_vocab(gz_path)
  return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


__all__ = ["TOKENIZER_FILE_SETS", "TOKENIZER_JSON_FILES", "load_tokenizer", "diagnose_tokenizer_files", "tokenize",
           "bytes_to_unicode", "clip_bpe_vocab", "build_clip_bpe_tokenizer", "CLIP_NUM_MERGES"]
