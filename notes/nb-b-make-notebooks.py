"""Writes notebooks/uwm.ipynb, notebooks/cmrm.ipynb and notebooks/tga.ipynb (outputs stripped) from the cell
sources below. Run from the repository root:  python notes/nb-b-make-notebooks.py [uwm cmrm tga]"""
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent

INSTALL = '''\
# Install: skipped where vlsafe_jax is already importable (e.g. this repository's own environment).
import importlib.util
import os
import pathlib
import shutil

if importlib.util.find_spec("vlsafe_jax") is None:
    # Where to install from: a clone of this repository (found next to this notebook) or VLSAFE_JAX_SRC (a path or
    # a pip URL such as "git+https://github.com/<owner>/vlsafe_jax"). Nothing else is downloaded by the notebook.
    here = pathlib.Path.cwd()
    clone = next((p for p in (here, here.parent) if (p / "pyproject.toml").is_file() and (p / "vlsafe_jax").is_dir()),
                 None)
    src = os.environ.get("VLSAFE_JAX_SRC") or (str(clone) if clone else None)
    if src is None:
        raise RuntimeError("vlsafe_jax is not installed: set VLSAFE_JAX_SRC to a clone of the repository or its git URL")
    # The JAX build for the accelerator: NVIDIA GPU (Colab GPU runtimes) -> the CUDA 12 extra; Cloud TPU / Colab
    # TPU runtimes -> jax[tpu]; otherwise the CPU build.
    if shutil.which("nvidia-smi"):
        spec, extra = f"{src}[cuda12]" if clone else f"vlsafe_jax[cuda12] @ {src}", ""
    elif os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR") or pathlib.Path("/dev/accel0").exists():
        spec, extra = (src if clone else f"vlsafe_jax @ {src}"), "jax[tpu]"
    else:
        spec, extra = (src if clone else f"vlsafe_jax @ {src}"), ""
    get_ipython().run_line_magic("pip", f"install '{spec}' {extra}")
import vlsafe_jax
print("vlsafe_jax", vlsafe_jax.__version__, "from", pathlib.Path(vlsafe_jax.__file__).parent)'''

SHOW = '''\
def show(fig):
    """Displays a figure inline whatever the active matplotlib backend (the library's plot files force Agg)."""
    display(fig)
    plt.close(fig)'''


def md(s):
  return nbformat.v4.new_markdown_cell(s.strip("\n"))


def code(s, params=False):
  return nbformat.v4.new_code_cell(s.strip("\n"), metadata={"tags": ["parameters"]} if params else {})


# ==============================================================================================================
# UWM
# ==============================================================================================================

