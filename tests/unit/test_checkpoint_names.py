"""Dist-checkpoint tensor names are backend independent: the local backend stores its layer norms
under the names Transformer Engine's fused linears give them (megatron-core's own convention), so a
checkpoint trained with ``te`` on GPU loads with ``local`` (and the converter reads either)."""

from __future__ import annotations

import re

from megatron_vlm.testing.distributed import run_distributed
from megatron_vlm.testing.configs import small_config

# per layer kind: the TE names of its norm parameters
TE_NORMS = {
    "self": {"self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"},
    "cross": {"cross_attention.linear_q.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"},
}


def _sharded_keys(arch: str) -> list[str]:
    from megatron_vlm import runtime
    from megatron_vlm.models import build_model

    runtime.initialize(seed=1)
    cfg = small_config()
    cfg.model.arch = arch
    cfg.model.language.num_layers = 4
    cfg.model.cross_attention.every = 2  # CA layers at 1 and 3
    model = build_model(cfg)
    # the names the tensors get in the checkpoint (ShardedTensor.key), not the module paths
    return sorted({v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")})


def _layer_params(keys: list[str], stack: str) -> set[str]:
    """Parameter names (after ``{stack}.layers.[i.]``) of the layers of one stack."""
    out = set()
    for k in keys:
        m = re.match(rf"{re.escape(stack)}\.layers\.(?:\d+\.)?(.+)$", k)
        if m and "_extra_state" not in m.group(1):
            out.add(m.group(1))
    return out


def test_local_checkpoint_uses_te_norm_names():
    keys = {arch: run_distributed(_sharded_keys, 1, arch)[0] for arch in ("joint_decoder", "cross_attention")}
    for arch, ks in keys.items():
        assert not [k for k in ks if "input_layernorm" in k or "pre_mlp_layernorm" in k], arch
        lang = _layer_params(ks, "language_model.decoder")
        vision = _layer_params(ks, "vision_model.decoder")
        assert TE_NORMS["self"] <= lang and TE_NORMS["self"] <= vision, (arch, lang, vision)
        assert {n.replace("weight", "bias") for n in TE_NORMS["self"]} <= vision  # LayerNorm bias
    ca = _layer_params(keys["cross_attention"], "language_model.decoder")
    assert TE_NORMS["cross"] <= ca, ca
    assert "cross_attention.linear_q.layer_norm_weight" not in _layer_params(keys["joint_decoder"],
                                                                              "language_model.decoder")
