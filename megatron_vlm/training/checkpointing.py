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
                    keep_last: int | None = None, sharded_strategy=None) -> Path:
    """Write ``iter_{iteration}`` atomically and point ``latest`` at it. Collective over all ranks.
    (The arch's layer metadata, e.g. ``non_homogeneous_layers``, comes from the model itself.)
    ``sharded_strategy``: a megatron save strategy other than its default torch_dist one (e.g. the
    conversion's in-process ``megatron_io.streaming_save``)."""
    save_dir = Path(save_dir)
    final, tmp = iteration_dir(save_dir, iteration), save_dir / f".tmp_iter_{iteration:07d}"
    if sharded_strategy is None:  # megatron's default writer; a custom one brings its own
        _writer_manager_dies_with_this_process()
    if _rank0():
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    fault_point("save_begin", iteration)
    metadata = dict(OPTIM_METADATA, **unwrap(model_chunks[0]).arch.checkpoint_metadata())
    sharded = _model_sharded_state_dict(model_chunks, metadata)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=metadata)
    sharded["rng_state"] = _rng_sharded_object(_rng_state())
    dist_checkpointing.save(sharded, str(tmp), sharded_strategy=sharded_strategy, content_metadata=metadata)
    fault_point("save_written", iteration)
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
        fault_point("save_renamed", iteration)
        latest_tmp = save_dir / (LATEST + ".tmp")
        latest_tmp.write_text(str(iteration))
        os.replace(latest_tmp, save_dir / LATEST)
        fault_point("save_latest", iteration)
        if keep_last:
            prune(save_dir, keep_last, iteration)
    _barrier()
    return final


def prune(save_dir: str | Path, keep_last: int, current: int) -> list[Path]:
    """Keep ``current`` (the checkpoint just written, never removed) and the newest ``keep_last - 1``
    checkpoints before it; remove older ones. Checkpoints numbered above ``current`` (left by a
    run killed before it updated ``latest``) are left alone: this run overwrites them when it gets
    there. Returns the removed folders."""
    older = sorted(p for p in Path(save_dir).glob("iter_*") if p.is_dir() and _iter_of(p) is not None
                   and _iter_of(p) < current)
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _iter_of(path: Path) -> int | None:
    digits = path.name[len("iter_"):]
    return int(digits) if digits.isdigit() else None


def existing_checkpoints(save_dir: str | Path) -> list[int]:
    """Iterations of the complete checkpoints (``iter_*`` folders) in ``save_dir``."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    return sorted(i for p in root.glob("iter_*") if p.is_dir() and (i := _iter_of(p)) is not None)


# ------------------------------------------------------------------------------------------------
# Test-only fault injection
# ------------------------------------------------------------------------------------------------

FAULT_ENV = "MEGATRON_VLM_TEST_KILL_AT"  # tests only: "RANK:POINT:ITERATION" -> that rank SIGKILLs itself


def fault_point(point: str, iteration: int) -> None:
    """FOR TESTS ONLY (tests/distributed/test_faults.py): when ``$MEGATRON_VLM_TEST_KILL_AT`` is
    ``RANK:POINT:ITERATION`` and this is that rank, point and iteration, the process SIGKILLs itself
    (no cleanup, like a node failure). Points: ``forward``, ``optimizer`` (trainer), ``save_begin``,
    ``save_written``, ``save_renamed``, ``save_latest`` (:func:`save_checkpoint`). Unset: a no-op."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if spec == f"{rank}:{point}:{iteration}":
        import signal
        import sys

        print(f"fault injection: rank {rank} killed at {point} of iteration {iteration}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# dist_checkpointing's writer helper process
# ------------------------------------------------------------------------------------------------

_manager = None


def _writer_manager_dies_with_this_process() -> None:
    """megatron's torch_dist writer collects results through a ``multiprocessing`` Manager (a
    spawned server process, plus the resource tracker). Started by megatron, the Manager outlives a
    rank killed during a save and keeps the launcher's output pipes open, so ``mpirun`` never
    returns. Start it ourselves with the parent-death signal set, before megatron's first save."""
    global _manager
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", "absent") is not None:  # already made, or not this megatron
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron_vlm.process_guard import die_with_parent

    _manager = SyncManager(ctx=mp.get_context("spawn"))
    _manager.start(initializer=die_with_parent)  # a light module: the spawned server imports it
    fa._results_queue = _manager.Queue()


# ------------------------------------------------------------------------------------------------
# --save folder lock
# ------------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"


class SaveDirLocked(RuntimeError):
    pass


class SaveLock:
    """An exclusive ``flock`` on ``SAVE_DIR/.lock`` held by rank 0 for the whole run (released by
    the kernel when the process ends, however it ends). The file names the holder."""

    def __init__(self, save_dir: str | Path):
        import fcntl
        import socket
        import time

        self.path = Path(save_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = Path(self.path).read_text().strip() or "another process"
            os.close(self._fd)
            raise SaveDirLocked(f"--save {save_dir}: in use by another job ({holder}); wait for it to end "
                                f"or pick another --save folder") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------------------------------------------
# Checks before building (one-line errors)
# ------------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: one line naming the folder/file and why."""


def check_files(ckpt: str | Path) -> None:
    """Every file of checkpoint folder ``ckpt`` is readable and as long as its metadata says
    (a truncated or missing file is named); cheap: reads metadata only."""
    import pickle

    ckpt = Path(ckpt)
    for name in ("state.json", "metadata.json"):
        f = ckpt / name
        if f.is_file():
            try:
                json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                raise CheckpointError(f"{f}: truncated or corrupt (not valid JSON)") from None
    f = ckpt / "config.yaml"
    if f.is_file():
        try:
            yaml.safe_load(f.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            raise CheckpointError(f"{f}: truncated or corrupt (not valid YAML)") from None
    meta = ckpt / ".metadata"
    if not meta.is_file():
        raise CheckpointError(f"{ckpt}: no .metadata file (not a complete dist checkpoint)")
    try:
        with open(meta, "rb") as fh:
            metadata = pickle.load(fh)
    except Exception:
        raise CheckpointError(f"{meta}: truncated or corrupt") from None
    needed: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the checkpoint's metadata lists it)")
        size = f.stat().st_size
        if size < end:
            raise CheckpointError(f"{f}: truncated ({size} bytes, the metadata needs {end})")
    common = ckpt / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=False)
        except Exception:
            raise CheckpointError(f"{common}: truncated or corrupt") from None


# config keys that decide parameter shapes: a checkpoint loads only into the same values
SHAPE_KEYS_LANGUAGE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                       "ffn_hidden_size", "vocab_size")
SHAPE_KEYS_VISION = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "image_size",
                     "patch_size", "add_class_token")