UWM = [
md('''
# UWM: unsafe-weight manipulation of CLIP

What this notebook shows, on the built-in **synthetic** safe/unsafe benchmark (labelled synthetic; no weights or
data are downloaded), with the same library functions as `python -m vlsafe_jax.uwm`:

1. **calibrate, score, select, negate**: the inputs of the target Linear layers (vision `mlp.fc2`, text
   `self_attn.out_proj`) are captured on paired safe/unsafe inputs, every weight gets the unsafe/safe
   information-flow ratio `R_io`, the top weights up to the cumulative share `tau` are selected per layer, and
   their sign is flipped (`alpha = -1`);
2. the **per-layer score distributions** and the **selected-weight masks** as images;
3. **SafeGround** (does the safe item win?), Safe-CLIP retrieval and **zero-shot** accuracy before and after;
4. an **alpha sweep** (call-time masked layers: the weights are not rewritten for each alpha);
5. **export back to Hugging Face** format, and the round trip checked.

On CPU the parameters below are a reduced smoke setting (a small stage-1 CLIP trained in the notebook, ~a minute).
On a GPU/TPU with a real CLIP ViT-L/14 change only the parameter cell (e.g.
`CONFIG = "configs/uwm_clip_l14_visu.py"` and the paths in `OVERRIDES`). The README section "Results on the synthetic
settings" says what the synthetic edit does and does not show (the text edit moves the metrics the paper's way,
the vision scores are nearly flat).
'''),
code(INSTALL),
code('''
# Parameters (CPU / synthetic defaults). On a GPU/TPU only this cell changes, e.g.
#   CONFIG = "configs/uwm_clip_l14_visu.py"
#   OVERRIDES = ["model.path=/ckpt/clip-vit-large-patch14", "calib.text_manifest=/data/uwm/text_pairs.jsonl",
#                "calib.vision_manifest=/data/uwm/image_pairs.jsonl", "data.test_json=/data/visu/test.json",
#                "data.coco_root=/data/coco", "data.unsafe_root=/data/visu/nsfw", "progress=False"]
CONFIG = "uwm_synthetic:smoke"     # "uwm_synthetic" = the full synthetic job (its stage-1 CLIP takes minutes on CPU)
WORKDIR = "runs/notebook_uwm"      # run directory (relative to the notebook's working directory)
# The smoke preset's stage-1 CLIP (width 32, 2 layers, 6 epochs of 1024 pairs), trained into WORKDIR/stage1 (and
# reused by a rerun) without the preset's checkpoint every 4 steps, which would cost more than the training here.
OVERRIDES = [
    "model.stage1_workdir=runs/notebook_uwm/stage1",
    "model.stage1_overrides=('clip_model.width=32', 'clip_model.layers=2', 'clip_model.heads=4', "
    "'clip_model.embed_dim=32', 'data.train_size=1024', 'clip_stage.batch_size=32', 'clip_stage.epochs=6', "
    "'train.progress=False', 'train.checkpoint_every=1000', 'train.log_every=50')",
    "progress=False",
]
ALPHAS = (1.0, 0.0, -1.0, -2.0)    # the alpha sweep (1 = the unedited model, -1 = UWM's negation)
SHOW_LAYERS = 4                    # at most this many layers per tower in the score / mask pictures
''', params=True),
md('''
## 1. The configuration and the base CLIP

The same command-line parser as `python -m vlsafe_jax.uwm` (`config.load_cli`), so the printed command reproduces
this notebook's numbers. The base CLIP is `model.path` (an HF or converted CLIP directory), or, for the synthetic
benchmark, the stage-1 CLIP trained from scratch on safe and unsafe pairs by the HySAC job's stage-`clip` trainer
(`jobs.uwm.base_clip_dir`: trained once, then reused).
'''),
code('''
%matplotlib inline
import shlex
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import display

from checkpoints_convert import clip as clip_convert
from vlsafe_jax import config as config_lib
from vlsafe_jax import perf
from vlsafe_jax.data import sources
from vlsafe_jax.jobs import uwm as uwm_job
from vlsafe_jax.methods.uwm import masked_model, set_alpha
from vlsafe_jax.models.clip import CLIP


''' + SHOW + '''


argv = ["--config", CONFIG, "--workdir", WORKDIR, *OVERRIDES]
cfg, workdir, _ = config_lib.load_cli(argv, "uwm_synthetic")
print("devices:", jax.devices())
print("equivalent command: python -m vlsafe_jax.uwm", shlex.join(argv))
t0 = time.perf_counter()
model_dir = uwm_job.base_clip_dir(cfg)
tok = sources.make_text_encoder(cfg.data, model_dir)
base = CLIP.from_pretrained(model_dir)
print(f"base CLIP: {model_dir} ({time.perf_counter() - t0:.1f} s)")
print("vision:", base.config.vision_config)
print("text:  ", base.config.text_config)
'''),
md('''
## 2. Calibrate, score, select, negate

`jobs.uwm.compute_edit` is the job's edit stage without its files: it builds the calibration pairs (`calib.*`: here
the first `calib.n_pairs` quadruplets of the synthetic train split) and calls `methods.uwm.uwm_clip`, text tower
first, then vision. Each calibration batch is one jitted step (safe forward + unsafe forward + per-feature
statistics + the rank-1 score accumulators). The result holds the new model (the base is untouched), the boolean
masks and the scores, keyed by layer path.
'''),
code('''
t0 = time.perf_counter()
res = uwm_job.compute_edit(cfg, base, tok)
print(f"calibration + edit: {time.perf_counter() - t0:.1f} s")
for tower, info in res.info.items():
    share = 100 * info["selected"] / info["weights"]
    print(f"{tower:6s}: {info['pairs']} pairs, {info['layers']} layers, tau {info['tau']}, alpha {info['alpha']}: "
          f"{info['selected']} of {info['weights']} weights selected ({share:.2f}%)")
'''),
md('''
## 3. Per-layer score distributions

Each weight's score is the mean over calibration pairs of (unsafe information flow) / (safe information flow)
through it. A weight with `R > 1` carries more of the unsafe input than of the safe one. Selection takes the
highest scores of each layer until they hold the share `tau` of the layer's total score. Selected weights are in
red (log scale on both axes).
'''),
code('''
def layers_of(tower):
    return [k for k in res.scores if k.startswith(f"{tower}_model.")][:SHOW_LAYERS]


rows = [(t, layers_of(t)) for t in ("text", "vision") if layers_of(t)]
ncols = max(len(ls) for _, ls in rows)
fig, axes = plt.subplots(len(rows), ncols, figsize=(3.6 * ncols, 2.9 * len(rows)), squeeze=False)
for r, (tower, names) in enumerate(rows):
    for c in range(ncols):
        ax = axes[r, c]
        if c >= len(names):
            ax.axis("off")
            continue
        s = np.asarray(res.scores[names[c]], np.float64).ravel()
        m = np.asarray(res.masks[names[c]]).ravel()
        bins = np.logspace(np.log10(max(s[s > 0].min(), 1e-12)), np.log10(s.max()), 60)
        ax.hist(s, bins=bins, color="tab:blue", alpha=0.7, label="all weights")
        ax.hist(s[m], bins=bins, color="tab:red", alpha=0.9, label=f"selected ({m.sum()})")
        ax.axvline(np.median(s), color="k", ls=":", lw=1, label=f"median {np.median(s):.2f}")
        ax.set(xscale="log", yscale="log", title=names[c].replace("_model.encoder.layers.", " L"), xlabel="R_io")
        ax.legend(fontsize=7)
fig.suptitle("UWM scores per layer (unsafe / safe information flow)")
fig.tight_layout()
show(fig)
'''),
md('''
## 4. The selected weights as images

Each mask is drawn in the PyTorch layout of the layer's weight, rows = output units, columns = input features
(a dark pixel = a negated weight). Rows or columns that light up as lines are units or features that the unsafe
inputs use much more than the safe ones.
'''),
code('''
fig, axes = plt.subplots(len(rows), ncols, figsize=(3.6 * ncols, 3.4 * len(rows)), squeeze=False)
for r, (tower, names) in enumerate(rows):
    for c in range(ncols):
        ax = axes[r, c]
        if c >= len(names):
            ax.axis("off")
            continue
        m = np.asarray(res.masks[names[c]]).T        # Flax (d_in, d_out) -> PyTorch (d_out, d_in)
        ax.imshow(m, cmap="Greys", interpolation="nearest", aspect="auto")
        ax.set(title=f"{names[c].replace('_model.encoder.layers.', ' L')}\\n{m.sum()} of {m.size} selected",
               xlabel="input feature", ylabel="output unit")
fig.tight_layout()
show(fig)
'''),
md('''
## 5. SafeGround, retrieval and zero-shot, before and after

`jobs.uwm.evaluate` is the job's evaluation (of the base model, and of the edited one saved to and read back from
`WORKDIR/edited_clip`, as the job does): SafeGround on the test quadruplets (P^t_s ... GS; ties count as
failures), the Safe-CLIP retrieval columns, and zero-shot accuracy (here the synthetic background split). The table
is the one `python -m vlsafe_jax.uwm` prints (`jobs.uwm.results_rows`).
'''),
code('''
test = sources.split_source(cfg.data, "test")
zs_sets = uwm_job.zeroshot_datasets(cfg)
t0 = time.perf_counter()
# As the job does: the edited model is saved as a converted CLIP directory and evaluated as read back from it.
edited_dir = clip_convert.save_converted(res.model, Path(workdir) / "edited_clip", src=model_dir)
edited = CLIP.from_pretrained(edited_dir)
before = uwm_job.evaluate(base, cfg, tok, test, zs_sets)
after = uwm_job.evaluate(edited, cfg, tok, test, zs_sets)
print(f"evaluation: {time.perf_counter() - t0:.1f} s")
print(perf.format_table(["metric", "before", "after", "delta"], uwm_job.results_rows(before, after)))

keys = list(uwm_job.SG_KEYS) + [f"zero-shot {k}" for k in before.get("zeroshot", {}) if k != "mean"]
val = lambda r, k: r["zeroshot"][k[len("zero-shot "):]] if k.startswith("zero-shot") else r["safeground"][k]
x = np.arange(len(keys))
fig, ax = plt.subplots(figsize=(11, 3.6))
ax.bar(x - 0.2, [val(before, k) for k in keys], 0.4, label="before", color="tab:gray")
ax.bar(x + 0.2, [val(after, k) for k in keys], 0.4, label="after UWM", color="tab:red")
ax.set_xticks(x, keys, rotation=30, ha="right")
ax.set(ylabel="%", title="SafeGround and zero-shot accuracy, before and after the edit")
ax.legend()
show(fig)
'''),
md('''
## 6. The alpha sweep

`methods.uwm.masked_model` wraps the selected layers in `MaskedDense` (the weights stay untouched; the selected
ones are multiplied by `alpha` at call time), and `set_alpha` changes alpha in place. `alpha = 1` is the unedited
model, `0` removes the selected weights, `-1` is UWM's negation (it must equal the edited model above: checked).
'''),
code('''
swept = masked_model(base, res.masks)
sweep = {}
t0 = time.perf_counter()
for a in ALPHAS:
    set_alpha(swept, a)
    sweep[a] = uwm_job.evaluate(swept, cfg, tok, test, zs_sets)
print(f"sweep over {len(ALPHAS)} alphas: {time.perf_counter() - t0:.1f} s")
if -1.0 in sweep:
    same = uwm_job.flat_metrics(sweep[-1.0]) == uwm_job.flat_metrics(after)
    print("alpha -1 (call-time masks) equals the edited model's evaluation:", same)
if 1.0 in sweep:
    print("alpha 1 equals the base model's evaluation:", uwm_job.flat_metrics(sweep[1.0]) == uwm_job.flat_metrics(before))

curves = {"Txt_s": ("safeground", "Txt_s"), "Img_s": ("safeground", "Img_s"), "GS": ("safeground", "GS"),
          "T_s-V_s R@10 (safe retrieval)": ("retrieval", ("T_s-V_s", "R@10"))}
fig, ax = plt.subplots(figsize=(7, 4))
for label, (group, key) in curves.items():
    if all(group in sweep[a] for a in ALPHAS):
        get = (lambda r, key=key: r["retrieval"][key[0]][key[1]]) if group == "retrieval" else (lambda r, key=key: r["safeground"][key])
        ax.plot(ALPHAS, [get(sweep[a]) for a in ALPHAS], "-o", label=label)
if all("zeroshot" in sweep[a] for a in ALPHAS):
    ax.plot(ALPHAS, [sweep[a]["zeroshot"]["mean"] for a in ALPHAS], "-s", color="k", label="zero-shot mean")
ax.axvline(-1.0, color="tab:red", ls=":", lw=1)
ax.set(xlabel="alpha (selected weights multiplied by alpha)", ylabel="%", title="UWM alpha sweep")
ax.invert_xaxis()
ax.legend(fontsize=8)
show(fig)
'''),
md('''
## 7. Export back to Hugging Face

`checkpoints_convert.clip.export_hf` writes `config.json` + `model.safetensors` in the HF `CLIPModel` layout (the
job does the same with `export_hf=True`; `python -m checkpoints_convert export` from a converted directory). The
exported directory loads back through the HF loader path of `CLIP.from_pretrained`, and gives the same embeddings
as the edited model in memory (float32 round trips bit-exactly). With torch installed,
`transformers.CLIPModel.from_pretrained(export_dir)` loads it too.
'''),
code('''
export_dir = clip_convert.export_hf(res.model, Path(workdir) / "hf_export", src=model_dir)
print(export_dir, sorted(p.name for p in Path(export_dir).iterdir()))
back = CLIP.from_pretrained(export_dir)
flat = lambda m: dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
want, got = flat(res.model), flat(back)
same = set(want) == set(got) and all(np.array_equal(np.asarray(want[k].get_value()), np.asarray(got[k].get_value()))
                                     for k in want)
print(f"{len(want)} parameter arrays; the exported-and-reloaded CLIP equals the edited one bit for bit: {same}")
'''),
md('''
## What this shows, and how it relates to the command line

`python -m vlsafe_jax.uwm` with the printed arguments runs the same functions (`base_clip_dir`, `compute_edit`
inside its `edit` stage, `evaluate`, `results_rows`) and prints the same before/after table; it also writes
`edited_clip/`, `masks.npz` and `eval.json` to the run directory and can resume. On the synthetic benchmark the
edit is a demonstration, not the paper's evaluation: with this small stage-1 CLIP the numbers move by a few points
either way, and how much they move depends on the stage-1 CLIP (see the README's UWM results for the full
synthetic job). With a real CLIP ViT-L/14 and ViSU pairs, the paper reports GS 1.2 -> 4.5 and zero-shot 72.7 -> 61.3
(Table 10; not measured here).
'''),
]


