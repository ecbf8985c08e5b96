"""Deterministic random batches (``--data-path mock``, like Megatron-LM's ``--mock-data``): no files,
the arch's token layout, loss on the text positions."""

from __future__ import annotations

import torch

from megatron_vlm.config import ModelConfig
from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY, VLMBatch
from megatron_vlm.data.encoder_weights import router_encoders
from megatron_vlm.data.layout import TokenLayout


def random_batch(cfg: ModelConfig, batch_size: int, seed: int, image_token_id: int | None = None,
                 images_per_sample: int = 1, layout: TokenLayout = TokenLayout.INLINE) -> VLMBatch:
    """``[bos] + image positions + random text`` (``layout`` decides the image positions: the
    image tokens, or one marker per image with ``text_image_mask`` True after it). Several vision
    encoders: ``images`` is a tuple of one random tensor per encoder (its image_size); with the
    data router, ``router_weights`` ``[b, E]`` are random in [0, 1) (not all 0)."""
    g = torch.Generator().manual_seed(seed)
    lang, v = cfg.language, cfg.vision[0]
    s = lang.seq_length
    n_pos = TokenLayout(layout).positions_per_image(cfg) * images_per_sample
    image_token_id = lang.vocab_size - 1 if image_token_id is None else image_token_id
    high = min(lang.vocab_size - 1, lang.unpadded_vocab_size or lang.vocab_size)  # no padded vocab ids
    tokens = torch.randint(0, high, (batch_size, s), generator=g)
    tokens[tokens == image_token_id] = 0
    tokens[:, 1:1 + n_pos] = image_token_id
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(batch_size, s)
    loss_mask[:, :n_pos] = 0  # targets that are image tokens
    loss_mask[:, -1] = 0
    modality = torch.full((batch_size, s), TEXT_MODALITY)
    text_image_mask = None
    if layout is TokenLayout.INLINE:
        modality[:, 1:1 + n_pos] = IMAGE_MODALITY
    else:  # token t may attend image i from its marker (position 1 + i) on
        text_image_mask = torch.arange(s)[None, :, None] >= 1 + torch.arange(images_per_sample)[None, None, :]
        text_image_mask = text_image_mask.expand(batch_size, s, images_per_sample).clone()
    ratio_ids = ratio_mask = None
    if v.max_tiles > 1:  # Mllama tiling: a random grid per image, unused tiles 0
        from megatron_vlm.data.tiling import aspect_ratio_ids, supported_grids, tile_mask

        grids = torch.tensor(supported_grids(v.max_tiles))
        grid = grids[torch.randint(0, len(grids), (batch_size, images_per_sample), generator=g)]
        ratio_ids, ratio_mask = aspect_ratio_ids(grid, v.max_tiles), tile_mask(grid, v.max_tiles)
        images = torch.randn(batch_size, images_per_sample, v.max_tiles, 3, v.image_size, v.image_size,
                             generator=g) * ratio_mask[..., None, None, None]
    else:
        images = tuple(torch.randn(batch_size, images_per_sample, 3, e.image_size, e.image_size, generator=g)
                       for e in cfg.vision)
        images = images if cfg.multi_encoder else images[0]
    router_weights = None
    if router_encoders(cfg):
        router_weights = torch.rand(batch_size, len(cfg.vision), generator=g)
        router_weights[router_weights.sum(1) == 0] = 1.0
    return VLMBatch(tokens=tokens, labels=labels, loss_mask=loss_mask,
                    position_ids=torch.arange(s).expand(batch_size, s).clone(),
                    modality_ids=modality, images=images,
                    image_mask=torch.ones(batch_size, images_per_sample, dtype=torch.bool),
                    text_image_mask=text_image_mask, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask,
                    router_weights=router_weights)
