"""moma through pretrain_vlm's training loop: resume at EP=2 is bit-exact (Gumbel noise on: the RNG
state travels in the checkpoint); a checkpoint saved at EP=2 resumes at EP=1 (megatron reshards the
experts and their optimizer state) with the losses of the uninterrupted EP=2 run; routing metrics
reach metrics.jsonl."""

import json
from pathlib import Path

from megatron_vlm.testing.distributed import run_distributed

TINY = [
    "--data-path", "mock", "--arch", "moma", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--ffn-hidden-size", "48", "--seq-length", "24", "--vocab-size", "128",
    "--set", "model.vision.image_size=8", "--set", "model.vision.patch_size=4",
    "--set", "model.vision.hidden_size=16", "--set", "model.vision.num_layers=1",
    "--set", "model.vision.num_attention_heads=2", "--set", "model.vision.ffn_hidden_size=32",
    "--set", "model.moma.experts={image: 2, text: 2}", "--lr", "1e-3", "--seed", "5",
    "--transformer-impl", "local", "--log-interval", "1", "--set", "training.lr_decay_iters=6",
]


def _cli(argv):
    from megatron_vlm.training.cli import run

    return run(argv)


def _records(log_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(log_dir) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in _records(log_dir) if r.get("loss") is not None}


def test_resume_at_ep2_is_bit_exact_with_gumbel_noise(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    ep2 = TINY + ["--expert-model-parallel-size", "2"]
    run_distributed(_cli, 2, ep2 + ["--train-iters", "6", "--log-dir", str(full)])
    run_distributed(_cli, 2, ep2 + ["--train-iters", "3", "--log-dir", str(part), "--save", str(part / "ckpt")])
    run_distributed(_cli, 2, ep2 + ["--train-iters", "6", "--log-dir", str(part), "--load", str(part / "ckpt")])
    a, b = _losses(full), _losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[i] for i in range(1, 7)] == [b[i] for i in range(1, 7)]
    assert a[6] != a[1]
    record = _records(full)[-1]
    assert record["moma_expert_selection_rate"] and 0 < record["moma_image_token_frac"] < 1
    assert 0 <= record["moma_aux_acc"] <= 1 and record["moma_aux_bce"] > 0


def test_save_at_ep2_resume_at_ep1(tmp_path):
    no_noise = TINY + ["--set", "model.moma.gumbel_noise=false"]
    ep2 = no_noise + ["--expert-model-parallel-size", "2"]
    run_distributed(_cli, 2, ep2 + ["--train-iters", "4", "--log-dir", str(tmp_path / "full")])
    run_distributed(_cli, 2, ep2 + ["--train-iters", "2", "--log-dir", str(tmp_path / "a"),
                                    "--save", str(tmp_path / "ckpt")])
    run_distributed(_cli, 1, no_noise + ["--train-iters", "4", "--log-dir", str(tmp_path / "b"),
                                         "--load", str(tmp_path / "ckpt")])
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "b")
    assert sorted(resumed) == [3, 4]
    for it in (3, 4):
        assert abs(resumed[it] - full[it]) <= 1e-5 * abs(full[it]), (it, resumed[it], full[it])
