"""MMCA core attention: one Q/K/V, two key sets, two softmaxes.

Per sample, with query position i and key position j (padding is neither image nor text):

* image branch: a TEXT query attends every image token before it (j < i); an IMAGE query attends
  the tokens of its own image (bidirectional inside the image, nothing else).
* text branch: a TEXT query attends the text tokens j <= i (causal); an image query has none.
* each branch is normalised on its own; a text query's output is their sum (``combine: sum``, as
  DeepSpeed-VisualChat) or the sum over its non-empty branches divided by their number (``mean``).
* a branch without any valid key contributes exactly 0 (never uniform weight on masked or future
  keys, as the public DeepSpeed-VisualChat masks do); padding queries get 0, padding keys are never seen.

"Its own image": image tokens are grouped into images by contiguous runs, each run cut every
``num_image_tokens`` tokens (so two images back to back stay two images).

Inside an MMCA layer megatron's ``attention_mask`` argument carries the full-sequence modality
context ``[b, s, M]`` bool (``megatron_vlm.data.batch``; put there by ``layers.MMCALayer``); the
masks are built from it here, per forward, never stored.

    query  [s, b, heads/tp, d]      key, value [s, b, groups/tp, d]
    returns [s, b, heads/tp * d]

Two implementations (``impl``), equal up to float rounding (tests/distributed/test_mmca_attention.py):

* ``explicit``: two boolean ``[b, 1, s, s]`` masks and two ``F.scaled_dot_product_attention`` calls.
* ``fast`` (default): no ``[s, s]`` mask (KV-cache decoding steps, whose queries are the last few
  positions, take the explicit path on those rows only). Text branch: causal SDPA (``is_causal``) over the text
  tokens compacted in order (per sample, then gathered back); image branch: one SDPA of every query
  over the compacted image tokens with an ``[s, s_img]`` mask. ``benchmarks/mmca_attention.py``.

In both, a branch row with no key gets one dummy key in the kernel's mask (so no kernel ever sees a
fully masked row: the result cannot depend on how a kernel treats one) and is then multiplied by 0,
which also zeroes its gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.archs.mmca.config import COMBINES
from megatron_vlm.data.batch import decode_modality_context


def image_ids(image: torch.Tensor, num_image_tokens: int | None) -> torch.Tensor:
    """``[b, s]`` bool image-token mask -> ``[b, s]`` int64: 1, 2, ... per image in order, 0 elsewhere.
    A new image starts at each contiguous run of image tokens and every ``num_image_tokens`` tokens
    inside a run (None: runs only)."""
    b, s = image.shape
    prev = torch.cat([image.new_zeros(b, 1), image[:, :-1]], dim=1)
    run_start = image & ~prev
    starts = run_start
    if num_image_tokens:
        pos = torch.arange(s, device=image.device).expand(b, s)
        start_pos = torch.where(run_start, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        starts = image & ((pos - start_pos) % num_image_tokens == 0)
    return torch.where(image, starts.long().cumsum(dim=1), torch.zeros_like(image, dtype=torch.long))


@dataclass(frozen=True)
class MMCAMasks:
    """The two key sets (True = attend), ``[b, s, s]`` (query, key), and per-query branch weights
    ``[b, s]`` (0 where the branch is empty, 1 or 1/n with ``mean``)."""
    image: torch.Tensor
    text: torch.Tensor
    image_weight: torch.Tensor
    text_weight: torch.Tensor


def mmca_masks(context: torch.Tensor, num_image_tokens: int | None = None, combine: str = "sum",
               query_start: int = 0) -> MMCAMasks:
    """Modality context ``[b, s, M]`` bool (full sequence) -> :class:`MMCAMasks` (no empty-row guard)
    for the queries at positions ``[query_start, s)`` (masks ``[b, s - query_start, s]``; KV-cache
    decoding asks for the last rows only)."""
    view = decode_modality_context(context)
    image, text = view.image, view.text  # [b, s]; both False at padding
    s = image.shape[1]
    pos = torch.arange(s, device=image.device)
    qpos = pos[query_start:]
    before = pos[None, :] < qpos[:, None]     # [s(q), s(k)]: j < i
    upto = pos[None, :] <= qpos[:, None]      # j <= i
    ids = image_ids(image, num_image_tokens)
    q_image, q_text, q_ids = image[:, query_start:], text[:, query_start:], ids[:, query_start:]
    same_image = (q_ids[:, :, None] == ids[:, None, :]) & q_image[:, :, None] & image[:, None, :]
    image_keys = (q_text[:, :, None] & image[:, None, :] & before) | same_image
    text_keys = q_text[:, :, None] & text[:, None, :] & upto
    w_image, w_text = image_keys.any(dim=-1), text_keys.any(dim=-1)
    wi, wt = w_image.float(), w_text.float()
    if combine == "mean":
        n = (wi + wt).clamp(min=1.0)
        wi, wt = wi / n, wt / n
    elif combine != "sum":
        raise ValueError(f"mmca combine={combine!r}: allowed ['sum', 'mean']")
    return MMCAMasks(image_keys, text_keys, wi, wt)


IMPLS = ("fast", "explicit")


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[b, s]`` bool -> (``[b, n]`` positions of the True entries in order, then filler; n = the
    largest count). Filler slots hold positions of False entries (finite values, never read back)."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    n = int(mask.sum(dim=1).max()) if mask.numel() else 0
    return order[:, :n], n


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x ``[b, heads, s, d]``, index ``[b, n]`` -> ``[b, heads, n, d]`` (rows of x along s)."""
    b, h, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def _dropout_rng(dropout: float):
    """Megatron's model-parallel RNG stream (distinct per TP rank) when dropout is on."""
    return tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext()


