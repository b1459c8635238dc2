"""HySAC in the paper's setting: CLIP ViT-L/14 + LoRA on ViSU (hysac.md §4, §5; reference-code defaults).

  python -m vlsafe_jax.train --config configs/hysac_clip_l14_visu.py \
      base_path=/path/to/clip-vit-large-patch14 \
      data.train_json=/path/to/visu/train/visu_dpo_train_nsfw_unfiltered_images_ailb.json \
      data.val_json=/path/to/visu/validation/visu_validation_dpo_nsfw_unfiltered_images_ailb.json \
      data.test_json=/path/to/visu/test/visu_test_dpo_nsfw_unfiltered_images_ailb.json \
      data.coco_root=/path/to/coco data.unsafe_root=/path/to/visu_unsafe_images

  ... --config configs/hysac_clip_l14_visu.py:paper ...    # the paper's 20 epochs, no early stopping

``base_path`` is an HF CLIP directory (config.json + safetensors + tokenizer files) or a converted directory.
Batch 32 per device over all visible devices (global 256 on 8 GPUs), AdamW betas (0.9, 0.98), eps 1e-8, weight
decay 0.2 on LoRA and 0 on the four scalars, constant lr 1e-4 (``hysac.optim.schedule=warmup_cosine`` for MERU's
warmup + cosine), negatives local (the reference's per-GPU negatives; ``hysac.loss.negatives=global`` for the
paper's batch-wide reading), towers in bf16 with the hyperbolic part in float32, 50 epochs with early stopping
(patience 5) and ``best_recall`` / ``best_validation_loss`` checkpoints. FSDP for the frozen base: ``mesh.data=1
mesh.fsdp=-1``. Multi-host: launch one process per host with ``distributed=True`` (or JAX's coordinator env vars).

Expected runtime / metrics: not yet measured (no GPU was available when this config was written).
"""
import importlib.util
from pathlib import Path

import ml_collections


def _synthetic():
  # Same key set as the default job (loaded by path: configs/ need not be on sys.path).
  spec = importlib.util.spec_from_file_location("_hysac_synthetic_cfg", Path(__file__).with_name("hysac_synthetic.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config(arg=None):
  c = _synthetic()
  c.name = "hysac_clip_l14_visu" if arg != "paper" else "hysac_clip_l14_visu_paper"
  c.stages = ("hysac", "evaluate")
  c.ablations = ()
  c.base_path = ""                 # required: HF CLIP ViT-L/14 directory (no default path)

  c.data = ml_collections.ConfigDict(dict(
      kind="visu", image_size=224, max_length=77, train_json="", val_json="", test_json="", coco_root="",
      unsafe_root="", image_root="", on_error="raise", worker_count=8, read_threads=2, seed=0))

  c.hysac.dtype = "bfloat16"
  c.hysac.batch_size_per_device = 32
  c.hysac.epochs = 50 if arg != "paper" else 20
  c.hysac.lora.update(rank=16, alpha=1.0, dropout=0.1)
  c.hysac.scalars.update(alpha_init="inv_sqrt_embed_dim", curv_init=1.0, learn_curv=True, freeze_logit_scale=False)
  c.hysac.loss.update(eta=1.0, entailment_lambda=1.0, weighting="reference", negatives="local", radial="none")
  c.hysac.optim.update(lr=1e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.2, schedule="constant", warmup_steps=4000)

  c.train.log_every = 20
  c.train.checkpoint_every = 1000
  c.train.max_to_keep = 3
  c.train.validate = True
  c.train.early_stopping_patience = 5 if arg != "paper" else 0

  c.eval_run.batch_size = 256
  c.eval_run.bounds_limit = 0      # 0 = the whole training split for bounds.json (hysac.md §7.3)
  c.eval.synthetic = False
  return c
