"""``cross_attention`` (Llama-3.2-Vision / Mllama): text-only residual stream; gated GQA
cross-attention layers at a cadence read the image features."""

from megatron_vlm.archs import ArchSpec, register_arch
from megatron_vlm.archs.cross_attention.config import (CrossAttentionConfig, layer_indices,
                                                       place_text_layers, validate)
from megatron_vlm.data.layout import TokenLayout


def flops(cfg, global_batch_size: int) -> float:
    from megatron_vlm.training.flops import iteration_flops

    return iteration_flops(cfg, global_batch_size, cross_attention_layers=len(layer_indices(cfg.model)))


def pipeline_seq_length(cfg) -> int:
    from megatron_vlm.archs.cross_attention.model import pipeline_seq_length as length

    return length(cfg)


SPEC = register_arch(ArchSpec(
    name="cross_attention",
    summary="gated GQA cross-attention layers at a cadence (Llama-3.2-Vision / Mllama layout)",
    model_class="megatron_vlm.archs.cross_attention.model:CrossAttentionVLM",
    block_spec="megatron_vlm.archs.cross_attention.layers:block_spec",
    token_layout=TokenLayout.MARKER,
    section="cross_attention",
    section_class=CrossAttentionConfig,
    validate=validate,
    flops=flops,
    pipeline_seq_length=pipeline_seq_length,
    homogeneous_layers=False,
    conversion_family="megatron_vlm.archs.cross_attention.hf_mllama:Mllama",
    place_text_layers=place_text_layers,
))
