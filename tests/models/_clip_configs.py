"""CLIP configs shared by the CLIP / LoRA / HySAC tests (no torch needed).

``TINY``: prime/odd sizes, 10-px images in 5-px patches, a 7-token text window with vocab 53 and EOS = 52 (the
largest id, so argmax pooling finds it). ``L14``: the real CLIP ViT-L/14 tower shapes (for abstract, FLOP-free
counts such as the 8,676,544 LoRA parameters of hysac.md §4.2; never instantiated with real arrays).
"""
from vlsafe_jax.models import clip as C

TINY = C.CLIPConfig(
    text_config=C.CLIPTextConfig(vocab_size=53, hidden_size=14, intermediate_size=22, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=7, projection_dim=11,
                                 eos_token_id=52),
    vision_config=C.CLIPVisionConfig(image_size=10, patch_size=5, hidden_size=14, intermediate_size=22,
                                     num_hidden_layers=1, num_attention_heads=2, projection_dim=11),
    projection_dim=11)

L14 = C.CLIPConfig(
    text_config=C.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, projection_dim=768, eos_token_id=2),
    vision_config=C.CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                     num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
    projection_dim=768)
