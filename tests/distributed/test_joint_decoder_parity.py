"""joint_decoder at TP=2, PP=2 (1F1B, 4 micro batches), DP=2 and TP=2 x PP=2 against the
single-rank reference built from the same full weights (fp32).

Tolerance: loss relative difference <= 1e-6 and, for every gradient tensor,
max|g - g_ref| / max|g_ref| <= 1e-5.
"""

import copy

import pytest

from megatron_vlm.config import Config
from megatron_vlm.testing import parity
from megatron_vlm.testing.batches import random_micro_batches
from megatron_vlm.testing.configs import small_config
from megatron_vlm.testing.distributed import run_distributed

NUM_MICRO_BATCHES = 4
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5


def with_parallel(cfg: Config, tp=1, pp=1, sp=False) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.parallel.sequence_parallel = sp
    return cfg


LAYOUTS = {  # name: (world size, tp, pp, sp)
    "tp2": (2, 2, 1, False),
    "tp2_sp": (2, 2, 1, True),
    "pp2": (2, 1, 2, False),
    "dp2": (2, 1, 1, False),
    "tp2_pp2": (4, 2, 2, False),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint_parity")
    cfg = small_config(language_layers=4)
    mbs = random_micro_batches(cfg.model, NUM_MICRO_BATCHES, micro_batch_size=2, seed=7)
    (loss,) = run_distributed(parity.reference_step, 1, cfg, mbs, str(root / "weights"), str(root / "ref_grads"))
    return cfg, mbs, root, loss


@pytest.fixture(scope="module")
def parallel_runs(reference):
    """Every layout's losses, then ONE comparison run over all their gradient checkpoints."""
    cfg, mbs, root, ref_loss = reference
    losses = {}
    for layout, (world, tp, pp, sp) in LAYOUTS.items():
        losses[layout] = run_distributed(parity.parallel_step, world, with_parallel(cfg, tp, pp, sp), mbs,
                                         str(root / "weights"), str(root / f"grads_{layout}"))
    dirs = [str(root / f"grads_{layout}") for layout in LAYOUTS] + [str(root / "weights")]
    (results,) = run_distributed(parity.compare_gradients, 1, cfg, str(root / "ref_grads"), dirs)
    return ref_loss, losses, dict(zip(list(LAYOUTS) + ["control"], results))


def test_comparison_can_fail(parallel_runs):
    _, _, results = parallel_runs
    assert results["control"]["max_rel_diff"] > 1e-2, results["control"]  # weights are not gradients


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_matches_single_rank(parallel_runs, layout):
    ref_loss, losses, results = parallel_runs
    for rank_loss in losses[layout]:
        assert abs(rank_loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (layout, rank_loss, ref_loss)
    r = results[layout]
    assert r["nonzero_ref"] > 20 and r["tensors"] >= r["nonzero_ref"], r
    assert r["max_rel_diff"] <= GRAD_RTOL, (layout, r)
