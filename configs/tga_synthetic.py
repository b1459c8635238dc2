"""TGA on the synthetic setting (labelled synthetic; vlsafe_jax.data.tga_synthetic): TGA vs plain alignment.

  python -m vlsafe_jax.train --config configs/tga_synthetic.py            # a few minutes on 2 CPU cores
  python -m vlsafe_jax.train --config configs/tga_synthetic.py:smoke      # tiny, for tests (seconds)

A text-aligned tiny LLaVA base is trained once (cached in data.base_dir), then each variant ("tga": retrieved text
+ auxiliary loss; "plain": standard LLaVA alignment) runs stage 1 (projector) and stage 2 (projector + decoder)
from that base, and eval.json reports held-out loss / token accuracy and the DSR per hazard category on unseen
hazard images ("describe this image ."; keyword judge). Results: README section "TGA on the synthetic setting".
"""
import ml_collections


def get_config(arg=None):
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.name = "tga_synthetic" if not smoke else "tga_synthetic_smoke"
  c.trainer = "tga"
  c.seed = 0
  c.distributed = False
  c.variants = ("tga", "plain")
  c.stages = ("pretrain", "finetune")
  c.evaluate = True
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))

  c.model = ml_collections.ConfigDict()
  c.model.path = ""                    # synthetic: the base below
  c.model.dims = ml_collections.ConfigDict(dict(vision_width=32, vision_layers=2, width=64, layers=4, heads=4,
                                                kv_heads=2, mlp=128))
  if smoke:
    c.model.dims.update(vision_width=16, vision_layers=1, width=32, layers=3, heads=2, kv_heads=1, mlp=48)

  c.data = ml_collections.ConfigDict()
  c.data.kind = "synthetic"
  c.data.seed = 0
  c.data.image_size = 32
  c.data.train_size = 512 if not smoke else 16
  c.data.eval_size = 64 if not smoke else 8
  c.data.base_dir = ""                 # "" = <workdir>/base (trained once, then reused)
  c.data.worker_count = 0
  c.data.read_threads = 0

  # Text-only alignment of the base LLM (the stand-in for an instruct LLM's safety training).
  c.base = ml_collections.ConfigDict(dict(steps=400 if not smoke else 4, batch_size=32 if not smoke else 8,
                                          lr=3e-3, max_length=48))

  c.tga = ml_collections.ConfigDict()
  c.tga.dtype = "float32"             # bf16 on accelerators
  c.tga.template = "llava_v1"
  c.tga.system = "a chat between a human and an assistant ."
  c.tga.halve_identical_retrieval = True
  c.tga.loss = ml_collections.ConfigDict(dict(
      layers=(1, 2, 3) if not smoke else (1, 2), w_al=0.25, w_pw=0.1, decay_al=1.0, decay_pw=2.0,
      stop_grad_retrieved=True, mode="differentiable", norm="batch", exclude_ids_containing="tox"))

  def stage(lr, steps, bs):
    return ml_collections.ConfigDict(dict(
        batch_size_per_device=bs, grad_accum=1, epochs=1, steps=steps, max_length=64, ref_max_length=40,
        optim=ml_collections.ConfigDict(dict(lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                             schedule="warmup_cosine", warmup_ratio=0.03))))
  # batch_size_per_device x data devices (1 CPU device by default; 8 simulated in tests).
  c.tga.pretrain = stage(1e-3, 150 if not smoke else 4, 32 if not smoke else 1)
  c.tga.finetune = stage(1e-3, 400 if not smoke else 4, 32 if not smoke else 1)
  if smoke:
    c.tga.finetune.grad_accum = 2

  c.train = ml_collections.ConfigDict()
  c.train.log_every = 25 if not smoke else 2
  c.train.checkpoint_every = 100 if not smoke else 2
  c.train.max_to_keep = 2
  c.train.nonfinite = "raise"
  c.train.check_every_step = False
  c.train.max_steps_this_run = 0
  c.train.progress = not smoke

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16 if not smoke else 8
  c.eval.max_new_tokens = 12 if not smoke else 4
  c.eval.question = "describe this image ."
  c.eval.judge = ml_collections.ConfigDict(dict(kind="keyword"))
  return c
