"""Layer specs shared by every arch, for the two backends.

* ``local``: megatron-core's own parallel linears + ``SDPAttention`` (torch's fused
  scaled-dot-product attention in megatron's core-attention contract; CPU and GPU).
* ``te``: Transformer Engine modules (GPU only; FP8 capable). Chosen by ``backend="auto"`` when TE
  imports and CUDA is present.

State-dict layout of a language layer (both backends, megatron-core names)::

    input_layernorm.weight                    [h]            (te: fused into linear_qkv.layer_norm_weight)
    (dist checkpoints use the te names for both backends: TE_NORM_KEYS)
    self_attention.linear_qkv.weight          [(nq + 2 nkv) d / tp, h]   per query group: q.., k, v
    self_attention.linear_proj.weight         [h, nq d / tp]
    pre_mlp_layernorm.weight                  [h]            (te: linear_fc1.layer_norm_weight)
    mlp.linear_fc1.weight                     [2 f / tp, h]  gate rows then up rows (per TP shard)
    mlp.linear_fc2.weight                     [h, f / tp]
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vlm.models.attention import SDPAttention

BACKENDS = ("local", "te")


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is present (TE raises RuntimeError without CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(name: str) -> str:
    """``auto`` -> ``te`` when available else ``local``; ``te`` without TE/CUDA is an error."""
    if name == "auto":
        return "te" if te_available() else "local"
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed 'auto', 'local', 'te'")
    if name == "te" and not te_available():
        raise ValueError("backend='te' needs Transformer Engine and a CUDA device; use 'local' or 'auto'")
    return name


class LocalNorm:
    """LayerNorm/RMSNorm from torch, built like a megatron norm (``config``, ``hidden_size``, ``eps``).

    Unlike megatron's ``WrappedTorchNorm`` it supports sequence parallelism: megatron's contract for
    SP norms is only that their parameters carry ``sequence_parallel=True`` so that
    ``finalize_model_grads`` all-reduces their gradients over the TP group.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: allowed 'LayerNorm', 'RMSNorm'")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def norm_module(backend: str):
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return LocalNorm


def _te():
    from megatron.core.extensions import transformer_engine as te

    return te


def mlp_spec(backend: str) -> ModuleSpec:
    """Dense MLP; with ``te`` the pre-MLP norm is fused into ``linear_fc1``."""
    if backend == "te":
        te = _te()
        return ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=te.TELayerNormColumnParallelLinear, linear_fc2=te.TERowParallelLinear))
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def projector_submodules(backend: str) -> MLPSubmodules:
    """Submodules of megatron's ``MultimodalProjector`` (no fused norm: the projector has none)."""
    if backend == "te":
        te = _te()
        return MLPSubmodules(linear_fc1=te.TEColumnParallelLinear, linear_fc2=te.TERowParallelLinear)
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def self_attention_spec(backend: str, mask_type: AttnMaskType) -> ModuleSpec:
    if backend == "te":
        te = _te()
        sub = SelfAttentionSubmodules(linear_qkv=te.TELayerNormColumnParallelLinear,
                                      core_attention=te.TEDotProductAttention,
                                      linear_proj=te.TERowParallelLinear)
    else:
        sub = SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                      core_attention=SDPAttention,
                                      linear_proj=RowParallelLinear)
    return ModuleSpec(module=SelfAttention, params={"attn_mask_type": mask_type}, submodules=sub)


# Checkpoint names of the local backend's norms = the names TE's fused linears give them, so one dist
# checkpoint loads with either backend (train with TE on GPU, resume/convert with local anywhere)
TE_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def transformer_layer_spec(backend: str, mask_type: AttnMaskType) -> ModuleSpec:
    """Pre-norm transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""
    norm = IdentityOp if backend == "te" else LocalNorm  # te fuses the norms into the linears
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=self_attention_spec(backend, mask_type),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp_spec(backend),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if backend == "te" else dict(TE_NORM_KEYS),
        ),
    )


def language_layer_spec(backend: str) -> ModuleSpec:
    """Causal decoder layer (Llama style when the config says RMSNorm + SwiGLU + no bias)."""
    return transformer_layer_spec(backend, AttnMaskType.causal)


def vision_layer_spec(backend: str) -> ModuleSpec:
    """ViT layer: bidirectional attention (megatron's local ViT spec is causal; see CPU_RUNTIME.md)."""
    return transformer_layer_spec(backend, AttnMaskType.no_mask)


def block_spec(config: TransformerConfig, layer_spec: ModuleSpec, backend: str,
               vp_stage: int | None = None):
    """This pipeline stage's layers of one homogeneous spec, with a final norm that supports SP."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules, get_num_layers_to_build)

    num_layers = get_num_layers_to_build(config, vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers,
                                      layer_norm=norm_module(backend))
