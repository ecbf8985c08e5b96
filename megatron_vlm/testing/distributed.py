"""Run a function on N gloo ranks (local processes) and collect what each returns.

    from megatron_vlm.testing.distributed import run_distributed

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
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_vlm.runtime.launcher_env import free_port


class DistributedTestError(RuntimeError):
    pass


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
    try:
        while len(collected) + len(errors) < world_size:
            try:
                rank, status, payload = results.get(timeout=timeout)
            except queue_mod.Empty:
                raise DistributedTestError(
                    f"timed out after {timeout}s waiting for ranks "
                    f"{sorted(set(range(world_size)) - set(collected))}") from None
            if status == "ok":
                collected[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # other ranks may now hang in a collective: stop them
    finally:
        for p in procs:
            p.join(timeout=5 if errors or len(collected) < world_size else 60)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise DistributedTestError("\n".join(errors))
    return [collected[r] for r in range(world_size)]
