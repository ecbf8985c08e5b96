"""The ``moma`` arch's config section ``model.moma``, its rules and the numbers derived from it.

YAML (every key optional)::

    model:
      arch: moma
      moma:
        experts: {image: 4, text: 4}   # experts per modality group
        capacity_factor: null          # null = 1/experts of the group; a number; or {image: .., text: ..}
        gumbel_noise: true             # Gumbel-sigmoid noise on the router logits while training
        layers: all                    # all | {every: N} | [explicit indices]; the others keep a dense MLP
        eval_routing: aux              # aux (causal, auxiliary routers) | expert_choice
        aux_router: {hidden_size: 64, loss_coeff: 0.01}
        dispatcher: alltoall           # megatron-core token dispatcher: alltoall | allgather

Global expert indices: the groups are interleaved round robin (image 0, text 1, image 2, ...), so
with megatron's contiguous expert blocks per EP rank every rank holds experts of both modalities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_vlm.config import Config, ConfigError, ModelConfig
from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY

MODALITIES = {"image": IMAGE_MODALITY, "text": TEXT_MODALITY}
EVAL_ROUTINGS = ("aux", "expert_choice")
DISPATCHERS = ("alltoall", "allgather")


@dataclass
class AuxRouterConfig:
    hidden_size: int = 64       # width of each auxiliary router MLP
    loss_coeff: float = 0.01    # weight of its BCE loss (0 = predictors are not trained)


@dataclass
class MoMaConfig:
    experts: dict = field(default_factory=lambda: {"image": 4, "text": 4})
    capacity_factor: float | dict | None = None
    gumbel_noise: bool = True
    layers: str | dict | list = "all"
    eval_routing: str = "aux"
    aux_router: AuxRouterConfig = field(default_factory=AuxRouterConfig)
    dispatcher: str = "alltoall"


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def expert_groups(moma: MoMaConfig) -> list[list[int]]:
    """Global expert indices of each modality group (list index = modality id), interleaved."""
    left = [moma.experts[name] for name in sorted(MODALITIES, key=MODALITIES.get)]
    groups: list[list[int]] = [[] for _ in left]
    e = 0
    while any(left):
        for m, n in enumerate(left):
            if n:
                groups[m].append(e)
                left[m] -= 1
                e += 1
    return groups


def capacity_factors(moma: MoMaConfig) -> list[float | None]:
    """Per modality id: c_e, or None for the default 1/|E_m| (computed exactly in integers)."""
    c = moma.capacity_factor
    if isinstance(c, dict):
        return [c.get(name) for name in sorted(MODALITIES, key=MODALITIES.get)]
    return [c] * len(MODALITIES)


def tokens_per_expert(n_tokens: int, group_size: int, capacity: float | None) -> int:
    """k_e = ceil(c_e * N_m), at most N_m; default c_e = 1/|E_m| (exact integer ceil)."""
    if n_tokens <= 0:
        return 0
    k = -(-n_tokens // group_size) if capacity is None else math.ceil(round(capacity * n_tokens, 9))
    return min(n_tokens, k)


def moma_layer_indices(mc: ModelConfig) -> list[int]:
    """Global indices of the decoder layers whose MLP is MoMa (the others keep a dense MLP)."""
    n, layers = mc.language.num_layers, mc.moma.layers
    if layers == "all":
        return list(range(n))
    if isinstance(layers, dict):
        every = layers.get("every")
        return list(range(0, n, every))
    return sorted(int(i) for i in layers)


def validate(cfg: Config) -> None:
    mc, p = cfg.model, cfg.parallel
    moma = mc.moma
    if not isinstance(moma.experts, dict) or set(moma.experts) != set(MODALITIES):
        raise ConfigError(f"model.moma.experts={moma.experts!r}: needs one count for each of {sorted(MODALITIES)}")
    for name, n in moma.experts.items():
        if not _positive_int(n):
            raise ConfigError(f"model.moma.experts.{name}={n!r}: must be a positive integer")
    c = moma.capacity_factor
    values = c.items() if isinstance(c, dict) else [("", c)]
    if isinstance(c, dict) and not set(c) <= set(MODALITIES):
        raise ConfigError(f"model.moma.capacity_factor={c!r}: keys must be among {sorted(MODALITIES)}")
    for name, v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            key = "model.moma.capacity_factor" + (f".{name}" if name else "")
            raise ConfigError(f"{key}={v!r}: must be null (1/experts of the group) or a number in (0, 1]")
    layers, n = moma.layers, mc.language.num_layers
    if isinstance(layers, dict):
        if set(layers) != {"every"} or not _positive_int(layers["every"]):
            raise ConfigError(f"model.moma.layers={layers!r}: allowed 'all', {{every: N}} with N >= 1, "
                              f"or a list of layer indices")
    elif isinstance(layers, list):
        if not layers or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n for i in layers) \
                or len(set(layers)) != len(layers):
            raise ConfigError(f"model.moma.layers={layers!r}: must be distinct indices in "
                              f"[0, model.language.num_layers={n})")
    elif layers != "all":
        raise ConfigError(f"model.moma.layers={layers!r}: allowed 'all', {{every: N}}, or a list of layer indices")
    if moma.eval_routing not in EVAL_ROUTINGS:
        raise ConfigError(f"model.moma.eval_routing={moma.eval_routing!r}: allowed {list(EVAL_ROUTINGS)}")
    if moma.dispatcher not in DISPATCHERS:
        raise ConfigError(f"model.moma.dispatcher={moma.dispatcher!r}: allowed {list(DISPATCHERS)}")
    if not isinstance(moma.gumbel_noise, bool):
        raise ConfigError(f"model.moma.gumbel_noise={moma.gumbel_noise!r}: must be true or false")
    aux = moma.aux_router
    if not _positive_int(aux.hidden_size):
        raise ConfigError(f"model.moma.aux_router.hidden_size={aux.hidden_size!r}: must be a positive integer")
    if isinstance(aux.loss_coeff, bool) or not isinstance(aux.loss_coeff, (int, float)) or aux.loss_coeff < 0:
        raise ConfigError(f"model.moma.aux_router.loss_coeff={aux.loss_coeff!r}: must be a number >= 0")
    total = sum(moma.experts.values())
    ep, tp = p.expert_model_parallel_size, p.tensor_model_parallel_size
    if total % ep:
        raise ConfigError(f"parallel.expert_model_parallel_size={ep}: must divide the {total} experts of "
                          f"model.moma.experts")
    if tp > 1 and not p.sequence_parallel:
        raise ConfigError(f"parallel.tensor_model_parallel_size={tp} with moma: needs "
                          f"parallel.sequence_parallel=true (megatron-core MoE layers under TP)")
