"""Layer specs shared by every arch, built from a backend provider
(:func:`megatron_vlm.models.backends.backend_provider`: ``local`` | ``te``).

State-dict layout of a language layer (both backends, megatron-core names)::

    input_layernorm.weight                    [h]            (te: fused into linear_qkv.layer_norm_weight)
    (dist checkpoints use the te names for both backends: backends.te_norm_keys)
    self_attention.linear_qkv.weight          [(nq + 2 nkv) d / tp, h]   per query group: q.., k, v
    self_attention.linear_proj.weight         [h, nq d / tp]
    pre_mlp_layernorm.weight                  [h]            (te: linear_fc1.layer_norm_weight)
    mlp.linear_fc1.weight                     [2 f / tp, h]  gate rows then up rows (per TP shard)
    mlp.linear_fc2.weight                     [h, f / tp]
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


def first_linear(backend):
    """The linear that takes a layer's normed input: with a fused norm where the backend fuses."""
    return (backend.column_parallel_layer_norm_linear() if backend.fuse_layernorm_and_linear()
            else backend.column_parallel_linear())


def pre_norm(backend):
    """The separate pre-norm of a sub-layer (IdentityOp where the backend fuses it into the linear)."""
    return IdentityOp if backend.fuse_layernorm_and_linear() else backend.layer_norm()


def mlp_spec(backend) -> ModuleSpec:
    """Dense MLP; with ``te`` the pre-MLP norm is fused into ``linear_fc1``."""
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=first_linear(backend), linear_fc2=backend.row_parallel_linear()))


def projector_submodules(backend) -> MLPSubmodules:
    """Submodules of megatron's ``MultimodalProjector`` (no fused norm: the projector has none)."""
    return MLPSubmodules(linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear())


def self_attention_spec(backend, mask_type: AttnMaskType) -> ModuleSpec:
    sub = SelfAttentionSubmodules(linear_qkv=first_linear(backend), core_attention=backend.core_attention(),
                                  linear_proj=backend.row_parallel_linear())
    return ModuleSpec(module=SelfAttention, params={"attn_mask_type": mask_type}, submodules=sub)


def transformer_layer_spec(backend, mask_type: AttnMaskType) -> ModuleSpec:
    """Pre-norm transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm(backend),
            self_attention=self_attention_spec(backend, mask_type),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_norm(backend),
            mlp=mlp_spec(backend),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=backend.sharded_state_dict_keys_map("self_attention.linear_qkv"),
        ),
    )


def language_layer_spec(backend) -> ModuleSpec:
    """Causal decoder layer (Llama style when the config says RMSNorm + SwiGLU + no bias)."""
    return transformer_layer_spec(backend, AttnMaskType.causal)


def vision_layer_spec(backend) -> ModuleSpec:
    """ViT layer: bidirectional attention (megatron's local ViT spec is causal; see CPU_RUNTIME.md)."""
    return transformer_layer_spec(backend, AttnMaskType.no_mask)


def block_spec(config: TransformerConfig, layer_spec: ModuleSpec, backend, vp_stage: int | None = None):
    """This pipeline stage's layers of one homogeneous spec, with a final norm that supports SP."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=backend.layer_norm())
