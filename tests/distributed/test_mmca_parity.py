"""mmca at TP=2, TP=2 + SP (also with full activation recompute) and PP=2 against the single-rank
reference built from the same full weights (fp32, dropout 0), on micro batches whose image tokens
are not all at the start: text before the first image, two images per sample (back to back in one
sample), right padding. Under SP each
rank holds half the modality context; the layers all-gather it so the attention masks span the
whole sequence (a rank that built its masks from its own half would fail).

Tolerance: loss relative difference <= 1e-6; every gradient tensor max|g - g_ref| / max|g_ref| <= 1e-5.
"""

import copy

import pytest

from megatron_vlm.testing import parity
from tests.distributed.test_mmca_attention import layout_batch, mmca_config

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5

MICRO_BATCH_LAYOUTS = [
    ["ttt" + "I" + "t" * 6 + "I" + "t" * 12 + "ppp", "t" + "II" + "t" * 23],
    ["t" * 11 + "I" + "t" * 13 + "pppp", "I" + "t" * 10 + "I" + "t" * 14],
]

LAYOUTS = {  # name: (world size, tp, pp, sp, full activation recompute)
    "tp2": (2, 2, 1, False, False),
    "tp2_sp": (2, 2, 1, True, False),
    "pp2": (2, 1, 2, False, False),
    "tp2_sp_recompute": (2, 2, 1, True, True),  # the context gather re-runs inside the recompute
}


def with_parallel(cfg, tp, pp, sp, recompute):
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel = tp, pp, sp
    if recompute:
        cfg.training.recompute_granularity, cfg.training.recompute_num_layers = "full", 1
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cfg = mmca_config(layers=4)
    mbs = [layout_batch(cfg, layouts, seed=11 + i) for i, layouts in enumerate(MICRO_BATCH_LAYOUTS)]
    layouts = {name: (world, with_parallel(cfg, tp, pp, sp, recompute))
               for name, (world, tp, pp, sp, recompute) in LAYOUTS.items()}
    return parity.run_layouts(cfg, mbs, tmp_path_factory.mktemp("mmca_parity"), layouts)


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
