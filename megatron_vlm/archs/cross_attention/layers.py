"""Gated GQA cross-attention layers (Mllama's ``MllamaCrossAttentionDecoderLayer``) on megatron-core.

A CA layer (``GatedCrossAttentionLayer``)::

    h   = x + tanh(attn_gate) * row * CrossAttn(input_layernorm(x), image)      # row: see below
    out = h + tanh(mlp_gate)  * row * MLP(pre_mlp_layernorm(h))

``CrossAttn``: Q from text (linear_q, per-head RMSNorm ``q_layernorm``), K/V from the image features
(fused ``linear_kv``, per-head RMSNorm ``k_layernorm`` on K), GQA with ``num_query_groups``, no RoPE,
no causal mask on the image axis, a padding mask from ``text_image_mask`` [b, s, n] and
``image_mask`` [b, n] (each image is k feature tokens). ``row`` is 1 for a text token that may
attend at least one image and 0 otherwise (Mllama's ``full_text_row_masked_out_mask``). Gates start
at 0, so at step 0 the layer is the identity (bit for bit). With no image features at all CA layers
are skipped, as HF does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vlm.archs.cross_attention.config import layer_indices
from megatron_vlm.models import specs
from megatron_vlm.models.backends import provider

# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over the head dim of ``[..., heads, d]`` (Mllama's q_norm/k_norm; fp32 inside).

    The weight is shared by all heads while heads are split over TP ranks: its gradient is summed
    over the TP group by autograd (``copy_to_tensor_model_parallel_region``), so it needs no
    ``sequence_parallel`` flag and no help from ``finalize_model_grads``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_tensor_model_parallel_world_size() > 1 and torch.is_grad_enabled():
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)


@dataclass
class GQACrossAttentionSubmodules:
    linear_q: Union[ModuleSpec, type] = None
    linear_kv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = HeadRMSNorm
    k_layernorm: Union[ModuleSpec, type] = HeadRMSNorm


@dataclass
class CrossAttentionCache:
    """Image K/V per CA layer (``layer_number -> (k, v)``, each ``[n*k(/tp groups), b, ng/tp, d]``)
    and the last text row's image permission ``[b, n]`` (decoding steps reuse it, as HF generate
    repeats the last ``cross_attention_mask`` row)."""
    kv: dict = field(default_factory=dict)
    last_row: torch.Tensor | None = None
    tokens_per_image: int | None = None
    tile_mask: torch.Tensor | None = None  # [b, n, T] of tiled images (None: single tile)


def _cache_of(inference_context) -> CrossAttentionCache | None:
    if inference_context is None:
        return None
    cache = getattr(inference_context, "cross_attention_cache", None)
    if cache is None:
        cache = CrossAttentionCache()
        inference_context.cross_attention_cache = cache
    return cache


class GQACrossAttention(MegatronModule):
    """Text queries ``[s(/tp), b, h]`` attend image keys/values ``[n*k(/tp), b, h]`` (``/tp``: sequence
    parallel). Tensor-parallel over heads: linear_q and linear_kv are column-parallel (heads resp.
    query groups split), linear_proj row-parallel. ``attention_mask`` bool ``[b, 1, s, n*k]``, True =
    do not attend. Returns ``(output [s(/tp), b, h], bias or None)``."""

    def __init__(self, config: TransformerConfig, submodules: GQACrossAttentionSubmodules,
                 layer_number: int, pg_collection=None, **unused):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection, self.tp_group = pg_collection, pg_collection.tp
        self.layer_number = layer_number
        tp = self.tp_group.size()
        heads, groups = config.num_attention_heads, config.num_query_groups
        if heads % tp or groups % tp:
            raise ValueError(f"cross-attention: heads={heads} and query groups={groups} must be divisible "
                             f"by tensor_model_parallel_size={tp}")
        self.head_dim = config.kv_channels
        self.heads_per_rank, self.groups_per_rank = heads // tp, groups // tp
        linear_kw = dict(config=config, init_method=config.init_method, gather_output=False,
                         bias=config.add_bias_linear, skip_bias_add=False, is_expert=False,
                         tp_group=self.tp_group)
        self.linear_q = build_module(submodules.linear_q, config.hidden_size, heads * self.head_dim,
                                     tp_comm_buffer_name="q", **linear_kw)
        self.linear_kv = build_module(submodules.linear_kv, config.hidden_size, 2 * groups * self.head_dim,
                                      tp_comm_buffer_name="kv", **linear_kw)
        self.q_layernorm = build_module(submodules.q_layernorm, config=config, hidden_size=self.head_dim,
                                        eps=config.layernorm_epsilon)
        self.k_layernorm = build_module(submodules.k_layernorm, config=config, hidden_size=self.head_dim,
                                        eps=config.layernorm_epsilon)
        self.core_attention = build_module(submodules.core_attention, config=config,
                                           layer_number=layer_number, attn_mask_type=AttnMaskType.arbitrary,
                                           attention_type="cross", pg_collection=pg_collection)
        self.linear_proj = build_module(submodules.linear_proj, heads * self.head_dim, config.hidden_size,
                                        config=config, init_method=config.output_layer_init_method,
                                        bias=config.add_bias_linear, input_is_parallel=True,
                                        skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
                                        tp_group=self.tp_group)

    def image_key_values(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n*k(/tp), b, h]`` -> K (normed), V, each ``[n*k, b, ng/tp, d]``."""
        kv, _ = self.linear_kv(image_states)
        kv = kv.view(*kv.shape[:2], self.groups_per_rank, 2 * self.head_dim)
        key, value = kv[..., :self.head_dim], kv[..., self.head_dim:]
        return self.k_layernorm(key).contiguous(), value.contiguous()

    def forward(self, hidden_states, key_value_states=None, attention_mask=None,
                cache: CrossAttentionCache | None = None):
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:2], self.heads_per_rank, self.head_dim)
        query = self.q_layernorm(query).contiguous()
        if key_value_states is not None:
            key, value = self.image_key_values(key_value_states)
            if cache is not None:
                cache.kv[self.layer_number] = (key.detach(), value.detach())
        elif cache is not None and self.layer_number in cache.kv:
            key, value = cache.kv[self.layer_number]
        else:
            raise ValueError(f"cross-attention layer {self.layer_number}: no image features and no cached K/V")
        context = self.core_attention(query, key, value, attention_mask,
                                      attn_mask_type=AttnMaskType.arbitrary)
        return self.linear_proj(context)


