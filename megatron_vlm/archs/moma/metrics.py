"""Routing statistics of the MoMa layers, summed over layers and micro batches in this process and
turned into metrics (``ArchSpec.metrics``) once per training iteration / evaluation.

Every statistic is a (numerator, denominator) pair of sums, reduced by SUM over all ranks: tensor-
parallel ranks that count the same tokens scale both sides alike, so the ratios hold.

Metrics: ``moma_image_token_frac`` (tokens per modality), ``moma_unrouted_frac`` (non-padding tokens
chosen by no expert), ``moma_expert_tokens_min`` / ``_max`` / ``_cv`` (tokens per expert over a layer's
experts, mean over layers and micro batches), ``moma_aux_bce`` / ``moma_aux_acc`` (auxiliary routers
against expert choice, per token and expert of its modality), ``moma_expert_selection_rate`` (per
expert: share of its modality's tokens it takes).
"""

from __future__ import annotations

import torch

_SCALARS = ("tokens", "image_tokens", "unrouted", "layers", "expert_min", "expert_max", "expert_cv",
            "aux_bce", "aux_correct", "aux_total")
_sums: dict[str, torch.Tensor] = {}
_selected: torch.Tensor | None = None      # [E] tokens each expert took
_offered: torch.Tensor | None = None       # [E] tokens of the expert's modality


def _add(name: str, value) -> None:
    value = torch.as_tensor(value).detach().double()  # stays on its device: no host sync per layer
    _sums[name] = value if name not in _sums else _sums[name] + value


def record_routing(routing_map: torch.Tensor, context: torch.Tensor, groups: list[list[int]]) -> None:
    """One layer's routing of one pool (or this rank's share of it)."""
    global _selected, _offered
    from megatron_vlm.data.batch import IMAGE_MODALITY

    tokens = context.any(dim=1)
    per_expert = routing_map.sum(dim=0).double()
    _add("tokens", tokens.sum())
    _add("image_tokens", context[:, IMAGE_MODALITY].sum())
    _add("unrouted", (tokens & ~routing_map.any(dim=1)).sum())
    _add("layers", 1)
    _add("expert_min", per_expert.min())
    _add("expert_max", per_expert.max())
    _add("expert_cv", per_expert.std(unbiased=False) / per_expert.mean().clamp(min=1e-9))
    offered = torch.zeros_like(per_expert)
    for m, experts in enumerate(groups):
        offered[experts] = context[:, m].sum().double()
    _selected = per_expert if _selected is None else _selected + per_expert
    _offered = offered if _offered is None else _offered + offered


def record_aux(bce_sum: torch.Tensor, correct: torch.Tensor, total: torch.Tensor) -> None:
    _add("aux_bce", bce_sum)
    _add("aux_correct", correct)
    _add("aux_total", total)


def reset() -> None:
    global _selected, _offered
    _sums.clear()
    _selected = _offered = None


def collect(num_experts: int, prefix: str = "") -> dict:
    """The metrics since the last call, reduced over every rank (a collective: call it on all ranks
    at the same point), then reset. Empty when no MoMa layer ran anywhere."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float64, device=device)
    experts = torch.zeros(num_experts, dtype=torch.float64, device=device)
    packed = torch.cat([torch.stack([_sums.get(k, zero).to(device) for k in _SCALARS]),
                        experts if _selected is None else _selected.to(device),
                        experts if _offered is None else _offered.to(device)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed)
    reset()
    packed = packed.cpu()
    s = dict(zip(_SCALARS, packed[:len(_SCALARS)].tolist()))
    if s["layers"] == 0:
        return {}
    selected, offered = packed[len(_SCALARS):len(_SCALARS) + num_experts], packed[len(_SCALARS) + num_experts:]
    out = {
        "moma_image_token_frac": s["image_tokens"] / max(s["tokens"], 1),
        "moma_unrouted_frac": s["unrouted"] / max(s["tokens"], 1),
        "moma_expert_tokens_min": s["expert_min"] / s["layers"],
        "moma_expert_tokens_max": s["expert_max"] / s["layers"],
        "moma_expert_tokens_cv": s["expert_cv"] / s["layers"],
        "moma_expert_selection_rate": [round(v, 4) for v in (selected / offered.clamp(min=1)).tolist()],
    }
    if s["aux_total"]:
        out["moma_aux_bce"] = s["aux_bce"] / s["aux_total"]
        out["moma_aux_acc"] = s["aux_correct"] / s["aux_total"]
    return {prefix + k: v for k, v in out.items()}