def config_mismatches(saved: dict, config) -> list[str]:
    """``field: checkpoint X, this run Y`` for every shape-deciding model setting that differs
    between a checkpoint's ``config.yaml`` (``saved``) and ``config`` (empty: compatible)."""
    if not saved or "model" not in saved:
        return []
    ours, theirs = config.to_dict()["model"], saved["model"]
    out = []

    def cmp(path, a, b):
        if a != b:
            out.append(f"model.{path}: checkpoint {a!r}, this run {b!r}")

    cmp("arch", theirs.get("arch"), ours["arch"])
    if theirs.get("arch") != ours["arch"]:
        return out
    cmp("projector", theirs.get("projector", ours["projector"]), ours["projector"])
    tl, ol = theirs.get("language", {}), ours["language"]
    for k in SHAPE_KEYS_LANGUAGE:
        if k in tl:
            cmp(f"language.{k}", tl[k], ol[k])
    tv = theirs.get("vision", [])
    tv = [tv] if isinstance(tv, dict) else tv
    ov = ours["vision"]
    if len(tv) != len(ov):
        out.append(f"model.vision: checkpoint has {len(tv)} encoder(s), this run {len(ov)}")
    else:
        for i, (a, b) in enumerate(zip(tv, ov)):
            where = "vision" if len(ov) == 1 else f"vision.{i}"
            if (a.get("hf_config") is None) != (b.get("hf_config") is None):
                out.append(f"model.{where}.hf_config: checkpoint {'set' if a.get('hf_config') else 'none'}, "
                           f"this run {'set' if b.get('hf_config') else 'none'}")
                continue
            for k in SHAPE_KEYS_VISION + (("name", "generalist") if len(ov) > 1 else ()):
                if k in a and b.get("hf_config") is None:
                    cmp(f"{where}.{k}", a[k], b[k])
    if len(ov) > 1:  # the fusion's parameters follow its method / space / heads / router width
        tf, of = theirs.get("fusion", {}), ours["fusion"]
        for k in ("method", "space", "heads", "router", "router_hidden_size"):
            if k in tf:
                cmp(f"fusion.{k}", tf[k], of[k])
    return out


def read_config(load_dir: str | Path, iteration: int | None = None) -> dict:
    iteration = read_latest(load_dir) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"{load_dir}: no '{LATEST}' file: not a checkpoint directory")
    path = iteration_dir(load_dir, iteration) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def load_checkpoint(load_dir: str, model_chunks: list, optimizer=None, opt_param_scheduler=None,
                    strict: bool = True, load_rng: bool = True, iteration: int | None = None) -> dict:
    """Load ``latest`` (or ``iteration``) into the model chunks (and optimizer), resharding to
    the current TP/PP. Returns ``{"iteration", "extra", "config", "optimizer_loaded"}`` (False: the
    optimizer keeps its state; for bf16/fp16 call its ``reload_model_params()``). Collective."""
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
    return {"iteration": iteration, "extra": meta.get("extra", {}), "config": read_config(load_dir, iteration),
            "optimizer_loaded": "optimizer" in sharded}
