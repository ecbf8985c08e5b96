"""The tiny joint_decoder config the tests build (fp32 CPU worlds of 1-4 ranks)."""

from __future__ import annotations

from megatron_vlm.config import Config


def small_config(language_layers: int = 2) -> Config:
    """Language: ``language_layers`` x 64 hidden, 4 heads / 2 query groups, vocab 256, 32 tokens;
    vision: 2 x 32 hidden, 16 px images in 4 px patches (16 image tokens)."""
    cfg = Config()
    lang, v = cfg.model.language, cfg.model.vision_encoder
    lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups = language_layers, 64, 4, 2
    lang.ffn_hidden_size, lang.vocab_size, lang.seq_length = 96, 256, 32
    v.num_layers, v.hidden_size, v.num_attention_heads, v.ffn_hidden_size = 2, 32, 4, 64
    v.image_size, v.patch_size = 16, 4
    return cfg
