"""TGA logit-lens analysis: ranks, probability-increase ranks and start/end layers against NumPy; the lens on a
tiny LLaVA equals final-norm + LM head applied to the returned hidden states (rtol = atol = 1e-5); outputs
written (JSON, table, plot)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlsafe_jax.methods.tga import analysis as A
from vlsafe_jax.models.hooks import Hooks


def test_ranks_and_layers_match_numpy():
  rs = np.random.RandomState(0)
  probs = rs.dirichlet(np.ones(13), size=(6, 3)).astype(np.float32)        # (L, B, V)
  ids = [4, 9]
  st = A.lens_stats(jnp.asarray(probs), ids)
  want_rank = np.stack([(probs > probs[..., [i]]).sum(-1) for i in ids], -1)
  np.testing.assert_array_equal(np.asarray(st["rank"]), want_rank)
  inc = probs[1:] - probs[:-1]
  want_inc = np.stack([(inc > inc[..., [i]]).sum(-1) for i in ids], -1)
  np.testing.assert_array_equal(np.asarray(st["inc_rank"])[1:], want_inc)
  assert np.all(np.asarray(st["inc_rank"])[0] == 13)
  # Designed ranks: item 0 -> increase top-5 first at HF layer 3, top-1 at layer 5; item 1 never.
  rank = np.full((6, 2, 2), 50)
  inc_rank = np.full((6, 2, 2), 50)
  inc_rank[2, 0, 1] = 4
  inc_rank[4, 0, 0] = 0
  rank[4, 0, 1] = 0
  rank[0, 1, 0] = 0                         # top-1 before any start: not an end layer
  start, end = A.safety_layers(rank, inc_rank)
  np.testing.assert_array_equal(start, [3, -1])
  np.testing.assert_array_equal(end, [5, -1])


def test_analyze_tiny_model(tmp_path):
  from vlsafe_jax.data import tga_synthetic
  from vlsafe_jax.models.llava import Llava
  from vlsafe_jax.train import vlm_base
  tok = tga_synthetic.tokenizer()
  cfg = vlm_base.llava_config(tok, image_size=16, patch_size=8, vision_width=16, vision_layers=1, width=24,
                              layers=3, heads=2, kv_heads=1, mlp=40)
  model = Llava(cfg, rngs=nnx.Rngs(0))
  items = tga_synthetic.TGASynthetic(0, 1, 3, 16).toxic_items()
  ids = [tok.token_to_id["sorry"], tok.token_to_id["i"]]
  res = A.analyze(model, tok, items[:2], refusal_ids=ids, template="llava_v1", batch_size=1,
                  image_question=tga_synthetic.DESCRIBE_IMAGE, text_template=tga_synthetic.DESCRIBE_TEXT)
  assert res["layers"] == [1, 2, 3] and res["n_items"] == 2 and len(res["cosine"]) == 3
  assert len(res["image"]["start_layer"]) == 2
  # Independent check of the text-condition lens (each prompt alone, unpadded, all-zero image): mean over the two
  # items of the best refusal rank and probability at each layer.
  from vlsafe_jax.data import vlm_prompts as VP
  lm = model.language_model
  ranks, probs = np.zeros((2, 3)), np.zeros((2, 3))
  for k, it in enumerate(items[:2]):
    p = VP.build_prompt(tok, tga_synthetic.DESCRIBE_TEXT.format(it.caption), template="llava_v1",
                        num_image_tokens=cfg.num_image_tokens, image_token_index=cfg.image_token_index)
    _, _, ex = model(jnp.asarray(p.input_ids[None]), jnp.zeros((1, 16, 16, 3)),
                     hooks=Hooks(output_hidden_states=True))
    for l in (1, 2, 3):
      pr = np.asarray(jax.nn.softmax(lm.logits_from_hidden(lm.model.norm(ex["hidden_states"][l][:, -1])), -1))[0]
      ranks[k, l - 1] = min(int((pr > pr[i]).sum()) for i in ids)
      probs[k, l - 1] = max(pr[i] for i in ids)
  np.testing.assert_allclose(res["text"]["mean_rank"], ranks.mean(0))
  np.testing.assert_allclose(res["text"]["mean_prob"], probs.mean(0), rtol=1e-5, atol=1e-6)
  A.write_outputs(res, tmp_path)
  assert json.loads((tmp_path / "analysis.json").read_text())["refusal_ids"] == ids
  assert (tmp_path / "analysis.png").stat().st_size > 0 and "cos(img, desc)" in (tmp_path / "analysis.txt").read_text()

