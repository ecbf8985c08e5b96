"""MoMa's router: per-modality expert-choice routing with sigmoid scores, inside megatron-core's own
``MoELayer`` (given as ``MoESubmodules(router=MoMaRouter)``), plus the auxiliary routers that make
routing causal for evaluation and generation.

Routing (one layer, one pool)::

    scores = sigmoid(x W^T)            W = router.weight [E, h]; + Gumbel noise G' - G'' in training
    for each modality m, expert e of group m:
        k_e = ceil(c_e * N_m)          N_m = non-padding tokens of modality m in the pool
        e takes the k_e tokens of modality m with the highest score
    probs[t, e] = scores[t, e] if e took t else 0      -> megatron: out_t = sum_e probs[t, e] * expert_e(x_t)

* **Pool**: one micro batch on one data-parallel rank, over the whole sequence of the tensor-parallel
  group. Under sequence parallelism each rank holds ``s/tp`` positions; the router all-gathers the
  (detached) scores and modality context of the TP group, selects over all of them, and keeps its own
  rows, so TP=2+SP routes exactly as TP=1. Expert-parallel ranks are data-parallel ranks: each routes
  its own micro batch.
* **Ties**: the higher score wins; among equal scores the earlier token of the pool wins, in the order
  of the flattened ``[s, b]`` layout (sequence position first, then sample).
* **Padding** (all-False modality context) is never chosen; a token no expert chose gets 0 from the
  layer (the residual carries it); a modality with no tokens selects nothing.
* **Gumbel noise** is drawn from megatron's model-parallel RNG tracker, so recompute reproduces it.
* **Auxiliary routers**: per modality group a small MLP ``h -> hidden -> |E_m|`` on the detached layer
  input predicts whether expert choice selects the token; trained with BCE against the detached
  routing map (``aux_router.loss_coeff``), the loss injected with megatron's ``MoEAuxLossAutoScaler``.
  With ``eval_routing: aux`` (outside training) a token goes to the experts of its modality whose
  predictor says yes (p > 0.5), weighted by the main router's score: routing then depends on the token
  alone, so it is causal.

State dict (inside ``mlp.router.``): ``weight [E, h]``; ``aux.{m}.0.weight [hidden, h]``,
``aux.{m}.0.bias``, ``aux.{m}.2.weight [|E_m|, hidden]``, ``aux.{m}.2.bias`` (m = modality id).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import Router

from megatron_vlm.archs.moma import metrics  # the module (routing statistics)
from megatron_vlm.archs.moma.config import tokens_per_expert

_EPS = 1e-10


def expert_choice(scores: torch.Tensor, context: torch.Tensor, groups: list[list[int]],
                  capacities: list[float | None]) -> torch.Tensor:
    """Expert-choice selection over one pool.

    scores ``[N, E]`` (sigmoid scores), context bool ``[N, M]`` (modality one-hot, all False = padding),
    ``groups[m]`` the global expert indices of modality m, ``capacities[m]`` its c_e (None = 1/|E_m|).
    Returns the bool routing map ``[N, E]``.
    """
    routing = torch.zeros_like(scores, dtype=torch.bool)
    for m, experts in enumerate(groups):
        members = context[:, m].nonzero().squeeze(1)  # the pool's tokens of modality m, in order
        k = tokens_per_expert(members.numel(), len(experts), capacities[m])
        if k == 0:
            continue
        cols = torch.tensor(experts, device=scores.device)
        ranked = torch.sort(scores[members][:, cols], dim=0, descending=True, stable=True).indices[:k]
        routing[members[ranked], cols.expand(k, -1)] = True
    return routing


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(like).clamp(_EPS, 1 - _EPS)
    return -torch.log(-torch.log(u))


@dataclass(frozen=True)
class MoMaRouting:
    """What a MoMa router needs beyond megatron's TransformerConfig (from ``model.moma``)."""
    groups: tuple[tuple[int, ...], ...]       # global expert indices per modality id
    capacities: tuple[float | None, ...]      # c_e per modality id (None = 1/|E_m|)
    gumbel_noise: bool = True
    eval_routing: str = "aux"
    aux_hidden_size: int = 64
    aux_loss_coeff: float = 0.01


