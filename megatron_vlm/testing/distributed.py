"""Gloo worlds for tests: :func:`megatron_vlm.runtime.spawn.run_distributed`."""

from megatron_vlm.runtime.spawn import SpawnError as DistributedTestError
from megatron_vlm.runtime.spawn import run_distributed

__all__ = ["DistributedTestError", "run_distributed"]
