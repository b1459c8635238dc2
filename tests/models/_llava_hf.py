"""Tiny random HF LLaVA models (Llama and Mistral text towers) shared by the LLaVA tests (torch needed).

platform.md §6 recipe with prime-ish sizes: text D = 40 (divisible by 8 so the 8-device FSDP test really splits
it), F = 37, V = 128 with image token 127, 4 query heads over 2 KV heads; vision 32 px / patch 8 (16 image tokens),
width 24, 3 layers (feature layer -2 needs >= 2). The Mistral variant adds a sliding window of 7 (shorter than
the prompts) and an explicit head_dim 12.
"""
import numpy as np

VOCAB = 128
IMAGE_TOKEN = 127
PAD = 0
N_IMG = 16                      # (32 / 8) ** 2 image tokens (CLS dropped)
IMAGE_SIZE = 32

TEXT_KWARGS = {
    "llama": dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=7,
                    rope_theta=5000.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
}
VISION_KWARGS = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=24, intermediate_size=29, num_hidden_layers=3,
                     num_attention_heads=4)


def build_hf(name: str, directory, seed: int = 0, *, vision_feature_layer=-2,
             vision_feature_select_strategy: str = "default", tie_word_embeddings: bool = False):
  """Builds the tiny HF LLaVA (seeded, eager attention), saves it to ``directory``; returns the torch model.

  The feature-selection keywords are LlavaConfig's (an int or a list of vision layers; "default" drops CLS, "full"
  keeps it, so "full" prompts need N_IMG + 1 image tokens). ``tie_word_embeddings`` sets the top-level
  ``LlavaConfig`` flag only (the text config stays untied)."""
  import torch
  import transformers
  text_cls = transformers.LlamaConfig if name == "llama" else transformers.MistralConfig
  cfg = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**VISION_KWARGS), text_config=text_cls(**TEXT_KWARGS[name]),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=vision_feature_layer,
      vision_feature_select_strategy=vision_feature_select_strategy,
      projector_hidden_act="gelu", tie_word_embeddings=tie_word_embeddings)
  cfg.vision_config.model_type = "clip_vision_model"
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      # Random norm scales / biases (defaults are ones / zeros) so those paths are exercised.
      if n.endswith("norm.weight") or "layer_norm" in n or "layrnorm" in n:
        p.add_(0.2 * torch.randn_like(p))
      elif n.endswith(".bias"):
        p.copy_(0.05 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def prompt(rs, n_text_before: int, n_text_after: int, image: bool) -> list[int]:
  """BOS, random text, optionally N_IMG image tokens, random text (ids in [3, 100))."""
  ids = [1] + list(rs.randint(3, 100, n_text_before))
  if image:
    ids += [IMAGE_TOKEN] * N_IMG
  return ids + list(rs.randint(3, 100, n_text_after))


def pad_rows(rows, side: str):
  """int64 ids and mask (B, T) padded with PAD on ``side``."""
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), PAD, np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
    ids[i, sl], mask[i, sl] = r, 1
  return ids, mask


def hf_positions(mask):
  return np.maximum(np.cumsum(mask, -1) - 1, 0)


def nchw(pixels_nhwc):
  import torch
  return torch.tensor(np.ascontiguousarray(np.asarray(pixels_nhwc).transpose(0, 3, 1, 2)))
