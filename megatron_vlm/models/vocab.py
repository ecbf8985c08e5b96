"""Padded vocabulary rows take no part in the softmax.

Megatron pads the embedding and output layer to a multiple of rows (``--make-vocab-size-divisible-by``,
e.g. an HF vocab of 2056 becomes 2176 rows). An imported model's padded output rows are zero, so
their logits are 0 and would enter the cross entropy (and generation's argmax / sampling) unlike
the HF model's. ``model.language.unpadded_vocab_size`` is the true vocab (from the HF config on
import); when it is below ``vocab_size`` the language model's output layer gets
:class:`PaddedVocabMask` as a forward hook, so the loss (megatron's vocab-parallel cross entropy),
eval and generation all see logits in which every padded id holds the dtype's lowest finite value
(exp() of it is exactly 0 after the max subtraction: the loss equals the unpadded model's; finite,
so ``p * log p`` stays 0, not NaN). Gradients of the padded rows are 0.

Tensor parallelism: the output layer's logits ``[s, b, v/tp]`` are TP rank r's vocab shard, global
ids ``[r*v/tp, (r+1)*v/tp)``; gathered logits (``runtime_gather_output``) hold the full ``v``.
"""

from __future__ import annotations

import torch


def mask_padded_vocab(logits: torch.Tensor, true_vocab: int, tp_rank: int = 0) -> torch.Tensor:
    """``logits`` ``[..., n]`` holding global vocab ids ``[tp_rank*n, (tp_rank+1)*n)`` (a TP rank's
    shard; ``tp_rank=0`` for full, gathered logits) -> a copy in which ids ``>= true_vocab`` hold the
    lowest finite value of the dtype (the input itself when no id of this slice is padded)."""
    n = logits.shape[-1]
    first = true_vocab - tp_rank * n  # first padded column of this slice
    if first >= n:
        return logits
    pad = torch.arange(n, device=logits.device) >= max(first, 0)
    return logits.masked_fill(pad, torch.finfo(logits.dtype).min)


def padded_vocab_start(language_config) -> int | None:
    """The true vocab when ``language_config`` (our ``LanguageConfig``) is padded, else None."""
    true = getattr(language_config, "unpadded_vocab_size", None)
    return true if true is not None and true < language_config.vocab_size else None


class PaddedVocabMask:
    """Forward hook for megatron's output layer (``ColumnParallelLinear`` returning
    ``(logits, bias)``): masks the padded ids of this TP rank's shard, or of the gathered logits."""

    def __init__(self, true_vocab: int, padded_vocab: int):
        self.true_vocab = true_vocab
        self.padded_vocab = padded_vocab

    def __call__(self, module, args, output):
        logits, bias = output
        rank = 0
        if logits.shape[-1] != self.padded_vocab:  # a vocab shard (TP > 1, not gathered)
            group = getattr(module, "tp_group", None)
            if group is None:
                from megatron.core import parallel_state

                group = parallel_state.get_tensor_model_parallel_group()
            rank = torch.distributed.get_rank(group)
        return mask_padded_vocab(logits, self.true_vocab, rank), bias


def install_padded_vocab_mask(language_model: torch.nn.Module, language_config) -> bool:
    """Hook :class:`PaddedVocabMask` on ``language_model.output_layer`` (megatron ``GPTModel``,
    last pipeline stage) when the vocab is padded. Returns whether it did."""
    true = padded_vocab_start(language_config)
    layer = getattr(language_model, "output_layer", None)
    if true is None or layer is None:
        return False
    layer.register_forward_hook(PaddedVocabMask(true, language_config.vocab_size))
    return True