# ==============================================================================================================
# CMRM
# ==============================================================================================================

CMRM = [
md('''
# CMRM: correcting a vision-language model's hidden states at inference time

What this notebook shows, on the built-in **synthetic** vision-language setting (a tiny LLaVA trained in the
notebook; labelled synthetic; no weights or data are downloaded), with the same job as `python -m vlsafe_jax.cmrm`:

1. **extract the shift**: the dataset-level vector `v_l = mean(h_text - h_corrupted)` at the last prompt token of
   every decoder layer, on anchor prompts (the image replaced by a blank one, `cmrm.corrupt`);
2. **steer generation**: `h <- h + alpha v` at every layer and position, inside the compiled decode loop, with a few
   responses side by side;
3. the **unsafe rate with and without** CMRM (and text-only, and sample-level CMRM), keyword judge;
4. the **alpha curve** (the job's `sweep` command);
5. the **hidden-state PCA** of five input variants with and without CMRM (the job's `analyze` command).

On CPU the parameters below are the smoke preset (16 items per set, a 2-layer model). On a GPU/TPU with
llava-1.5-7b-hf change only the parameter cell (`CONFIG = "configs/cmrm_llava15_7b.py"`, `model.path` and
`data.sets` in `OVERRIDES`). The README section "Results on the synthetic settings" says what the synthetic
setting shows; read the tables below rather than expecting an effect: whether attaching an image erodes refusal in
the tiny model is a property of the synthetic setting (`configs/cmrm_synthetic.py`), not of CMRM.
'''),
code(INSTALL),
code('''
# Parameters (CPU / synthetic defaults). On a GPU/TPU only this cell changes, e.g.
#   CONFIG = "configs/cmrm_llava15_7b.py"
#   OVERRIDES = ["model.path=/ckpt/llava-1.5-7b-hf", "data.sets=('mmsb:mm-safetybench:/data/mmsb.jsonl',)",
#                "progress=False"]
CONFIG = "cmrm_synthetic:smoke"    # "cmrm_synthetic" = the full synthetic setting (minutes on 2 CPU cores)
WORKDIR = "runs/notebook_cmrm"     # run directory (relative to the notebook's working directory); reruns resume
OVERRIDES = ["progress=False", "cmrm.sweep_alphas=(0.0, 0.5, 1.0, 2.0)"]
N_EXAMPLES = 4                     # responses shown side by side
''', params=True),
md('''
## 1. The configuration, the model and the shift vector

The same command-line parser as `python -m vlsafe_jax.cmrm` (`config.load_cli`); each later section prints the
command that gives its numbers. `jobs.cmrm.run(cfg, workdir, "extract")` trains the tiny synthetic LLaVA into
`WORKDIR/model` on first use (for `model.kind=hf` it loads `model.path`) and extracts the dataset-level vectors
into `WORKDIR/cmrm_vectors.{npz,json}`; the later commands reuse both.
'''),
code('''
%matplotlib inline
import shlex
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from vlsafe_jax import config as config_lib
from vlsafe_jax import perf
from vlsafe_jax.eval import judge as judge_lib
from vlsafe_jax.eval import vlm_safety
from vlsafe_jax.jobs import cmrm as cmrm_job
from vlsafe_jax.methods.cmrm import steer


''' + SHOW + '''


def command(cmd):
    argv = ["--config", CONFIG, "--workdir", WORKDIR, cmd, *OVERRIDES]
    print("equivalent command: python -m vlsafe_jax.cmrm", shlex.join(argv))
    cfg, workdir, _ = config_lib.load_cli(argv, "cmrm_synthetic", cmrm_job.COMMANDS)
    return cfg, workdir


print("devices:", jax.devices())
cfg, workdir = command("extract")
t0 = time.perf_counter()
extracted = cmrm_job.run(cfg, workdir, "extract")
print(f"model + vectors: {time.perf_counter() - t0:.1f} s")
model, tok, model_id = cmrm_job.load_model(cfg, workdir)          # the model the job trained (or model.path)
sets, anchors = cmrm_job.load_sets(cfg)
vec = cmrm_job.get_vectors(model, tok, anchors, cfg, workdir, model_id)   # read back from cmrm_vectors.npz
print("model:", model_id, "| decoder layers:", model.config.text_config.num_hidden_layers,
      "| width:", model.config.text_config.hidden_size)
print("sets:", {k: len(v) for k, v in sets.items()}, "| anchors:", len(anchors))
print("vector metadata:", vec.meta)
'''),
md('''
**The shift.** One vector per decoder layer (`(L, D)`). Its norm per layer says how far, on average, attaching
an image moves the last prompt token's state away from where the same prompt without the image is; the cosine
between layers says whether the shift keeps its direction through the depth (the residual stream carries every
earlier layer's change forward).
'''),
code('''
v = np.asarray(vec.vectors, np.float64)
unit = v / np.linalg.norm(v, axis=-1, keepdims=True)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
axes[0].bar(np.arange(1, len(v) + 1), np.linalg.norm(v, axis=-1), color="tab:purple")
axes[0].set(xlabel="decoder layer", ylabel="|v_l|", title="CMRM shift: norm per layer")
im = axes[1].imshow(unit @ unit.T, vmin=-1, vmax=1, cmap="coolwarm")
axes[1].set(xlabel="layer", ylabel="layer", title="cosine between the layers' vectors",
            xticks=range(len(v)), xticklabels=range(1, len(v) + 1), yticks=range(len(v)),
            yticklabels=range(1, len(v) + 1))
fig.colorbar(im, ax=axes[1])
fig.tight_layout()
show(fig)
'''),
md('''
## 2. Steering generation

`methods.cmrm.steer.Steerer` is the `steer_fn` the job passes to `eval.vlm_safety.generate_responses`: the vectors
and alpha travel into the compiled decode loop as traced hooks, so no alpha recompiles. Below: the first
`N_EXAMPLES` harmful requests (with their images) answered without steering, without the image (text only), and
with dataset-level CMRM at `cmrm.alpha`; the judge column is the configured judge's verdict on each response.
'''),
code('''
items = [it for it in sets["harmful"] if it.has_image][:N_EXAMPLES]
judge = judge_lib.make_judge(dict(cfg.judge))
gen = dict(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, template=cfg.prompt.template,
           system=cfg.prompt.system or None)
steerer = steer.Steerer(model, level="dataset", vectors=vec.vectors, alpha=cfg.cmrm.alpha, layers=cfg.cmrm.layers,
                        apply=cfg.cmrm.apply)
rows = []
for name, kw in (("image", dict(use_images=True)), ("text only", dict(use_images=False)),
                 (f"image + CMRM (alpha {cfg.cmrm.alpha:g})", dict(use_images=True, steer_fn=steerer))):
    resp = vlm_safety.generate_responses(model, tok, items, **kw, **gen)
    ev = vlm_safety.evaluate_responses(items, resp, judge, mode="response")
    rows += [[it.question[:50], name, r[:60], row["label"]] for it, r, row in zip(items, resp, ev["items"])]
rows.sort(key=lambda r: r[0])
print(perf.format_table(["request", "input", "response", f"judge ({judge.name})"], rows))
'''),
md('''
## 3. Unsafe rate with and without CMRM

The job's `evaluate` command: every evaluation set without steering, text only, with dataset-level CMRM and with
sample-level CMRM (two extra prefills per batch). `unsafe %` is the judge's rate (for the synthetic setting the
refusal-keyword judge: a response without a refusal counts as unsafe, so on the benign and grounded sets a high
rate is the wanted behaviour); utility is exact match against the expected answer where the set has one.
'''),
code('''
cfg, workdir = command("evaluate")
t0 = time.perf_counter()
results = cmrm_job.run(cfg, workdir, "evaluate")
print(f"evaluate: {time.perf_counter() - t0:.1f} s")
conds = list(results["conditions"])
set_names = list(next(iter(results["conditions"].values())))
fig, ax = plt.subplots(figsize=(9, 3.6))
w = 0.8 / len(conds)
for i, c in enumerate(conds):
    ax.bar(np.arange(len(set_names)) + i * w - 0.4 + w / 2,
           [results["conditions"][c][s]["overall"]["unsafe_rate"] for s in set_names], w, label=c)
ax.set_xticks(range(len(set_names)), set_names)
ax.set(ylabel=f"unsafe % ({results['judge']})", ylim=(0, 105), title="unsafe rate per set and condition")
ax.legend(fontsize=8, ncol=len(conds))
show(fig)
'''),
md('''
## 4. The alpha curve

The job's `sweep` command: dataset-level CMRM at every `cmrm.sweep_alphas` (alpha 0 = no steering). The
unsteered and text-only rows are stored stages of the run directory, so they are reused, not generated again.
'''),
code('''
cfg, workdir = command("sweep")
t0 = time.perf_counter()
swept = cmrm_job.run(cfg, workdir, "sweep")
print(f"sweep: {time.perf_counter() - t0:.1f} s")
alphas = [float(a) for a in cfg.cmrm.sweep_alphas]
fig, ax1 = plt.subplots(figsize=(7, 3.8))
for s, style in zip(set_names, ("-o", "-s", "-^", "-v")):
    ax1.plot(alphas, [swept["conditions"][f"dataset_alpha_{a:g}"][s]["overall"]["unsafe_rate"] for a in alphas],
             style, label=f"{s}: unsafe %")
for s in set_names:
    util = [swept["conditions"][f"dataset_alpha_{a:g}"][s]["utility_exact_match"] for a in alphas]
    if all(u is not None for u in util):
        ax1.plot(alphas, util, "--", color="k", label=f"{s}: utility (exact match %)")
ax1.axhline(swept["conditions"]["text_only"]["harmful"]["overall"]["unsafe_rate"], color="tab:blue", ls=":",
            lw=1, label="harmful, text only")
ax1.set(xlabel="alpha", ylabel="%", ylim=(-3, 103), title="dataset-level CMRM: alpha sweep")
ax1.legend(fontsize=7)
show(fig)
'''),
md('''
## 5. The hidden-state PCA

The job's `analyze` command (cmrm.md §7.3): the last decoder layer's output at the last prompt token for five
variants of each held-out harmful item (image + query, blank image, noise image, caption + query, query only),
without and with CMRM, projected on the 2-D PCA plane fitted on the unsteered points. The table gives each
variant's centroid distance to the text-only centroid; CMRM is meant to move the image variants toward it. The
picture is the one the job writes (`cmrm_analysis.png`).
'''),
code('''
cfg, workdir = command("analyze")
analysis = cmrm_job.run(cfg, workdir, "analyze")
display(Image(filename=str(workdir / "cmrm_analysis.png")))
dist = analysis["distance_to_text"]
names = list(dist)
fig, ax = plt.subplots(figsize=(7, 3.4))
ax.bar(np.arange(len(names)) - 0.2, [dist[n]["full"]["off"] for n in names], 0.4, label="CMRM off", color="tab:gray")
ax.bar(np.arange(len(names)) + 0.2, [dist[n]["full"]["on"] for n in names], 0.4,
       label=f"CMRM on (alpha {cfg.cmrm.alpha:g})", color="tab:purple")
ax.set_xticks(range(len(names)), [cmrm_job.VARIANT_STYLES[n][0] for n in names], rotation=20, ha="right")
ax.set(ylabel="distance to the text-only centroid", title="centroid distances (full hidden dimension)")
ax.legend()
show(fig)
'''),
md('''
## What this shows

Every number above comes from `jobs.cmrm` (the commands printed before each section reproduce them from the shell;
the run directory holds `eval.json`, `metrics.jsonl` and `cmrm_analysis.*`). In the synthetic setting the tiny
model may refuse as often with an image as without, and then CMRM has nothing to correct: the table and the
curve say which is the case for the configured setting. The PCA section shows the mechanism either way: the image
variants sit away from the text-only states, and the shift moves them. With llava-1.5-7b-hf and real safety sets
the paper reports large drops of the unsafe rate (not measured here).
'''),
]

