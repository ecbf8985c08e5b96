"""Token layouts: how an arch's sequences hold images (the data layer builds them, the arch names one).

* ``INLINE`` (joint decoder, MoMa, MoT, MMCA): every image occupies ``num_image_tokens``
  consecutive ``image_token_id`` positions whose embeddings the model replaces with the image
  features; ``modality_ids`` are 0 there.
* ``MARKER`` (cross-attention, Mllama): one ``<image>`` token marks each image's place in a
  text-only sequence; the pixels travel as a side channel with ``text_image_mask`` (which text
  positions may attend which image); ``modality_ids`` are all 1.
"""

from __future__ import annotations

import enum


class TokenLayout(enum.Enum):
    INLINE = "inline"
    MARKER = "marker"

    def positions_per_image(self, model_config) -> int:
        """Sequence positions one image takes in this layout."""
        return model_config.num_image_tokens if self is TokenLayout.INLINE else 1
