"""The batch contract between the data layer and the models.

Shapes (b = micro batch, s = sequence length, n = images per sample, C/H/W = image):

* ``tokens``        [b, s]  int64   token ids; in the ``inline`` token layout each image occupies
                                    ``num_image_tokens`` consecutive ``image_token_id`` positions.
* ``labels``        [b, s]  int64   next-token targets (``tokens`` shifted left); ``-100``-free: use
                                    ``loss_mask`` to ignore positions.
* ``loss_mask``     [b, s]  float32 1 where the label counts (text targets), 0 on image tokens,
                                    padding and prompt tokens that are not trained on.
* ``position_ids``  [b, s]  int64
* ``modality_ids``  [b, s]  int64   0 = image token, 1 = text token (padding counts as text).
* ``images``        [b, n, C, H, W] float32, normalised with the vision encoder's mean/std;
                    several encoders (``model.vision`` a list of E): a tuple of E such tensors in
                    ``model.vision`` order, each at its encoder's image_size / mean / std (one
                    decode per image in the DALI pipeline, resized per encoder);
                    tiled (Mllama, ``model.vision.max_tiles = T > 1``): [b, n, T, C, H, W], the
                    tiles of each image in row-major order, unused tiles 0.
* ``aspect_ratio_ids``  [b, n] int64 (tiled only) Mllama's: 1 + the image's tile grid among the
                    supported grids, 0 = no image (``megatron_vlm.data.tiling``).
* ``aspect_ratio_mask`` [b, n, T] bool (tiled only) True on the image's real tiles; with
                    ``text_image_mask`` it gives Mllama's ``cross_attention_mask`` [b, s, n, T].
* ``image_mask``    [b, n]  bool    True where an image is present (False = padded image slot).
* ``text_image_mask`` [b, s, n] bool (``marker`` layout) True where text token t may attend
                                    image i (Mllama's ``cross_attention_mask`` before tiling).
* ``padding_mask``  [b, s]  bool    True at right-padding positions (None = no padding).
* ``router_weights`` [b, E] float32 (``model.fusion.router: data`` only) the sample's weights over
                    the E encoders from the dataset manifest (finite, >= 0; normalised once, in
                    the model); None otherwise.

:class:`ModelInputs` is everything a model's ``forward`` takes, in one object (the schedule's
``forward_step``, eval, generation and ``verify`` all call ``model(inputs)``); :class:`VLMBatch` is
that plus ``loss_mask``.

The **modality context** every decoder layer and the MLP/MoE slot receive is one bool tensor
``[b, s, M]`` (``M`` = number of modalities, one-hot of ``modality_ids``; all False at padding),
handed to megatron-core's ``GPTModel``/``TransformerBlock``/``TransformerLayer`` as their per-forward
``padding_mask`` argument (megatron passes it to every layer, through recompute, and to the MLP /
``MoELayer``, which transposes it to ``[s, b, M]``). With sequence parallelism it is split along s
like the hidden states: each rank gets ``[b, s/tp, M]``. :func:`decode_modality_context` turns it
back into ids / padding / per-modality masks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IMAGE_MODALITY = 0
TEXT_MODALITY = 1
NUM_MODALITIES = 2


def _map_tensors(obj, fn):
    """A copy of the dataclass ``obj`` with ``fn`` applied to each tensor field (and to each
    tensor of a tuple field: ``images`` of several encoders)."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if torch.is_tensor(value):
            out[f.name] = fn(value)
        elif isinstance(value, tuple) and value and all(torch.is_tensor(v) for v in value):
            out[f.name] = tuple(fn(v) for v in value)
    return replace(obj, **out)


