"""The batch contract between the data layer and the models.

Shapes (b = micro batch, s = sequence length, n = images per sample, C/H/W = image):

* ``tokens``        [b, s]  int64   token ids; for ``joint_decoder``-style archs each image occupies
                                    ``num_image_tokens`` consecutive ``image_token_id`` positions.
* ``labels``        [b, s]  int64   next-token targets (``tokens`` shifted left); ``-100``-free: use
                                    ``loss_mask`` to ignore positions.
* ``loss_mask``     [b, s]  float32 1 where the label counts (text targets), 0 on image tokens,
                                    padding and prompt tokens that are not trained on.
* ``position_ids``  [b, s]  int64
* ``modality_ids``  [b, s]  int64   0 = image token, 1 = text token (padding counts as text).
* ``images``        [b, n, C, H, W] float32, normalised with the vision encoder's mean/std.
* ``image_mask``    [b, n]  bool    True where an image is present (False = padded image slot).
* ``text_image_mask`` [b, s, n] bool (cross-attention archs) True where text token t may attend
                                    image i (Mllama's ``cross_attention_mask`` before tiling).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IMAGE_MODALITY = 0
TEXT_MODALITY = 1


@dataclass
class VLMBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    modality_ids: torch.Tensor
    images: torch.Tensor
    image_mask: torch.Tensor
    text_image_mask: torch.Tensor | None = None

    def to(self, device) -> "VLMBatch":
        return VLMBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                           for f in fields(self)})

    def micro_batches(self, micro_batch_size: int) -> list["VLMBatch"]:
        """Split along the batch axis into micro batches of ``micro_batch_size``."""
        b = self.tokens.shape[0]
        if b % micro_batch_size:
            raise ValueError(f"batch of {b} samples is not divisible by micro_batch_size={micro_batch_size}")
        out = []
        for start in range(0, b, micro_batch_size):
            sl = slice(start, start + micro_batch_size)
            out.append(VLMBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[sl])
                                   for f in fields(self)}))
        return out
