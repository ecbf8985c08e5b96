"""``mot`` (Mixture-of-Transformers, Liang et al. 2024, arXiv 2411.04996): the joint-decoder residual
stream (image features spliced at the image positions); every non-embedding weight of a decoder
layer (Q/K/V, output projection, norms, SwiGLU FFN) untied by modality, one global causal attention
over the whole sequence. Per-token FLOPs equal the dense model's (parameters x2). See ``config.py``
(YAML) and ``layers.py`` (layer, TP/SP, state dict)."""

import re

from megatron_vlm.archs import ArchSpec, register_arch
from megatron_vlm.archs.mot.config import MoTConfig, modality_names, validate
from megatron_vlm.data.layout import TokenLayout

_DENSE_LAYER = re.compile(r"^(language_model\.decoder\.layers\.\d+\.)"
                          r"(input_layernorm|pre_mlp_layernorm|mlp"
                          r"|self_attention\.(?:linear_qkv|linear_proj|q_layernorm|k_layernorm))\.(.+)$")


def from_dense(mc, key: str) -> list[str]:
    """Warm start / upcycling: each tensor of a dense decoder layer goes to every modality's copy
    (``...mlp.linear_fc1.weight`` -> ``...mlp.{image,text}.linear_fc1.weight``); shared norms
    (``untie_norms: false``) and everything outside the decoder layers keep their key."""
    m = _DENSE_LAYER.match(key)
    if not m or (m.group(2).endswith("layernorm") and not m.group(2).startswith("self_attention")
                 and not mc.mot.untie_norms):
        return [key]
    prefix, module, rest = m.groups()
    return [f"{prefix}{module}.{name}.{rest}" for name in modality_names()]


SPEC = register_arch(ArchSpec(
    name="mot",
    summary="every non-embedding layer weight untied by modality, one global causal attention (dense FLOPs)",
    model_class="megatron_vlm.archs.joint_decoder.model:JointDecoderVLM",
    block_spec="megatron_vlm.archs.mot.layers:block_spec",
    token_layout=TokenLayout.INLINE,
    section="mot",
    section_class=MoTConfig,
    validate=validate,
    from_dense=from_dense,
))