class GatedCrossAttentionLayer(TransformerLayer):
    """Mllama's cross-attention decoder layer as a megatron TransformerLayer (tanh gates at 0).

    Called by ``TransformerBlock`` like any layer: ``context`` = image features ``[n*k(/tp), b, h]``
    or None, ``context_mask`` = bool ``[b, 1, s, n*k]`` (True = do not attend; a row that is all
    True is a text token without image). Returns ``(hidden_states, context)``.
    """

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules,
                 layer_number: int = 1, hidden_dropout: float | None = None, pg_collection=None,
                 vp_stage: int | None = None):
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        self.cross_attn_attn_gate = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        self.cross_attn_mlp_gate = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        for gate in (self.cross_attn_attn_gate, self.cross_attn_mlp_gate):
            # with SP each rank sees s/tp rows: finalize_model_grads sums the gate grads over TP
            setattr(gate, "sequence_parallel", config.sequence_parallel)
        self.text_rows_without_image = "zero"

    def _row_mask(self, context_mask, hidden_states):
        """(core-attention mask with image-less rows opened, row mask ``[s(/tp), b, 1]``)."""
        if context_mask is None:
            return None, None
        has_image = ~context_mask.all(dim=-1, keepdim=True)  # [b, 1, s, 1]
        attn_mask = context_mask & has_image  # rows without any image: attend all (no NaN), then zeroed
        row = has_image[:, 0, :, 0].t().unsqueeze(-1).to(hidden_states.dtype)  # [s, b, 1]
        if self.config.sequence_parallel:
            s_local = hidden_states.shape[0]
            rank = parallel_state.get_tensor_model_parallel_rank()
            row = row[rank * s_local:(rank + 1) * s_local]
        return attn_mask, row

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                inference_context=None, **unused):
        cache = _cache_of(inference_context)
        if context is None and (cache is None or self.layer_number not in cache.kv):
            return hidden_states, context  # no image features at all: skipped, as HF does
        attn_mask, row = self._row_mask(context_mask, hidden_states)
        attn, bias = self.cross_attention(self.input_layernorm(hidden_states), key_value_states=context,
                                          attention_mask=attn_mask, cache=cache)
        if bias is not None:
            attn = attn + bias
        if row is not None and self.text_rows_without_image == "zero":
            attn = attn * row
        attn = torch.nn.functional.dropout(attn, p=self.hidden_dropout, training=self.training)
        hidden_states = hidden_states + self.cross_attn_attn_gate.tanh() * attn

        mlp, bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if bias is not None:
            mlp = mlp + bias
        if row is not None:
            mlp = mlp * row
        mlp = torch.nn.functional.dropout(mlp, p=self.hidden_dropout, training=self.training)
        return hidden_states + self.cross_attn_mlp_gate.tanh() * mlp, context