class MoMaRouter(Router):
    """Per-modality expert-choice router (see the module docstring). megatron's ``MoELayer`` builds it
    as ``router(config=, pg_collection=)``: the spec passes ``partial(MoMaRouter, routing=...)``."""

    def __init__(self, config, pg_collection=None, *, routing: MoMaRouting):
        super().__init__(config=config, pg_collection=pg_collection)
        self.settings = routing
        self.groups = [list(g) for g in routing.groups]
        self.aux = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(config.hidden_size, routing.aux_hidden_size, dtype=config.params_dtype),
                                torch.nn.SiLU(),
                                torch.nn.Linear(routing.aux_hidden_size, len(g), dtype=config.params_dtype))
            for g in self.groups)
        for p in self.aux.parameters():  # each TP rank sees its own tokens under SP: all-reduce grads
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def routing(self, logits: torch.Tensor):  # megatron's abstract hook; forward does the work
        raise NotImplementedError("MoMaRouter routes in forward(input, modality_context)")

    def _pool(self, scores: torch.Tensor, context: torch.Tensor, s_local: int, b: int):
        """The TP group's pool under SP (scores and context of all its ranks) and this rank's row
        offset in it; otherwise the local rows and 0."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if not (self.config.sequence_parallel and tp > 1):
            return scores, context, 0
        both = torch.cat([scores, context.to(scores.dtype)], dim=1).view(s_local, b, -1)
        full = gather_from_sequence_parallel_region(both, tensor_parallel_output_grad=False,
                                                    group=self.tp_group).reshape(-1, both.shape[-1])
        E = scores.shape[1]
        offset = parallel_state.get_tensor_model_parallel_rank() * s_local * b
        return full[:, :E], full[:, E:] > 0.5, offset

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """input ``[s(/tp), b, h]``, padding_mask = the modality context ``[s(/tp), b, M]`` (bool) ->
        (probs ``[s*b, E]``, routing_map ``[s*b, E]`` bool)."""
        if padding_mask is None or padding_mask.dim() != 3 or padding_mask.dtype != torch.bool:
            got = None if padding_mask is None else (padding_mask.dtype, tuple(padding_mask.shape))
            raise ValueError("MoMa router: expected the modality context (bool [s, b, modalities]) in "
                             f"megatron's padding_mask channel; got {got}")
        s_local, b, _ = input.shape
        n = s_local * b
        logits = self.gating(input).reshape(n, -1).float()
        context = padding_mask.reshape(n, -1)
        if self.training and self.settings.gumbel_noise:
            with get_cuda_rng_tracker().fork():
                noise = _gumbel(logits) - _gumbel(logits)
            logits = logits + noise
        scores = torch.sigmoid(logits)
        pool_scores, pool_context, offset = self._pool(scores.detach(), context, s_local, b)
        chosen = expert_choice(pool_scores, pool_context, self.groups, list(self.settings.capacities))
        chosen = chosen[offset:offset + n]  # what expert choice selects among this rank's tokens
        aux_logits = [head(input.reshape(n, -1).detach()) for head in self.aux]
        routing_map = chosen
        if not self.training and self.settings.eval_routing == "aux":
            routing_map = torch.zeros_like(chosen)
            for m, experts in enumerate(self.groups):
                routing_map[:, experts] = (aux_logits[m] > 0) & context[:, m:m + 1]
        record = not self.training or torch.is_grad_enabled()  # not on full recompute's first pass
        aux_loss = self._aux_loss(aux_logits, chosen, context, pool_context, record)
        probs = scores * routing_map
        if aux_loss is not None and self.training and torch.is_grad_enabled():
            probs = MoEAuxLossAutoScaler.apply(probs, aux_loss)
        if record:
            metrics.record_routing(routing_map, context, self.groups)
        return probs.to(input.dtype), routing_map

    def _aux_loss(self, aux_logits, chosen, context, pool_context, record):
        """coeff * sum_m mean BCE over the pool's tokens of modality m and its experts (this rank's
        share of the sum), times the pool's token count under per-token loss (as megatron scales
        its aux losses). None when the coefficient is 0."""
        total = 0.0
        for m, experts in enumerate(self.groups):
            rows = context[:, m]
            target = chosen[:, experts].float()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                aux_logits[m].float(), target, reduction="none").sum(dim=1)
            bce_sum = (bce * rows).sum()
            if record:
                correct = (((aux_logits[m] > 0) == chosen[:, experts]) & rows.unsqueeze(1)).sum()
                metrics.record_aux(bce_sum.detach(), correct, rows.sum() * len(experts))
            total = total + bce_sum / (pool_context[:, m].sum().clamp(min=1) * len(experts))
        if self.settings.aux_loss_coeff == 0:
            return None
        total = self.settings.aux_loss_coeff * total
        if self.config.calculate_per_token_loss:
            total = total * pool_context.any(dim=1).sum().clamp(min=1)
        return total
