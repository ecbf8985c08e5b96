"""Llama decoder (HF ``LlamaModel`` / ``LlamaForCausalLM`` layout) <-> megatron ``GPTModel``.

Key map (``{i}`` megatron layer, ``{j}`` HF layer; megatron prefix ``language_model.``)::

    embedding.word_embeddings.weight              embed_tokens.weight          PadRows (vocab)
    decoder.layers.{i}.input_layernorm.weight     layers.{j}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv  layers.{j}.self_attn.{q,k,v}_proj.weight   QKV
    decoder.layers.{i}.self_attention.linear_proj layers.{j}.self_attn.o_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight   layers.{j}.post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight      layers.{j}.mlp.{gate,up}_proj.weight       GateUp
                                                  (hidden_act <-> language.activation: silu, gelu,
                                                  gelu_pytorch_tanh, gelu_new)
    decoder.layers.{i}.mlp.linear_fc2.weight      layers.{j}.mlp.down_proj.weight
    decoder.final_layernorm.weight                norm.weight
    output_layer.weight                           lm_head.weight               PadRows (untied only)
"""

from __future__ import annotations

from megatron_vlm.config import GATED_ACTIVATIONS, LanguageConfig
from megatron_vlm.conversion.mapping import (GATE_UP, QKV, ConversionError, Pair, PadRows, Rule,
                                             expand)

DEFAULT_VOCAB_MULTIPLE = 128  # Megatron-LM's --make-vocab-size-divisible-by default


def layer_rules(num_heads: int, num_groups: int) -> list[Rule]:
    qkv = QKV(num_heads, num_groups)
    return [
        Rule("decoder.layers.{i}.input_layernorm.weight", "layers.{j}.input_layernorm.weight"),
        Rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
             ("layers.{j}.self_attn.q_proj.weight", "layers.{j}.self_attn.k_proj.weight",
              "layers.{j}.self_attn.v_proj.weight"), qkv),
        Rule("decoder.layers.{i}.self_attention.linear_proj.weight", "layers.{j}.self_attn.o_proj.weight"),
        Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", "layers.{j}.post_attention_layernorm.weight"),
        Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
             ("layers.{j}.mlp.gate_proj.weight", "layers.{j}.mlp.up_proj.weight"), GATE_UP),
        Rule("decoder.layers.{i}.mlp.linear_fc2.weight", "layers.{j}.mlp.down_proj.weight"),
    ]


def hf_vocab_size(lang: LanguageConfig) -> int:
    return lang.unpadded_vocab_size or lang.vocab_size


def pairs(lang: LanguageConfig, mcore_prefix: str = "language_model.",
          hf_model_prefix: str = "language_model.model.",
          hf_lm_head: str = "language_model.lm_head.weight", layers=None) -> list[Pair]:
    """The full decoder map. ``layers``: ``(megatron i, HF j)`` pairs of self-attention layers
    (default: ``i == j`` over ``lang.num_layers``)."""
    heads, groups = lang.num_attention_heads, lang.num_query_groups or lang.num_attention_heads
    vocab = PadRows(hf_vocab_size(lang), lang.vocab_size)
    layers = range(lang.num_layers) if layers is None else layers
    out = expand([Rule("embedding.word_embeddings.weight", "embed_tokens.weight", vocab)],
                 mcore_prefix=mcore_prefix, hf_prefix=hf_model_prefix)
    out += expand(layer_rules(heads, groups), layers, mcore_prefix, hf_model_prefix)
    out += expand([Rule("decoder.final_layernorm.weight", "norm.weight")],
                  mcore_prefix=mcore_prefix, hf_prefix=hf_model_prefix)
    if lang.untie_embeddings_and_output_weights:
        out.append(Pair(mcore_prefix + "output_layer.weight", (hf_lm_head,), vocab))
    return out


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

