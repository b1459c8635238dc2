"""CMRM on LLaVA-1.5-7B (HF ``llava-hf/llava-1.5-7b-hf`` directory) with the user's VLSafe / JailbreakLLMs files.

  python -m vlsafe_jax.cmrm --config configs/cmrm_llava15_7b.py evaluate \\
      model.path=/ckpt/llava-1.5-7b-hf \\
      data.sets="('vlsafe:vlsafe:/data/vlsafe.jsonl', 'jailbreak:jailbreakllms:/data/forbidden_question_set.csv')" \\
      data.image_root=/data/coco/train2017
  python -m vlsafe_jax.cmrm --config configs/cmrm_llava15_7b.py sweep model.path=...   # alpha sweep
  python -m vlsafe_jax.cmrm --config configs/cmrm_llava15_7b.py analyze model.path=... # PCA of input variants
  judge.kind=llm judge.path=/ckpt/Meta-Llama-3-8B-Instruct                             # LLM judge instead

``data.sets`` entries are ``name:reader:path`` with reader jsonl | vlsafe | jailbreakllms; a seeded 20% of each
set (items with images) is the anchor set, the remaining 80% is evaluated (cmrm.md §7.2). Greedy, 512 new tokens.
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.name = "cmrm_llava15_7b"
  c.seed = 0
  c.progress = True
  c.model = ml_collections.ConfigDict(dict(kind="hf", path="", dtype="bfloat16", train_steps=0,
                                           train_batch_size=0, sizes=ml_collections.ConfigDict()))
  c.data = ml_collections.ConfigDict(dict(kind="files", sets=(), image_root="", anchor_fraction=0.2, limit=0,
                                          anchor_limit=0))
  c.prompt = ml_collections.ConfigDict(dict(template="llava_v1", system=""))
  c.cmrm = ml_collections.ConfigDict(dict(
      vectors="", extract="last", corrupt="blank", noise_seed=0, method="mean", pca_center=False, layers="all",
      apply="all", alpha=1.0, sample_level=False, sample_alpha=0.5,
      sweep_alphas=tuple(round(0.1 * i, 1) for i in range(16))))
  c.judge = ml_collections.ConfigDict(dict(kind="keyword", path="", batch_size=16))
  c.eval = ml_collections.ConfigDict(dict(batch_size=16, max_new_tokens=512))
  # analyze: PCA of the five input variants (cmrm.md §7.3) on the first set's items ("" = first data.sets entry);
  # the caption+query variant needs a "caption" in every manifest row, else it is omitted with a note.
  c.analysis = ml_collections.ConfigDict(dict(set="", limit=200))
  return c
