"""TGA, the paper's recipe (tga.md §2) on user data: LLaVA + Mistral-7B-Instruct-v0.2 + CLIP ViT-L/14-336.

  python -m vlsafe_jax.train --config configs/tga_llava_mistral7b.py \
      model.path=/ckpt/llava-mistral-7b-init data.pretrain_json=/data/blip_laion_cc_sbu_558k_tga.json \
      data.finetune_json=/data/llava_v1_5_mix665k_tga.json data.image_folder=/data/images \
      data.heldout_json=/data/heldout.json data.toxic_manifest=/data/toxic.jsonl

Inputs: ``model.path`` an HF LLaVA directory (Mistral-7B-Instruct-v0.2 decoder, CLIP-L/14-336 tower, mlp2x_gelu
projector; ``checkpoints_convert`` can build one); LLaVA pretrain / instruct JSON rows (``id``, ``image``,
``conversations``) extended with ``image_caption`` and ``retrieved_caption`` (tga.md §3.1; the authors' BEiT-3
retrieval is not released: ``vlsafe_jax.methods.tga.retrieval`` offers a CLIP substitute); toxic manifest JSONL
``{"id", "image", "prompt"?, "scene"}``. Sharding: 8 x 80 GB, FSDP over all devices (stage 2 of a 7B decoder
needs ~16 bytes/param of weights + Adam state: ~112 GB, tga.md §2). Wall time and results: not measured here
(no GPU and no weights in the build environment).
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "tga_llava_mistral7b"
  c.trainer = "tga"
  c.seed = 0
  c.distributed = False
  c.variants = ("tga",)
  c.stages = ("pretrain", "finetune")
  c.evaluate = True
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1))   # ZeRO-3-like; model>1 adds tensor parallelism

  c.model = ml_collections.ConfigDict(dict(path=""))

  c.data = ml_collections.ConfigDict()
  c.data.kind = "llava_json"
  c.data.pretrain_json = ""
  c.data.finetune_json = ""
  c.data.image_folder = ""
  c.data.heldout_json = ""
  c.data.toxic_manifest = ""
  c.data.worker_count = 8
  c.data.read_threads = 4

  c.tga = ml_collections.ConfigDict()
  c.tga.dtype = "bfloat16"
  c.tga.template = "llava_llama_2"
  c.tga.system = ""                    # "" = LLaVA's llama_2 system prompt
  c.tga.halve_identical_retrieval = True
  c.tga.loss = ml_collections.ConfigDict(dict(
      layers=tuple(range(10, 19)), w_al=0.25, w_pw=0.1, decay_al=1.0, decay_pw=2.0, stop_grad_retrieved=True,
      mode="differentiable", norm="batch", exclude_ids_containing="tox"))
  c.tga.pretrain = ml_collections.ConfigDict(dict(
      batch_size_per_device=32, grad_accum=1, epochs=1, steps=0, max_length=2048, ref_max_length=128,
      optim=ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                           schedule="warmup_cosine", warmup_ratio=0.03))))
  c.tga.finetune = ml_collections.ConfigDict(dict(
      batch_size_per_device=4, grad_accum=1, epochs=1, steps=0, max_length=1200, ref_max_length=160,
      optim=ml_collections.ConfigDict(dict(lr=2e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                           schedule="warmup_cosine", warmup_ratio=0.03))))

  c.train = ml_collections.ConfigDict(dict(log_every=10, checkpoint_every=500, max_to_keep=2, nonfinite="raise",
                                           check_every_step=False, max_steps_this_run=0, progress=True))
  c.eval = ml_collections.ConfigDict(dict(batch_size=16, max_new_tokens=128, question="Describe this image.",
                                          judge=ml_collections.ConfigDict(dict(kind="keyword"))))
  return c
