"""attention_impl="auto": which kernel each call gets (cuDNN flash attention vs XLA), decided on CPU.

The choice is a pure function of platform, dtype and shapes (``attention.choose_impl``); the GPU cases are
checked here with ``platform="gpu"`` without a GPU. On CPU the model path must give XLA's numbers and record it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlsafe_jax.models import attention
from vlsafe_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from vlsafe_jax.models.llama import LlamaConfig

BF16 = jnp.bfloat16


def pick(requested="auto", platform="gpu", dtype=BF16, q=(2, 257, 16, 64), k=None, mask=False, cc="9.0"):
  return attention.choose_impl(requested, platform=platform, dtype=dtype, q_shape=q, k_shape=k or q,
                               has_mask=mask, compute_capability=cc)


@pytest.mark.parametrize("case, want", [
    # ViT-L/14 tower (T = 257, odd, no mask) and the causal text tower: flash attention.
    (dict(), "cudnn"),
    (dict(q=(64, 77, 12, 64)), "cudnn"),
    (dict(dtype=jnp.float16), "cudnn"),
    # LLaVA prefill: masked, even lengths (640 queries over a 704-slot cache); 7B head dim 128.
    (dict(q=(1, 640, 32, 128), k=(1, 704, 32, 128), mask=True), "cudnn"),
    # Not on a GPU, or float32: XLA.
    (dict(platform="cpu"), "xla"),
    (dict(platform="tpu"), "xla"),
    (dict(dtype=jnp.float32), "xla"),
    # Head dims cuDNN rejects: not a multiple of 8; above 128 before Hopper, above 256 on Hopper.
    (dict(q=(2, 64, 4, 36)), "xla"),
    (dict(q=(2, 64, 4, 160), cc="8.0"), "xla"),
    (dict(q=(2, 64, 4, 160), cc=None), "xla"),
    (dict(q=(2, 64, 4, 160), cc="9.0"), "cudnn"),
    (dict(q=(2, 64, 4, 264), cc="9.0"), "xla"),
    # Decode steps (one query token) stay on XLA; odd lengths with a mask (a cuDNN bias) too.
    (dict(q=(8, 1, 32, 128), k=(8, 704, 32, 128), mask=True), "xla"),
    (dict(q=(1, 641, 32, 128), k=(1, 705, 32, 128), mask=True), "xla"),
    # Explicit requests are obeyed.
    (dict(requested="xla"), "xla"),
    (dict(requested=None), "xla"),
    (dict(requested="cudnn", platform="cpu", dtype=jnp.float32), "cudnn"),
])
def test_choose_impl(case, want):
  impl, reason = pick(**case)
  assert impl == want, reason
  assert reason


def test_unknown_impl_is_a_named_error():
  with pytest.raises(ValueError, match="attention_impl"):
    pick(requested="flash")
  with pytest.raises(ValueError, match="vision_config"):
    CLIPVisionConfig(attention_impl="flash")
  with pytest.raises(ValueError, match="LlamaConfig"):
    LlamaConfig(hidden_size=64, num_attention_heads=4, attention_impl="triton")
  assert CLIPTextConfig().attention_impl == CLIPVisionConfig().attention_impl == LlamaConfig().attention_impl == "auto"


def test_auto_on_cpu_runs_xla_and_records_the_choice():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(rng.random((2, 1, 1, 6)) > 0.3).at[..., 0].set(True)
  attention.clear_choices()
  out = attention.dot_product_attention(q, k, v, mask=mask, scale=8 ** -0.5, is_causal=True, site="test.site")
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=8 ** -0.5, is_causal=True, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)
  got = attention.choices()["test.site"]
  assert got["impl"] == "xla" and "platform cpu" in got["reason"] and got["q_shape"] == (2, 6, 4, 8)
