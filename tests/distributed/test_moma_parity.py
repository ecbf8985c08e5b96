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
from megatron_vlm.testing.batches import random_micro_batches
from megatron_vlm.testing.configs import small_config
from megatron_vlm.testing.distributed import run_distributed

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
    root = tmp_path_factory.mktemp("moma_parity")
    cfg = moma_config()
    mbs = random_micro_batches(cfg.model, NUM_MICRO_BATCHES, micro_batch_size=2, seed=7)
    for i, mb in enumerate(mbs):  # uneven pools: right padding in some samples
        mb.padding_mask = mb.tokens.new_zeros(mb.tokens.shape, dtype=bool)
        mb.padding_mask[i % 2, -(3 + i):] = True
        mb.loss_mask[mb.padding_mask] = 0
    (ref_loss,) = run_distributed(parity.reference_step, 1, cfg, mbs, str(root / "weights"), str(root / "ref"))
    losses = {}
    for name, (world, tp, pp, ep, sp) in LAYOUTS.items():
        losses[name] = run_distributed(parity.parallel_step, world, with_parallel(cfg, tp, pp, ep, sp), mbs,
                                       str(root / "weights"), str(root / name))
    (compared,) = run_distributed(parity.compare_gradients, 1, cfg, str(root / "ref"),
                                  [str(root / "weights")] + [str(root / n) for n in LAYOUTS])
    return ref_loss, losses, compared[0], dict(zip(LAYOUTS, compared[1:]))


def test_comparison_can_fail(runs):
    _, _, control, _ = runs
    assert control["max_rel_diff"] > 1e-2, control  # weights are not gradients


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_matches_single_rank(runs, layout):
    ref_loss, losses, _, results = runs
    for rank_loss in losses[layout]:
        assert abs(rank_loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (layout, rank_loss, ref_loss)
    r = results[layout]
    assert r["nonzero_ref"] > 40 and r["tensors"] >= r["nonzero_ref"], r
    assert r["max_rel_diff"] <= GRAD_RTOL, (layout, r)


RECOMPUTE = {"full": {"recompute_granularity": "full", "recompute_num_layers": 1},
             "selective_moe": {"recompute_granularity": "selective", "recompute_modules": "moe"}}


@pytest.fixture(scope="module")
def recompute_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moma_recompute")
    cfg = moma_config()
    cfg.model.moma.gumbel_noise = True
    mbs = random_micro_batches(cfg.model, 2, micro_batch_size=2, seed=8)
    (ref_loss,) = run_distributed(parity.reference_step, 1, cfg, mbs, str(root / "weights"), str(root / "ref"))
    losses = {}
    for name, fields in RECOMPUTE.items():
        rcfg = copy.deepcopy(cfg)
        for key, value in fields.items():
            setattr(rcfg.training, key, value)
        (losses[name],) = run_distributed(parity.parallel_step, 1, rcfg, mbs, str(root / "weights"), str(root / name))
    (compared,) = run_distributed(parity.compare_gradients, 1, cfg, str(root / "ref"), [str(root / n) for n in RECOMPUTE])
    return ref_loss, losses, dict(zip(RECOMPUTE, compared))


@pytest.mark.parametrize("mode", list(RECOMPUTE))
def test_recompute_routes_identically_with_gumbel_noise(recompute_runs, mode):
    ref_loss, losses, results = recompute_runs
    assert losses[mode] == ref_loss, (mode, losses[mode], ref_loss)
    assert results[mode]["max_rel_diff"] <= GRAD_RTOL, results[mode]
