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

Both functions apply the converter's declarative text map (:func:`megatron_vlm.archs.cross_attention.hf_mllama.text_pairs`)
to whole in-memory state dicts; they only rename its keys to the text model's own names.
"""

from __future__ import annotations

import dataclasses
import re

from megatron_vlm.config import ModelConfig
from megatron_vlm.conversion import mapping
from megatron_vlm.archs.cross_attention.config import layer_indices
from megatron_vlm.archs.cross_attention.hf_mllama import EXTRA_EMBEDDING_ROWS, text_pairs
from megatron_vlm.models.backends import te_norm_keys

_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
# the prefixes text_pairs() writes its keys with
_MAP_MCORE, _MAP_HF, _MAP_HF_HEAD = "language_model.", "language_model.model.", "language_model.lm_head.weight"


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


def _te_name(key: str, ca: set[int]) -> str:
    """A layer's norm under the name TE's fused linear gives it (``te`` backend state dicts)."""
    m = re.match(r"(decoder\.layers\.(\d+)\.)(.*)$", key)
    if m:
        for local, te in te_norm_keys("cross_attention.linear_q" if int(m.group(2)) in ca else "self_attention.linear_qkv").items():
            if m.group(3).startswith(local):
                return m.group(1) + te + m.group(3)[len(local):]
    return key


def _local_pairs(config: ModelConfig, hf_vocab: int, backend: str) -> list[mapping.Pair]:
    """``text_pairs`` for an HF vocab of ``hf_vocab``, keyed by language-model-local Megatron names
    and text-model-local HF names."""
    lang = dataclasses.replace(config.language, unpadded_vocab_size=hf_vocab)
    ca = set(layer_indices(config))
    out = []
    for p in text_pairs(dataclasses.replace(config, language=lang)):
        mcore = p.mcore[len(_MAP_MCORE):]
        hf = tuple("lm_head.weight" if k == _MAP_HF_HEAD else k[len(_MAP_HF):] for k in p.hf)
        out.append(mapping.replace(p, mcore=_te_name(mcore, ca) if backend == "te" else mcore, hf=hf))
    return out


def hf_text_to_megatron(hf_state_dict: dict, config: ModelConfig, prefix: str = "language_model.",
                        backend: str = "local") -> dict:
    """HF Mllama text weights -> Megatron (TP=1) state dict of the ``cross_attention`` arch's
    language model, keys prefixed with ``prefix`` (``"language_model."`` loads into
    ``CrossAttentionVLM.load_state_dict(..., strict=False)``; ``""`` into the GPTModel itself)."""
    n_layers = config.language.num_layers
    ca = set(layer_indices(config))
    hf = _text_view(hf_state_dict)
    hf_layers = {int(k.split(".")[1]) for k in hf if k.startswith("layers.")}
    if hf_layers != set(range(n_layers)):
        raise ValueError(f"HF checkpoint has layers {sorted(hf_layers)}, config has {n_layers}")
    for i in range(n_layers):
        is_ca = f"layers.{i}.cross_attn.q_proj.weight" in hf
        if is_ca != (i in ca):
            raise ValueError(f"layer {i}: HF is {'cross' if is_ca else 'self'}-attention, config says "
                             f"cross-attention layers are {sorted(ca)}")
    vocab = config.language.vocab_size
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if hf[name].shape[0] > vocab:
            raise ValueError(f"{name.split('.')[0]}: HF has {hf[name].shape[0]} rows but language.vocab_size="
                             f"{vocab}; set vocab_size >= {hf[name].shape[0]} (Mllama: vocab_size + "
                             f"{EXTRA_EMBEDDING_ROWS})")
    pairs = _local_pairs(config, hf["lm_head.weight"].shape[0], backend)
    return {prefix + k: t.detach().clone() for k, t in mapping.hf_to_mcore(pairs, hf.__getitem__)}


def megatron_to_hf_text(state_dict: dict, config: ModelConfig, hf_vocab_size: int | None = None,
                        prefix: str = "language_model.", backend: str = "local") -> dict:
    """Inverse of :func:`hf_text_to_megatron`: MllamaForCausalLM keys (``model.*``, ``lm_head.weight``).
    ``hf_vocab_size`` defaults to ``language.vocab_size - 8``."""
    V = hf_vocab_size if hf_vocab_size is not None else config.language.vocab_size - EXTRA_EMBEDDING_ROWS
    pairs = _local_pairs(config, V, backend)
    out = mapping.mcore_to_hf(pairs, lambda name: state_dict[prefix + name])
    return {(k if k == "lm_head.weight" else "model." + k): t.detach().clone() for k, t in out}
