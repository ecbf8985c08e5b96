"""pretrain_vlm's training loop on gloo ranks with mock data: bit-exact resume, resharding loads,
crash-safe checkpoints, TP/PP loss parity, NaN skipping, SIGTERM, and flag errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_vlm.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "--data-path", "mock", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--ffn-hidden-size", "96", "--seq-length", "32", "--vocab-size", "256",
    "--set", "model.vision.image_size=16", "--set", "model.vision.patch_size=4",
    "--set", "model.vision.hidden_size=32", "--set", "model.vision.ffn_hidden_size=64",
    "--lr", "1e-3", "--lr-warmup-iters", "2", "--seed", "11", "--log-interval", "1",
]


def _losses(log_dir) -> dict[int, float]:
    out = {}
    for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None:
            out[rec["iteration"]] = rec["loss"]
    return out


def _cli(argv):
    from megatron_vlm.training.cli import run

    return run(argv)


def _eval_loss(argv):
    """Build the model for argv's layout, load --load, return the eval loss on mock val data."""
    from megatron_vlm import runtime
    from megatron_vlm.training import checkpointing
    from megatron_vlm.training.cli import prepare
    from megatron_vlm.training.data_adapter import TrainingData
    from megatron_vlm.training.step import build_model_chunks
    from megatron_vlm.training.trainer import evaluate

    cfg, spec = prepare(argv)
    p = cfg.parallel
    runtime.initialize(tensor_model_parallel_size=p.tensor_model_parallel_size,
                       pipeline_model_parallel_size=p.pipeline_model_parallel_size, seed=cfg.training.seed)
    chunks = build_model_chunks(cfg)
    checkpointing.load_checkpoint(cfg.training.load, chunks, load_rng=False)
    data = TrainingData(cfg, spec)
    dp = 1
    num_mb = cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp)
    return evaluate(chunks, data.val_batches(num_mb, 2), cfg.model.language.seq_length)["eval_loss"]


