"""``moma`` (Mixture of Modality-Aware Experts, Lin et al. 2024, arXiv 2407.21770): the joint-decoder
residual stream (image features spliced at the image positions); shared attention; the MLP of each
MoMa layer is a set of expert groups, one per modality, with expert-choice sigmoid routing inside a
group, on megatron-core's ``MoELayer`` with expert parallelism. See ``config.py`` (YAML),
``router.py`` (routing, pool, ties, auxiliary routers) and ``layers.py`` (specs, state dict)."""

import re

from megatron_vlm.archs import ArchSpec, register_arch
from megatron_vlm.archs.moma.config import MoMaConfig, expert_groups, moma_layer_indices, validate
from megatron_vlm.data.layout import TokenLayout


def transformer_config(mc) -> dict:
    """megatron-core MoE fields. Expert choice breaks megatron's top-k-per-token assumptions, so they
    are pinned here (users cannot set them): sigmoid scores, no load-balancing loss, no capacity
    dropping or padding by megatron, no probs on the input, unfused permute; ``moe_router_topk`` = the
    largest group (the most experts one token can get) and a capacity factor set, so the alltoall
    dispatcher sizes its buffers from the routing map's true pair count."""
    from megatron_vlm.models.backends import resolve_backend

    groups = expert_groups(mc.moma)
    layers = set(moma_layer_indices(mc))
    return dict(
        num_moe_experts=sum(len(g) for g in groups),
        moe_ffn_hidden_size=mc.language.ffn_hidden_size,
        moe_router_topk=max(len(g) for g in groups),
        moe_router_score_function="sigmoid",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_expert_capacity_factor=1.0,
        moe_pad_expert_input_to_capacity=False,
        moe_apply_probs_on_input=False,
        moe_permute_fusion=False,
        moe_token_dispatcher_type=mc.moma.dispatcher,
        moe_grouped_gemm=resolve_backend(mc.backend) == "te",
        moe_router_dtype="fp32",
        moe_layer_freq=[int(i in layers) for i in range(mc.language.num_layers)],
    )


_DENSE_MLP = re.compile(r"^(language_model\.decoder\.layers\.(\d+)\.mlp\.)(linear_fc[12]\.weight)$")


def from_dense(mc, key: str) -> list[str]:
    """Upcycling: the dense MLP of a MoMa layer goes to every expert of that layer."""
    m = _DENSE_MLP.match(key)
    if not m or int(m.group(2)) not in moma_layer_indices(mc):
        return [key]
    return [f"{m.group(1)}experts.local_experts.{e}.{m.group(3)}" for e in range(sum(mc.moma.experts.values()))]


def flops(cfg, global_batch_size: int) -> float:
    from megatron_vlm.archs.moma.model import iteration_flops

    return iteration_flops(cfg, global_batch_size)


def routing_metrics(cfg, prefix: str = "") -> dict:
    from megatron_vlm.archs.moma.metrics import collect

    return collect(sum(cfg.model.moma.experts.values()), prefix)


SPEC = register_arch(ArchSpec(
    name="moma",
    summary="per-modality expert groups with expert-choice sigmoid routing on megatron-core MoELayer (EP)",
    model_class="megatron_vlm.archs.joint_decoder.model:JointDecoderVLM",
    block_spec="megatron_vlm.archs.moma.layers:block_spec",
    token_layout=TokenLayout.INLINE,
    section="moma",
    section_class=MoMaConfig,
    validate=validate,
    transformer_config=transformer_config,
    flops=flops,
    homogeneous_layers=False,
    experts=True,
    metrics=routing_metrics,
    from_dense=from_dense,
))
