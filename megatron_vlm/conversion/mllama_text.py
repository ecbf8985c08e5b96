"""HF Mllama TEXT decoder <-> ``cross_attention`` arch language model (TP=1, PP=1 tensors).

The layer lists coincide (Mllama keeps cross-attention layers as layers of their own), so HF layer
``i`` is Megatron layer ``i``. Per layer, ``{L}`` = ``decoder.layers.{i}.``:

self-attention layer (HF ``MllamaSelfAttentionDecoderLayer``)::

    input_layernorm.weight              {L}input_layernorm.weight            te: {L}self_attention.linear_qkv.layer_norm_weight
    self_attn.{q,k,v}_proj.weight       {L}self_attention.linear_qkv.weight  rows per query group [q heads; k; v]
    self_attn.o_proj.weight             {L}self_attention.linear_proj.weight
    post_attention_layernorm.weight     {L}pre_mlp_layernorm.weight          te: {L}mlp.linear_fc1.layer_norm_weight
    mlp.{gate,up}_proj.weight           {L}mlp.linear_fc1.weight             cat([gate, up])
    mlp.down_proj.weight                {L}mlp.linear_fc2.weight

cross-attention layer (HF ``MllamaCrossAttentionDecoderLayer``)::

    input_layernorm.weight              {L}input_layernorm.weight            te: {L}cross_attention.linear_q.layer_norm_weight
    cross_attn.q_proj.weight            {L}cross_attention.linear_q.weight
    cross_attn.{k,v}_proj.weight        {L}cross_attention.linear_kv.weight  rows per query group [k_g; v_g]
    cross_attn.q_norm.weight            {L}cross_attention.q_layernorm.weight
    cross_attn.k_norm.weight            {L}cross_attention.k_layernorm.weight
    cross_attn.o_proj.weight            {L}cross_attention.linear_proj.weight
    cross_attn_attn_gate                {L}cross_attn_attn_gate
    cross_attn_mlp_gate                 {L}cross_attn_mlp_gate
    post_attention_layernorm.weight     {L}pre_mlp_layernorm.weight          te: {L}mlp.linear_fc1.layer_norm_weight
    mlp.{gate,up,down}_proj             as above

and ``embed_tokens.weight`` -> ``embedding.word_embeddings.weight``, ``norm.weight`` ->
``decoder.final_layernorm.weight``, ``lm_head.weight`` -> ``output_layer.weight``.

Vocabulary: Mllama's embedding has ``vocab_size + 8`` rows (the extra rows embed special tokens such
as ``<|image|>``), ``lm_head`` has ``vocab_size``. Lossless both ways when the Megatron
``language.vocab_size`` >= HF ``vocab_size + 8`` (e.g. exactly that): the embedding is copied whole and
``output_layer`` is padded with zero rows (their logits are 0: compare ``logits[..., :vocab_size]``).

HF keys are accepted with any of the prefixes ``""``, ``model.``, ``language_model.``,
``language_model.model.``, ``model.language_model.`` (MllamaForCausalLM, saved
MllamaForConditionalGeneration, in-memory MllamaForConditionalGeneration); vision keys are ignored.
:func:`megatron_to_hf_text` writes MllamaForCausalLM names (``model.*``, ``lm_head.weight``).
"""

from __future__ import annotations

import torch

from megatron_vlm.config import ModelConfig

EXTRA_EMBEDDING_ROWS = 8

_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


def _ca_indices(config: ModelConfig) -> list[int]:
    from megatron_vlm.models.cross_attention import cross_attention_layer_indices

    ca = config.cross_attention
    return cross_attention_layer_indices(config.language.num_layers, ca.every, ca.layers)


def _dims(config: ModelConfig) -> tuple[int, int, int]:
    lang = config.language
    heads = lang.num_attention_heads
    groups = lang.num_query_groups or heads
    return heads, groups, lang.hidden_size // heads


