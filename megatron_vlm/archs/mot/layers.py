"""MoT layer (Mixture-of-Transformers, Liang et al. 2024, arXiv 2411.04996) on megatron-core.

Every non-embedding weight of the layer is untied by modality (image = 0, text = 1; padding counts
as text); attention is ONE global causal self-attention over the whole sequence::

    for token t of modality m = ids[t]:
        a_t = x_t + proj_m( Attn( qkv_m(norm1_m(x_t)) over all tokens, causal, GQA, RoPE ) )
        y_t = a_t + mlp_m(norm2_m(a_t))                     mlp_m: SwiGLU as the dense layer

Each token goes only through its modality's weights (tokens are selected per modality, projected
and scattered back in sequence order), so per-token FLOPs equal the dense layer's; parameters x2.

Tensor parallelism (megatron-core linears per modality; TP over heads and the FFN): the layer
input is ``[s(/tp), b, h]``; norms run on this rank's tokens, the normed tokens enter the TP region
once (SP: all-gather, its backward a reduce-scatter; TP only: megatron's copy, backward all-reduce),
the per-modality column-parallel linears run with no communication of their own, the
row-parallel ones return partial sums that are merged in sequence order and reduced once for all
modalities (SP: reduce-scatter; TP only: all-reduce). Norm weights carry ``sequence_parallel`` under
SP (``finalize_model_grads`` sums their grads over TP), as do the row-parallel biases if any.

State-dict layout of a MoT layer (``{m}`` = modality name ``image`` | ``text``)::

    input_layernorm.{m}.weight                [h]      (model.mot.untie_norms: false -> input_layernorm.weight)
    self_attention.linear_qkv.{m}.weight      [(nq + 2 nkv) d / tp, h]   per query group: q.., k, v
    self_attention.q_layernorm.{m}.weight     [d]      (model.mot.qk_norm only; also k_layernorm)
    self_attention.linear_proj.{m}.weight     [h, nq d / tp]
    pre_mlp_layernorm.{m}.weight              [h]      (untie_norms: false -> pre_mlp_layernorm.weight)
    mlp.{m}.linear_fc1.weight                 [2 f / tp, h]  gate rows then up rows (per TP shard)
    mlp.{m}.linear_fc2.weight                 [h, f / tp]

Generation: with a megatron ``StaticInferenceContext`` the attention keeps its K/V (keys after RoPE) in
the context's ``key_value_memory_dict`` as megatron's own attention does (``MoTAttention._cached``):
the prefill writes the prompt's positions, each decoding step one position.

With the ``te`` backend the layer still uses megatron-core's own linears (TE's fuse their
communication) and TE's norm and core attention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region, reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import make_viewless_tensor

from megatron_vlm.archs.cross_attention.layers import HeadRMSNorm
from megatron_vlm.archs.mot.config import modality_names
from megatron_vlm.data.batch import decode_modality_context
from megatron_vlm.models import specs


class PartialRowParallelLinear(RowParallelLinear):
    """megatron's ``RowParallelLinear`` without its TP reduction: returns this rank's partial sums
    and the (unsplit) bias; the MoT layer reduces all modalities' outputs at once."""

    def forward(self, input_):
        out = self._forward_impl(input=input_, weight=self.weight, bias=None,
                                 gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                 allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                                 grad_output_buffer=None)
        return out, self.bias


class PerModality(MegatronModule):
    """One module per modality, children named by modality (``image``, ``text``); ``[m]`` = the
    module of modality id ``m``. A MegatronModule, so TP-split children shard in dist checkpoints."""

    def __init__(self, config: TransformerConfig, build: Callable[[], torch.nn.Module]):
        super().__init__(config=config)
        self.names = modality_names()
        for name in self.names:
            self.add_module(name, build())

    def __getitem__(self, m: int) -> torch.nn.Module:
        return getattr(self, self.names[m])

    def __len__(self) -> int:
        return len(self.names)


