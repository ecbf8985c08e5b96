"""SDPAttention (local backend core attention) equals megatron's DotProductAttention."""

from megatron_vlm.testing.distributed import run_distributed


def _compare_all() -> dict:
    from megatron_vlm import runtime

    runtime.initialize()
    return {(m, g): _compare(m, g) for m in ("causal", "none", "padding") for g in (4, 2)}


def _compare(mask_kind: str, groups: int) -> float:
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vlm.models.attention import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=groups,
                            attention_dropout=0.0, use_cpu_initialization=True, masked_softmax_fusion=False)
    mask_type = {"causal": AttnMaskType.causal, "none": AttnMaskType.no_mask,
                 "padding": AttnMaskType.arbitrary}[mask_kind]
    g = torch.Generator().manual_seed(0)
    sq, b, d = 12, 2, 16
    q = torch.randn(sq, b, 4, d, generator=g)
    k, v = (torch.randn(sq, b, groups, d, generator=g) for _ in range(2))
    mask = None
    if mask_kind == "padding":
        mask = torch.zeros(b, 1, sq, sq, dtype=torch.bool)
        mask[0, :, :, 9:] = True  # sample 0: last 3 keys are padding
    ref = DotProductAttention(cfg, 1, mask_type, "self")(q, k, v, mask, attn_mask_type=mask_type)
    out = SDPAttention(cfg, 1, mask_type, "self")(q, k, v, mask, attn_mask_type=mask_type)
    assert out.shape == ref.shape == (sq, b, 4 * d)
    return (out - ref).abs().max().item()


def test_sdpa_matches_megatron_dot_product_attention():
    diffs = run_distributed(_compare_all, 1)[0]
    assert len(diffs) == 6
    for case, diff in diffs.items():
        assert diff <= 1e-5, (case, diff)
