"""AOT: a LLaVA-1.5-7B-shaped model (CLIP ViT-L/14 at 336 px + projector + Vicuna-7B) lowers and compiles for an
8-device FSDP mesh from abstract state only (no weight materialised), and fits an 80 GB GPU per device.

The compiled program is the LLaVA prefill (vision tower, projector, image scatter, decoder prefill into a
preallocated KV cache); the decode ``while_loop`` that follows is the decoder's own program, compiled for the same
7B shape in test_llama_aot.py.
"""
import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vlsafe_jax import _compat, perf, sharding
from vlsafe_jax.models import llava as LV


@pytest.mark.multidevice
def test_llava_7b_prefill_compiles_fsdp8_and_fits_80gb():
  cfg = LV.LlavaConfig()                                       # defaults = llava-1.5-7b-hf
  assert cfg.num_image_tokens == 576 and cfg.vision_config.image_size == 336
  abstract = _compat.eval_shape(lambda: LV.Llava(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                 rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  n_params = sum(x.size for x in jax.tree.leaves(abs_state))
  # 6.74 B decoder (vocab 32064) + 303.5 M ViT-L/14-336 tower + 21 M projector (1024*4096 + 4096^2 + biases).
  proj = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
  assert n_params - perf.llama_param_count(cfg.text_config) - proj == pytest.approx(303.5e6, rel=0.01)
  mesh = sharding.make_mesh(data=1, fsdp=8, model=1)
  shardings = sharding.state_shardings(abs_state, mesh)
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  b, p, new = 8, 640, 128                                      # 576 image + 64 text tokens per prompt
  ids = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
  pixels = jax.ShapeDtypeStruct((b, 336, 336, 3), jnp.float32, sharding=sharding.batch_sharding(mesh, 4))

  @functools.partial(jax.jit, static_argnums=0)
  def prefill(gd, state, ids_bt, pixels_ihwc, mask_bt):
    model = nnx.merge(gd, state)
    cache = model.init_cache(ids_bt.shape[0], ids_bt.shape[1] + new)
    logits, cache, _ = model(ids_bt, pixels_ihwc, attention_mask_bt=mask_bt, kv_cache=cache, logits="last")
    return logits, cache

  with jax.set_mesh(mesh):
    compiled = prefill.lower(graphdef, abs_state, ids, pixels, ids).compile()
  mem = compiled.memory_analysis()
  per_device = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes \
      - mem.alias_size_in_bytes
  # Parameters split 8 ways (a replicated 14 GB copy would dominate the arguments) ...
  assert mem.argument_size_in_bytes < 1.05 * 2 * n_params / 8 + 8 * 336 * 336 * 3 * 4, mem
  # ... and weights + KV cache (2*32*768*4096*2 B per row, batch split) + activations fit 80 GB with headroom.
  assert per_device < 80e9 * 0.9, per_device / 1e9