class Routing:
    """Which token goes through which modality's weights: ``ids`` ``[s, b]`` (modality id per
    token) -> per modality the flat ``[s*b]`` indices of its tokens, in sequence order."""

    def __init__(self, ids: torch.Tensor, num_modalities: int):
        self.ids, self.shape = ids, tuple(ids.shape)
        flat = ids.reshape(-1)
        self.index = [(flat == m).nonzero().squeeze(1) for m in range(num_modalities)]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[s, b, ...]`` -> per modality ``[n_m, 1, ...]`` (3-D: megatron's linears want it)."""
        flat = x.reshape(-1, *x.shape[2:])
        return [flat.index_select(0, idx).unsqueeze(1) for idx in self.index]

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`: per modality ``[n_m, 1, ...]`` -> ``[s, b, ...]``."""
        tail = parts[0].shape[2:]
        out = parts[0].new_zeros(self.ids.numel(), *tail)
        for idx, part in zip(self.index, parts):
            out = out.index_copy(0, idx, part.reshape(-1, *tail))
        return out.view(*self.shape, *tail)

    def apply(self, modules, x: torch.Tensor) -> torch.Tensor:
        """Token-wise: each token of ``x`` ``[s, b, ...]`` through its modality's module."""
        return self.merge([modules[m](part) for m, part in enumerate(self.split(x))])


@dataclass
class MoTLayerSubmodules:
    norm: Union[ModuleSpec, type] = None            # input / pre-MLP norm (one per modality)
    linear_qkv: Union[ModuleSpec, type] = None      # column-parallel, no communication of its own
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None     # row-parallel, partial sums
    head_norm: Union[ModuleSpec, type] = HeadRMSNorm  # q/k norm (model.mot.qk_norm)
    mlp: Union[ModuleSpec, type] = None             # per-modality SwiGLU MLP, partial sums


class MoTAttention(MegatronModule):
    """Per-modality Q/K/V and output projections around one global causal attention.

    forward(x ``[s, b, h]`` inside the TP region, routing over those ``s*b`` tokens,
    rotary_pos_emb, attention_mask) -> (partial sums ``[s, b, h]``, per-modality biases or None).
    """

    def __init__(self, config: TransformerConfig, local_config: TransformerConfig,
                 submodules: MoTLayerSubmodules, layer_number: int, qk_norm: bool, pg_collection):
        super().__init__(config=config)
        self.tp_group = tp_group = pg_collection.tp
        tp = tp_group.size()
        heads, groups = config.num_attention_heads, config.num_query_groups
        if heads % tp or groups % tp:
            raise ValueError(f"mot attention: heads={heads} and query groups={groups} must be divisible "
                             f"by tensor_model_parallel_size={tp}")
        self.head_dim = config.kv_channels
        self.heads_per_rank, self.groups_per_rank = heads // tp, groups // tp
        self.layer_number = layer_number
        qkv_size = (heads + 2 * groups) * self.head_dim
        self.linear_qkv = PerModality(config, lambda: build_module(
            submodules.linear_qkv, config.hidden_size, qkv_size, config=local_config,
            init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="qkv", tp_group=tp_group))
        self.q_layernorm = self.k_layernorm = None
        if qk_norm:
            head_norm = lambda: build_module(submodules.head_norm, config=config,  # noqa: E731
                                             hidden_size=self.head_dim, eps=config.layernorm_epsilon)
            self.q_layernorm = PerModality(config, head_norm)
            self.k_layernorm = PerModality(config, head_norm)
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number,
                                           attn_mask_type=AttnMaskType.causal, attention_type="self",
                                           softmax_scale=config.softmax_scale, pg_collection=pg_collection)
        self.checkpoint_core_attention = (config.recompute_granularity == "selective"
                                          and "core_attn" in (config.recompute_modules or []))
        self.linear_proj = PerModality(config, lambda: build_module(
            submodules.linear_proj, heads * self.head_dim, config.hidden_size, config=local_config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
            tp_group=tp_group))

    def _qkv(self, m: int, x: torch.Tensor):
        """``[n, 1, h]`` tokens of modality m -> q ``[n, 1, nq/tp, d]``, k, v ``[n, 1, nkv/tp, d]``."""
        mixed, _ = self.linear_qkv[m](x)
        n, d, g = x.shape[0], self.head_dim, self.groups_per_rank
        per_group = self.heads_per_rank // g
        mixed = mixed.view(n, 1, g, (per_group + 2) * d)
        q, k, v = torch.split(mixed, [per_group * d, d, d], dim=-1)
        q = q.reshape(n, 1, self.heads_per_rank, d)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm[m](q), self.k_layernorm[m](k)
        return q, k, v

    def _cached(self, inference_context, key: torch.Tensor, value: torch.Tensor):
        """Static KV cache in megatron's layout (``inference_context.key_value_memory_dict[layer]`` =
        (K, V) ``[max_seq, max_batch, groups/tp, d]``, keys after RoPE): this step's K/V go to
        positions ``[offset, offset + s)``; returns K/V of positions ``[0, offset + s)``."""
        memory = inference_context.key_value_memory_dict
        if self.layer_number not in memory:
            shape = (inference_context.max_sequence_length, inference_context.max_batch_size, *key.shape[2:])
            memory[self.layer_number] = (key.new_zeros(shape), value.new_zeros(shape))
        k_mem, v_mem = memory[self.layer_number]
        start, b0 = inference_context.sequence_len_offset, inference_context.batch_size_offset
        end, b1 = start + key.shape[0], b0 + key.shape[1]
        if end > k_mem.shape[0] or b1 > k_mem.shape[1]:
            raise ValueError(f"MoT KV cache: positions [{start}, {end}) x batch [{b0}, {b1}) exceed the "
                             f"inference context's {tuple(k_mem.shape[:2])}")
        k_mem[start:end, b0:b1], v_mem[start:end, b0:b1] = key, value
        return k_mem[:end, b0:b1], v_mem[:end, b0:b1]

    def forward(self, x: torch.Tensor, routing: Routing, rotary_pos_emb=None, attention_mask=None,
                inference_context=None):
        qkv = [self._qkv(m, part) for m, part in enumerate(routing.split(x))]
        query, key, value = (routing.merge([t[i] for t in qkv]) for i in range(3))
        mask_type = AttnMaskType.causal
        q_start = 0
        if inference_context is not None:  # generation: megatron's static KV cache
            q_start = inference_context.sequence_len_offset
            if q_start > 0 and query.shape[0] != 1:
                raise ValueError(f"MoT KV cache: {query.shape[0]} positions in one step after the prefill "
                                 "(decode one position per step)")
            mask_type = AttnMaskType.causal if q_start == 0 else AttnMaskType.no_mask
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            if inference_context is not None:  # the embedding covers the context's whole length
                q_emb, k_emb = (e[q_start:q_start + query.shape[0]] for e in (q_emb, k_emb))
            query = apply_rotary_pos_emb(query, q_emb, config=self.config)
            key = apply_rotary_pos_emb(key, k_emb, config=self.config)
        if inference_context is not None:  # keys enter the cache rotated (once, not at every step)
            key, value = self._cached(inference_context, key, value)

        def attend(q, k, v):
            return self.core_attention(q, k, v, attention_mask, attn_mask_type=mask_type)

        if self.checkpoint_core_attention and self.training:  # selective recompute "core_attn"
            context = tensor_parallel.checkpoint(attend, False, query, key, value)
        else:
            context = attend(query, key, value)
        outs = [self.linear_proj[m](part) for m, part in enumerate(routing.split(context))]
        return routing.merge([o for o, _ in outs]), [b for _, b in outs]


class MoTLayer(MegatronModule):
    """A MoT decoder layer, called by megatron's ``TransformerBlock`` like a ``TransformerLayer``:
    ``forward(hidden_states [s(/tp), b, h], attention_mask, rotary_pos_emb=..., padding_mask=
    modality context [b, s(/tp), M], ...)`` -> ``(output [s(/tp), b, h], context)``.
    See the module docstring for the math and the state-dict layout."""

    def __init__(self, config: TransformerConfig, submodules: MoTLayerSubmodules, layer_number: int = 1,
                 hidden_dropout: float | None = None, pg_collection=None, vp_stage: int | None = None,
                 untie_norms: bool = True, qk_norm: bool = False):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage)
        self.hidden_dropout = config.hidden_dropout if hidden_dropout is None else hidden_dropout
        self.num_modalities = len(modality_names())
        self.tp_size = self.tp_group.size()
        self.sequence_parallel = config.sequence_parallel and self.tp_size > 1
        # the per-modality linears see the whole sequence and communicate nothing themselves
        local_config = copy.copy(config)
        local_config.sequence_parallel = False

        def norm():
            return build_module(submodules.norm, config=config, hidden_size=config.hidden_size,
                                eps=config.layernorm_epsilon)

        self.input_layernorm = PerModality(config, norm) if untie_norms else norm()
        self.self_attention = MoTAttention(config, local_config, submodules, self.layer_number, qk_norm,
                                           pg_collection)
        self.pre_mlp_layernorm = PerModality(config, norm) if untie_norms else norm()
        self.mlp = PerModality(config, lambda: build_module(
            submodules.mlp, config=local_config, ffn_hidden_size=config.ffn_hidden_size, tp_group=self.tp_group))
        for linear in [self.self_attention.linear_proj[m] for m in range(self.num_modalities)] + \
                [self.mlp[m].linear_fc2 for m in range(self.num_modalities)]:
            if linear.bias is not None:  # added after the reduce-scatter, on this rank's tokens
                setattr(linear.bias, "sequence_parallel", self.sequence_parallel)

    # ---- TP region ----------------------------------------------------------------------------
    def _enter_tp(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's normed tokens -> the full sequence every TP rank projects."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.tp_group)
        if self.tp_size > 1:
            return copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        return x

    def _exit_tp(self, partial: torch.Tensor) -> torch.Tensor:
        """Partial sums over the full sequence -> this rank's tokens, summed over TP."""
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        if self.tp_size > 1:
            return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        return partial

    def _routings(self, padding_mask: torch.Tensor | None) -> tuple[Routing, Routing]:
        """(routing of this rank's tokens, routing of the full sequence inside the TP region)."""
        if padding_mask is None:
            raise ValueError("MoT layer: expected the modality context (bool [b, s, modalities]) in "
                             "megatron's padding_mask channel; got None")
        ids = decode_modality_context(padding_mask).modality_ids.t().contiguous()  # [s(/tp), b]
        local = Routing(ids, self.num_modalities)
        if not self.sequence_parallel:
            return local, local
        full = gather_from_sequence_parallel_region(ids.to(torch.float32).unsqueeze(-1),
                                                    tensor_parallel_output_grad=False, group=self.tp_group)
        return local, Routing(full.squeeze(-1).round().long(), self.num_modalities)

    def _norm(self, norm, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return routing.apply(norm, x) if isinstance(norm, PerModality) else norm(x)

    def _residual(self, residual, out, biases, routing: Routing):
        if biases[0] is not None:
            out = out + torch.stack(biases)[routing.ids]
        return residual + torch.nn.functional.dropout(out, p=self.hidden_dropout, training=self.training)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, inference_context=None, packed_seq_params=None,
                padding_mask=None, **unused):
        if packed_seq_params is not None:
            raise NotImplementedError("MoT layer: packed sequences are not supported")
        local, full = self._routings(padding_mask)

        normed = self._enter_tp(self._norm(self.input_layernorm, hidden_states, local))
        attn, biases = self.self_attention(normed, full, rotary_pos_emb, attention_mask, inference_context)
        hidden_states = self._residual(hidden_states, self._exit_tp(attn), biases, local)

        normed = self._enter_tp(self._norm(self.pre_mlp_layernorm, hidden_states, local))
        outs = [self.mlp[m](part) for m, part in enumerate(full.split(normed))]
        mlp = self._exit_tp(full.merge([o for o, _ in outs]))
        output = self._residual(hidden_states, mlp, [b for _, b in outs], local)
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True), context


# ------------------------------------------------------------------------------------------------
# Specs
# ------------------------------------------------------------------------------------------------

def mot_layer_spec(backend, untie_norms: bool = True, qk_norm: bool = False) -> ModuleSpec:
    """MoT layer for a backend provider (``megatron_vlm.models.backends``): megatron-core's
    tensor-parallel linears per modality, the backend's norm and core attention."""
    column = ModuleSpec(module=ColumnParallelLinear, params={"disable_grad_reduce": True})
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=PartialRowParallelLinear))
    return ModuleSpec(
        module=MoTLayer, params={"untie_norms": untie_norms, "qk_norm": qk_norm},
        submodules=MoTLayerSubmodules(norm=backend.layer_norm(), linear_qkv=column,
                                      core_attention=backend.core_attention(),
                                      linear_proj=PartialRowParallelLinear, mlp=mlp))


def block_spec(ctx):
    """This stage's MoT layers (homogeneous) + the final norm."""
    mot = ctx.model.mot
    return specs.block_spec(ctx.config, mot_layer_spec(ctx.backend, mot.untie_norms, mot.qk_norm),
                            ctx.backend, ctx.vp_stage)
