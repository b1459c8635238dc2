"""The default job: HySAC end to end on the embedded synthetic safe/unsafe benchmark (labelled synthetic).

  python -m vlsafe_jax.train                                   # = --config configs/hysac_synthetic.py
  python -m vlsafe_jax.train --config hysac_synthetic:smoke    # tiny, for tests (seconds)

Stages: "clip" trains a small CLIP from scratch (Euclidean InfoNCE on both (I, T) and (I*, T*) pairs), "hysac"
fine-tunes it with LoRA + the four learned scalars and the seven-term loss, plus the "w/o Ent" and "w/o S-Ent"
ablations as baselines, then "evaluate" writes eval.json / bounds.json / plots and prints the results table.
Run directory: runs/hysac_synthetic/ (re-running resumes; a finished run prints its results again).
Measured wall time and metrics: see the README section "HySAC on the synthetic benchmark" (2 CPU cores).
"""
import ml_collections


def get_config(arg=None):
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.name = "hysac_synthetic" if not smoke else "hysac_synthetic_smoke"
  c.trainer = "hysac"
  c.seed = 0
  c.distributed = False
  c.stages = ("clip", "hysac", "evaluate")
  c.ablations = ("wo_ent", "wo_sent")
  c.base_path = ""                 # empty: the base CLIP is stage "clip"'s output (runs/<name>/clip_base)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  c.data = ml_collections.ConfigDict()
  c.data.kind = "synthetic"
  c.data.seed = 0
  c.data.image_size = 32
  c.data.max_length = 32
  c.data.train_size = 4096 if not smoke else 64
  c.data.val_size = 512 if not smoke else 32
  c.data.test_size = 512 if not smoke else 32
  c.data.worker_count = 0
  c.data.read_threads = 1 if not smoke else 0

  # Stage-1 CLIP architecture (both towers): ViT with 8-px patches on 32-px images (16 patches + CLS).
  c.clip_model = ml_collections.ConfigDict(dict(width=64, layers=2, heads=4, mlp_ratio=4, patch_size=8,
                                                embed_dim=64, logit_scale_init=2.6592))
  if smoke:
    c.clip_model.update(width=16, layers=1, heads=2, embed_dim=16)

  c.clip_stage = ml_collections.ConfigDict()
  c.clip_stage.batch_size = 64 if not smoke else 16      # quadruplets per step (= 128 image-text pairs)
  c.clip_stage.epochs = 10 if not smoke else 2
  c.clip_stage.optim = ml_collections.ConfigDict(dict(lr=2e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                                                      schedule="warmup_cosine", warmup_steps=50))
  c.clip_stage.logit_scale_max = 4.6052                  # log 100, CLIP's cap

  c.hysac = ml_collections.ConfigDict()
  c.hysac.dtype = "float32"        # tower compute dtype (bf16 on accelerators); hyperbolic math is always float32
  c.hysac.batch_size_per_device = 64 if not smoke else 4   # smoke: 8 simulated test devices x 4
  c.hysac.epochs = 5 if not smoke else 2
  c.hysac.steps = 0                # > 0 overrides epochs
  c.hysac.lora = ml_collections.ConfigDict(dict(
      rank=16, alpha=16.0, dropout=0.1, targets=("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")))
  if smoke:
    c.hysac.lora.rank = 4
  c.hysac.scalars = ml_collections.ConfigDict(dict(alpha_init="inv_sqrt_embed_dim", curv_init=1.0, learn_curv=True,
                                                   freeze_logit_scale=False))
  c.hysac.loss = ml_collections.ConfigDict(dict(eta=1.0, entailment_lambda=1.0, weighting="reference",
                                                negatives="local"))
  # Synthetic-only choices (few steps): LoRA alpha = rank (scaling 1, not 1/16) and lr 5e-3 (not 1e-4).
  # Issue 5 (measured, hysac stage on the 12-epoch stage-1 CLIP, test split): this setting does NOT reach the paper's
  # T < I < T* < I* ordering, and no scalar/optimiser variant tried did either. Stage-1 feature norms are ~4.0 (I, I*)
  # and ~4.35 (T, T*): safe and unsafe have the same norm (T*/T = 1.006 +- 0.024 after HySAC), while same-item
  # directions are almost colinear (cos(I, T*) = 0.98, non-matching pairs 0.44). The modality gap T < I is set by
  # the two alphas, so T* sits on I's ray on the root side, where the exterior angle phi(I, T*) ~ pi (2.75 rad) is
  # flat in the radial direction (and clipped at 1 - 1e-5): E(I, T*) stays ~2-2.7 with no outward gradient. The only
  # descent the optimiser finds is collapsing towards the root until sqrt(c)|x| < 2K = 0.2, where half_aperture
  # saturates at ~pi/2: learned c drifts 1 -> 0.3 and alphas shrink (this default: root d ~0.3). Fixed c = 1 or 10
  # (learn_curv=False), alpha_init 0.5 / 1.0, entailment_lambda 2-8 and 10 epochs all either keep E(I, T*) ~2.6
  # (no safe/unsafe separation) or collapse into that saturated zone (d ~0.05-0.2, T->I R@1 down to 2-6 %).
  # Why the radial push is missing: for T* just behind I on I's ray, phi(I, T*) ~ pi - eps/(1 - r) in the near-root
  # (Euclidean-like) regime, so its gradient is ~1/(1 - r) tangential (rotate T* around I) and only ~eps/(1 - r)^2
  # radial; the tangential move is exactly what the contrastive C(I, T*) term undoes. Re-measured (session 3):
  # a stage-1 CLIP at fixed logit scale 100 (clip_model.logit_scale_init=4.6052) still has matched cos(I, T) 0.97
  # (real CLIP: ~0.3); injecting a real-CLIP-like constant modality gap (|g| = 1.5 or 3, via the final LayerNorm
  # biases) does not help either: T* and T, I* and I still differ by < 0.003 in root distance (E(I, T*) 0.7-2.1).
  # So the towers' LoRA never learns hazard-dependent norms here; the cause is not the modality gap. Every run (fixed
  # c = 1 or 10, scalars at lr/50, logit scale held at 1/0.07, 20 epochs) ends at sqrt(c)|x| <= 2K = 0.2, where the
  # aperture is clipped at its widest (the attractor of facebookresearch/meru#4); README "Further measurements".
  # So the values below are kept; see tests/train/test_hysac_train.py::test_synthetic_phenomena for what holds.
  c.hysac.optim = ml_collections.ConfigDict(dict(lr=5e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.2,
                                                 schedule="constant", warmup_steps=0, scalar_lr_multiplier=1.0))

  c.train = ml_collections.ConfigDict()
  c.train.log_every = 10 if not smoke else 2
  c.train.checkpoint_every = 100 if not smoke else 4
  c.train.max_to_keep = 2
  c.train.nonfinite = "raise"      # raise | skip
  c.train.check_every_step = False
  c.train.max_steps_this_run = 0   # > 0: stop the process after that many steps (simulated kill; re-run resumes)
  c.train.validate = False         # per-epoch validation + early stopping (hysac.md §5.3)
  c.train.early_stopping_patience = 0
  c.train.progress = True

  # python -m vlsafe_jax.hysac_probe: the loss on free per-item embeddings started from the base CLIP's features.
  c.probe = ml_collections.ConfigDict(dict(split="train", n_items=1024 if not smoke else 32, steps=1500 if not smoke
                                           else 20, batch_size=64 if not smoke else 16, lr=1e-3, weight_decay=0.0,
                                           seed=0, log_every=100 if not smoke else 10, variant="hysac"))

  c.eval_run = ml_collections.ConfigDict(dict(batch_size=256 if not smoke else 16, bounds_limit=0))
  c.eval = ml_collections.ConfigDict(dict(variant="code", synthetic=True, plots=True))
  return c