def _text_view(hf_state_dict: dict) -> dict:
    """HF keys -> text-model-local names (``embed_tokens.weight``, ``layers.i.*``, ``norm.weight``,
    ``lm_head.weight``)."""
    out = {}
    for key, value in hf_state_dict.items():
        if key in _LM_HEAD_KEYS:
            out["lm_head.weight"] = value
            continue
        for p in _TEXT_PREFIXES:
            if key.startswith(p):
                rest = key[len(p):]
                if rest.startswith(("layers.", "embed_tokens.", "norm.")):
                    out[rest] = value
                break
    return out


def _pad_rows(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"{what}: HF has {t.shape[0]} rows but language.vocab_size={rows}; "
                         f"set vocab_size >= {t.shape[0]} (Mllama: vocab_size + {EXTRA_EMBEDDING_ROWS})")
    if t.shape[0] == rows:
        return t.clone()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _norm_keys(backend: str, kind: str) -> tuple[str, str]:
    """(input norm, pre-MLP norm) Megatron names inside a layer."""
    if backend == "te":
        first = "self_attention.linear_qkv.layer_norm_weight" if kind == "self" else \
            "cross_attention.linear_q.layer_norm_weight"
        return first, "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def hf_text_to_megatron(hf_state_dict: dict, config: ModelConfig, prefix: str = "language_model.",
                        backend: str = "local") -> dict:
    """HF Mllama text weights -> Megatron (TP=1) state dict of the ``cross_attention`` arch's
    language model, keys prefixed with ``prefix`` (``"language_model."`` loads into
    ``CrossAttentionVLM.load_state_dict(..., strict=False)``; ``""`` into the GPTModel itself)."""
    heads, groups, d = _dims(config)
    n_layers = config.language.num_layers
    ca = set(_ca_indices(config))
    hf = _text_view(hf_state_dict)
    hf_layers = {int(k.split(".")[1]) for k in hf if k.startswith("layers.")}
    if hf_layers != set(range(n_layers)):
        raise ValueError(f"HF checkpoint has layers {sorted(hf_layers)}, config has {n_layers}")
    out = {}

    def put(name, value):
        out[prefix + name] = value.detach().clone()

    vocab = config.language.vocab_size
    put("embedding.word_embeddings.weight", _pad_rows(hf["embed_tokens.weight"], vocab, "embed_tokens"))
    put("output_layer.weight", _pad_rows(hf["lm_head.weight"], vocab, "lm_head"))
    put("decoder.final_layernorm.weight", hf["norm.weight"])
    for i in range(n_layers):
        h, m = f"layers.{i}.", f"decoder.layers.{i}."
        is_ca = f"{h}cross_attn.q_proj.weight" in hf
        if is_ca != (i in ca):
            raise ValueError(f"layer {i}: HF is {'cross' if is_ca else 'self'}-attention, config says "
                             f"cross-attention layers are {sorted(ca)}")
        in_norm, mlp_norm = _norm_keys(backend, "cross" if is_ca else "self")
        put(m + in_norm, hf[h + "input_layernorm.weight"])
        put(m + mlp_norm, hf[h + "post_attention_layernorm.weight"])
        put(m + "mlp.linear_fc1.weight", torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]))
        put(m + "mlp.linear_fc2.weight", hf[h + "mlp.down_proj.weight"])
        if is_ca:
            a = h + "cross_attn."
            put(m + "cross_attention.linear_q.weight", hf[a + "q_proj.weight"])
            put(m + "cross_attention.linear_kv.weight", fuse_kv(hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], groups))
            put(m + "cross_attention.q_layernorm.weight", hf[a + "q_norm.weight"])
            put(m + "cross_attention.k_layernorm.weight", hf[a + "k_norm.weight"])
            put(m + "cross_attention.linear_proj.weight", hf[a + "o_proj.weight"])
            put(m + "cross_attn_attn_gate", hf[h + "cross_attn_attn_gate"].reshape(1))
            put(m + "cross_attn_mlp_gate", hf[h + "cross_attn_mlp_gate"].reshape(1))
        else:
            a = h + "self_attn."
            put(m + "self_attention.linear_qkv.weight",
                fuse_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], heads, groups))
            put(m + "self_attention.linear_proj.weight", hf[a + "o_proj.weight"])
    return out


