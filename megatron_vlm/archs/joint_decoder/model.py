"""``joint_decoder`` (LLaVA style): image features replace the image-token embeddings in the text
sequence; the decoder is a plain GPT stack.

The data layer reserves ``num_image_tokens`` positions holding ``image_token_id`` per present image
(``inline`` token layout), so the sequence length is fixed and pipeline stages exchange plain
``[s, b, h]`` tensors.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_vlm.models import specs
from megatron_vlm.models.vlm import VLMModel


def block_spec(ctx):
    """This stage's plain causal GPT layers."""
    return specs.block_spec(ctx.config, specs.language_layer_spec(ctx.backend), ctx.backend, ctx.vp_stage)


def splice_image_embeddings(text_embeddings: torch.Tensor, tokens: torch.Tensor,
                            image_embeddings: torch.Tensor, image_mask: torch.Tensor | None,
                            image_token_id: int, sequence_parallel: bool) -> torch.Tensor:
    """Put image features at the image-token positions.

    text_embeddings ``[s(/tp), b, h]`` (scattered when sequence parallel), tokens ``[b, s]``,
    image_embeddings ``[b, n, k, h]``, image_mask ``[b, n]`` (True = present). Present images fill
    the image-token positions of their sample in order. Returns ``[s(/tp), b, h]``.
    """
    b, n, k, h = image_embeddings.shape
    is_image = tokens == image_token_id  # [b, s]
    present = image_mask if image_mask is not None else torch.ones(b, n, dtype=torch.bool,
                                                                  device=tokens.device)
    expected = present.sum(dim=1) * k
    found = is_image.sum(dim=1)
    if not torch.equal(expected, found):
        raise ValueError(f"image-token count per sample {found.tolist()} does not match "
                         f"{k} tokens x present images = {expected.tolist()}")
    features = image_embeddings[present].reshape(-1, h).to(text_embeddings.dtype)
    full = torch.zeros(b, tokens.shape[1], h, dtype=text_embeddings.dtype, device=text_embeddings.device)
    full = full.masked_scatter(is_image.unsqueeze(-1), features).transpose(0, 1).contiguous()
    where = is_image.t().unsqueeze(-1)  # [s, b, 1]
    if sequence_parallel:
        full = tensor_parallel.scatter_to_sequence_parallel_region(full)
        s_local = full.shape[0]
        rank = parallel_state.get_tensor_model_parallel_rank()
        where = where[rank * s_local:(rank + 1) * s_local]
    return torch.where(where, full, text_embeddings)


class JointDecoderVLM(VLMModel):
    """LLaVA-style VLM: one causal decoder over spliced image + text tokens."""

    def language_forward(self, inputs, decoder_input, image_embeddings, context,
                         inference_context=None, runtime_gather_output=None):
        if decoder_input is not None and image_embeddings is not None:
            decoder_input = splice_image_embeddings(
                decoder_input, inputs.tokens, image_embeddings, inputs.image_mask, self.image_token_id,
                self.language_config.sequence_parallel)
        return self.language_model(input_ids=inputs.tokens, position_ids=inputs.position_ids,
                                   attention_mask=None, decoder_input=decoder_input, labels=inputs.labels,
                                   inference_context=inference_context,
                                   runtime_gather_output=runtime_gather_output, padding_mask=context)
