"""Several vision encoders fused (``model.fusion``): TP=2 and PP=2 (1F1B, 4 micro batches) against
the single-rank reference with the same full weights (fp32), for each method, joint_decoder arch,
three encoders (gen 4x4 grid, twin 4x4, fine 8x8):

* ``sequence_append`` (space projected: a projector per encoder);
* ``weighted_average`` (space vision: one shared projector after the fusion; data router, the
  per-sample weights travel in the batches, zero entries included);
* ``cross_attn`` (learned router over the two specialists; the gate set to 0.5 so the fusion's
  weights and the router get gradients; heads split over TP).

One spawned world per layout runs all three methods (reference, tp2, pp2, then one comparison).
Tolerance: loss relative difference <= 1e-6, every gradient max|g - g_ref| / max|g_ref| <= 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_vlm.config import Config, VisionConfig, validate
from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY, VLMBatch
from megatron_vlm.testing import parity
from megatron_vlm.testing.distributed import run_distributed

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5
IMAGE_TOKEN = 255
METHODS = {  # method: (space, router)
    "sequence_append": ("projected", "learned"),
    "weighted_average": ("vision", "data"),
    "cross_attn": ("projected", "learned"),
}
LAYOUTS = {"tp2": (2, 2, 1), "pp2": (2, 1, 2)}  # name: (world size, tp, pp)


def fusion_config(method: str) -> Config:
    space, router = METHODS[method]
    cfg = Config()
    m = cfg.model
    lang = m.language
    lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups = 4, 64, 4, 2
    lang.ffn_hidden_size, lang.vocab_size = 96, 256
    m.image_token_id = IMAGE_TOKEN
    enc = dict(num_layers=2, num_attention_heads=4, ffn_hidden_size=64, image_size=16)
    m.vision = [VisionConfig(name="gen", generalist=True, patch_size=4, hidden_size=32, **enc),
                VisionConfig(name="twin", patch_size=4, hidden_size=32 if space == "vision" else 48, **enc),
                VisionConfig(name="fine", patch_size=2, hidden_size=32, **enc)]
    m.fusion.method, m.fusion.space, m.fusion.router, m.fusion.heads = method, space, router, 4
    lang.seq_length = m.num_image_tokens + 16
    return validate(cfg)


def micro_batches(cfg: Config, num: int = 4, size: int = 2, seed: int = 0) -> list[VLMBatch]:
    """[bos, image tokens, text]; one image per sample for each encoder; router weights (data
    router) with zero entries in some samples."""
    m, s = cfg.model, cfg.model.language.seq_length
    k = m.num_image_tokens
    out = []
    for i in range(num):
        g = torch.Generator().manual_seed(seed + i)
        tokens = torch.randint(0, 200, (size, s), generator=g)
        tokens[:, 1:1 + k] = IMAGE_TOKEN
        loss_mask = torch.ones(size, s)
        loss_mask[:, :k] = 0
        loss_mask[:, -1] = 0
        modality = torch.full((size, s), TEXT_MODALITY)
        modality[:, 1:1 + k] = IMAGE_MODALITY
        weights = torch.rand(size, len(m.vision), generator=g)
        weights[0, i % len(m.vision)] = 0.0
        out.append(VLMBatch(
            tokens=tokens, labels=torch.roll(tokens, -1, dims=1), loss_mask=loss_mask,
            position_ids=torch.arange(s).expand(size, s).clone(), modality_ids=modality,
            images=tuple(torch.randn(size, 1, 3, v.image_size, v.image_size, generator=g) for v in m.vision),
            image_mask=torch.ones(size, 1, dtype=torch.bool),
            router_weights=weights if m.fusion.router == "data" else None))
    return out


def open_gate(model) -> None:
    """A non-zero cross_attn gate, so the attention and router weights take part (and get gradients)."""
    if model.fusion is not None and model.fusion.attention is not None:
        with torch.no_grad():
            model.fusion.gate.fill_(0.5)


def with_layout(cfg: Config, tp: int, pp: int) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    return cfg


def _reference_world(cases: dict, root: str) -> dict:
    return {name: parity.reference_step(cfg, mbs, f"{root}/{name}/weights", f"{root}/{name}/ref", init_fn=open_gate)
            for name, (cfg, mbs) in cases.items()}


def _layout_world(cases: dict, root: str, layout: str, tp: int, pp: int) -> dict:
    return {name: parity.parallel_step(with_layout(cfg, tp, pp), mbs, f"{root}/{name}/weights",
                                       f"{root}/{name}/{layout}")
            for name, (cfg, mbs) in cases.items()}


def _compare_world(cases: dict, root: str) -> dict:
    return {name: parity.compare_gradients(cfg, f"{root}/{name}/ref",
                                           [f"{root}/{name}/weights"] + [f"{root}/{name}/{l}" for l in LAYOUTS])
            for name, (cfg, _) in cases.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fusion_parity"))
    cases = {}
    for i, method in enumerate(METHODS):
        cfg = fusion_config(method)
        cases[method] = (cfg, micro_batches(cfg, seed=10 * i))
    (ref,) = run_distributed(_reference_world, 1, cases, root, timeout=300)
    losses = {layout: run_distributed(_layout_world, world, cases, root, layout, tp, pp, timeout=300)
              for layout, (world, tp, pp) in LAYOUTS.items()}
    (compared,) = run_distributed(_compare_world, 1, cases, root, timeout=300)
    return ref, losses, compared


@pytest.mark.parametrize("method", list(METHODS))
def test_comparison_can_fail(runs, method):
    _, _, compared = runs
    control = compared[method][0]  # the weights compared as if they were gradients
    assert control["max_rel_diff"] > 1e-2, control


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_fusion_parallel_matches_single_rank(runs, method, layout):
    ref, losses, compared = runs
    for rank in losses[layout]:
        assert abs(rank[method] - ref[method]) <= LOSS_RTOL * abs(ref[method]), (method, layout, rank, ref)
    r = compared[method][1 + list(LAYOUTS).index(layout)]
    assert r["nonzero_ref"] > 40 and r["tensors"] >= r["nonzero_ref"], r
    assert r["max_rel_diff"] <= GRAD_RTOL, (method, layout, r)