# ==============================================================================================================
# TGA
# ==============================================================================================================

TGA = [
md('''
# TGA: text-guided alignment of a vision-language model

What this notebook shows, on the built-in **synthetic** TGA setting (a tiny LLaVA whose language model was first
aligned on text only, including refusals of hazard descriptions; labelled synthetic; nothing is downloaded), with
the same job as `python -m vlsafe_jax.train --config configs/tga_synthetic.py`:

1. training from a text-aligned base: **TGA** (each image's retrieved text, the alignment and pair-wise terms on
   the hidden states of the configured layers) and, with `variants=('tga', 'plain')` in the parameter cell, **plain**
   LLaVA alignment from the same base (the baseline; left out of the CPU defaults for time);
2. the **alignment terms during training** (raw alignment / pair-wise losses, the language-model loss, and the
   image-caption hidden-state cosine per layer);
3. the **logit-lens curves**: per decoder layer, the rank of the refusal tokens for an image of a hazard vs the
   same scene described in text, and the cosine between image-token and description-token states;
4. the **defense success rate (DSR)** on unseen hazard images, before (the base model) and after training.

**Reduced setting.** The full synthetic setting (`configs/tga_synthetic.py`, ~6 min on 2 CPU cores) does not fit
the notebook's CPU budget, so the defaults below are the smoke preset (a 3-layer, width-32 model) with more steps
than the preset's 4, and TGA only (each variant's train steps take ~30 s to compile on 2 CPU cores): a pipeline
demonstration, whose DSR and held-out loss are not the README's numbers. On a
GPU/TPU change only the parameter cell: `CONFIG = "configs/tga_synthetic.py"` with `OVERRIDES = []` for the full
synthetic setting, or `CONFIG = "configs/tga_llava_mistral7b.py"` with `model.path` and the `data.*` paths.
'''),
code(INSTALL),
code('''
# Parameters (CPU / synthetic defaults). On a GPU/TPU only this cell changes, e.g.
#   CONFIG = "configs/tga_llava_mistral7b.py"; GLOBAL_BATCH = 0
#   OVERRIDES = ["model.path=/ckpt/llava-mistral-7b-stage0", "data.pretrain_json=/data/tga/pretrain.json",
#                "data.finetune_json=/data/tga/finetune.json", "data.image_folder=/data/tga/images",
#                "data.toxic_manifest=/data/tga/toxic.jsonl", "analysis.manifest=/data/tga/lens.jsonl"]
CONFIG = "tga_synthetic:smoke"     # "tga_synthetic" = the full synthetic setting (~6 min on 2 CPU cores)
WORKDIR = "runs/notebook_tga"      # run directory (relative to the notebook's working directory); reruns resume
OVERRIDES = [                      # the reduced setting: more steps than the smoke preset, still seconds per stage
    "base.steps=100", "base.batch_size=16", "data.train_size=64", "data.eval_size=16",
    "tga.pretrain.steps=6", "tga.finetune.steps=30", "tga.finetune.grad_accum=1",
    "train.log_every=2", "train.checkpoint_every=1000", "train.progress=False",
    "variants=('tga',)",           # ('tga', 'plain') adds the plain-alignment baseline (~30 s more compilation on CPU)
]
GLOBAL_BATCH = 8                   # rows per step over all devices (0 = the config's batch_size_per_device)
'''.replace("\n    \n", "\n"), params=True),
md('''
## 1. Training: the base, then the variants

The cell builds the command line of `python -m vlsafe_jax.train` (printed) and calls the job it runs,
`jobs.tga.run`: the text-aligned base is trained once into `WORKDIR/base`, then each variant runs stage 1
(projector) and stage 2 (projector + decoder) from it, is saved to `WORKDIR/final/<variant>` and evaluated
(`eval.json`: held-out loss and token accuracy, DSR per hazard category with the keyword judge). The batch per
device is `GLOBAL_BATCH` split over the data devices, so the run matches the command on the same device count.
'''),
code('''
%matplotlib inline
import json
import shlex
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from vlsafe_jax import config as config_lib
from vlsafe_jax.jobs import tga as tga_job
from vlsafe_jax.train import common


''' + SHOW + '''


argv = ["--config", CONFIG, "--workdir", WORKDIR, *OVERRIDES]
cfg, workdir, _ = config_lib.load_cli(argv, "tga_synthetic")
if GLOBAL_BATCH:
    n_batch_devices = jax.device_count() // (cfg.mesh.model * max(cfg.mesh.fsdp, 1)) if cfg.mesh.data == -1 \\
        else cfg.mesh.data * max(cfg.mesh.fsdp, 1)
    per_device = max(GLOBAL_BATCH // n_batch_devices, 1)
    argv += [f"tga.{s}.batch_size_per_device={per_device}" for s in cfg.stages]
    cfg, workdir, _ = config_lib.load_cli(argv, "tga_synthetic")
print("devices:", jax.devices())
print("equivalent command: python -m vlsafe_jax.train", shlex.join(argv))
t0 = time.perf_counter()
results = tga_job.run(cfg, workdir)
print(f"base + {len(cfg.variants)} variants x {len(cfg.stages)} stages + evaluation: {time.perf_counter() - t0:.1f} s")
'''),
md('''
## 2. The alignment terms during training

From the run's `metrics.jsonl` (one record every `train.log_every` steps, keyed `<variant>_<stage>`): the raw
alignment and pair-wise losses (before their weights; TGA trains on them, plain alignment only logs them), the
language-model loss, and the mean over the configured layers of the cosine between image-token states and the
caption's states (`cos_vc`).
'''),
code('''
recs = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
runs = {}
for r in recs:
    if "align_raw" in r:
        runs.setdefault(r["stage"], []).append(r)
panels = [("align_raw", "alignment term (raw)"), ("pairwise_raw", "pair-wise term (raw)"), ("ce", "LM loss (CE)"),
          ("cos_vc", "cos(image tokens, caption), mean over layers")]
fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
offset = {}
for name, rs in runs.items():
    variant, stage = name.split("_", 1)
    x0 = offset.get(variant, 0)
    steps = np.array([r["step"] for r in rs]) + x0
    offset[variant] = steps.max() if len(steps) else x0
    for ax, (key, title) in zip(axes, panels):
        if key == "cos_vc":
            ks = sorted(k for k in rs[0] if k.startswith("cos_vc_l"))
            y = [np.mean([r[k] for k in ks]) for r in rs]
        else:
            y = [r[key] for r in rs]
        ax.plot(steps, y, "-" if variant == "tga" else "--", label=name, color="tab:red" if variant == "tga" else "tab:gray",
                alpha=0.55 if stage == "pretrain" else 1.0)
        ax.set(title=title, xlabel="step (stage 1, then stage 2)")
axes[0].legend(fontsize=7)
fig.tight_layout()
show(fig)
'''),
md('''
## 3. The logit lens

`jobs.tga.analyze` (= `python -m vlsafe_jax.tga analyze`, printed below): for each unseen hazard image, the
refusal-token rank at every decoder layer (the hidden state read out through the final norm and the LM head) when
the model sees the image, and when it reads the scene's description instead; and the cosine between the
image-token states and the description-token states. A model whose image states are aligned with text should
rank refusal as high for the image as for the description. Before = the text-aligned base.
'''),
code('''
models = {"base (before)": workdir / "base", **{v: workdir / "final" / v for v in cfg.variants}}
lens = {}
for name, path in models.items():
    print(f"--- {name}: python -m vlsafe_jax.tga analyze", shlex.join(["--config", CONFIG, "--workdir", WORKDIR,
          "--model", str(path), *argv[4:]]))
    lens[name] = tga_job.analyze(cfg, workdir, str(path), name.split()[0])
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
colours = dict(zip(models, ("tab:gray", "tab:red", "tab:blue", "tab:green")))
for name, res in lens.items():
    axes[0].plot(res["layers"], res["image"]["mean_rank"], "-o", color=colours[name], label=f"{name}: image")
    axes[0].plot(res["layers"], res["text"]["mean_rank"], ":s", color=colours[name], label=f"{name}: description")
    axes[1].plot(res["layers"], res["cosine"], "-o", color=colours[name], label=name)
axes[0].set(xlabel="decoder layer", ylabel="refusal-token rank (mean; 0 = top)", yscale="symlog",
            title="logit lens: refusal rank")
axes[1].set(xlabel="decoder layer", ylabel="cosine", title="image-token vs description-token states")
for a in axes:
    a.legend(fontsize=7)
fig.tight_layout()
show(fig)
'''),
md('''
## 4. DSR before and after

The defense success rate (share of responses that refuse, keyword judge) on the unseen hazard images, per category
and overall: the base model evaluated by the job's own `jobs.tga.evaluate_variant` (before), and each trained
variant as stored in `eval.json` by the job (after). Held-out loss and token accuracy measure what the training
costs in general ability. Read "before" with care: the base was aligned on text only, so its projector is still at
its random initialisation and its image tokens carry no scene; its refusals on hazard images do not show that it
recognises the hazard (the held-out loss and token accuracy say how little it sees).
'''),
code('''
setting = tga_job.load_setting(cfg, common.make_mesh(cfg), workdir)     # the cached base model and the eval sets
table = {"base (before)": tga_job.evaluate_variant(cfg, setting, setting["model"], "base"), **results}
print(tga_job.format_results(table))
cats = sorted(next(iter(table.values()))["safety"]["per_category"])
fig, ax = plt.subplots(figsize=(10, 3.6))
w = 0.8 / len(table)
for i, (name, r) in enumerate(table.items()):
    vals = [r["safety"]["per_category"][c]["defense_success_rate"] for c in cats] + \\
           [r["safety"]["overall"]["defense_success_rate"]]
    ax.bar(np.arange(len(cats) + 1) + i * w - 0.4 + w / 2, vals, w, label=name)
ax.set_xticks(range(len(cats) + 1), cats + ["overall"], rotation=20, ha="right")
ax.set(ylabel="DSR %", ylim=(0, 105), title="defense success rate on unseen hazard images")
ax.legend()
show(fig)
'''),
md('''
## What this shows

The job trains and evaluates exactly as `python -m vlsafe_jax.train` with the printed command (the run directory
keeps `metrics.jsonl`, `final/<variant>`, `eval.json`, `analysis/`). In this reduced setting the numbers
demonstrate the pipeline only. On the full synthetic setting the README reports that TGA raises the image-caption
hidden-state cosine (layer 3: 0.96 vs 0.53 for plain training) while the DSR on unseen hazard images stays 0% for
both: the alignment is learnt, the refusal does not transfer. The paper's DSR gains are for LLaVA with a Mistral-7B
decoder on real data (not measured here).
'''),
]

NOTEBOOKS = {"uwm": UWM, "cmrm": CMRM, "tga": TGA}


def write(name, cells):
  nb = nbformat.v4.new_notebook(cells=cells, metadata={
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"}})
  nbformat.validate(nb)
  path = REPO / "notebooks" / f"{name}.ipynb"
  nbformat.write(nb, path)
  print("wrote", path)


if __name__ == "__main__":
  for name in sys.argv[1:] or NOTEBOOKS:
    write(name, NOTEBOOKS[name])
