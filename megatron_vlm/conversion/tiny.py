"""Tiny random HF models built offline from configs (tests, benchmark). No downloads.

Weights are re-drawn with :func:`randomize_` so that every tensor matters (HF's init leaves
Mllama's gates at 0 and projections tiny, which would hide mapping mistakes).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(fan_in)))
            elif "norm" in name and name.endswith("weight") or name.endswith(("layer_norm1.weight", "layer_norm2.weight", "layrnorm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "gate" in name:
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def llava_config(vision_layers: int = 3, text_layers: int = 2, vocab: int = 300, image_size: int = 28,
                 patch: int = 14, vision_hidden: int = 32, hidden: int = 64, heads: int = 4,
                 kv_heads: int = 2, ffn: int = 128, feature_layer: int = -2, strategy: str = "default",
                 max_positions: int = 128):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                          num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                          patch_size=patch, projection_dim=16)
    tc = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=text_layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                     max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlavaConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_index=vocab - 1,
                       vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                       image_seq_length=(image_size // patch) ** 2)


def mllama_config(vocab: int = 256, hidden: int = 64, text_layers: int = 4, ca_layers=(1, 3),
                  heads: int = 4, kv_heads: int = 2, ffn: int = 128, vision_hidden: int = 32,
                  vision_layers: int = 2, global_layers: int = 1, image_size: int = 28, patch: int = 14):
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    indices = [0, vision_layers - 1]
    vc = MllamaVisionConfig(hidden_size=vision_hidden, num_hidden_layers=vision_layers,
                            num_global_layers=global_layers, attention_heads=4,
                            intermediate_size=2 * vision_hidden, image_size=image_size, patch_size=patch,
                            intermediate_layers_indices=indices,
                            vision_output_dim=vision_hidden * (len(indices) + 1))
    tc = MllamaTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                          num_hidden_layers=text_layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, cross_attention_layers=list(ca_layers),
                          max_position_embeddings=128, rms_norm_eps=1e-5,
                          # Llama-3.2-Vision's RoPE scaling (with head_dim 16 it rescales 2 of 8 frequencies)
                          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192},
                          bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return MllamaConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_index=vocab)


def save_llava(path: str | Path, seed: int = 0, max_shard_size: str = "200KB", **kw) -> Path:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = randomize_(LlavaForConditionalGeneration(llava_config(**kw)), seed)
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    return Path(path)


def save_mllama(path: str | Path, seed: int = 0, max_shard_size: str = "200KB", **kw) -> Path:
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = randomize_(MllamaForConditionalGeneration(mllama_config(**kw)), seed)
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    return Path(path)


def save_llama(path: str | Path, seed: int = 0, vocab: int = 300, hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, ffn: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=128, rms_norm_eps=1e-5)
    model = randomize_(LlamaForCausalLM(cfg), seed)
    model.save_pretrained(str(path))
    return Path(path)


def save_clip_vision(path: str | Path, seed: int = 0, layers: int = 2, hidden: int = 32,
                     image_size: int = 28, patch: int = 14) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch)
    model = randomize_(CLIPVisionModel(cfg), seed)
    model.save_pretrained(str(path))
    return Path(path)


def load_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
