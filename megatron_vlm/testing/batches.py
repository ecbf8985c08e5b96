"""Deterministic random ``VLMBatch``es for tests (no data files needed): :mod:`megatron_vlm.data.mock`."""

from __future__ import annotations

from megatron_vlm.config import ModelConfig
from megatron_vlm.data.batch import VLMBatch
from megatron_vlm.data.mock import random_batch


def random_micro_batches(cfg: ModelConfig, num: int, micro_batch_size: int, seed: int = 0,
                         **kw) -> list[VLMBatch]:
    return [random_batch(cfg, micro_batch_size, seed + i, **kw) for i in range(num)]


__all__ = ["random_batch", "random_micro_batches"]


def pad_right(micro_batches: list[VLMBatch]) -> list[VLMBatch]:
    """Right padding (3, 4, ... positions) in one sample of each micro batch, excluded from the loss."""
    for i, mb in enumerate(micro_batches):
        mb.padding_mask = mb.tokens.new_zeros(mb.tokens.shape, dtype=bool)
        mb.padding_mask[i % 2, -(3 + i):] = True
        mb.loss_mask[mb.padding_mask] = 0
    return micro_batches
