"""Deterministic random ``VLMBatch``es for tests (no data files needed)."""

from __future__ import annotations

import torch

from megatron_vlm.config import ModelConfig
from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY, VLMBatch


def random_batch(cfg: ModelConfig, batch_size: int, seed: int, image_token_id: int | None = None,
                 images_per_sample: int = 1) -> VLMBatch:
    """Joint-decoder layout: [bos] + image tokens + random text; loss on text positions only."""
    g = torch.Generator().manual_seed(seed)
    lang, v = cfg.language, cfg.vision
    s, k = lang.seq_length, cfg.num_image_tokens
    image_token_id = lang.vocab_size - 1 if image_token_id is None else image_token_id
    tokens = torch.randint(0, lang.vocab_size - 1, (batch_size, s), generator=g)
    tokens[tokens == image_token_id] = 0
    n_img = k * images_per_sample
    tokens[:, 1:1 + n_img] = image_token_id
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(batch_size, s)
    loss_mask[:, :n_img] = 0  # targets that are image tokens
    loss_mask[:, -1] = 0
    modality = torch.full((batch_size, s), TEXT_MODALITY)
    modality[:, 1:1 + n_img] = IMAGE_MODALITY
    images = torch.randn(batch_size, images_per_sample, 3, v.image_size, v.image_size, generator=g)
    return VLMBatch(tokens=tokens, labels=labels, loss_mask=loss_mask,
                    position_ids=torch.arange(s).expand(batch_size, s).clone(),
                    modality_ids=modality, images=images,
                    image_mask=torch.ones(batch_size, images_per_sample, dtype=torch.bool))


def random_micro_batches(cfg: ModelConfig, num: int, micro_batch_size: int, seed: int = 0,
                         **kw) -> list[VLMBatch]:
    return [random_batch(cfg, micro_batch_size, seed + i, **kw) for i in range(num)]
