"""Fusion of several vision encoders' tokens into one image's tokens (``model.fusion``).

Input: one tensor per encoder in ``model.vision`` order, ``[B, k_e, d]`` (B images, k_e tokens of
encoder e: its row-major patch grid, class token first if kept; d = the fusion width: the language
width for ``space: projected``, the encoders' common width for ``space: vision``), and the router's
raw data weights ``[B, E]`` (``router: data``) or None. Output ``[B, k, d]``:

* ``sequence_append``: the encoders' tokens one after another, k = sum_e k_e (no router).
* ``weighted_average``: every encoder's grid adaptively average-pooled to the generalist's grid
  (identity where they agree), then ``sum_e w_e tokens_e``; k = the generalist's k.
* ``cross_attn``: queries = the generalist's tokens, keys/values = the specialists' tokens (the
  generalist is never one of them); the router's weight of a specialist enters as ``log w`` added
  to the attention logits of its keys (w = 0 masks it out); multi-head, heads split over TP
  (column-parallel q / kv, row-parallel output); ``out = generalist + tanh(gate) * attention`` with
  the scalar gate initialised to 0, so at step 0 the output IS the generalist's tokens. An image
  whose specialist weights are all 0 gets attention 0 (the generalist alone).

Router (:func:`route`): ``learned``: an MLP on the mean-pooled generalist tokens gives logits over
the encoders (weighted_average) or the specialists (cross_attn); ``top_k`` keeps the k largest
specialist logits (the generalist always stays for weighted_average), the rest -inf, then ONE
softmax. ``data``: the manifest weights of the used encoders divided by their sum (once); an image
whose used weights are all 0 gets the generalist alone.

State dict (under the model's ``fusion.``)::

    router.mlp.0.{weight [r, d], bias [r]}   learned router (r = router_hidden_size)
    router.mlp.2.{weight [n, r], bias [n]}   n = E (weighted_average) or E - 1 (cross_attn)
    attention.linear_q.{weight [d, d], bias [d]}        column-parallel (TP: rows split)
    attention.linear_kv.{weight [2d, d], bias [2d]}     column-parallel, rows per head: [k_h; v_h]
    attention.linear_proj.{weight [d, d], bias [d]}     row-parallel (TP: columns split)
    gate [1]                                            cross_attn's tanh gate (init 0)

Metrics: the mean router weight per routed encoder since the last :func:`collect_metrics`
(``router_weight_<name>``), accumulated on the first pipeline stage and reduced over all ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_vlm.config import encoder_width

ROUTED_METHODS = ("weighted_average", "cross_attn")


class ModuleDictWithShards(torch.nn.ModuleDict):
    """``nn.ModuleDict`` whose dist-checkpoint entries come from each child's own
    ``sharded_state_dict`` (a plain ModuleDict would save TP-split tensors as replicated)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        out = {}
        for name, module in self.items():
            out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata))
        return out


def routed_encoders(model_config) -> list[int]:
    """Indices (``model.vision`` order) of the encoders the router weighs: all of them for
    weighted_average, the specialists for cross_attn, none for sequence_append."""
    method, g = model_config.fusion.method, model_config.generalist_index
    if method == "weighted_average":
        return list(range(len(model_config.vision)))
    if method == "cross_attn":
        return [i for i in range(len(model_config.vision)) if i != g]
    return []


def grid_side(model_config, v) -> tuple[int, int]:
    """(class tokens kept: 0 or 1, patch grid side) of encoder ``v``'s tokens."""
    cls = model_config.encoder_image_tokens(v) - v.num_patches
    return cls, v.patches_per_side


def pool_to_grid(x: torch.Tensor, cls: int, side: int, target: int) -> torch.Tensor:
    """``[B, cls + side^2, d]`` -> ``[B, cls + target^2, d]``: the grid adaptively average-pooled
    (row-major), the class token kept as is; unchanged when ``side == target``."""
    if side == target:
        return x
    b, _, d = x.shape
    grid = x[:, cls:].transpose(1, 2).reshape(b, d, side, side)
    grid = F.adaptive_avg_pool2d(grid, target).flatten(2).transpose(1, 2)
    return torch.cat([x[:, :cls], grid], dim=1)


