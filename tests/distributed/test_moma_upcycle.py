"""Upcycling a dense checkpoint of ours (joint_decoder, trained through pretrain_vlm's path) into moma
with ``convert_checkpoint.py upcycle``: every expert of a MoMa layer is the dense MLP, everything the
dense model has is carried over unchanged, and the result trains through pretrain_vlm's path at EP=2."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from megatron_vlm.testing.cli import TINY_ARGV, pretrain, read_checkpoint
from megatron_vlm.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
def test_upcycle_joint_decoder_into_moma_and_train_at_ep2(tmp_path):
    dense, moma = tmp_path / "dense", tmp_path / "moma"
    (rc,) = run_distributed(pretrain, 1, TINY_ARGV + ["--arch", "joint_decoder", "--train-iters", "1",
                                                      "--save", str(dense)])
    assert rc == 0
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "upcycle", "--load", str(dense),
                           "--save", str(moma), "--arch", "moma", "--set", "model.moma.experts={image: 2, text: 2}",
                           "--set", "model.moma.layers=[1]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (d,) = run_distributed(read_checkpoint, 1, str(dense))
    (m,) = run_distributed(read_checkpoint, 1, str(moma))
    layer = "language_model.decoder.layers.{}."
    for fc in ("linear_fc1", "linear_fc2"):
        dense_mlp = d[layer.format(1) + f"mlp.{fc}.weight"]
        experts = m[layer.format(1) + f"mlp.experts.experts.{fc}.weight"]  # dist ckpt: [experts, out, in]
        assert experts.shape == (4, *dense_mlp.shape)
        for e in range(4):
            assert torch.equal(experts[e], dense_mlp)
        assert torch.equal(m[layer.format(0) + f"mlp.{fc}.weight"], d[layer.format(0) + f"mlp.{fc}.weight"])
    carried = [k for k in d if ".mlp.linear_fc" not in k or k.startswith(layer.format(0))]
    assert len(carried) > 20 and all(torch.equal(m[k], d[k]) for k in carried)
    added = sorted(set(m) - set(d))
    assert any(k.endswith("mlp.router.weight") for k in added) and any(".router.aux." in k for k in added)

    # the upcycled checkpoint trains through pretrain_vlm's path at EP=2
    argv = TINY_ARGV + ["--config", str(moma / "iter_0000000" / "config.yaml"), "--load", str(moma),
                   "--expert-model-parallel-size", "2", "--train-iters", "2", "--log-dir", str(tmp_path / "log")]
    assert run_distributed(pretrain, 2, argv) == [0, 0]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("loss") is not None]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)


def test_upcycle_refuses_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "upcycle", "--load", str(tmp_path),
                           "--save", str(tmp_path / "out"), "--arch", "moma"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no 'latest' file" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
