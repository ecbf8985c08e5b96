"""Command line of ``pretrain_vlm.py``: parse and validate everything before any rank builds a
model, then initialise the runtime and train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_vlm import config as config_mod
from megatron_vlm.config import Config, ConfigError, validate
from megatron_vlm.runtime.launcher_env import detect

VOCAB_MULTIPLE = 128  # padded vocab stays divisible by any power-of-two TP up to 128, at any TP


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.cli_errors import OneLineArgumentParser

    parser = OneLineArgumentParser(
        prog="pretrain_vlm.py", description="Train a vision-language model on megatron-core. Flags "
        "override the YAML config (--config); --set KEY=VALUE overrides both; unset flags keep its values.")
    return config_mod.add_arguments(parser)


def padded_vocab_size(tokenizer_vocab: int) -> int:
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_load(cfg: Config, rank: int = 0) -> None:
    """``--load DIR`` must hold a checkpoint, except in the auto-resume idiom ``--save DIR --load DIR``
    (same directory), where an empty one means: first launch, start from scratch."""
    from megatron_vlm.training.checkpointing import read_latest

    t = cfg.training
    if not t.load:
        return
    if Path(t.load).exists() and not Path(t.load).is_dir():
        raise ConfigError(f"--load {t.load}: not a folder (a checkpoint folder holds 'latest' and iter_*/)")
    iteration = read_latest(t.load)
    if iteration is not None:
        check_checkpoint(cfg, iteration)
        return
    if t.save and Path(t.save).resolve() == Path(t.load).resolve():
        if t.finetune:
            raise ConfigError(f"--finetune --load {t.load}: no checkpoint there to start from")
        if rank == 0:
            print(f"pretrain_vlm.py: no checkpoint in {t.load} yet: starting from scratch", flush=True)
        t.load = None
        return
    raise FileNotFoundError(f"--load {t.load}: no checkpoint there (no 'latest' file); to start fresh "
                            f"and resume automatically later, pass the same directory to --save and --load")


def check_checkpoint(cfg: Config, iteration: int) -> None:
    """The checkpoint ``latest`` names exists, is intact and fits this run's model (one line each)."""
    from megatron_vlm.training import checkpointing as ck

    t = cfg.training
    folder = ck.iteration_dir(t.load, iteration)
    if not folder.is_dir():
        raise ConfigError(f"--load {t.load}: 'latest' names iteration {iteration} but {folder.name}/ is missing; "
                          f"write an existing iteration into {Path(t.load) / ck.LATEST} or remove that file")
    ck.check_files(folder)
    diffs = ck.config_mismatches(ck.read_config(t.load, iteration), cfg)
    if diffs:
        raise ConfigError(f"--load {folder}: the checkpoint's model differs from this run's: " + "; ".join(diffs))


