"""MoMa's expert-choice routing inside megatron-core's MoELayer equals a naive pure-torch reference
(per-group, per-expert loops written here) for outputs and gradients: both token dispatchers, EP=1
and EP=2; pools with padding, a modality with no tokens, and tied scores (the earlier token wins)."""

import math

import pytest
import torch

from megatron_vlm.testing.distributed import run_distributed

S, B, H, F = 12, 2, 32, 48
GROUPS_EXPERTS = {"image": 2, "text": 2}
RTOL = 1e-5


def _config(dispatcher: str, ep: int):
    from megatron_vlm.testing.configs import small_config

    cfg = small_config(language_layers=1)
    cfg.model.arch, cfg.model.backend = "moma", "local"
    lang = cfg.model.language
    lang.hidden_size, lang.ffn_hidden_size, lang.seq_length = H, F, S
    cfg.model.moma.experts = dict(GROUPS_EXPERTS)
    cfg.model.moma.gumbel_noise = False
    cfg.model.moma.dispatcher = dispatcher
    cfg.parallel.expert_model_parallel_size = ep
    return cfg


def _inputs(case: str, seed: int):
    """x [S, B, H] and the modality context [B, S, 2] (bool one-hot, all False = padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, H, generator=g)
    image = torch.zeros(B, S, dtype=torch.bool)
    padding = torch.zeros(B, S, dtype=torch.bool)
    if case == "mixed":
        image[0, 1:6] = True          # sample 0: 5 image tokens; sample 1: text only
        padding[1, -3:] = True        # right padding
    elif case == "text_only_ties":    # no image token anywhere; identical tokens tie
        x[4, 0] = x[5, 0]
        x[7, 1] = x[5, 0]
        padding[0, -1] = True
    context = torch.stack([image & ~padding, ~image & ~padding], dim=-1)
    return x, context


def naive_moma(x, context, W, W1, W2, groups):
    """Per modality, per expert: score every token of the modality, take the top ceil(N_m/|E_m|)
    (ties: earlier flattened [s, b] index first), add score * expert(x)."""
    s, b, h = x.shape
    xt = x.reshape(s * b, h)
    ctx = context.transpose(0, 1).reshape(s * b, -1)
    f = W2.shape[2]
    contributions = [[] for _ in range(s * b)]
    for m, experts in enumerate(groups):
        tokens = [t for t in range(s * b) if ctx[t, m]]
        k = math.ceil(len(tokens) / len(experts)) if tokens else 0
        for e in experts:
            score = {t: torch.sigmoid(xt[t] @ W[e]) for t in tokens}
            for t in sorted(tokens, key=lambda t: (-score[t].item(), t))[:k]:
                a = W1[e] @ xt[t]
                y = W2[e] @ (torch.nn.functional.silu(a[:f]) * a[f:])
                contributions[t].append(score[t] * y)
    rows = [torch.stack(c).sum(0) if c else torch.zeros(h) for c in contributions]
    return torch.stack(rows).reshape(s, b, h)


def _moe_vs_naive(ep: int):
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from megatron_vlm import runtime
    from megatron_vlm.archs.moma import transformer_config
    from megatron_vlm.archs.moma.config import expert_groups
    from megatron_vlm.archs.moma.layers import moma_layer_spec, routing_settings
    from megatron_vlm.models.backends import provider
    from megatron_vlm.models.vlm import language_transformer_config

    runtime.initialize(expert_model_parallel_size=ep, seed=1)
    rank = parallel_state.get_expert_model_parallel_rank()
    results = []
    for dispatcher in ("alltoall", "allgather"):
        cfg = _config(dispatcher, ep)
        mc = cfg.model
        tcfg = language_transformer_config(mc, cfg.parallel, **transformer_config(mc))
        layer = build_module(moma_layer_spec(provider("local"), routing_settings(mc)).submodules.mlp,
                             config=tcfg, layer_number=1)
        E = tcfg.num_moe_experts
        g = torch.Generator().manual_seed(0)
        W = torch.randn(E, H, generator=g) * 0.3
        W1 = torch.randn(E, 2 * F, H, generator=g) * 0.2
        W2 = torch.randn(E, H, F, generator=g) * 0.2
        local = [rank * (E // ep) + i for i in range(E // ep)]
        with torch.no_grad():
            layer.router.weight.copy_(W)
            for i, e in enumerate(local):
                layer.experts.local_experts[i].linear_fc1.weight.copy_(W1[e])
                layer.experts.local_experts[i].linear_fc2.weight.copy_(W2[e])
        groups = expert_groups(mc.moma)
        for case in ("mixed", "text_only_ties"):
            x, context = _inputs(case, seed=10 * rank + len(case))
            upstream = torch.randn(S, B, H, generator=torch.Generator().manual_seed(rank + 3))
            layer.zero_grad()
            xl = x.clone().requires_grad_()
            out, _ = layer(xl, padding_mask=context)
            (out * upstream).sum().backward()
            ref_params = [t.clone().requires_grad_() for t in (W, W1, W2)]
            xr = x.clone().requires_grad_()
            ref = naive_moma(xr, context, *ref_params, groups)
            (ref * upstream).sum().backward()
            grads = [p.grad for p in ref_params]
            if ep > 1:  # an expert's gradient gathers the tokens of every EP rank
                for t in grads[1:]:
                    torch.distributed.all_reduce(t, group=parallel_state.get_expert_model_parallel_group())
            ours_w1 = torch.stack([layer.experts.local_experts[i].linear_fc1.weight.grad for i in range(len(local))])
            ours_w2 = torch.stack([layer.experts.local_experts[i].linear_fc2.weight.grad for i in range(len(local))])
            padding = ~context.transpose(0, 1).any(-1)
            rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()  # noqa: E731
            results.append({
                "case": f"{dispatcher}/{case}", "out": rel(out, ref), "x_grad": rel(xl.grad, xr.grad),
                "router_grad": rel(layer.router.weight.grad, grads[0]), "w1_grad": rel(ours_w1, grads[1][local]),
                "w2_grad": rel(ours_w2, grads[2][local]), "padding_out": out[padding].abs().max().item(),
                "ref_nonzero": ref.abs().max().item(),
            })
    return results


@pytest.mark.parametrize("ep", [1, 2])
def test_expert_choice_equals_naive_reference(ep):
    for rank_results in run_distributed(_moe_vs_naive, ep, ep):
        assert len(rank_results) == 4
        for r in rank_results:
            assert r["ref_nonzero"] > 0, r
            assert r["padding_out"] == 0.0, r  # padding is never chosen
            for key in ("out", "x_grad", "router_grad", "w1_grad", "w2_grad"):
                assert r[key] <= RTOL, (key, r)


def test_naive_reference_sees_the_tie_order():
    """The tie rule matters: with the later of two identical tokens preferred, outputs move."""
    from megatron_vlm.archs.moma.router import expert_choice

    scores = torch.tensor([[0.9], [0.5], [0.5], [0.1]])
    context = torch.tensor([[True], [True], [True], [True]])
    chosen = expert_choice(scores, context, [[0]], [0.5])  # k = 2 of 4
    assert chosen[:, 0].tolist() == [True, True, False, False]
    empty = expert_choice(scores, torch.zeros(4, 1, dtype=torch.bool), [[0]], [None])
    assert not empty.any()