class MMCAttention(MegatronModule):
    """Core attention of an MMCA layer (megatron's core-attention constructor and forward contract;
    ``attention_mask`` = the full-sequence modality context). No parameters."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, *, num_image_tokens: int | None = None, combine: str = "sum",
                 impl: str = "fast", **unused):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("mmca attention does not support context parallelism")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.num_image_tokens = num_image_tokens
        self.combine = combine
        if combine not in COMBINES:
            raise ValueError(f"mmca attention combine={combine!r}: allowed {list(COMBINES)}")
        if impl not in IMPLS:
            raise ValueError(f"mmca attention impl={impl!r}: allowed {list(IMPLS)}")
        self.impl = impl

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **unused):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("mmca attention: packed sequences / attention bias are not supported")
        if attention_mask is None or attention_mask.dim() != 3 or attention_mask.dtype != torch.bool:
            raise ValueError("mmca attention: attention_mask must be the modality context [b, s, M] bool "
                             "(built by MMCALayer from the layer's padding_mask)")
        sq, sk = query.shape[0], key.shape[0]
        if attention_mask.shape[1] != sk or sq > sk:
            raise ValueError(f"mmca attention: query {sq} / key {sk} / context {attention_mask.shape[1]} "
                             "positions: the context must cover the keys, the queries are the last of them")
        if self.impl == "fast" and sq == sk:
            return self._fast(query, key, value, attention_mask)
        # explicit masks; with a KV cache (sq < sk) only the rows of this step's queries
        masks = mmca_masks(attention_mask, self.num_image_tokens, self.combine, query_start=sk - sq)
        return self._explicit(query, key, value, masks)

    def _explicit(self, query, key, value, masks: MMCAMasks):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        s, sk = q.shape[2], k.shape[2]
        pos = torch.arange(sk, device=q.device)
        eye = pos[None, :] == pos[sk - s:, None]  # [sq, sk]: each query's own position
        dropout = self.dropout if self.training else 0.0
        out = 0
        for keys, weight in ((masks.image, masks.image_weight), (masks.text, masks.text_weight)):
            guarded = keys | (eye & ~keys.any(dim=-1, keepdim=True))  # no fully masked row reaches the kernel
            with _dropout_rng(dropout):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=guarded.unsqueeze(1), dropout_p=dropout,
                                                   scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
            out = out + o * weight.to(o.dtype)[:, None, :, None]
        b = q.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _fast(self, query, key, value, context):
        """No ``[s, s]`` mask: the text branch is causal SDPA over the text tokens compacted in order
        (``is_causal``, fused kernels); the image branch is one SDPA of every query over the
        compacted image tokens with an ``[s, s_img]`` mask (preceding images for text queries, its
        own image for image queries). Same empty-row guard and weights as the explicit path."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        b, _, s, _ = q.shape
        view = decode_modality_context(context)
        image, text = view.image, view.text  # [b, s]
        gqa = k.shape[1] != q.shape[1]
        dropout = self.dropout if self.training else 0.0
        w_text = text.to(q.dtype)
        out = torch.zeros_like(q)
        text_idx, n_text = _compact(text)
        if n_text:
            with _dropout_rng(dropout):
                o = F.scaled_dot_product_attention(_take(q, text_idx), _take(k, text_idx), _take(v, text_idx),
                                                   dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                                                   enable_gqa=gqa)  # [b, heads, n_text, d]
            rank = (text.long().cumsum(dim=1) - 1).clamp(min=0)  # position -> its slot among the text tokens
            text_out = _take(o, rank)
        image_idx, n_image = _compact(image)
        if n_image:
            pos = torch.arange(s, device=q.device)
            key_pos = pos[image_idx]                                   # [b, n_image]
            key_ok = image.gather(1, image_idx)                        # False at filler slots
            ids = image_ids(image, self.num_image_tokens)
            key_ids = ids.gather(1, image_idx)
            keys = key_ok[:, None, :] & (
                (text[:, :, None] & (key_pos[:, None, :] < pos[None, :, None]))
                | (image[:, :, None] & (key_ids[:, None, :] == ids[:, :, None])))  # [b, s, n_image]
            has_image = keys.any(dim=-1)
            first = torch.zeros_like(keys)
            first[..., 0] = True
            keys = keys | (first & ~has_image[..., None])  # no fully masked row reaches the kernel
            with _dropout_rng(dropout):
                image_out = F.scaled_dot_product_attention(q, _take(k, image_idx), _take(v, image_idx),
                                                           attn_mask=keys.unsqueeze(1), dropout_p=dropout,
                                                           scale=self.softmax_scale, enable_gqa=gqa)
            w_image = has_image.to(q.dtype)
        else:
            image_out, w_image = None, torch.zeros_like(w_text)
        if self.combine == "mean":
            n = (w_image + w_text).clamp(min=1.0)
            w_image, w_text = w_image / n, w_text / n
        if n_text:
            out = out + text_out * w_text[:, None, :, None]
        if image_out is not None:
            out = out + image_out * w_image[:, None, :, None]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
