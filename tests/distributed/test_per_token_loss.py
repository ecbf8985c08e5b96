"""``training.calculate_per_token_loss`` (the default): the loss of a global batch is the mean over all
its loss tokens (across micro batches and data-parallel ranks), not the mean of the micro batches'
means. A global batch of two micro batches with 3 and 30 loss tokens shows the difference; DP=2
(one micro batch per rank) gives the DP=1 loss and gradients."""

import copy

import pytest
import torch

from megatron_vlm.testing import parity
from megatron_vlm.testing.batches import random_micro_batches
from megatron_vlm.testing.configs import small_config
from megatron_vlm.testing.distributed import run_distributed

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5


def _micro_batches(cfg):
    short, long = random_micro_batches(cfg.model, 2, micro_batch_size=2, seed=21)
    keep = short.loss_mask.nonzero()[:3]  # 3 loss tokens in the first micro batch
    short.loss_mask.zero_()
    short.loss_mask[keep[:, 0], keep[:, 1]] = 1
    assert short.loss_mask.sum() == 3 and long.loss_mask.sum() == 30
    return [short, long]


def _per_token_losses(cfg, micro_batches, weights_dir):
    """Each micro batch's per-token loss [b, s] with the saved weights (one rank)."""
    from megatron_vlm import runtime
    from megatron_vlm.training import checkpointing
    from megatron_vlm.training.step import build_model_chunks

    runtime.initialize(seed=1)
    (model,) = build_model_chunks(cfg, wrap_ddp=False)
    checkpointing.load_checkpoint(weights_dir, [model], load_rng=False)
    with torch.no_grad():
        return [model(mb.model_inputs()) for mb in micro_batches]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("per_token")
    cfg = small_config(language_layers=2)
    mbs = _micro_batches(cfg)
    w = str(root / "weights")
    (ref,) = run_distributed(parity.reference_step, 1, cfg, mbs, w, str(root / "g_dp1"))
    dp2 = run_distributed(parity.parallel_step, 2, cfg, mbs, w, str(root / "g_dp2"))
    per_mb = copy.deepcopy(cfg)
    per_mb.training.calculate_per_token_loss = False
    (ref_mb,) = run_distributed(parity.reference_step, 1, per_mb, mbs, w + "_mb", str(root / "g_mb"))
    (losses,) = run_distributed(_per_token_losses, 1, cfg, mbs, w)
    (grads,) = run_distributed(parity.compare_gradients, 1, cfg, str(root / "g_dp1"),
                               [str(root / "g_dp2"), str(root / "g_mb")])
    sums = [(l * mb.loss_mask).sum().item() for l, mb in zip(losses, mbs)]
    counts = [mb.loss_mask.sum().item() for mb in mbs]
    return {"ref": ref, "dp2": dp2, "ref_mb": ref_mb, "grads": grads,
            "token_mean": sum(sums) / sum(counts), "mean_of_means": sum(s / c for s, c in zip(sums, counts)) / 2}


def test_loss_is_the_token_weighted_mean(runs):
    assert abs(runs["token_mean"] - runs["mean_of_means"]) > 1e-3 * runs["token_mean"]  # they differ here
    assert abs(runs["ref"] - runs["token_mean"]) <= LOSS_RTOL * runs["token_mean"], runs
    # switched off: megatron's per-micro-batch mean, as before
    assert abs(runs["ref_mb"] - runs["mean_of_means"]) <= LOSS_RTOL * runs["mean_of_means"], runs


def test_dp2_equals_dp1(runs):
    for loss in runs["dp2"]:
        assert abs(loss - runs["ref"]) <= LOSS_RTOL * runs["ref"], (loss, runs["ref"])
    dp2, per_micro_batch = runs["grads"]
    assert dp2["nonzero_ref"] > 20, dp2
    assert dp2["max_rel_diff"] <= GRAD_RTOL, dp2
    # the gradients of the per-micro-batch mean are different ones: the comparison can fail
    assert per_micro_batch["max_rel_diff"] > 1e-2, per_micro_batch
