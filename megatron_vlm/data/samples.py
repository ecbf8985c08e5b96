"""Token layout of one sample, and collation of samples + images into a :class:`VLMBatch`.

Text of a sample (its shard json record):

* question/answer sample (``question`` and ``answer`` fields): prompt = question, target =
  ``" " + answer`` (text = question + " " + answer). Loss only on the answer tokens and eos, so
  "argmax equals label at every loss_mask position" is exact-match answer accuracy.
* caption sample (``text`` field): no prompt, target = text; loss on every caption token and eos.

Literal ``<image>`` placeholders in the text (LLaVA-style data) are removed: the layout places the
image itself. The tokenizer treats any other special-token string in the text as plain text.

Sequence of length ``s = seq_length`` (right-padded with ``pad_id``):

* ``inline`` layout (:mod:`megatron_vlm.data.layout`; joint_decoder, moma, mot, mmca)::

      [bos] [image_token_id] * num_image_tokens  prompt  target  [eos]  [pad] ...

  ``modality_ids`` 0 on the ``num_image_tokens`` image positions, 1 elsewhere (padding included).
* ``marker`` layout (cross_attention, Mllama style)::

      [bos] [<image>]  prompt  target  [eos]  [pad] ...

  The pixels are a side channel; the one ``<image>`` token marks the image's place in the text.
  ``modality_ids`` are all 1: the ``<image>`` token is an ordinary embedded token of the text-only
  residual stream (no position carries image features). ``text_image_mask[b, t, 0]`` is True for
  ``t >= 1`` (the ``<image>`` token and every later position, padding included) and False for
  bos: Mllama's ``cross_attention_mask``, where tokens before the first image attend to no image.

Targets: ``labels[t] = tokens[t + 1]``, ``labels[s - 1] = pad_id``. ``loss_mask[t]`` is 1 exactly
when ``labels[t]`` is a trained token (target text or its eos): 0 where the label is bos, an image
token, prompt or padding. On caption samples the last image position (the ``<image>`` token for
cross_attention) thus has loss 1: it predicts the first caption token, as in LLaVA's shifted labels.

Truncation: a sample longer than ``s`` loses tokens from the end of its text (eos first, then the
target, then the prompt); the prefix (bos + image tokens) is never cut. A prefix that leaves no
room for text (``len(prefix) >= s``) raises ``ValueError`` when the builder is constructed.

Several vision encoders: ``num_image_tokens`` is the model's (the sum over the encoders for
``sequence_append``, the generalist's grid otherwise); ``images`` is a tuple of one tensor per
encoder; with the data router (``router_encoders = E``) each record's ``encoder_weights`` become
``router_weights`` ``[b, E]`` (:mod:`megatron_vlm.data.encoder_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_vlm.config import ModelConfig
from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY, VLMBatch
from megatron_vlm.data.layout import TokenLayout
from megatron_vlm.data.tokenizer import IMAGE_TOKEN, Tokenizer


@dataclass(frozen=True)
class TextParts:
    prompt: str   # conditioning text, not trained on
    target: str   # trained text (an eos follows it)


def text_parts(record: dict) -> TextParts:
    """Prompt and target of a shard json record (question/answer wins over text)."""
    def clean(value) -> str:
        return str(value).replace(IMAGE_TOKEN, "").strip()

    if "question" in record and "answer" in record:
        return TextParts(clean(record["question"]), " " + clean(record["answer"]))
    if "text" in record:
        return TextParts("", clean(record["text"]))
    raise KeyError(f"sample {record.get('key', '?')}: json has neither 'text' nor 'question'+'answer'")


@dataclass
class EncodedSample:
    tokens: list[int]    # unpadded, at most seq_length
    trained: list[bool]  # per token: counts as a loss target


class SequenceBuilder:
    """Builds the token layout above; ``collate`` makes the batch tensors."""

    def __init__(self, tokenizer: Tokenizer, layout: TokenLayout, seq_length: int, num_image_tokens: int,
                 image_token_id: int | None = None, router_encoders: int | None = None):
        if layout not in list(TokenLayout) + [t.value for t in TokenLayout]:
            raise ValueError(f"layout={layout!r}: no token layout of that name; allowed "
                             f"{[t.value for t in TokenLayout]}")
        self.tok, self.layout, self.seq_length = tokenizer, TokenLayout(layout), seq_length
        self.router_encoders = router_encoders  # E: records carry the data router's weights
        self.image_token_id = tokenizer.image_token_id if image_token_id is None else image_token_id
        self.num_image_positions = num_image_tokens if self.layout is TokenLayout.INLINE else 1
        self.prefix = [tokenizer.bos_id] + [self.image_token_id] * self.num_image_positions
        if len(self.prefix) >= seq_length:
            raise ValueError(f"seq_length={seq_length}: bos + {self.num_image_positions} image token(s) "
                             f"leave no room for text ({self.layout.value} layout); raise "
                             "model.language.seq_length or use fewer image tokens")

    @classmethod
    def from_model_config(cls, tokenizer: Tokenizer, model: ModelConfig) -> "SequenceBuilder":
        """The builder of ``model.arch``'s token layout (asked of the arch registry)."""
        from megatron_vlm.archs import get_arch
        from megatron_vlm.data.encoder_weights import router_encoders

        return cls(tokenizer, get_arch(model.arch).token_layout, model.language.seq_length,
                   model.num_image_tokens, model.image_token_id, router_encoders(model))

    def encode(self, record: dict) -> EncodedSample:
        """Unpadded tokens of one record, truncated to ``seq_length``."""
        parts = text_parts(record)
        prompt = self.tok.encode(parts.prompt) if parts.prompt else []
        target = self.tok.encode(parts.target) + [self.tok.eos_id]
        tokens = (self.prefix + prompt + target)[:self.seq_length]
        trained = ([False] * (len(self.prefix) + len(prompt)) + [True] * len(target))[:self.seq_length]
        return EncodedSample(tokens, trained)

    def prompt_tokens(self, prompt: str, num_images: int = 1) -> list[int]:
        """What generation conditions on: the layout's prefix for ``num_images`` images (bos, then
        each image's positions) and the prompt text, cleaned and encoded as :meth:`encode` does
        (no truncation); the model continues with the target."""
        text = text_parts({"question": prompt, "answer": ""}).prompt
        return ([self.tok.bos_id] + [self.image_token_id] * self.num_image_positions * num_images
                + (self.tok.encode(text) if text else []))

    def collate(self, records: list[dict], images: torch.Tensor | tuple[torch.Tensor, ...],
                grid: torch.Tensor | None = None) -> VLMBatch:
        """``records``: b json records; ``images``: [b, C, H, W] float32 (several encoders: a tuple of
        one per encoder) -> VLMBatch (one image each: images [b, 1, C, H, W], or the tuple of them).
        Tiled (Mllama): ``images`` [b, T, C, H, W] and ``grid`` [b, 2] (tiles down, across) -> images
        [b, 1, T, C, H, W] with ``aspect_ratio_ids`` [b, 1] and ``aspect_ratio_mask`` [b, 1, T]."""
        b, s = len(records), self.seq_length
        several = isinstance(images, tuple)
        parts = images if several else (images,)
        first = parts[0]
        if any(t.shape[0] != b for t in parts):
            raise ValueError(f"{[t.shape[0] for t in parts]} images for {b} records")
        tokens = np.full((b, s), self.tok.pad_id, dtype=np.int64)
        trained = np.zeros((b, s), dtype=bool)
        padding = np.ones((b, s), dtype=bool)
        for i, record in enumerate(records):
            sample = self.encode(record)
            tokens[i, :len(sample.tokens)] = sample.tokens
            trained[i, :len(sample.trained)] = sample.trained
            padding[i, :len(sample.tokens)] = False
        tokens_t = torch.from_numpy(tokens)
        labels = torch.full_like(tokens_t, self.tok.pad_id)
        labels[:, :-1] = tokens_t[:, 1:]
        loss_mask = torch.zeros(b, s, dtype=torch.float32)
        loss_mask[:, :-1] = torch.from_numpy(trained[:, 1:]).float()
        modality = torch.full((b, s), TEXT_MODALITY, dtype=torch.int64)
        text_image_mask = None
        if self.layout is TokenLayout.INLINE:
            modality[:, 1:1 + self.num_image_positions] = IMAGE_MODALITY
        else:
            text_image_mask = torch.zeros(b, s, 1, dtype=torch.bool)
            text_image_mask[:, 1:] = True
        ratio_ids = ratio_mask = None
        if grid is not None:
            from megatron_vlm.data.tiling import aspect_ratio_ids, tile_mask

            grid = grid.to("cpu")
            ratio_ids = aspect_ratio_ids(grid, first.shape[1])[:, None].to(first.device)
            ratio_mask = tile_mask(grid, first.shape[1])[:, None].to(first.device)
        router_weights = None
        if self.router_encoders:
            from megatron_vlm.data.encoder_weights import weights_tensor

            router_weights = weights_tensor(records, self.router_encoders).to(first.device)
        return VLMBatch(tokens=tokens_t, labels=labels, loss_mask=loss_mask,
                        position_ids=torch.arange(s, dtype=torch.int64).expand(b, s).clone(),
                        modality_ids=modality,
                        images=tuple(t.unsqueeze(1) for t in images) if several else images.unsqueeze(1),
                        image_mask=torch.ones(b, 1, dtype=torch.bool, device=first.device),
                        text_image_mask=text_image_mask, padding_mask=torch.from_numpy(padding),
                        aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask, router_weights=router_weights)
