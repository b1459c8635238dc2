"""CMRM on the synthetic vision-language setting (``vlsafe_jax.data.synthetic_vlm``; labelled synthetic).

  python -m vlsafe_jax.cmrm                                     # = --config configs/cmrm_synthetic.py evaluate
  python -m vlsafe_jax.cmrm --config cmrm_synthetic:smoke       # small, for tests
  python -m vlsafe_jax.cmrm --config cmrm_synthetic sweep       # dataset-level alpha sweep
  python -m vlsafe_jax.cmrm --config cmrm_synthetic analyze     # PCA of the five input variants, CMRM off / on
  python -m vlsafe_jax.cmrm --config cmrm_synthetic:llava       # the eroded base (issue 16), see below

Trains the tiny LLaVA into <run>/model on first use (minutes on 2 CPU cores), extracts the dataset-level vector on
the anchor set, then generates on held-out harmful / benign / image-grounded sets without steering, text-only,
and with CMRM; keyword judge. Run directory: runs/cmrm_synthetic/ (model/, cmrm_vectors.*, eval.json, cmrm_analysis.*).

Variant ``llava`` (issue 16, notes/erosion-readme.md): the tiny LLaVA trained with LLaVA-1.5's recipe
(``vlm_base.TrainConfig`` schedule ``llava``: text alignment of the language model, caption pretraining with the
language model frozen, visual instruction tuning with 6.25% text-only rows drawn like the alignment data -- LLaVA-1.5:
6.1% ShareGPT rows -- and no refusal paired with an image). This base refuses harmful text-only requests and much
less often with a benign image: the erosion CMRM corrects. CMRM's settings stay the spec's defaults.
"""
import ml_collections


def get_config(arg=None):
  if arg not in (None, "", "smoke", "llava"):
    raise ValueError(f"cmrm_synthetic variant {arg!r} unknown; expected smoke or llava")
  smoke, llava = arg == "smoke", arg == "llava"
  c = ml_collections.ConfigDict()
  c.name = {"smoke": "cmrm_synthetic_smoke", "llava": "cmrm_synthetic_llava"}.get(arg or "", "cmrm_synthetic")
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
  # Further vlm_base.TrainConfig fields (empty: the "mixed" schedule of train_steps steps).
  c.model.train = ml_collections.ConfigDict()
  if llava:
    c.model.train_steps = 200      # "align" stage; then 150 caption-pretraining and 200 instruction-tuning steps
    c.model.train = ml_collections.ConfigDict(dict(schedule="llava", pretrain_steps=150, stage2_steps=200,
                                                   stage2_text="aligned"))

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
