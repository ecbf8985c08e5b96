"""Command line of ``pretrain_vlm.py``: parse and validate everything before any rank builds a
model, then initialise the runtime and train."""

from __future__ import annotations

import argparse
import sys

from megatron_vlm import config as config_mod
from megatron_vlm.config import Config, ConfigError, validate
from megatron_vlm.runtime.launcher_env import detect

VOCAB_MULTIPLE = 128  # padded vocab stays divisible by any power-of-two TP up to 128, at any TP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_vlm.py", description="Train a vision-language model on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return config_mod.add_arguments(parser)


def padded_vocab_size(tokenizer_vocab: int) -> int:
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_load(cfg: Config, rank: int = 0) -> None:
    """``--load DIR`` must hold a checkpoint, except in the auto-resume idiom ``--save DIR --load DIR``
    (same directory), where an empty one means: first launch, start from scratch."""
    from pathlib import Path

    from megatron_vlm.training.checkpointing import read_latest

    t = cfg.training
    if not t.load or read_latest(t.load) is not None:
        return
    if t.save and Path(t.save).resolve() == Path(t.load).resolve():
        if rank == 0:
            print(f"pretrain_vlm.py: no checkpoint in {t.load} yet: starting from scratch", flush=True)
        t.load = None
        return
    raise FileNotFoundError(f"--load {t.load}: no checkpoint there (no 'latest' file); to start fresh "
                            f"and resume automatically later, pass the same directory to --save and --load")


def prepare(argv=None) -> tuple[Config, object]:
    """Config + data description, validated. Raises ConfigError/FileNotFoundError (one line)."""
    from megatron_vlm.training.data_adapter import DataSpec

    args = build_parser().parse_args(argv)
    cfg = config_mod.from_args(args)
    launch = detect()
    spec = DataSpec.from_config(cfg)  # checks paths, loads the tokenizer (cheap)
    if spec.tokenizer_vocab_size is not None:
        needed = padded_vocab_size(spec.tokenizer_vocab_size)
        cfg.model.language.vocab_size = max(cfg.model.language.vocab_size, needed)
    if cfg.model.image_token_id is None and spec.image_token_id is not None:
        cfg.model.image_token_id = spec.image_token_id
    validate(cfg, world_size=launch.world_size, machine=True)  # core, arch, backend/FP8 rules
    check_load(cfg, launch.rank)
    return cfg, spec


def run(argv=None) -> int:
    launch = detect()
    try:
        cfg, spec = prepare(argv)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if launch.rank == 0:
            print(f"pretrain_vlm.py: error: {e}", file=sys.stderr, flush=True)
        return 2

    from megatron_vlm import runtime
    from megatron_vlm.training.data_adapter import TrainingData
    from megatron_vlm.training.trainer import TrainingError, train

    p = cfg.parallel
    runtime.initialize(tensor_model_parallel_size=p.tensor_model_parallel_size,
                       pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                       virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
                       expert_model_parallel_size=p.expert_model_parallel_size,
                       context_parallel_size=p.context_parallel_size, seed=cfg.training.seed)
    try:
        data = TrainingData(cfg, spec)
        train(cfg, data)
    except TrainingError as e:
        if launch.rank == 0:
            print(f"pretrain_vlm.py: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        runtime.shutdown()
    return 0
