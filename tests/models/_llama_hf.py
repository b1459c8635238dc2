"""Tiny random HF Llama / Mistral causal LMs shared by test_llama.py and test_decoding.py (torch needed).

Prime-ish sizes catch transposition bugs: D = 40, F = 37, V = 97, 4 query heads over 2 KV heads (GQA). The
Mistral variant adds a sliding window of 3 (shorter than every test sequence), an explicit head_dim (12 != D/N),
a non-default rope_theta and tied embeddings, so one extra model covers every optional code path.
"""
import numpy as np

VOCAB = 97
PAD = 0

HF_KWARGS = {
    "llama": dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=37, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=3,
                    rope_theta=5000.0, tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1,
                    eos_token_id=2),
}


def build_hf(name: str, directory, **overrides):
  """Builds the HF model (seeded, eager attention), saves it to ``directory``; returns the torch model.

  ``overrides``: config keywords replacing / adding to ``HF_KWARGS[name]`` (e.g. a RoPE scaling)."""
  import torch
  import transformers
  cls_cfg = transformers.LlamaConfig if name == "llama" else transformers.MistralConfig
  cls_model = transformers.LlamaForCausalLM if name == "llama" else transformers.MistralForCausalLM
  cfg = cls_cfg(**{**HF_KWARGS[name], **overrides})
  cfg._attn_implementation = "eager"
  torch.manual_seed(1234 if name == "llama" else 4321)
  model = cls_model(cfg).eval()
  # Random (not ones) norm scales so the RMSNorm weight path is exercised.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def padded_batch(lengths, total, seed=0, low=3):
  """Left-padded random prompts: ids int64 (B, total) with PAD on the left, mask (B, total)."""
  rs = np.random.RandomState(seed)
  ids = np.full((len(lengths), total), PAD, np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for i, n in enumerate(lengths):
    ids[i, total - n:] = rs.randint(low, VOCAB, n)
    mask[i, total - n:] = 1
  return ids, mask


def hf_positions(mask):
  """HF generate's position_ids for a left-padded mask (cumsum - 1, padding clamped)."""
  return np.maximum(np.cumsum(mask, -1) - 1, 0)


def add_steering_hooks(model, vectors_bld, mask_bt, alpha):
  """Forward hooks adding ``alpha * mask * v_l`` to each decoder layer's output; returns the handles.

  mask_bt None = every position (generation: prompt and every new token).
  """
  import torch
  handles = []
  v = torch.as_tensor(np.asarray(vectors_bld), dtype=torch.float32)
  for l, layer in enumerate(model.model.layers):
    def hook(mod, inp, out, l=l):
      h = out[0] if isinstance(out, tuple) else out
      add = alpha * v[:, l][:, None, :]
      if mask_bt is not None:
        add = add * torch.as_tensor(np.asarray(mask_bt), dtype=torch.float32)[..., None]
      h = h + add
      return (h, *out[1:]) if isinstance(out, tuple) else h
    handles.append(layer.register_forward_hook(hook))
  return handles
