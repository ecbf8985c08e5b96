"""Rank, world size and local rank from whichever launcher started this process.

Supported launchers (first match wins): torchrun / torch.distributed (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), Open MPI (``OMPI_COMM_WORLD_*``), MPICH / Intel MPI / PMI (``PMI_RANK``,
``PMI_SIZE``, ``MPI_LOCALRANKID``), Slurm (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``).
A plain ``python`` start is a world of one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", ("LOCAL_WORLD_SIZE",)),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", ("MPI_LOCALNRANKS",)),
    # SLURM_NTASKS_PER_NODE exists only with --ntasks-per-node; SLURM_TASKS_PER_NODE ("4(x2)") always
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
     ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")),
)

DEFAULT_PORT_BASE = 29500


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def single_node(self) -> bool:
        return self.local_world_size == self.world_size


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None:
        if default is None:
            raise RuntimeError(f"launcher variable {key} is not set")
        return default
    try:
        return int(str(value).split("(")[0].split(",")[0])
    except ValueError:
        raise RuntimeError(f"launcher variable {key}={value!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank/world/local rank from the launcher's environment variables."""
    env = os.environ if env is None else env
    for name, rank_key, world_key, local_key, local_world_keys in _LAUNCHERS:
        if rank_key in env and world_key in env:
            local_world_key = next((k for k in local_world_keys if k in env), local_world_keys[0])
            world = _int(env, world_key)
            rank = _int(env, rank_key)
            local_rank = _int(env, local_key, default=rank if name != "slurm" else 0)
            local_world = _int(env, local_world_key, default=world if local_key not in env else 0)
            if local_world == 0:  # local rank known but not the node's size: assume one node
                local_world = world
            if not 0 <= rank < world:
                raise RuntimeError(f"{rank_key}={rank} is outside the world of {world} ranks ({world_key})")
            return LaunchEnv(name, rank, world, local_rank, local_world)
    return LaunchEnv("none", 0, 1, 0, 1)


def agreed_port(launch: LaunchEnv, env: Mapping[str, str] | None = None) -> int:
    """A rendezvous port every rank of a single-node job agrees on.

    A world of one asks the OS for a free port (two single-process runs side by side never
    collide). Under an MPI launcher with mpi4py, rank 0 asks the OS for a free port and broadcasts
    it. Otherwise the port is derived from the job id (``PMIX_NAMESPACE``, ``SLURM_JOB_ID``, ...), so
    concurrent jobs on one node do not collide, or is 29500 without one.
    """
    env = os.environ if env is None else env
    if launch.world_size == 1:
        return free_port()
    if launch.launcher in ("openmpi", "mpich") and launch.world_size > 1:
        try:
            from mpi4py import MPI
        except Exception:  # no mpi4py or no MPI library: fall back to the job id
            MPI = None
        if MPI is not None:
            return MPI.COMM_WORLD.bcast(free_port() if launch.rank == 0 else None, root=0)
    for key in ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "SLURM_JOB_ID", "PMI_PORT", "PMI_FD"):
        if env.get(key):
            return DEFAULT_PORT_BASE + 1 + (_stable_hash(env[key]) % 20000)
    return DEFAULT_PORT_BASE


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stable_hash(text: str) -> int:
    h = 2166136261
    for ch in text.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h


def export_torch_env(launch: LaunchEnv, env: dict | None = None) -> dict:
    """Export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (what
    torch.distributed and megatron read). Multi-node jobs must give ``MASTER_ADDR``."""
    env = os.environ if env is None else env
    env["RANK"] = str(launch.rank)
    env["WORLD_SIZE"] = str(launch.world_size)
    env["LOCAL_RANK"] = str(launch.local_rank)
    env["LOCAL_WORLD_SIZE"] = str(launch.local_world_size)
    if "MASTER_ADDR" not in env:
        if not launch.single_node:
            raise RuntimeError(
                f"MASTER_ADDR is not set for a multi-node job ({launch.world_size} ranks, "
                f"{launch.local_world_size} per node, launcher {launch.launcher}): export "
                "MASTER_ADDR=<hostname of rank 0> (and optionally MASTER_PORT) for every rank"
            )
        env["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(agreed_port(launch, env))
    return env
