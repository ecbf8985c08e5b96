"""Core attention for the ``local`` backend on ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron's ``DotProductAttention`` (same constructor and forward contract) that lets
PyTorch pick a fused kernel (flash / memory-efficient on GPU, a fused CPU kernel here) instead of
materialising the ``[b, heads, sq, sk]`` score matrix. GQA is native (no repeat of K/V).

    query  [sq, b, heads/tp, d]      key, value [sk, b, groups/tp, d]
    attention_mask  bool, True = masked out, broadcastable to [b, heads, sq, sk] (or None)
    returns [sq, b, heads/tp * d]
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, **unused):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention (local backend) does not support context parallelism; use backend 'te'")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **unused):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences / attention bias need backend 'te'")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None if attention_mask is None or mask_type == AttnMaskType.no_mask else ~attention_mask
        dropout = self.dropout if self.training else 0.0
        # distinct dropout streams per TP rank (no dropout, e.g. generation: nothing drawn, no fork)
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])
        sq, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
