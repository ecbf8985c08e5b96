"""MoMa layer specs: a megatron-core ``TransformerLayer`` whose MLP slot is megatron-core's own
``MoELayer`` (experts: ``SequentialMLP`` with the local backend, ``TEGroupedMLP`` with te; alltoall or
allgather token dispatcher) routed by :class:`~megatron_vlm.archs.moma.router.MoMaRouter`.

State-dict layout of a MoMa layer (megatron-core names; dense layers as in ``models/specs.py``)::

    input_layernorm.weight                              [h]   (dist ckpt: self_attention.linear_qkv.layer_norm_weight)
    self_attention.linear_qkv / linear_proj.weight      as a dense layer
    pre_mlp_layernorm.weight                            [h]   (its own norm in both backends)
    mlp.router.weight                                   [E, h]        E = all experts, groups interleaved
    mlp.router.aux.{m}.{0,2}.{weight,bias}              auxiliary router of modality m
    mlp.experts.local_experts.{i}.linear_fc1.weight     [2 f / tp, h] (dist ckpt: mlp.experts.experts.linear_fc1.weight [E, ..])
    mlp.experts.local_experts.{i}.linear_fc2.weight     [h, f / tp]
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vlm.archs.moma.config import capacity_factors, expert_groups, moma_layer_indices
from megatron_vlm.archs.moma.router import MoMaRouter, MoMaRouting
from megatron_vlm.models import specs


def routing_settings(mc) -> MoMaRouting:
    moma = mc.moma
    return MoMaRouting(groups=tuple(tuple(g) for g in expert_groups(moma)),
                       capacities=tuple(capacity_factors(moma)), gumbel_noise=moma.gumbel_noise,
                       eval_routing=moma.eval_routing, aux_hidden_size=moma.aux_router.hidden_size,
                       aux_loss_coeff=float(moma.aux_router.loss_coeff))


def moma_layer_spec(backend, routing: MoMaRouting) -> ModuleSpec:
    """Pre-norm layer: shared self-attention, then the per-modality expert groups."""
    num_experts = sum(len(g) for g in routing.groups)
    moe = get_moe_module_spec_for_backend(backend, num_experts=num_experts,
                                          moe_grouped_gemm=backend.name == "te")
    moe = dataclasses.replace(moe, submodules=dataclasses.replace(
        moe.submodules, router=partial(MoMaRouter, routing=routing), shared_experts=None))
    keys = backend.sharded_state_dict_keys_map("self_attention.linear_qkv")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=specs.pre_norm(backend),
            self_attention=specs.language_layer_spec(backend).submodules.self_attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=backend.layer_norm(),
            mlp=moe,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={k: v for k, v in keys.items() if k == "input_layernorm."},
        ),
    )


def block_spec(ctx) -> TransformerBlockSubmodules:
    """This (virtual) pipeline stage's layers: MoMa where ``model.moma.layers`` says, dense elsewhere."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    n = get_num_layers_to_build(ctx.config, ctx.vp_stage)
    offset = get_transformer_layer_offset(ctx.config, ctx.vp_stage)
    moma = set(moma_layer_indices(ctx.model))
    dense, expert = specs.language_layer_spec(ctx.backend), moma_layer_spec(ctx.backend, routing_settings(ctx.model))
    return TransformerBlockSubmodules(layer_specs=[expert if offset + i in moma else dense for i in range(n)],
                                      layer_norm=ctx.backend.layer_norm())
