"""Every notebook in ``notebooks/`` runs top to bottom on CPU (issue 17), and none is committed with outputs.

How: ``scripts/run_notebooks.py`` (nbclient, the ``python3`` kernel of this environment), one test per notebook,
parametrized over the directory listing so a new notebook is picked up without editing this file. The kernel
inherits this process's environment: ``JAX_PLATFORMS=cpu`` and the suite's 8 simulated CPU devices
(tests/conftest.py), and ``PYTHONPATH`` starts with this checkout, so the notebook imports the code under test
even where another copy of vlsafe_jax is installed; it also shares this process's persistent XLA compilation cache.
The working directory is a fresh temporary directory per notebook: the notebooks write their run directories
relative to it (``runs/...``) and never into the repository.

Each notebook runs with its default (CPU, synthetic) parameters, except ``real_checkpoints``, which gets the paths
of tiny random HF checkpoints (CLIP with a real CLIP BPE tokenizer, a HySAC trainable-state directory on it as
the converted released weights would be, LLaVA-1.5 with a small word-level tokenizer) written here with
torch/transformers, so its loading code runs for real. Any cell error fails the test with the
notebook's name and the cell's index.

Truthfulness: committed notebooks carry no outputs (:func:`test_committed_notebooks_have_no_outputs`); executed
copies are regenerated with ``python scripts/run_notebooks.py OUT_DIR``.
"""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import jax
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "scripts" / "run_notebooks.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

NOTEBOOKS = runner.notebook_paths(REPO / "notebooks")
HYSAC_CURV = 0.5                 # curvature stored in the tiny HySAC directory
# Per-cell limit: the slowest cell (the HySAC smoke job) takes ~1-2 min on 2 loaded cores.
CELL_TIMEOUT_S = 900


def test_notebooks_exist():
  names = {p.stem for p in NOTEBOOKS}
  assert {"hysac", "real_checkpoints"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebooks_have_no_outputs(path):
  """Committed notebooks are stripped (outputs would go stale); a parameters cell exists."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
           and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; clear them with "
                     f"python scripts/run_notebooks.py --strip (the suite executes the notebooks; executed copies: "
                     f"python scripts/run_notebooks.py OUT_DIR)")
  runner.parameters_index(nb, path.name)


def test_injected_parameters_follow_the_parameters_cell_and_reject_unknown_names():
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"),
                                       nbformat.v4.new_code_cell("A = 1\nB = 'x'", metadata={"tags": ["parameters"]}),
                                       nbformat.v4.new_code_cell("print(A)")])
  runner.inject_parameters(nb, {"A": 2}, "t.ipynb")
  assert [c.metadata.get("tags") for c in nb.cells[1:3]] == [["parameters"], ["injected-parameters"]]
  assert nb.cells[2].source.endswith("A = 2")
  with pytest.raises(ValueError, match=r"t.ipynb: parameters \['C'\]"):
    runner.inject_parameters(nb, {"C": 1}, "t.ipynb")


def test_a_failing_cell_names_the_notebook_and_the_cell(tmp_path, monkeypatch):
  """The runner's error names the notebook and the failing cell (a 2-cell notebook: ~3 s for the kernel)."""
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("X = 1", metadata={"tags": ["parameters"]}),
                                       nbformat.v4.new_code_cell("raise RuntimeError('boom here')")])
  path = tmp_path / "broken.ipynb"
  nbformat.write(nb, path)
  with pytest.raises(runner.NotebookCellError, match=r"(?s)broken.ipynb: cell 1 \(\"raise RuntimeError.*boom here"):
    runner.execute(path, cwd=tmp_path, timeout=60)


# --------------------------------------------------------------------------------------------------------------
# Tiny random HF checkpoints for the real-checkpoint notebook (torch + transformers, written once per module)
# --------------------------------------------------------------------------------------------------------------

def _tiny_clip(d: Path) -> Path:
  """A random HF ``CLIPModel`` (2 layers, width 32, 32-px images, OpenAI CLIP vocabulary) + its BPE tokenizer."""
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

  from vlsafe_jax.data import tokenize
  torch.manual_seed(0)
  text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        projection_dim=16)   # vocab 49408, EOS 49407, 77 positions: CLIP's, so the tokenizer fits
  vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=16)
  CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval(
      ).save_pretrained(d)
  tokenize.build_clip_bpe_tokenizer(REPO / "tests" / "assets" / "bpe_simple_vocab_16e6.txt.gz").save_pretrained(d)
  return d


def _tiny_llava(d: Path) -> Path:
  """The suite's tiny random HF LLaVA (tests/models/_llava_hf.py, Llama decoder) + a word-level tokenizer."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  sys.path.insert(0, str(REPO / "tests" / "models"))
  import _llava_hf as H
  H.build_hf("llama", d, seed=0)
  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  words = ("a the of and is in on to what how can i you it this image picture photo show me describe do make "
           "tell about with for not are there chat between curious human artificial intelligence assistant gives "
           "helpful detailed polite answers questions user : . , ? !").split()
  vocab = {w: i for i, w in enumerate(specials + words[:H.VOCAB - len(specials) - 1])}
  vocab["<image>"] = H.IMAGE_TOKEN
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                          unk_token="<unk>").save_pretrained(d)
  cfg = json.loads((d / "config.json").read_text())
  assert cfg["image_token_index"] == H.IMAGE_TOKEN and max(vocab.values()) < H.VOCAB
  return d


def _tiny_hysac(d: Path, clip_dir: Path) -> Path:
  """A HySAC trainable-state directory on the tiny CLIP (fresh LoRA; curvature HYSAC_CURV instead of the initial 1,
  so the notebook's printed curvature shows the file was loaded): the format ``checkpoints_convert hysac`` writes
  for the released weights."""
  from vlsafe_jax.methods.hysac import model as hysac_model
  m = hysac_model.HySAC.from_pretrained(clip_dir, seed=1)
  m.scalars.curv[...] = math.log(HYSAC_CURV)
  hysac_model.save_trainable(m, d, base_path=str(clip_dir))
  return d


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_hf")
  clip = _tiny_clip(root / "clip")
  return {"CLIP_DIR": str(clip), "HYSAC_DIR": str(_tiny_hysac(root / "hysac", clip)),
          "LLAVA_DIR": str(_tiny_llava(root / "llava"))}


def _params(name: str, request) -> dict:
  if name == "real_checkpoints":
    return dict(request.getfixturevalue("tiny_checkpoints"))
  return {}


# The HySAC notebook runs the smoke HySAC job, as tests/train/test_hysac_train.py's module fixture does: on the same
# xdist worker (its group), one of the two loads the other's compiled programs from the persistent XLA cache.
_GROUPS = {"hysac": "hysac_smoke_run"}


@pytest.mark.slow
@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.xdist_group(_GROUPS[p.stem])] if p.stem in _GROUPS
                                               else []) for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch, request):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The kernel shares this process's persistent XLA cache (tests/conftest.py): programs the other tests compiled
  # (e.g. the smoke HySAC job's) load instead of compiling. Safe: this process compiles nothing while it waits.
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  params = _params(path.stem, request)
  nb, timing = runner.execute(path, cwd=tmp_path, params=params, timeout=CELL_TIMEOUT_S,
                              out_path=tmp_path / "executed" / path.name)
  if path.stem == "real_checkpoints":
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"curvature {HYSAC_CURV:.3f}" in text, "the notebook did not use the HySAC weights of HYSAC_DIR"
  print(f"{path.name}: {timing['total_s']:.1f} s")
