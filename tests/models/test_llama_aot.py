"""AOT: the real LLaVA-1.5-7B / Vicuna-7B decoder shape lowers and compiles for 8 devices from abstract state.

No weight is materialised (``nnx.eval_shape`` + ``jax.ShapeDtypeStruct`` with shardings); the compiled program is
the real generation program (prefill + ``while_loop`` decode, :mod:`vlsafe_jax.models.decoding`). On 2 CPU cores
this compiles in a few seconds because the 32 layers are one scanned body.
"""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vlsafe_jax import _compat, perf, sharding
from vlsafe_jax.models import decoding as D
from vlsafe_jax.models import llama as L

VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=8, model=1), dict(data=2, fsdp=1, model=4)],
                         ids=["fsdp8", "dp2_tp4"])
def test_7b_generate_compiles_sharded_and_fits_80gb(mesh_shape):
  cfg = L.LlamaConfig(**VICUNA_7B, eos_token_id=2, pad_token_id=0)
  abstract = _compat.eval_shape(lambda: L.Llama(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  n_params = sum(x.size for x in jax.tree.leaves(abs_state))
  assert n_params == perf.llama_param_count(cfg)
  assert 6.7e9 < n_params < 6.8e9                                # Vicuna-7B with LLaVA's 32064 vocab
  mesh = sharding.make_mesh(**mesh_shape)
  shardings = sharding.state_shardings(abs_state, mesh)
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  b, p, n = 16, 640, 128
  ids = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
  f32 = jax.ShapeDtypeStruct((), jnp.float32)
  with jax.set_mesh(mesh):
    compiled = D._generate_jit.lower(
        graphdef, abs_state, ids, None, ids, None, jax.random.key(0), f32,
        jax.ShapeDtypeStruct((), jnp.int32), f32, max_new_tokens=n, do_sample=False, eos_ids=(2,),
        pad_id=0).compile()
  mem = compiled.memory_analysis()
  per_device = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes \
      - mem.alias_size_in_bytes
  # Parameters are split over fsdp x model and replicated over data (a full 13.5 GB copy would dominate) ...
  weights_per_device = 2 * n_params / (mesh_shape["fsdp"] * mesh_shape["model"])
  assert mem.argument_size_in_bytes < 1.05 * weights_per_device, mem
  # ... and weights + KV cache (2*32*768*4096*2 B per row) + temporaries fit an 80 GB GPU with headroom.
  assert per_device < 80e9 * 0.9, per_device / 1e9
