"""CLIP vision tower (HF ``CLIPVisionModel`` layout) <-> megatron ``CLIPViTModel`` (clip subtype).

Key map (megatron prefix ``vision_model.``; HF prefix ``vision_tower.`` inside LLaVA, none for a
``CLIPVisionModel`` saved by transformers 5, ``vision_model.`` for older saves)::

    class_token [1, 1, h]                       embeddings.class_embedding [h]         Reshape
    conv1.weight                                embeddings.patch_embedding.weight
    position_embeddings.weight                  embeddings.position_embedding.weight
    ln_pre.{weight,bias}                        pre_layrnorm.{weight,bias}
    decoder.layers.{i}.input_layernorm.*        encoder.layers.{i}.layer_norm1.*
    decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}
                                                encoder.layers.{i}.self_attn.{q,k,v}_proj.*  QKV (MHA)
    decoder.layers.{i}.self_attention.linear_proj.*   encoder.layers.{i}.self_attn.out_proj.*
    decoder.layers.{i}.pre_mlp_layernorm.*      encoder.layers.{i}.layer_norm2.*
    decoder.layers.{i}.mlp.linear_fc1.*         encoder.layers.{i}.mlp.fc1.*
    decoder.layers.{i}.mlp.linear_fc2.*         encoder.layers.{i}.mlp.fc2.*

Not represented by our model: ``post_layernorm`` (LLaVA reads hidden states before it) and the
layers after LLaVA's ``vision_feature_layer``. Our tower is built only as deep as the selected
layer (megatron-LM's LLaVA does the same); the HF tensors it does not use are *carried* by the
import (see ``archs/joint_decoder/hf_llava.py``) so that an export restores them bit for bit.
"""

from __future__ import annotations

from megatron_vlm.config import VisionConfig
from megatron_vlm.conversion.mapping import QKV, ConversionError, Pair, Reshape, Rule, expand


def layer_rules(num_heads: int) -> list[Rule]:
    qkv = QKV(num_heads, num_heads)
    rules = []
    for p in ("weight", "bias"):
        rules += [
            Rule(f"decoder.layers.{{i}}.input_layernorm.{p}", f"encoder.layers.{{j}}.layer_norm1.{p}"),
            Rule(f"decoder.layers.{{i}}.self_attention.linear_qkv.{p}",
                 tuple(f"encoder.layers.{{j}}.self_attn.{x}_proj.{p}" for x in "qkv"), qkv),
            Rule(f"decoder.layers.{{i}}.self_attention.linear_proj.{p}", f"encoder.layers.{{j}}.self_attn.out_proj.{p}"),
            Rule(f"decoder.layers.{{i}}.pre_mlp_layernorm.{p}", f"encoder.layers.{{j}}.layer_norm2.{p}"),
            Rule(f"decoder.layers.{{i}}.mlp.linear_fc1.{p}", f"encoder.layers.{{j}}.mlp.fc1.{p}"),
            Rule(f"decoder.layers.{{i}}.mlp.linear_fc2.{p}", f"encoder.layers.{{j}}.mlp.fc2.{p}"),
        ]
    return rules


def pairs(v: VisionConfig, mcore_prefix: str = "vision_model.", hf_prefix: str = "vision_tower.") -> list[Pair]:
    h = v.hidden_size
    top = [
        Rule("class_token", "embeddings.class_embedding", Reshape((h,), (1, 1, h))),
        Rule("conv1.weight", "embeddings.patch_embedding.weight"),
        Rule("position_embeddings.weight", "embeddings.position_embedding.weight"),
        Rule("ln_pre.weight", "pre_layrnorm.weight"),
        Rule("ln_pre.bias", "pre_layrnorm.bias"),
    ]
    return (expand(top, mcore_prefix=mcore_prefix, hf_prefix=hf_prefix)
            + expand(layer_rules(v.num_attention_heads), range(v.num_layers), mcore_prefix, hf_prefix))


def unused_keys(num_hf_layers: int, used_layers: int, hf_prefix: str = "vision_tower.") -> list[str]:
    """HF tensors our tower does not represent: layers >= ``used_layers`` and ``post_layernorm``."""
    keys = [f"{hf_prefix}post_layernorm.weight", f"{hf_prefix}post_layernorm.bias"]
    for j in range(used_layers, num_hf_layers):
        for r in layer_rules(1):
            keys += [k.format(j=j) for k in r.hf_keys()]
    return [hf_prefix + k if not k.startswith(hf_prefix) else k for k in keys]


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

def used_layers(num_hidden_layers: int, feature_layer: int, where: str) -> int:
    """How many encoder layers produce HF ``hidden_states[feature_layer]`` (index 0 = embeddings)."""
    if isinstance(feature_layer, (list, tuple)):
        raise ConversionError(f"{where}.vision_feature_layer={list(feature_layer)}: multi-layer feature "
                              f"concatenation is not supported (use one layer)")
    k = feature_layer if feature_layer >= 0 else num_hidden_layers + 1 + feature_layer
    if not 1 <= k <= num_hidden_layers:
        raise ConversionError(f"{where}.vision_feature_layer={feature_layer}: selects {k} of "
                              f"{num_hidden_layers} layers; must select at least one layer")
    return k


def vision_config_from_hf(vc, num_layers: int, where: str = "vision_config",
                          image_mean=None, image_std=None) -> VisionConfig:
    mt = getattr(vc, "model_type", None)
    if mt != "clip_vision_model":
        raise ConversionError(f"{where}.model_type={mt!r}: only CLIP vision towers (clip_vision_model) "
                              f"are supported for this family")
    act = getattr(vc, "hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ConversionError(f"{where}.hidden_act={act!r}: our CLIP tower uses quick_gelu only")
    if getattr(vc, "num_channels", 3) != 3:
        raise ConversionError(f"{where}.num_channels={vc.num_channels}: only RGB (3) is supported")
    kw = {}
    if image_mean is not None:
        kw["image_mean"] = tuple(float(x) for x in image_mean)
    if image_std is not None:
        kw["image_std"] = tuple(float(x) for x in image_std)
    return VisionConfig(
        num_layers=num_layers, hidden_size=vc.hidden_size, num_attention_heads=vc.num_attention_heads,
        ffn_hidden_size=vc.intermediate_size, image_size=vc.image_size, patch_size=vc.patch_size,
        add_class_token=True, layernorm_epsilon=vc.layer_norm_eps, **kw)


def vision_config_to_hf(v: VisionConfig, base: dict | None = None):
    from transformers import CLIPVisionConfig

    kw = dict(base or {})
    kw.pop("model_type", None)
    kw.update(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
              num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
              image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layernorm_epsilon,
              hidden_act="quick_gelu", num_channels=3)
    return CLIPVisionConfig(**kw)


def strip_prefix(key: str, prefixes=("vision_model.",)) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key
