"""MoMa's training FLOPs (``ArchSpec.flops``): the dense count with each MoMa layer's MLP replaced by
what expert choice actually computes.

Per pool (one micro batch) and MoMa layer, expert e of modality m processes ``k_e = ceil(c_e N_m)``
tokens, ``N_m`` = the micro batch's tokens of modality m (image positions of the token layout; the
rest counted as text). Active MLP FLOPs = ``sum_m |E_m| k_m`` token-expert pairs x one gated MLP per
pair (with the default ``c_e = 1/|E_m|`` that is the dense MLP's cost, up to rounding); plus the
router ``[E, h]`` and the auxiliary routers (weights trained, input detached: 2x forward).
"""

from __future__ import annotations

from megatron_vlm.archs.moma.config import capacity_factors, expert_groups, moma_layer_indices, tokens_per_expert
from megatron_vlm.training import flops


def iteration_flops(cfg, global_batch_size: int) -> float:
    mc, lang = cfg.model, cfg.model.language
    mbs = cfg.training.micro_batch_size
    h, f, a = lang.hidden_size, lang.ffn_hidden_size, mc.moma.aux_router.hidden_size
    tokens = mbs * lang.seq_length
    image = min(tokens, mbs * cfg.data.images_per_sample * mc.num_image_tokens)
    per_modality = [image, tokens - image]  # by modality id
    groups, caps = expert_groups(mc.moma), capacity_factors(mc.moma)
    experts = sum(len(g) for g in groups)
    pairs = sum(len(g) * tokens_per_expert(per_modality[m], len(g), caps[m]) for m, g in enumerate(groups))
    per_pair = 2 * h * f * 2 + 2 * f * h  # gated MLP: fc1 (gate + up), fc2
    router = 2 * tokens * h * experts
    aux = 2 * tokens * (h * a + a * experts)
    delta = 3 * (pairs * per_pair - tokens * per_pair + router) + 2 * aux
    pools = global_batch_size // mbs
    return flops.iteration_flops(cfg, global_batch_size) + pools * len(moma_layer_indices(mc)) * delta