@dataclass
class ModelInputs:
    """All inputs of ``VLMModel.forward`` (shapes: see the module docstring).

    ``labels`` given -> the model returns the per-token loss ``[b, s]`` (last stage); None -> logits.
    ``modality_ids`` None -> derived from the arch's token layout. ``cross_attention_states``:
    precomputed projected image features ``[b, n, k, h]`` instead of ``images`` (marker layout;
    HF's argument of the same name).
    """
    tokens: torch.Tensor
    position_ids: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    images: torch.Tensor | tuple[torch.Tensor, ...] | None = None
    image_mask: torch.Tensor | None = None
    text_image_mask: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    cross_attention_states: torch.Tensor | None = None
    aspect_ratio_ids: torch.Tensor | None = None
    aspect_ratio_mask: torch.Tensor | None = None
    router_weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.position_ids is None:
            b, s = self.tokens.shape
            self.position_ids = torch.arange(s, device=self.tokens.device).expand(b, s).clone()

    def to(self, device) -> "ModelInputs":
        return _map_tensors(self, lambda t: t.to(device))

    def append_tokens(self, new_tokens: torch.Tensor) -> "ModelInputs":
        """The inputs one decoding step later: ``new_tokens`` ``[b, t]`` (text) appended; positions
        continue, new rows of ``text_image_mask`` repeat the last row (as HF's generate does)."""
        b, t = new_tokens.shape
        last = self.position_ids[:, -1:]
        cat = lambda a, x: None if a is None else torch.cat([a, x], dim=1)  # noqa: E731
        tim = self.text_image_mask
        return replace(
            self, tokens=torch.cat([self.tokens, new_tokens.to(self.tokens)], dim=1),
            position_ids=torch.cat([self.position_ids, last + torch.arange(1, t + 1, device=last.device)], dim=1),
            modality_ids=cat(self.modality_ids, torch.full((b, t), TEXT_MODALITY, dtype=torch.long,
                                                           device=self.tokens.device)),
            text_image_mask=None if tim is None else torch.cat([tim, tim[:, -1:].expand(b, t, tim.shape[2])], dim=1),
            padding_mask=cat(self.padding_mask, torch.zeros(b, t, dtype=torch.bool, device=self.tokens.device)),
            labels=None)


@dataclass
class VLMBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    modality_ids: torch.Tensor
    images: torch.Tensor | tuple[torch.Tensor, ...] | None
    image_mask: torch.Tensor | None
    text_image_mask: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    aspect_ratio_ids: torch.Tensor | None = None
    aspect_ratio_mask: torch.Tensor | None = None
    router_weights: torch.Tensor | None = None

    def to(self, device) -> "VLMBatch":
        return _map_tensors(self, lambda t: t.to(device))

    def model_inputs(self, with_labels: bool = True) -> ModelInputs:
        """What the model gets (everything but ``loss_mask``); labels only if ``with_labels``."""
        return ModelInputs(tokens=self.tokens, position_ids=self.position_ids, modality_ids=self.modality_ids,
                           images=self.images, image_mask=self.image_mask, text_image_mask=self.text_image_mask,
                           padding_mask=self.padding_mask, labels=self.labels if with_labels else None,
                           aspect_ratio_ids=self.aspect_ratio_ids, aspect_ratio_mask=self.aspect_ratio_mask,
                           router_weights=self.router_weights)

    def micro_batches(self, micro_batch_size: int) -> list["VLMBatch"]:
        """Split along the batch axis into micro batches of ``micro_batch_size``."""
        b = self.tokens.shape[0]
        if b % micro_batch_size:
            raise ValueError(f"batch of {b} samples is not divisible by micro_batch_size={micro_batch_size}")
        return [_map_tensors(self, lambda t, s=start: t[s:s + micro_batch_size])
                for start in range(0, b, micro_batch_size)]


# ------------------------------------------------------------------------------------------------
# Modality context
# ------------------------------------------------------------------------------------------------

def modality_context(modality_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                     num_modalities: int = NUM_MODALITIES) -> torch.Tensor:
    """``[b, s]`` ids (+ ``[b, s]`` padding) -> bool one-hot ``[b, s, M]``, all False at padding."""
    ctx = modality_ids.unsqueeze(-1) == torch.arange(num_modalities, device=modality_ids.device)
    if padding_mask is not None:
        ctx = ctx & ~padding_mask.to(torch.bool).unsqueeze(-1)
    return ctx


@dataclass(frozen=True)
class ModalityView:
    """A decoded modality context, in the layout it arrived in (``[b, s]`` or ``[s, b]``)."""
    modality_ids: torch.Tensor   # int64, TEXT_MODALITY at padding
    padding: torch.Tensor        # bool, True = padding
    masks: torch.Tensor          # bool [..., M], masks[..., m] = token of modality m (never padding)

    @property
    def image(self) -> torch.Tensor:
        return self.masks[..., IMAGE_MODALITY]

    @property
    def text(self) -> torch.Tensor:
        return self.masks[..., TEXT_MODALITY]


def decode_modality_context(context: torch.Tensor) -> ModalityView:
    """Inverse of :func:`modality_context` for what a layer receives as ``padding_mask``
    (``[b, s, M]`` in a decoder layer, ``[s, b, M]`` inside megatron's ``MoELayer``)."""
    if context.dim() != 3 or context.dtype != torch.bool:
        raise ValueError(f"modality context: expected a bool [.., .., modalities] tensor, got "
                         f"{context.dtype} {tuple(context.shape)}")
    padding = ~context.any(dim=-1)
    ids = torch.where(padding, torch.full_like(padding, TEXT_MODALITY, dtype=torch.long),
                      context.to(torch.long).argmax(dim=-1))
    return ModalityView(ids, padding, context)