# megatron-core's Llama-3 RoPE scaling has these fixed (only the factor is a parameter)
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(tc, where: str) -> tuple[float, float | None]:
    """(rope theta, Llama-3 scaling factor or None) of an HF text config."""
    params = getattr(tc, "rope_parameters", None) or {}
    scaling = getattr(tc, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    params = {**scaling, **params}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", getattr(tc, "rope_theta", None))
    theta = 10000.0 if theta is None else float(theta)
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConversionError(f"{where}: rope type {rope_type!r} is not supported (allowed: 'default', 'llama3')")
    for key, value in LLAMA3_ROPE_FIXED.items():
        if float(params.get(key, value)) != value:
            raise ConversionError(f"{where}: llama3 rope {key}={params.get(key)}: megatron-core supports only {value}")
    return theta, float(params["factor"])


def rope_parameters(lang: LanguageConfig) -> dict:
    """HF ``rope_parameters`` of our LanguageConfig."""
    out = {"rope_type": "default", "rope_theta": float(lang.rotary_base)}
    if lang.rope_scaling_factor is not None:
        out.update(rope_type="llama3", factor=float(lang.rope_scaling_factor), **LLAMA3_ROPE_FIXED)
    return out


def pad_vocab(vocab: int, multiple: int) -> int:
    multiple = max(1, int(multiple))
    return -(-vocab // multiple) * multiple


def language_config_from_hf(tc, vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
                            tie_word_embeddings: bool | None = None, where: str = "text_config",
                            max_seq_length: int = 4096, model_types=("llama",),
                            embedding_rows: int | None = None) -> LanguageConfig:
    """``LlamaConfig`` (or a config of the same decoder, e.g. Mllama's text config) -> our
    LanguageConfig. ``embedding_rows``: rows the HF embedding has when they exceed ``vocab_size``
    (the Megatron vocab is padded to cover them). Raises ConversionError (one line) for what our
    Llama-style decoder cannot represent."""
    mt = getattr(tc, "model_type", None)
    if mt not in model_types:
        raise ConversionError(f"{where}.model_type={mt!r}: supported text decoders: {list(model_types)}")
    act = getattr(tc, "hidden_act", "silu")
    if act not in GATED_ACTIVATIONS:  # megatron-core's gated MLP takes any; these are mapped
        raise ConversionError(f"{where}.hidden_act={act!r}: allowed for the gated MLP {list(GATED_ACTIVATIONS)}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(tc, flag, False):
            raise ConversionError(f"{where}.{flag}=True: our Llama decoder has no biases")
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    if head_dim * heads != tc.hidden_size:
        raise ConversionError(f"{where}.head_dim={head_dim}: must equal hidden_size/num_attention_heads "
                              f"= {tc.hidden_size // heads} (no separate kv_channels in our config)")
    theta, rope_factor = _rope(tc, where)
    if theta != int(theta):
        raise ConversionError(f"{where}.rope_theta={theta}: must be an integer for megatron's GPTModel")
    tie = getattr(tc, "tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
    kv = getattr(tc, "num_key_value_heads", None) or heads
    return LanguageConfig(
        num_layers=tc.num_hidden_layers, hidden_size=tc.hidden_size, num_attention_heads=heads,
        num_query_groups=kv, ffn_hidden_size=tc.intermediate_size,
        vocab_size=pad_vocab(max(tc.vocab_size, embedding_rows or 0), vocab_multiple),
        unpadded_vocab_size=tc.vocab_size,
        seq_length=min(tc.max_position_embeddings, max_seq_length), rotary_base=theta,
        rope_scaling_factor=rope_factor,
        layernorm_epsilon=tc.rms_norm_eps, untie_embeddings_and_output_weights=not tie, activation=act)


def language_config_to_hf(lang: LanguageConfig, base: dict | None = None, **extra):
    """Our LanguageConfig -> ``LlamaConfig`` (``base``: a config dict whose other fields to keep)."""
    from transformers import LlamaConfig

    kw = dict(base or {})
    kw.pop("model_type", None)
    kw.update(
        hidden_size=lang.hidden_size, intermediate_size=lang.ffn_hidden_size,
        num_hidden_layers=lang.num_layers, num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_query_groups or lang.num_attention_heads,
        head_dim=lang.hidden_size // lang.num_attention_heads, vocab_size=hf_vocab_size(lang),
        rms_norm_eps=lang.layernorm_epsilon, hidden_act=lang.activation, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=not lang.untie_embeddings_and_output_weights,
        rope_parameters=rope_parameters(lang),
    )
    kw.setdefault("max_position_embeddings", lang.seq_length)
    kw.pop("rope_scaling", None)
    kw.pop("rope_theta", None)
    kw.update(extra)
    return LlamaConfig(**kw)
