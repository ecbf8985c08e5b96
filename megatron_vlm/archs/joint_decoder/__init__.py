"""``joint_decoder`` (LLaVA): image features replace the image-token embeddings; plain GPT layers."""

from megatron_vlm.archs import ArchSpec, register_arch
from megatron_vlm.data.layout import TokenLayout

SPEC = register_arch(ArchSpec(
    name="joint_decoder",
    summary="image features spliced into the text sequence (LLaVA); plain GPT layers",
    model_class="megatron_vlm.archs.joint_decoder.model:JointDecoderVLM",
    block_spec="megatron_vlm.archs.joint_decoder.model:block_spec",
    token_layout=TokenLayout.INLINE,
    conversion_family="megatron_vlm.archs.joint_decoder.hf_llava:Llava",
))
