"""UWM on the embedded synthetic benchmark (the default ``python -m vlsafe_jax.uwm`` job; labelled synthetic).

  python -m vlsafe_jax.uwm                                   # = --config configs/uwm_synthetic.py
  python -m vlsafe_jax.uwm --config uwm_synthetic:smoke      # small, for tests
  python -m vlsafe_jax.uwm method=g_unsafe                   # a gradient baseline instead (uwm.md §8)

Edits the synthetic stage-1 CLIP: reused from ``runs/hysac_synthetic/clip_base`` when the HySAC job (or an
earlier UWM run) has trained it, else trained there first by the stage-"clip" trainer (a few minutes on 2 cores).
Calibration: 2048 (safe, unsafe) pairs of the synthetic train split for both towers; evaluation on the synthetic
test split (SafeGround, Safe-CLIP retrieval columns) and the synthetic zero-shot shapes split.
Run directory: runs/uwm_synthetic/ (edited_clip/, masks.npz, eval.json).
"""
import ml_collections


def get_config(arg=None):
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.name = "uwm_synthetic" if not smoke else "uwm_synthetic_smoke"
  c.method = "uwm"                 # uwm | g_unsafe | g_safe_clip
  c.towers = ("text", "vision")
  c.progress = True
  c.export_hf = False              # True: also write an HF directory to <run>/hf_export

  c.model = ml_collections.ConfigDict()
  c.model.path = ""                # empty: the synthetic stage-1 CLIP below
  c.model.stage1_config = "hysac_synthetic"
  c.model.stage1_overrides = ()
  c.model.stage1_workdir = ""      # empty: runs/<stage-1 config name>
  if smoke:
    # A smaller stage-1 CLIP than the HySAC default, still trained long enough to show CLIP-like behaviour.
    c.model.stage1_config = "hysac_synthetic:smoke"
    c.model.stage1_overrides = ("clip_model.width=32", "clip_model.layers=2", "clip_model.heads=4",
                                "clip_model.embed_dim=32", "data.train_size=1024", "clip_stage.batch_size=32",
                                "clip_stage.epochs=6", "train.progress=False")

  c.data = ml_collections.ConfigDict()
  c.data.kind = "synthetic"
  c.data.seed = 0
  c.data.image_size = 32
  c.data.max_length = 32
  # The generator options of the stage-1 CLIP's data (keep them equal to model.stage1_overrides'): "patch" | "rewrite"
  c.data.unsafe_variant = "patch"
  # side of the hazard motif as a fraction of the image side (low, high); (1.0, 1.0): the motif spans the image
  c.data.motif_scale = (0.35, 0.55)
  c.data.test_size = 512 if not smoke else 256
  c.data.tokenizer = ""
  c.data.train_json = ""
  c.data.test_json = ""
  c.data.coco_root = ""
  c.data.unsafe_root = ""

  c.calib = ml_collections.ConfigDict()
  c.calib.n_pairs = 2048 if not smoke else 256
  c.calib.seed = 0
  c.calib.vision_batch_size = 128
  c.calib.text_batch_size = 512 if not smoke else 128
  c.calib.baseline_batch_size = 64
  c.calib.text_manifest = ""
  c.calib.vision_manifest = ""
  c.calib.image_root = ""

  c.uwm = ml_collections.ConfigDict()
  c.uwm.aggregation = "mean_of_ratios"
  c.uwm.vision = ml_collections.ConfigDict(dict(
      targets=(r"vision_model\.encoder\.layers\.{i}\.mlp\.fc2",), tau=0.02, alpha=-1.0, eps=1e-8,
      magnitude_prior=False))
  c.uwm.text = ml_collections.ConfigDict(dict(
      targets=(r"text_model\.encoder\.layers\.{i}\.self_attn\.out_proj",), tau=0.02, alpha=-1.0, eps=0.0,
      magnitude_prior=True))

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256 if not smoke else 128
  c.eval.synthetic_zeroshot = True
  # The synthetic split labels the scene BACKGROUND ("a picture of a {} background", the captions' phrasing): the
  # synthetic stage-1 CLIP never learns shape kinds at 32 px, so the earlier "kind" split ("a photo of a {}.")
  # scored at chance (15.8% for 6 classes) with any wording; see data/synthetic.py ZeroShotShapes.
  c.eval.zeroshot_attribute = "background"   # background | kind
  c.eval.zeroshot_size = 512 if not smoke else 240
  c.eval.zeroshot_limit = 0
  c.eval.zeroshot_folders = ()     # "Name=/path/to/class_folders" entries
  # prepared tfds ArrayRecord datasets (no TensorFlow): (name, path, split[, builder[, image_key[, label_key]]]),
  # path = the builder dir <data_dir>/<builder>/<version> or a data_dir (then builder is needed)
  c.eval.zeroshot_tfds = ()
  return c
