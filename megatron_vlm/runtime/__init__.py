"""Process-level runtime: launcher env -> torch.distributed -> megatron parallel_state -> seeds.

``initialize(...)`` is the one call every entry point makes::

    from megatron_vlm import runtime
    ctx = runtime.initialize(tensor_model_parallel_size=2, seed=1234)
    ...
    runtime.shutdown()
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_vlm.runtime.launcher_env import LaunchEnv, detect, export_torch_env


@dataclass(frozen=True)
class RuntimeContext:
    launch: LaunchEnv
    backend: str
    device: torch.device

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size


_context: RuntimeContext | None = None
# the launcher variables initialize() exported itself (absent before); shutdown() removes them, so
# that a later initialize in this process or a child process it starts picks its own again
_exported_env: list[str] = []
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> RuntimeContext:
    """Start torch.distributed (nccl on GPU, gloo on CPU), megatron model-parallel groups and the
    RNG tracker. On a machine without CUDA the CPU compatibility layer is applied first."""
    global _context
    from megatron.core import parallel_state, tensor_parallel

    launch = detect()
    absent = [key for key in TORCH_ENV if key not in os.environ]
    export_torch_env(launch)
    _exported_env.extend(key for key in absent if key in os.environ)
    cuda = has_cuda()
    if cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        from megatron_vlm.runtime import cpu

        cpu.apply()
        device = torch.device("cpu")
        backend = "gloo"

    from megatron_vlm.runtime import megatron_fixes

    megatron_fixes.apply()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if launch.world_size % mp:
        raise ValueError(
            f"world size {launch.world_size} is not divisible by tensor x pipeline x context parallel "
            f"= {tensor_model_parallel_size} x {pipeline_model_parallel_size} x {context_parallel_size}"
        )
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    set_seed(seed)
    _context = RuntimeContext(launch=launch, backend=backend, device=device)
    return _context


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch per pipeline stage and megatron's model-parallel RNG tracker
    (distinct TP streams for dropout inside TP regions, shared streams elsewhere)."""
    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def place(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` on this rank's device. With CUDA megatron-core allocates its parallel linears on
    the GPU while torch norms, the ViT conv, gates and wrapped HF towers are created on the host:
    the whole module is moved, as Megatron-LM's ``get_model`` does. Unchanged on CPU."""
    if torch.cuda.is_available():
        return module.cuda(torch.cuda.current_device())
    return module


def context() -> RuntimeContext:
    if _context is None:
        raise RuntimeError("megatron_vlm.runtime.initialize() has not been called")
    return _context


def shutdown() -> None:
    global _context
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _context = None
    for key in _exported_env:
        os.environ.pop(key, None)
    _exported_env.clear()
    stop_helper_processes()


def stop_helper_processes(timeout: float = 10.0) -> None:
    """End the helper processes this process started, so that none outlives it.

    megatron's dist_checkpointing writer (``filesystem_async``) keeps a multiprocessing 'spawn'
    Manager for its results queue for the life of the process, and spawning it starts
    multiprocessing's resource tracker; both used to exit only after this process had (the tracker
    when its pipe closes). Shut the Manager down and stop the resource tracker if this process
    started it and no child of ours still runs (``timeout``: how long the tracker may take).
    """
    import multiprocessing
    import signal
    import sys
    import time

    fs_async = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    queue = getattr(fs_async, "_results_queue", None)
    if queue is not None:
        fs_async._results_queue = None
        manager = getattr(queue, "_manager", None)
        if manager is not None:
            manager.shutdown()
    if multiprocessing.active_children():  # (also reaps finished ones)
        return  # children still running (e.g. data workers) share the tracker: leave it to them
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    with tracker._lock:
        fd, pid = getattr(tracker, "_fd", None), getattr(tracker, "_pid", None)
        if fd is None or pid is None:  # not started here (a spawned child inherits its parent's)
            return
        tracker._fd = tracker._pid = None
        os.close(fd)  # EOF on its pipe: it cleans up what is left registered and exits
        deadline = time.monotonic() + timeout
        try:
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:  # a process forked by someone else holds the pipe
                    os.kill(pid, signal.SIGTERM)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
        except ChildProcessError:  # already reaped
            pass