def megatron_to_hf_text(state_dict: dict, config: ModelConfig, hf_vocab_size: int | None = None,
                        prefix: str = "language_model.", backend: str = "local") -> dict:
    """Inverse of :func:`hf_text_to_megatron`: MllamaForCausalLM keys (``model.*``, ``lm_head.weight``).
    ``hf_vocab_size`` defaults to ``language.vocab_size - 8``."""
    heads, groups, d = _dims(config)
    ca = set(_ca_indices(config))
    V = hf_vocab_size if hf_vocab_size is not None else config.language.vocab_size - EXTRA_EMBEDDING_ROWS
    g = lambda name: state_dict[prefix + name].detach().clone()  # noqa: E731
    out = {
        "model.embed_tokens.weight": g("embedding.word_embeddings.weight")[:V + EXTRA_EMBEDDING_ROWS].clone(),
        "lm_head.weight": g("output_layer.weight")[:V].clone(),
        "model.norm.weight": g("decoder.final_layernorm.weight"),
    }
    for i in range(config.language.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        in_norm, mlp_norm = _norm_keys(backend, "cross" if i in ca else "self")
        out[h + "input_layernorm.weight"] = g(m + in_norm)
        out[h + "post_attention_layernorm.weight"] = g(m + mlp_norm)
        gate, up = g(m + "mlp.linear_fc1.weight").chunk(2)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate.clone(), up.clone()
        out[h + "mlp.down_proj.weight"] = g(m + "mlp.linear_fc2.weight")
        if i in ca:
            a = h + "cross_attn."
            out[a + "q_proj.weight"] = g(m + "cross_attention.linear_q.weight")
            out[a + "k_proj.weight"], out[a + "v_proj.weight"] = split_kv(g(m + "cross_attention.linear_kv.weight"), groups)
            out[a + "q_norm.weight"] = g(m + "cross_attention.q_layernorm.weight")
            out[a + "k_norm.weight"] = g(m + "cross_attention.k_layernorm.weight")
            out[a + "o_proj.weight"] = g(m + "cross_attention.linear_proj.weight")
            out[h + "cross_attn_attn_gate"] = g(m + "cross_attn_attn_gate")
            out[h + "cross_attn_mlp_gate"] = g(m + "cross_attn_mlp_gate")
        else:
            a = h + "self_attn."
            q, k, v = split_qkv(g(m + "self_attention.linear_qkv.weight"), heads, groups)
            out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
            out[a + "o_proj.weight"] = g(m + "self_attention.linear_proj.weight")
    return out


# ---- tensor layouts ------------------------------------------------------------------------------

def fuse_qkv(q, k, v, heads: int, groups: int) -> torch.Tensor:
    """``q [nq d, h]``, ``k/v [ng d, h]`` -> ``linear_qkv`` rows per group ``[q heads of g; k_g; v_g]``."""
    d = k.shape[0] // groups
    qg = q.reshape(groups, heads // groups * d, -1)
    return torch.cat([qg, k.reshape(groups, d, -1), v.reshape(groups, d, -1)], dim=1).reshape(-1, q.shape[-1])


def split_qkv(qkv, heads: int, groups: int):
    d = qkv.shape[0] // (heads + 2 * groups)
    per = qkv.reshape(groups, (heads // groups + 2) * d, -1)
    q, k, v = per.split([heads // groups * d, d, d], dim=1)
    h = qkv.shape[-1]
    return q.reshape(-1, h).clone(), k.reshape(-1, h).clone(), v.reshape(-1, h).clone()


def fuse_kv(k, v, groups: int) -> torch.Tensor:
    """``k/v [ng d, h]`` -> ``linear_kv`` rows per group ``[k_g; v_g]``."""
    d = k.shape[0] // groups
    return torch.cat([k.reshape(groups, d, -1), v.reshape(groups, d, -1)], dim=1).reshape(-1, k.shape[-1])


def split_kv(kv, groups: int):
    h = kv.shape[-1]
    k, v = kv.reshape(groups, 2, -1, h).unbind(1)
    return k.reshape(-1, h).clone(), v.reshape(-1, h).clone()