def test_resume_is_bit_exact(tmp_path):
    """2k iterations in one run == k iterations, stop, resume for k (DP=2, distributed optimizer)."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_distributed(_cli, 2, TINY + ["--train-iters", "6", "--log-dir", str(full)])
    run_distributed(_cli, 2, TINY + ["--train-iters", "3", "--log-dir", str(part), "--save", str(part / "ckpt"),
                                     "--set", "training.lr_decay_iters=6"])
    assert (part / "ckpt" / "latest").read_text() == "3"
    run_distributed(_cli, 2, TINY + ["--train-iters", "6", "--log-dir", str(part), "--load", str(part / "ckpt"),
                                     "--set", "training.lr_decay_iters=6"])
    a, b = _losses(full), _losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[i] for i in range(1, 7)] == [b[i] for i in range(1, 7)]
    assert a[6] != a[1]  # it trained


def test_resume_with_dali_data_is_bit_exact(tmp_path):
    """Same as above on real shards through DALI (cross_attention arch, DP=2, launched the Megatron
    way with the same --save/--load each time): the data position is part of the checkpoint. 24 train samples = 6 micro batches per rank per epoch, so the resumed
    run (from iteration 5 of 8) also crosses an epoch boundary."""
    from megatron_vlm.data import synthetic

    data = tmp_path / "shapes"
    synthetic.prepare(data, num_train=24, num_val=8, image_size=16, shard_size=8, vocab_size=300)
    argv = TINY + ["--data-path", str(data), "--arch", "cross_attention", "--set", "training.lr_decay_iters=8",
                   "--set", "data.num_threads=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_distributed(_cli, 2, argv + ["--train-iters", "8", "--log-dir", str(full)])
    # the auto-resume idiom: the same --save/--load on every launch (the first finds no checkpoint)
    resume = ["--log-dir", str(part), "--save", str(part / "ckpt"), "--load", str(part / "ckpt")]
    run_distributed(_cli, 2, argv + ["--train-iters", "5"] + resume)
    assert (part / "ckpt" / "latest").read_text() == "5"
    run_distributed(_cli, 2, argv + ["--train-iters", "8"] + resume)
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[i] for i in range(1, 9)] == [b[i] for i in range(1, 9)]
    assert len(set(a.values())) == 8  # different batches every iteration


def test_save_tp2_load_tp1_and_pp2(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_distributed(_cli, 2, TINY + ["--train-iters", "2", "--tensor-model-parallel-size", "2",
                                     "--save", str(ckpt)])
    base = TINY + ["--train-iters", "2", "--load", str(ckpt)]
    (tp2_a, tp2_b) = run_distributed(_eval_loss, 2, base + ["--tensor-model-parallel-size", "2"])
    (tp1,) = run_distributed(_eval_loss, 1, base)
    pp2 = run_distributed(_eval_loss, 2, base + ["--pipeline-model-parallel-size", "2"])
    assert tp2_a == tp2_b
    for value in [tp1] + pp2:
        assert abs(value - tp2_a) <= 1e-5 * abs(tp2_a), (value, tp2_a)


def _crash_during_save(argv):
    """Train with saves; the second save dies half-way (process killed inside dist_checkpointing)."""
    from megatron.core import dist_checkpointing

    from megatron_vlm.training import checkpointing

    real_save = dist_checkpointing.save
    calls = {"n": 0}

    def dying_save(sharded, path, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path, "partial.distcp").write_bytes(b"half a shard")
            os._exit(17)  # like SIGKILL: no cleanup, no exception handlers
        return real_save(sharded, path, **kw)

    checkpointing.dist_checkpointing.save = dying_save
    return _cli(argv)


def test_kill_during_checkpoint_keeps_previous_latest(tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = TINY + ["--train-iters", "4", "--save", str(ckpt), "--save-interval", "2"]
    with pytest.raises(Exception):
        run_distributed(_crash_during_save, 1, argv, timeout=120)
    assert (ckpt / "latest").read_text() == "2"
    assert (ckpt / "iter_0000002").is_dir() and not (ckpt / "iter_0000004").exists()
    assert (ckpt / ".tmp_iter_0000004").is_dir()  # the half-written one stays invisible
    (loss,) = run_distributed(_eval_loss, 1, TINY + ["--train-iters", "4", "--load", str(ckpt)])
    assert loss == loss and loss > 0
    # and training resumes from it, overwriting the stale temporary directory
    run_distributed(_cli, 1, argv + ["--load", str(ckpt)])
    assert (ckpt / "latest").read_text() == "4" and not (ckpt / ".tmp_iter_0000004").exists()


def test_tp2_and_pp2_losses_match_tp1(tmp_path):
    """Same starting weights (a TP=1 checkpoint), same data: the next iterations' losses agree with
    dropout 0.0; --hidden-dropout 0.1 at the same seed changes them."""
    start = tmp_path / "start"
    run_distributed(_cli, 1, TINY + ["--train-iters", "1", "--save", str(start)])
    common = TINY + ["--train-iters", "4", "--load", str(start), "--attention-dropout", "0.0"]
    no_dropout = ["--hidden-dropout", "0.0"]
    runs = {"tp1": (1, no_dropout), "tp2": (2, no_dropout + ["--tensor-model-parallel-size", "2"]),
            "pp2": (2, no_dropout + ["--pipeline-model-parallel-size", "2"]),
            "tp1_dropout": (1, ["--hidden-dropout", "0.1"])}
    losses = {}
    for name, (world, extra) in runs.items():
        run_distributed(_cli, world, common + extra + ["--log-dir", str(tmp_path / name)])
        losses[name] = _losses(tmp_path / name)
    assert sorted(losses["tp1"]) == sorted(losses["tp1_dropout"]) == [2, 3, 4]
    for name in ("tp2", "pp2"):
        for it, ref in losses["tp1"].items():
            assert abs(losses[name][it] - ref) <= 1e-5 * abs(ref), (name, it, losses[name][it], ref)
    for it, ref in losses["tp1"].items():
        assert abs(losses["tp1_dropout"][it] - ref) > 1e-4 * abs(ref), (it, losses["tp1_dropout"][it], ref)


def _nan_run(argv, nan_iterations):
    from megatron_vlm.training import trainer

    real = trainer.reduce_losses
    state = {"it": 0}

    def maybe_nan(*args):
        state["it"] += 1
        return float("nan") if state["it"] in nan_iterations else real(*args)

    trainer.reduce_losses = maybe_nan
    return _cli(argv)


def test_nan_steps_are_skipped_then_stop(tmp_path, capfd):
    ok = tmp_path / "ok"
    (rc,) = run_distributed(_nan_run, 1, TINY + ["--train-iters", "5", "--log-dir", str(ok)], {2, 4})
    assert rc == 0
    records = [json.loads(l) for l in (ok / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r.get("skipped")] == [2, 4]
    assert records[-1]["skipped_total"] == 2 and records[-1]["loss"] is not None
    bad = tmp_path / "bad"
    (rc,) = run_distributed(_nan_run, 1, TINY + ["--train-iters", "8", "--log-dir", str(bad),
                                                 "--max-bad-steps", "3"], {2, 3, 4, 5})
    assert rc == 3
    assert "NaN/Inf for 3 iterations in a row" in capfd.readouterr().err


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_vlm.py"), *TINY, "--train-iters", "100000",
                             "--save", str(ckpt), "--log-dir", str(logs)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((logs / "metrics.jsonl").is_file()
                                          and (logs / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "stop requested" in out
    last = max(_losses(logs))
    assert (ckpt / "latest").read_text() == str(last)
    assert (ckpt / f"iter_{last:07d}" / "state.json").is_file()


@pytest.mark.parametrize("flags, expected", [
    (["--tensor-model-parallel-size", "3"], "num_attention_heads=4: must be divisible by parallel.tensor_model_parallel_size=3"),
    (["--pipeline-model-parallel-size", "3"], "num_layers=4: must be divisible by parallel.pipeline_model_parallel_size=3"),
    (["--arch", "nope"], "model.arch='nope'"),
    (["--arch", "llava"], "model.arch='llava': allowed ['cross_attention', 'joint_decoder', 'mmca', 'moma', 'mot']"),
    (["--global-batch-size", "3"], "training.global_batch_size=3"),
    (["--fp8-format", "hybrid"], "--fp8-format hybrid: needs Transformer Engine"),
    (["--data-path", "/nonexistent/dir"], "--data-path /nonexistent/dir: no train/*.tar shards"),
    (["--set", "model.vision.image_size=3"], "model.vision.image_size=3: must be at least model.vision.patch_size=4"),
    (["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt: no checkpoint there"),
])
def test_bad_flags_fail_with_one_line_before_building(flags, expected):
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_vlm.py"), *TINY, "--train-iters", "1", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("pretrain_vlm.py: error:")]
    assert len(err) == 1 and expected in err[0], proc.stderr[-1500:]
    assert "model: arch=" not in proc.stdout  # no model was built
