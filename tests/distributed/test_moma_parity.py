"""moma at EP=2, EP=2 x TP=2 + SP (4 ranks), EP=2 x PP=2 (4 ranks) and DP=2 against the single-rank
reference built from the same full weights (fp32, dropout 0, Gumbel noise off, auxiliary-router loss
on). The routing pool is one micro batch over the whole sequence of the TP group, so every layout
routes as the reference does. Activation recompute (full, and selective "moe") routes exactly as
without it, Gumbel noise included (megatron's RNG tracker restores the noise stream).

Tolerance: loss relative difference <= 1e-6; every gradient tensor max|g - g_ref| / max|g_ref| <= 1e-5.
"""

import copy

import pytest

from megatron_vlm.testing import parity
from megatron_vlm.testing.batches import pad_right, random_micro_batches
from megatron_vlm.testing.configs import small_config

NUM_MICRO_BATCHES = 4
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5

LAYOUTS = {  # name: (world size, tp, pp, ep, sp)
    "ep2": (2, 1, 1, 2, False),
    "ep2_tp2_sp": (4, 2, 1, 2, True),
    "ep2_pp2": (4, 1, 2, 2, False),
    "dp2": (2, 1, 1, 1, False),
}


def moma_config():
    cfg = small_config(language_layers=4)
    cfg.model.arch, cfg.model.backend = "moma", "local"
    cfg.model.moma.experts = {"image": 2, "text": 2}
    cfg.model.moma.gumbel_noise = False
    cfg.model.moma.layers = [0, 1, 3]  # layer 2 keeps a dense MLP
    return cfg


def with_parallel(cfg, tp, pp, ep, sp):
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.expert_model_parallel_size, p.sequence_parallel = ep, sp
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cfg = moma_config()
    mbs = pad_right(random_micro_batches(cfg.model, NUM_MICRO_BATCHES, micro_batch_size=2, seed=7))
    layouts = {name: (world, with_parallel(cfg, tp, pp, ep, sp)) for name, (world, tp, pp, ep, sp) in LAYOUTS.items()}
    return parity.run_layouts(cfg, mbs, tmp_path_factory.mktemp("moma_parity"), layouts)


def test_comparison_can_fail(runs):
    assert runs["control"]["max_rel_diff"] > 1e-2, runs["control"]  # weights are not gradients


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_matches_single_rank(runs, layout):
    ref_loss, losses, results = runs["ref_loss"], runs["losses"], runs["grads"]
    for rank_loss in losses[layout]:
        assert abs(rank_loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (layout, rank_loss, ref_loss)
    r = results[layout]
    assert r["nonzero_ref"] > 40 and r["tensors"] >= r["nonzero_ref"], r
    assert r["max_rel_diff"] <= GRAD_RTOL, (layout, r)


RECOMPUTE = {"full": {"recompute_granularity": "full", "recompute_num_layers": 1},
             "selective_moe": {"recompute_granularity": "selective", "recompute_modules": "moe"}}


@pytest.fixture(scope="module")
def recompute_runs(tmp_path_factory):
    cfg = moma_config()
    cfg.model.moma.gumbel_noise = True
    mbs = random_micro_batches(cfg.model, 2, micro_batch_size=2, seed=8)
    layouts = {}
    for name, fields in RECOMPUTE.items():
        layouts[name] = (1, copy.deepcopy(cfg))
        for key, value in fields.items():
            setattr(layouts[name][1].training, key, value)
    return parity.run_layouts(cfg, mbs, tmp_path_factory.mktemp("moma_recompute"), layouts)


@pytest.mark.parametrize("mode", list(RECOMPUTE))
def test_recompute_routes_identically_with_gumbel_noise(recompute_runs, mode):
    ref_loss, (loss,), result = recompute_runs["ref_loss"], recompute_runs["losses"][mode], recompute_runs["grads"][mode]
    assert loss == ref_loss, (mode, loss, ref_loss)
    assert result["max_rel_diff"] <= GRAD_RTOL, result
