"""MMCA layer specs: a megatron-core pre-norm decoder layer whose core attention is
:class:`~megatron_vlm.archs.mmca.attention.MMCAttention` (torch SDPA, both backends; linears and
norms from the backend).

How the modality context reaches the core attention: :class:`MMCALayer` takes megatron's per-forward
``padding_mask`` (the modality context ``[b, s(/tp), M]``, sequence-parallel sharded), all-gathers
it along the sequence over the TP group when sequence parallel (the attention sees the whole
sequence: ``linear_qkv`` all-gathers the hidden states), and hands it on as the layer's
``attention_mask``, which megatron passes unchanged to the core attention (also through full and
selective ``core_attn`` recompute). Nothing is stored on modules. Generation with a megatron
``StaticInferenceContext``: the context of the cached keys lives in the inference context
(:func:`cached_key_context`), the attention then sees this step's queries against all cached keys.

State-dict layout of an MMCA layer: exactly a dense language layer's (``models/specs.py``), so a
joint_decoder checkpoint loads as is::

    input_layernorm.weight                    [h]
    self_attention.linear_qkv.weight          [(nq + 2 nkv) d / tp, h]   per query group: q.., k, v
    self_attention.linear_proj.weight         [h, nq d / tp]
    pre_mlp_layernorm.weight                  [h]
    mlp.linear_fc1.weight                     [2 f / tp, h]
    mlp.linear_fc2.weight                     [h, f / tp]
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_vlm.archs.mmca.attention import MMCAttention
from megatron_vlm.models import specs


def full_sequence_context(context: torch.Tensor, sequence_parallel: bool, group=None) -> torch.Tensor:
    """``[b, s/tp, M]`` bool (this rank's slice) -> ``[b, s, M]`` bool, gathered over the TP group
    when sequence parallel (as a float ``[s, b, M]`` tensor along the first dim; no gradient)."""
    tp = group.size() if group is not None else parallel_state.get_tensor_model_parallel_world_size()
    if not sequence_parallel or tp == 1:
        return context
    gathered = gather_from_sequence_parallel_region(context.transpose(0, 1).float().contiguous(),
                                                    tensor_parallel_output_grad=False, group=group)
    return (gathered > 0.5).transpose(0, 1).contiguous()


class MMCALayer(TransformerLayer):
    """A ``TransformerLayer`` that gives its self-attention the full-sequence modality context as
    ``attention_mask`` (``padding_mask`` = the context, required)."""

    def forward(self, *args, **kwargs):
        context = kwargs.get("padding_mask")
        if context is None:
            raise ValueError("MMCALayer: needs the modality context as padding_mask "
                             "(VLMModel passes it; see megatron_vlm.data.batch)")
        if len(args) > 1 or kwargs.get("attention_mask") is not None:
            raise ValueError("MMCALayer: builds its own attention masks; got an attention_mask")
        full = full_sequence_context(context, self.config.sequence_parallel, getattr(self, "tp_group", None))
        if kwargs.get("inference_context") is not None:
            full = cached_key_context(kwargs["inference_context"], full)
        kwargs["attention_mask"] = full
        return super().forward(*args, **kwargs)


def cached_key_context(inference_context, context: torch.Tensor) -> torch.Tensor:
    """Generation with a megatron static KV cache: the modality context of every cached key.

    ``inference_context.mmca_key_context`` ``[max_batch, max_seq, M]`` bool holds it (written at this
    step's positions ``[offset, offset + s)``; every MMCA layer writes the same values); returns
    ``[b, offset + s, M]``, the keys the step's queries see."""
    cache = getattr(inference_context, "mmca_key_context", None)
    if cache is None:
        cache = context.new_zeros(inference_context.max_batch_size, inference_context.max_sequence_length,
                                  context.shape[-1])
        inference_context.mmca_key_context = cache
    start, b0 = inference_context.sequence_len_offset, inference_context.batch_size_offset
    end, b1 = start + context.shape[1], b0 + context.shape[0]
    cache[b0:b1, start:end] = context
    return cache[b0:b1, :end]


def mmca_layer_spec(backend, num_image_tokens: int | None, combine: str, impl: str = "fast") -> ModuleSpec:
    """Pre-norm decoder layer (as ``specs.language_layer_spec``) with MMCA core attention
    (``impl``: ``fast`` | ``explicit``, see ``attention.py``)."""
    layer = specs.language_layer_spec(backend)
    attention = layer.submodules.self_attention
    core = partial(MMCAttention, num_image_tokens=num_image_tokens, combine=combine, impl=impl)
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules,
                                                                              core_attention=core))
    return ModuleSpec(module=MMCALayer, submodules=dataclasses.replace(layer.submodules, self_attention=attention))


def block_spec(ctx):
    """This stage's MMCA layers (homogeneous)."""
    layer = mmca_layer_spec(ctx.backend, ctx.model.num_image_tokens, ctx.model.mmca.combine)
    return specs.block_spec(ctx.config, layer, ctx.backend, ctx.vp_stage)
