"""pretrain_vlm's code path for tests: a tiny mock-data command line and module-level workers for
``run_distributed`` (spawned ranks import them by name)."""

from __future__ import annotations

# 2 x 32-wide language layers, a 1-layer 16-wide ViT on 8 px images in 4 px patches (4 image tokens),
# sequence 24, vocab 128; local backend; mock data; 2 micro batches of 2 per iteration on one rank
TINY_ARGV = [
    "--data-path", "mock", "--micro-batch-size", "2", "--global-batch-size", "4", "--num-layers", "2",
    "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "48",
    "--seq-length", "24", "--vocab-size", "128", "--set", "model.vision.image_size=8",
    "--set", "model.vision.patch_size=4", "--set", "model.vision.hidden_size=16",
    "--set", "model.vision.num_layers=1", "--set", "model.vision.num_attention_heads=2",
    "--set", "model.vision.ffn_hidden_size=32", "--lr", "1e-3", "--seed", "3", "--transformer-impl", "local",
    "--log-interval", "1",
]


def pretrain(argv: list[str]) -> int:
    """``pretrain_vlm.py argv`` in this (spawned) rank; returns its exit code."""
    from megatron_vlm.training.cli import run

    return run(argv)


def check_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """``pretrain_vlm.py``'s checks (parse + validate, nothing built) in this process: (exit code,
    stderr captured by pytest's ``capsys``)."""
    from megatron_vlm.training import cli

    try:
        out = cli.check_command_line(argv)
        rc = out if isinstance(out, int) else 0
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def read_checkpoint(load: str) -> dict:
    """Every model tensor of a checkpoint (any layout) by its TP=1 name."""
    from megatron_vlm.conversion.megatron_io import MegatronReader

    reader = MegatronReader(load)
    return {k: reader.get(k) for k in reader.model_keys()}
