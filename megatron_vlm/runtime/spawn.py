"""Run a function on N local ranks (spawned processes) and collect what each returns: the
converter's ``verify`` started as one process spawns its TP ranks with it, and the tests use it
for their gloo worlds (``megatron_vlm.testing.distributed``).

    from megatron_vlm.runtime.spawn import run_distributed

    def _case(tp):                      # module level, so spawned processes can import it
        ctx = runtime.initialize(tensor_model_parallel_size=tp)
        ...
        return {"loss": loss.item()}

    results = run_distributed(_case, world_size=2, tp=2)   # [rank0's return, rank1's return]

Each rank is a fresh ``spawn``ed process with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` set as torchrun would; an exception on any rank is re-raised in the
caller with that rank's traceback. Return values must be picklable (CPU tensors are fine).
"""

from __future__ import annotations

import os
import queue as queue_mod
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_vlm.runtime.launcher_env import free_port


class SpawnError(RuntimeError):
    """A rank failed (its traceback is in the message), died, or timed out."""


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict,
            results, threads: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(threads)
    try:
        out = fn(*args, **kwargs)
        results.put((rank, "ok", out))
    except BaseException:  # report any failure, including SystemExit, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_vlm import runtime

            runtime.shutdown()
        except Exception:
            pass


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 600,
                    threads: int = 1, **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, results, threads),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size and not errors:
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in collected and p.exitcode is not None]
                if dead:  # died without reporting (os._exit, signal, crash in C code)
                    time.sleep(0.5)  # a report may still be in flight
                    if results.empty():
                        errors.append(f"ranks {dead} exited with codes "
                                      f"{[procs[r].exitcode for r in dead]} without a result")
                elif time.monotonic() > deadline:
                    raise SpawnError(
                        f"timed out after {timeout}s waiting for ranks "
                        f"{sorted(set(range(world_size)) - set(collected))}") from None
                continue
            if status == "ok":
                collected[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors or len(collected) < world_size else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise SpawnError("\n".join(errors))
    return [collected[r] for r in range(world_size)]
