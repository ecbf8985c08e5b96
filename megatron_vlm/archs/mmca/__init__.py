"""``mmca`` (multi-modal causal attention, DeepSpeed-VisualChat, Yao et al. 2023, arXiv 2309.14327):
the joint-decoder residual stream (image features spliced at the image-token positions, ``inline``
token layout); every self-attention layer keeps one Q/K/V projection (GQA) but normalises two key
sets separately: a text query attends the preceding image tokens and, on its own, the causal text
tokens; an image query attends the tokens of its own image only. See ``attention.py`` (the masks and
the core attention), ``layers.py`` (specs, how the modality context reaches the attention),
``config.py`` (``model.mmca``).

FLOPs (``ArchSpec.flops``): the default dense formula, i.e. the model FLOPs of one causal attention
per layer (the same parameters and matmul sizes; the kernels that split the keys into the two
branches are counted as one attention).
"""

from megatron_vlm.archs import ArchSpec, register_arch
from megatron_vlm.archs.mmca.config import MMCAConfig, validate
from megatron_vlm.data.layout import TokenLayout

SPEC = register_arch(ArchSpec(
    name="mmca",
    summary="joint decoder with multi-modal causal attention: one QKV, separate softmax over image and text keys",
    model_class="megatron_vlm.archs.joint_decoder.model:JointDecoderVLM",
    block_spec="megatron_vlm.archs.mmca.layers:block_spec",
    token_layout=TokenLayout.INLINE,
    section="mmca",
    section_class=MMCAConfig,
    validate=validate,
))
