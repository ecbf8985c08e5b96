"""The moma model as a whole: with ``eval_routing: aux`` routing is causal (logits at position t do
not change when later tokens change); with ``expert_choice`` they do: the expert-choice pool spans the
whole sequence, which is why generation and causal evaluation need the auxiliary routers."""

import dataclasses

import pytest
import torch

from megatron_vlm.testing.configs import small_config
from megatron_vlm.testing.distributed import run_distributed

CUT = 20  # positions 0..CUT are compared; tokens after CUT change


def _prefix_change(eval_routing: str) -> tuple[float, float]:
    from megatron_vlm import runtime
    from megatron_vlm.data.mock import random_batch
    from megatron_vlm.models import build_model

    cfg = small_config(language_layers=2)
    cfg.model.arch, cfg.model.backend = "moma", "local"
    cfg.model.moma.eval_routing = eval_routing
    runtime.initialize(seed=1)
    model = build_model(cfg)
    model.eval()
    inputs = random_batch(cfg.model, 2, seed=5).model_inputs(with_labels=False)
    later = inputs.tokens.clone()
    later[:, CUT + 1:] = torch.randint(0, 100, later[:, CUT + 1:].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model(inputs)[:, :CUT + 1]
        b = model(dataclasses.replace(inputs, tokens=later))[:, :CUT + 1]
    return (a - b).abs().max().item(), a.abs().max().item()


@pytest.mark.parametrize("eval_routing", ["aux", "expert_choice"])
def test_aux_routing_is_causal_expert_choice_is_not(eval_routing):
    ((diff, scale),) = run_distributed(_prefix_change, 1, eval_routing)
    assert scale > 0
    if eval_routing == "aux":
        assert diff <= 1e-6 * scale, diff
    else:
        assert diff > 1e-4 * scale, diff