def check_data_position(cfg: Config, spec, world_size: int) -> None:
    """Resuming (``--load`` without ``--finetune``) restores the data position: it must be one of
    this dataset. A position from mock data, or beyond this dataset's epoch, means another dataset."""
    import json

    from megatron_vlm.training import checkpointing as ck

    t, p = cfg.training, cfg.parallel
    if not t.load or t.finetune:
        return
    iteration = ck.read_latest(t.load)
    state_file = ck.iteration_dir(t.load, iteration) / "state.json"
    if not state_file.is_file():
        return
    data = json.loads(state_file.read_text()).get("extra", {}).get("data") or {}
    if not data:
        return
    hint = ("to train these weights on another dataset pass --finetune (iteration 0, fresh optimizer and "
            "data position)")
    where = f"--load {t.load} (iteration {iteration})"
    if spec.mock:
        if "consumed" not in data:
            raise ConfigError(f"{where}: its data position is for a shard dataset, not --data-path mock; {hint}")
        return
    if "train" not in data:
        raise ConfigError(f"{where}: its data position is for mock data, not --data-path {spec.data_path}; {hint}")
    from megatron_vlm.data.shards import list_shards

    dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)
    mbs = t.micro_batch_size
    samples = sum(s.num_samples for s in list_shards(Path(spec.data_path) / "train"))
    per_epoch = (samples // dp) // mbs * mbs * dp
    state = data["train"]
    consumed = int(state.get("samples_consumed", 0))
    if consumed > per_epoch:
        raise ConfigError(f"{where}: its data position ({consumed} samples into epoch {state.get('epoch')}) is "
                          f"beyond one epoch of --data-path {spec.data_path} ({per_epoch} samples at micro batch "
                          f"{mbs} x {dp} data-parallel ranks); {hint}")


def _check_writable_folder(flag: str, value: str | None) -> None:
    from megatron_vlm.cli_errors import check_output_folder

    try:
        check_output_folder(flag, value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_outputs(cfg: Config, resuming_from_save: bool) -> None:
    """``--save`` and ``--log-dir`` can be written, and a run that does not resume from its
    ``--save`` folder does not write into one holding another run's checkpoints."""
    from megatron_vlm.training import checkpointing as ck

    t = cfg.training
    _check_writable_folder("--save", t.save)
    _check_writable_folder("--log-dir", t.log_dir)
    if t.finetune and resuming_from_save and t.load:
        raise ConfigError(f"--finetune --load {t.load} --save {t.save}: --finetune starts a new run at iteration 0, "
                          f"so --save must be another folder (to continue a fine-tuning run, drop --finetune)")
    if t.save and not resuming_from_save:
        iters = ck.existing_checkpoints(t.save)
        if iters or (Path(t.save) / ck.LATEST).is_file():
            found = f"iter_{iters[-1]:07d}" if iters else "a 'latest' file"
            raise ConfigError(f"--save {t.save}: already holds checkpoints ({found}); to continue that run pass "
                              f"--load {t.save} too, else pick an empty --save folder")


def prepare(argv=None) -> tuple[Config, object]:
    """Config + data description, validated. Raises ConfigError/FileNotFoundError (one line)."""
    from megatron_vlm.training.data_adapter import DataSpec

    args = build_parser().parse_args(argv)
    cfg = config_mod.from_args(args)
    launch = detect()
    spec = DataSpec.from_config(cfg)  # checks paths, loads the tokenizer (cheap)
    config_mod._positive("model.language.vocab_size", cfg.model.language.vocab_size)  # before raising it
    if spec.tokenizer_vocab_size is not None:
        needed = padded_vocab_size(spec.tokenizer_vocab_size)
        cfg.model.language.vocab_size = max(cfg.model.language.vocab_size, needed)
    if cfg.model.image_token_id is None and spec.image_token_id is not None:
        cfg.model.image_token_id = spec.image_token_id
    validate(cfg, world_size=launch.world_size, machine=True)  # core, arch, backend/FP8 rules
    t = cfg.training
    resuming_from_save = bool(t.save and t.load and Path(t.save).resolve() == Path(t.load).resolve())
    check_load(cfg, launch.rank)
    check_data_position(cfg, spec, launch.world_size)
    check_outputs(cfg, resuming_from_save)
    return cfg, spec


def check_command_line(argv=None):
    """Everything ``run`` does before starting the runtime: ``(cfg, spec)``, or exit code 2 after
    rank 0 printed the one-line error (argparse errors exit 2 themselves, with one line). Writes
    nothing."""
    try:
        return prepare(argv)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if detect().rank == 0:
            print(f"pretrain_vlm.py: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2


def run(argv=None) -> int:
    launch = detect()
    checked = check_command_line(argv)
    if isinstance(checked, int):
        return checked
    cfg, spec = checked

    from megatron_vlm import runtime
    from megatron_vlm.training.data_adapter import TrainingData
    from megatron_vlm.training.trainer import TrainingError, train

    p = cfg.parallel
    runtime.initialize(tensor_model_parallel_size=p.tensor_model_parallel_size,
                       pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                       virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
                       expert_model_parallel_size=p.expert_model_parallel_size,
                       context_parallel_size=p.context_parallel_size, seed=cfg.training.seed)
    lock = None
    try:
        lock, error = _lock_save_dir(cfg)
        if error is not None:
            if launch.rank == 0:
                print(f"pretrain_vlm.py: error: {error}", file=sys.stderr, flush=True)
            return 2
        data = TrainingData(cfg, spec)
        train(cfg, data)
    except TrainingError as e:
        if launch.rank == 0:
            print(f"pretrain_vlm.py: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        runtime.shutdown()
        if lock is not None:
            lock.release()
    return 0


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _lock_save_dir(cfg: Config):
    """Rank 0 locks ``--save`` for the run; every rank learns whether it could (collective).
    Returns ``(lock or None, error message or None)``."""
    import torch

    from megatron_vlm.training.checkpointing import SaveDirLocked, SaveLock

    if not cfg.training.save:
        return None, None
    lock, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            lock = SaveLock(cfg.training.save)
        except SaveDirLocked as e:
            error = str(e)
    flag = torch.tensor([0.0 if error is None else 1.0], device=torch.cuda.current_device())
    torch.distributed.all_reduce(flag)
    if flag.item() > 0 and error is None:
        error = f"--save {cfg.training.save}: in use by another job"
    return lock, error
