"""Checkpoints written by the code before the per-arch packages (tests/data/legacy_checkpoints, see
its README) still load strictly, give the logits recorded then, and resume training."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from megatron_vlm.testing.distributed import run_distributed

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy_checkpoints"
ARGV = [
    "--data-path", "mock", "--micro-batch-size", "2", "--global-batch-size", "2", "--num-layers", "4",
    "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "48",
    "--seq-length", "24", "--vocab-size", "128", "--set", "model.vision.image_size=8",
    "--set", "model.vision.patch_size=4", "--set", "model.vision.hidden_size=16",
    "--set", "model.vision.num_layers=1", "--set", "model.vision.num_attention_heads=2",
    "--set", "model.vision.ffn_hidden_size=32", "--lr", "1e-3", "--seed", "3", "--transformer-impl", "local",
]
EXTRA = {"joint_decoder": [], "cross_attention": ["--set", "model.cross_attention.layers=[1, 3]"]}


def _legacy_logits(ckpt: str, expected_path: str):
    import torch

    from megatron_vlm import runtime
    from megatron_vlm.config import from_dict
    from megatron_vlm.data.batch import ModelInputs
    from megatron_vlm.models import build_model
    from megatron_vlm.training.checkpointing import load_checkpoint

    expected = torch.load(expected_path)
    cfg = from_dict(yaml.safe_load((Path(ckpt) / "iter_0000002" / "config.yaml").read_text()))
    runtime.initialize(seed=3)
    model = build_model(cfg)
    load_checkpoint(ckpt, [model], load_rng=False, strict=True)
    model.eval()
    inputs = ModelInputs(**{k: expected[k] for k in ("tokens", "position_ids", "images", "image_mask",
                                                    "text_image_mask", "modality_ids")})
    with torch.no_grad():
        logits = model(inputs)
    return (logits - expected["logits"]).abs().max().item(), expected["logits"].abs().max().item()


@pytest.mark.parametrize("arch", ["joint_decoder", "cross_attention"])
def test_legacy_checkpoint_loads_with_same_logits(arch):
    ckpt = LEGACY / arch / "ckpt"
    ((diff, scale),) = run_distributed(_legacy_logits, 1, str(ckpt), str(LEGACY / arch / "expected.pt"))
    assert scale > 0
    assert diff <= 1e-6 * scale, (diff, scale)


def _cli(argv):
    from megatron_vlm.training.cli import run

    return run(argv)


def test_legacy_checkpoint_resumes_training(tmp_path):
    """pretrain_vlm's path: --load the old cross_attention checkpoint (model + optimizer) and train on."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(LEGACY / "cross_attention" / "ckpt", ckpt)
    argv = ARGV + EXTRA["cross_attention"] + ["--arch", "cross_attention", "--train-iters", "4",
                                               "--load", str(ckpt), "--save", str(ckpt), "--log-dir", str(tmp_path)]
    (rc,) = run_distributed(_cli, 1, argv)
    assert rc == 0
    assert (ckpt / "latest").read_text() == "4"
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {r["iteration"]: r["loss"] for r in records if r.get("loss") is not None}
    assert sorted(losses) == [3, 4]  # resumed after iteration 2
    assert all(0 < v < 20 for v in losses.values())