def top_k_softmax(logits: torch.Tensor, top_k: int | None, always: int | None = None) -> torch.Tensor:
    """``[B, n]`` logits -> weights: the ``top_k`` largest logits among the columns other than
    ``always`` (that column is always kept) stay, the others become -inf; then one softmax."""
    n = logits.shape[-1]
    candidates = [i for i in range(n) if i != always]
    if top_k is not None and top_k < len(candidates):
        cand = logits[:, candidates]
        drop = torch.ones_like(cand, dtype=torch.bool).scatter(1, cand.topk(top_k, dim=1).indices, False)
        keep = torch.ones_like(logits, dtype=torch.bool)
        keep[:, candidates] = ~drop
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=-1)


def data_weights(raw: torch.Tensor, fallback: int | None) -> torch.Tensor:
    """``[B, n]`` raw non-negative weights divided by their row sum (once). Rows summing to 0 stay
    0, or become one-hot on column ``fallback`` when given."""
    total = raw.sum(dim=-1, keepdim=True)
    w = raw / torch.where(total > 0, total, torch.ones_like(total))
    if fallback is not None:
        one_hot = torch.zeros_like(w[0])
        one_hot[fallback] = 1
        w = torch.where(total > 0, w, one_hot)
    return w


class Router(torch.nn.Module):
    """Per-image weights ``[B, n]`` over the routed encoders. Learned: ``mlp`` on the mean-pooled
    generalist tokens ``[B, d]`` -> logits -> :func:`top_k_softmax`. Data: :func:`data_weights`."""

    def __init__(self, kind: str, width: int, hidden: int, n: int, top_k: int | None, always: int | None,
                 init_method=None):
        super().__init__()
        self.kind, self.top_k, self.always = kind, top_k, always
        self.mlp = None
        if kind == "learned":
            self.mlp = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(),
                                           torch.nn.Linear(hidden, n))
            if init_method is not None:
                for layer in (self.mlp[0], self.mlp[2]):
                    init_method(layer.weight)
                    torch.nn.init.zeros_(layer.bias)

    def forward(self, generalist: torch.Tensor, raw: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "learned":
            return top_k_softmax(self.mlp(generalist.mean(dim=1)), self.top_k, self.always)
        if raw is None:
            raise ValueError("model.fusion.router='data': the batch has no router_weights "
                             "(the dataset manifest's per-sample 'encoder_weights')")
        return data_weights(raw.to(generalist.dtype), self.always)


class CrossAttention(MegatronModule):
    """Multi-head attention of the generalist tokens ``[B, q, d]`` (queries) over the specialists'
    tokens ``[B, s, d]`` with an additive per-key bias ``[B, s]`` (-inf = masked); heads split
    over the TP ranks. Returns ``[B, q, d]`` (full width on every rank)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        d, tp = config.hidden_size, config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp  # this rank's
        self.head_dim = d // config.num_attention_heads
        kw = dict(config=config, init_method=config.init_method, bias=True, gather_output=False)
        self.linear_q = tensor_parallel.ColumnParallelLinear(d, d, **kw)
        self.linear_kv = tensor_parallel.ColumnParallelLinear(d, 2 * d, **kw)
        self.linear_proj = tensor_parallel.RowParallelLinear(
            d, d, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, nq, _ = query.shape
        q = self.linear_q(query)[0].view(b, nq, self.heads, self.head_dim).transpose(1, 2)
        kv = self.linear_kv(keys)[0].view(b, keys.shape[1], self.heads, 2, self.head_dim)
        k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)
        # every rank's heads see the same bias; its gradient is the sum over all ranks' heads
        bias = tensor_parallel.copy_to_tensor_model_parallel_region(bias)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :].to(q.dtype))
        return self.linear_proj(ctx.transpose(1, 2).reshape(b, nq, -1))[0]


_sums: torch.Tensor | None = None   # [E] summed router weights per encoder (model.vision order)
_count: torch.Tensor | None = None  # images weighed


class Fusion(MegatronModule):
    """``forward(tokens: list of [B, k_e, d], raw_weights [B, E] | None) -> [B, k, d]`` (module
    docstring). ``config``: a TransformerConfig of width d with ``fusion.heads`` heads (cross_attn)."""

    def __init__(self, model_config, config: TransformerConfig):
        super().__init__(config=config)
        mc, f = model_config, model_config.fusion
        self.method = f.method
        self.num_encoders = len(mc.vision)
        self.generalist = mc.generalist_index
        self.routed = routed_encoders(mc)
        self.grids = [grid_side(mc, v) for v in mc.vision]
        self.router = None
        if self.method in ROUTED_METHODS:
            always = self.generalist if self.method == "weighted_average" else None
            self.router = Router(f.router, config.hidden_size, f.router_hidden_size, len(self.routed), f.top_k,
                                 always, config.init_method if config.perform_initialization else None)
        self.attention = None
        if self.method == "cross_attn":
            self.attention = CrossAttention(config)
            self.gate = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))

    def forward(self, tokens: list[torch.Tensor], raw_weights: torch.Tensor | None = None) -> torch.Tensor:
        if len(tokens) != self.num_encoders:
            raise ValueError(f"fusion: {len(tokens)} encoder outputs for {self.num_encoders} encoders")
        if self.method == "sequence_append":
            return torch.cat(tokens, dim=1)
        generalist = tokens[self.generalist]
        if raw_weights is not None:
            if raw_weights.shape != (generalist.shape[0], self.num_encoders):
                raise ValueError(f"router_weights of shape {tuple(raw_weights.shape)}: expected "
                                 f"[{generalist.shape[0]} images, {self.num_encoders} encoders]")
            raw_weights = raw_weights[:, self.routed]
        w = self.router(generalist, raw_weights)  # [B, len(routed)]
        _record(w.detach(), self.routed, self.num_encoders)
        if self.method == "weighted_average":
            cls, target = self.grids[self.generalist]
            pooled = torch.stack([pool_to_grid(x, cls, self.grids[e][1], target) for e, x in enumerate(tokens)], 1)
            return (pooled * w[:, :, None, None].to(pooled.dtype)).sum(dim=1)
        keys = torch.cat([tokens[e] for e in self.routed], dim=1)
        # log w per key ([B, s]); -inf where w = 0 (without log's infinite gradient there)
        log_w = torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), float("-inf"))
        log_w = torch.cat([log_w[:, j:j + 1].expand(-1, tokens[e].shape[1]) for j, e in enumerate(self.routed)], 1)
        valid = (w > 0).any(dim=1)  # images with some specialist
        attn = self.attention(generalist, keys, torch.where(valid[:, None], log_w, torch.zeros_like(log_w)))
        attn = torch.where(valid[:, None, None], attn, torch.zeros_like(attn))
        return generalist + torch.tanh(self.gate).to(attn.dtype) * attn


def _record(w: torch.Tensor, routed: list[int], num_encoders: int) -> None:
    global _sums, _count
    full = w.new_zeros(num_encoders, dtype=torch.float64)
    full[routed] = w.double().sum(dim=0)
    count = torch.tensor(float(w.shape[0]), dtype=torch.float64, device=w.device)
    if _sums is None or _sums.shape != full.shape:  # first record (or another model's encoders)
        _sums, _count = full, count
    else:
        _sums, _count = _sums + full.to(_sums.device), _count + count.to(_count.device)


def collect_metrics(cfg, prefix: str = "") -> dict:
    """``{prefix + "router_weight_<name>": mean weight}`` for the routed encoders since the last
    call, reduced over every rank (a collective: call it on all ranks at the same point), then
    reset. Empty without a router (one encoder, sequence_append) or when no image was routed."""
    global _sums, _count
    mc = cfg.model
    if not mc.multi_encoder or mc.fusion.method not in ROUTED_METHODS:
        return {}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    packed = torch.zeros(len(mc.vision) + 1, dtype=torch.float64, device=device)
    if _sums is not None:
        packed[:-1] += _sums.to(device)
        packed[-1] += _count.to(device)
    _sums = _count = None
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed)
    packed = packed.cpu()
    if packed[-1] <= 0:
        return {}
    return {f"{prefix}router_weight_{mc.vision[e].name}": float(packed[e] / packed[-1]) for e in routed_encoders(mc)}


def fusion_width(model_config) -> int:
    """d: the language width (``space: projected``) or the encoders' common width (``vision``)."""
    if model_config.fusion.space == "projected":
        return model_config.language.hidden_size
    return encoder_width(model_config.generalist)


__all__ = ["Fusion", "ModuleDictWithShards", "collect_metrics", "data_weights", "encoder_width", "fusion_width",
           "pool_to_grid", "routed_encoders", "top_k_softmax"]
