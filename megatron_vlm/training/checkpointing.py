"""Checkpoints with megatron ``dist_checkpointing`` (torch_dist), atomic and reshardable.

On-disk layout::

    SAVE_DIR/
      latest                   text: the iteration of the last COMPLETE checkpoint
      iter_0000100/            dist_checkpointing dir: model (+ optimizer, RNG per rank)
        config.yaml            the resolved Config
        state.json             iteration, scheduler state, data position, extra
      .tmp_iter_0000200/       being written; renamed to iter_0000200 only when complete

Loading reshards to the current TP/PP (megatron does it); the optimizer uses the
``fully_reshardable`` distributed-optimizer format so it follows the model to any layout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_vlm.training.step import unwrap

LATEST = "latest"
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def read_latest(load_dir: str | Path) -> int | None:
    f = Path(load_dir) / LATEST
    if not f.is_file():
        return None
    text = f.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{f}: expected an iteration number, found {text!r}")
    return int(text)


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _model_sharded_state_dict(model_chunks: list, metadata: dict) -> dict:
    chunks = [unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    out = {}
    for i, c in enumerate(chunks):
        parallel_state.set_virtual_pipeline_model_parallel_rank(i)
        out[f"model{i}"] = c.sharded_state_dict(metadata=metadata)
    return out


def _rng_state() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size()}


def _rng_sharded_object(state: dict | None) -> ShardedObject:
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject("rng_state", state, (pp_size, tp_size), (pp, tp), replica_id=dp)


def save_checkpoint(save_dir: str, iteration: int, model_chunks: list, optimizer=None,
                    opt_param_scheduler=None, config=None, extra: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Write ``iter_{iteration}`` atomically and point ``latest`` at it. Collective over all ranks.
    (The arch's layer metadata, e.g. ``non_homogeneous_layers``, comes from the model itself.)"""
    save_dir = Path(save_dir)
    final, tmp = iteration_dir(save_dir, iteration), save_dir / f".tmp_iter_{iteration:07d}"
    if _rank0():
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    metadata = dict(OPTIM_METADATA, **unwrap(model_chunks[0]).arch.checkpoint_metadata())
    sharded = _model_sharded_state_dict(model_chunks, metadata)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=metadata)
    sharded["rng_state"] = _rng_sharded_object(_rng_state())
    dist_checkpointing.save(sharded, str(tmp), content_metadata=metadata)
    if _rank0():
        state = {"iteration": iteration, "extra": extra or {}, "layout": _layout(),
                 "has_optimizer": optimizer is not None,  # False: model-only (e.g. converted from HF)
                 "scheduler": opt_param_scheduler.state_dict() if opt_param_scheduler else None}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if config is not None:
            (tmp / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = save_dir / (LATEST + ".tmp")
        latest_tmp.write_text(str(iteration))
        os.replace(latest_tmp, save_dir / LATEST)
        if keep_last:
            _prune(save_dir, keep_last)
    _barrier()
    return final


def _prune(save_dir: Path, keep_last: int) -> None:
    iters = sorted(p for p in save_dir.glob("iter_*") if p.is_dir())
    for old in iters[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_config(load_dir: str | Path, iteration: int | None = None) -> dict:
    iteration = read_latest(load_dir) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"{load_dir}: no '{LATEST}' file: not a checkpoint directory")
    path = iteration_dir(load_dir, iteration) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def load_checkpoint(load_dir: str, model_chunks: list, optimizer=None, opt_param_scheduler=None,
                    strict: bool = True, load_rng: bool = True, iteration: int | None = None) -> dict:
    """Load ``latest`` (or ``iteration``) into the model chunks (and optimizer), resharding to
    the current TP/PP. Returns ``{"iteration", "extra", "config"}``. Collective."""
    iteration = read_latest(load_dir) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"--load {load_dir}: no '{LATEST}' file: not a checkpoint directory")
    ckpt = iteration_dir(load_dir, iteration)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--load {load_dir}: {LATEST} names iteration {iteration} but {ckpt} is missing")
    metadata = dist_checkpointing.load_content_metadata(str(ckpt)) or dict(OPTIM_METADATA)
    sharded = _model_sharded_state_dict(model_chunks, metadata)
    meta = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
    if optimizer is not None and meta.get("has_optimizer", True):  # model-only: fresh optimizer
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)
    if load_rng and meta.get("layout") == _layout():  # RNG streams belong to a TP/PP position
        sharded["rng_state"] = _rng_sharded_object(None)
    state = dist_checkpointing.load(sharded, str(ckpt))
    chunks = [unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"], strict=strict)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"], strict=strict)
    if "optimizer" in sharded:
        optimizer.load_state_dict(state["optimizer"])
    rng = state.get("rng_state")
    if rng is not None:
        random.setstate(rng["random"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    if opt_param_scheduler is not None and meta.get("scheduler"):
        opt_param_scheduler.load_state_dict(meta["scheduler"])
    return {"iteration": iteration, "extra": meta.get("extra", {}), "config": read_config(load_dir, iteration)}
