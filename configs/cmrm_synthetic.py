"""CMRM on the synthetic vision-language setting (``vlsafe_jax.data.synthetic_vlm``; labelled synthetic).

  python -m vlsafe_jax.cmrm                                     # = --config configs/cmrm_synthetic.py evaluate
  python -m vlsafe_jax.cmrm --config cmrm_synthetic:smoke       # small, for tests
  python -m vlsafe_jax.cmrm --config cmrm_synthetic sweep       # dataset-level alpha sweep
  python -m vlsafe_jax.cmrm --config cmrm_synthetic analyze     # PCA of the five input variants, CMRM off / on

Trains the tiny LLaVA into <run>/model on first use (minutes on 2 CPU cores), extracts the dataset-level vector on
the anchor set, then generates on held-out harmful / benign / image-grounded sets without steering, text-only,
and with CMRM; keyword judge. Run directory: runs/cmrm_synthetic/ (model/, cmrm_vectors.*, eval.json, cmrm_analysis.*).
"""
import ml_collections


def get_config(arg=None):
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.name = "cmrm_synthetic" if not smoke else "cmrm_synthetic_smoke"
  c.seed = 0
  c.progress = not smoke

  c.model = ml_collections.ConfigDict()
  c.model.kind = "synthetic"
  c.model.path = ""                # empty: <run>/model (trained there on first use)
  c.model.dtype = "float32"
  c.model.train_steps = 400 if not smoke else 150
  c.model.train_batch_size = 32 if not smoke else 16
  c.model.checkpoint_every = 100   # training checkpoints of the synthetic model (a killed training resumes)
  c.model.sizes = ml_collections.ConfigDict(dict(width=64, layers=4) if not smoke else dict(width=48, layers=2))

  c.data = ml_collections.ConfigDict()
  c.data.kind = "synthetic"
  c.data.sets = ()
  c.data.image_root = ""
  c.data.anchor_fraction = 0.2
  c.data.limit = 0 if not smoke else 16
  c.data.anchor_limit = 0 if not smoke else 16

  c.prompt = ml_collections.ConfigDict()
  c.prompt.template = "llava_v1"
  c.prompt.system = "a chat between a human and an assistant ."

  c.cmrm = ml_collections.ConfigDict()
  c.cmrm.vectors = ""              # empty: <run>/cmrm_vectors (extracted on first use)
  c.cmrm.extract = "last"          # last | text_mean
  c.cmrm.corrupt = "blank"         # blank | noise
  c.cmrm.noise_seed = 0
  c.cmrm.method = "mean"           # mean | pca
  c.cmrm.pca_center = False
  c.cmrm.layers = "all"
  c.cmrm.apply = "all"             # all | new_tokens
  c.cmrm.alpha = 1.0
  c.cmrm.sample_level = True
  c.cmrm.sample_alpha = 0.5
  c.cmrm.sweep_alphas = tuple(round(0.1 * i, 1) for i in range(16)) if not smoke else (0.0, 1.0)

  c.judge = ml_collections.ConfigDict(dict(kind="keyword", path="", batch_size=16))

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32 if not smoke else 16
  c.eval.max_new_tokens = 20 if not smoke else 12

  # analyze: PCA of the five input variants with / without CMRM (cmrm.md §7.3) on held-out harmful requests; the
  # caption variant uses each scene's generated description.
  c.analysis = ml_collections.ConfigDict()
  c.analysis.set = "harmful"
  c.analysis.limit = 0 if not smoke else 16
  return c