# ------------------------------------------------------------------------------------------------
# Specs
# ------------------------------------------------------------------------------------------------

def cross_attention_layer_spec(backend) -> ModuleSpec:
    """Gated cross-attention layer for a backend provider (``megatron_vlm.models.backends``);
    where the backend fuses norms, both are fused into linear_q / linear_fc1."""
    if isinstance(backend, str):
        backend = provider(backend)
    attn = GQACrossAttentionSubmodules(
        linear_q=specs.first_linear(backend), linear_kv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(), linear_proj=backend.row_parallel_linear())
    return ModuleSpec(module=GatedCrossAttentionLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=specs.pre_norm(backend),
        cross_attention=ModuleSpec(module=GQACrossAttention, submodules=attn),
        pre_mlp_layernorm=specs.pre_norm(backend),
        mlp=specs.mlp_spec(backend),
        sharded_state_dict_keys_map=backend.sharded_state_dict_keys_map("cross_attention.linear_q"),
    ))


def block_spec(ctx) -> TransformerBlockSubmodules:
    """This (virtual) pipeline stage's slice of the heterogeneous layer list + final norm."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    n = get_num_layers_to_build(ctx.config, ctx.vp_stage)
    offset = get_transformer_layer_offset(ctx.config, ctx.vp_stage)
    ca = set(layer_indices(ctx.model))
    self_spec, ca_spec = specs.language_layer_spec(ctx.backend), cross_attention_layer_spec(ctx.backend)
    return TransformerBlockSubmodules(
        layer_specs=[ca_spec if offset + i in ca else self_spec for i in range(n)],
        layer_norm=ctx.backend.layer_norm())


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------

def image_permission(b: int, s: int, n: int, text_image_mask: torch.Tensor | None,
                     image_mask: torch.Tensor | None, device) -> torch.Tensor:
    """bool ``[b, s, n]``: text token t may attend image i (text_image_mask AND image present;
    missing masks mean 'yes')."""
    allowed = torch.ones(b, s, n, dtype=torch.bool, device=device)
    if text_image_mask is not None:
        if tuple(text_image_mask.shape) != (b, s, n):
            raise ValueError(f"text_image_mask shape {tuple(text_image_mask.shape)}: expected "
                             f"[batch, seq, images] = {(b, s, n)}")
        allowed = allowed & text_image_mask.to(device=device, dtype=torch.bool)
    if image_mask is not None:
        if tuple(image_mask.shape) != (b, n):
            raise ValueError(f"image_mask shape {tuple(image_mask.shape)}: expected [batch, images] = {(b, n)}")
        allowed = allowed & image_mask.to(device=device, dtype=torch.bool)[:, None, :]
    return allowed


def context_mask_from_permission(allowed: torch.Tensor, tokens_per_image: int,
                                 tile_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[b, s, n]`` permission -> megatron mask ``[b, 1, s, n*k]`` (True = do not attend). Tiled
    images (``tile_mask`` bool ``[b, n, T]``, k = T x tokens per tile, tile-major): a token attends
    only the real tiles of an image it may attend (Mllama's ``cross_attention_mask [b, s, n, T]``)."""
    if tile_mask is not None:
        b, s, n = allowed.shape
        t = tile_mask.shape[-1]
        if tuple(tile_mask.shape) != (b, n, t) or tokens_per_image % t:
            raise ValueError(f"aspect_ratio_mask shape {tuple(tile_mask.shape)}: expected [batch, images, tiles] "
                             f"= {(b, n, t)} with tiles dividing the {tokens_per_image} tokens per image")
        allowed = (allowed[..., None] & tile_mask.to(device=allowed.device, dtype=torch.bool)[:, None])
        allowed, tokens_per_image = allowed.reshape(b, s, n * t), tokens_per_image // t
    return ~allowed.repeat_interleave(tokens_per_image, dim=2)[:, None]
