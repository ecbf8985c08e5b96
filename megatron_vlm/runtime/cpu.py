"""CPU compatibility layer: lets real megatron-core modules, schedules, optimizers and MoE token
dispatchers run on a machine without CUDA (gloo backend).

Megatron-core is written for GPUs: it asks ``torch.cuda`` for the current device, RNG states,
streams and events, and allocates with ``device="cuda"``. Each entry of ``PATCHES`` below redirects
one such assumption to the CPU. The layer is

* applied only by :func:`megatron_vlm.runtime.initialize` when CUDA is absent (never on import),
* idempotent (``apply()`` twice is a no-op),
* guarded by the megatron-core version it was written and tested against,
* the only place in the project that touches ``torch.cuda`` or megatron-core internals.

``apply(skip=("name",))`` leaves patches out; the test suite uses it to show every patch is needed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

SUPPORTED_MEGATRON_CORE = ("0.16.1",)

_applied: set[str] = set()
_device_mode = None
CPU = torch.device("cpu")


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Maps ``device="cuda"`` / ``device=<int>`` of any torch call (factories, ``.to``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        d = kwargs.get("device")
        if d is not None and _is_cuda_device(d):
            kwargs = dict(kwargs, device=CPU)
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            if _is_cuda_device(args[1]):
                args = (args[0], CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _DummyStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: CPU execution is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _DummyStream()

    def record(self, *a, **k):
        pass

    def synchronize(self, *a, **k):
        pass

    def query(self):
        return True

    def wait(self, *a, **k):
        pass

    def elapsed_time(self, *a, **k):
        return 0.0


# --------------------------------------------------------------------------------------------
# The patches. Each names the megatron-core code it covers.
# --------------------------------------------------------------------------------------------


def _patch_current_device():
    """``torch.cuda.current_device()`` (~175 calls: buffers, RoPE, router, experts, schedules,
    ``GlobalMemoryBuffer.get_tensor``) and ``set_device``/``device_count``."""
    torch.cuda.current_device = lambda: CPU
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.device_count = lambda: 0


def _patch_device_args():
    """Literal ``device="cuda"``, ``.cuda()``, ``pin_memory``, ``record_stream``, e.g.
    ``pipeline_parallel/schedules.py``: ``torch.zeros(..., device="cuda")``."""
    global _device_mode
    _device_mode = _CudaToCpuMode()
    _device_mode.__enter__()  # stays active for the life of the process (main thread)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.Tensor.record_stream = lambda self, *a, **k: None


def _patch_rng():
    """``CudaRNGStatesTracker.add/fork`` and ``model_parallel_cuda_manual_seed`` read and set CUDA
    RNG states (``torch.cuda.get_rng_state``, ``random._get_cuda_rng_state/_set_cuda_rng_state``):
    map them to the CPU default generator, seeding it for real."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(*a, **k):
        return torch.get_rng_state()

    def set_state(state, *a, **k):
        torch.set_rng_state(state)

    torch.cuda.get_rng_state = get_state
    torch.cuda.set_rng_state = set_state
    torch.cuda.random.get_rng_state = get_state
    torch.cuda.random.set_rng_state = set_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    # with both streams on the CPU generator, every fork "changes the CPU RNG state": drop that
    # notice (one log line per dropout/noise fork otherwise)
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context")


def _patch_streams():
    """``torch.cuda.Stream/Event/stream/current_stream/synchronize``, used by the MoE all-to-all
    dispatcher, shared experts, DDP overlap and schedules."""
    torch.cuda.Stream = _DummyStream
    torch.cuda.Event = _DummyStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()
    torch.cuda.default_stream = lambda *a, **k: _DummyStream()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None


def _patch_moe_split_sizes():
    """``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)`` only converts CUDA tensors; the
    alltoall dispatcher's split sizes then stay tensors and ``all_to_all_single`` rejects them."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_te_general_gemm():
    """``moe_utils`` references ``te_general_gemm`` in the router GEMM; without TE it is undefined
    (NameError)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_tensor_type_strings():
    """``optimizer.py``/``distrib_optimizer.py``/``clip_grads.py`` test ``param.type()`` against
    ``'torch.cuda.FloatTensor'`` etc.; on CPU they need the CUDA spelling to take the right branch."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    type_._megatron_vlm_original = original
    torch.Tensor.type = type_


def _patch_uneven_all_gather():
    """gloo's ``all_gather`` needs equal shapes on every rank; megatron's
    ``_gather_along_first_dim(..., output_split_sizes=...)`` (the alltoall MoE dispatcher gathering
    each rank's routed tokens over the expert-TP group) sends different ones. Pad to the largest,
    gather, trim (NCCL does this natively)."""
    original = torch.distributed.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or len({tuple(t.shape) for t in tensor_list}) <= 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        size = max(t.numel() for t in tensor_list)
        padded = tensor.new_zeros(size)
        padded[:tensor.numel()] = tensor.reshape(-1)
        out = [tensor.new_empty(size) for _ in tensor_list]
        original(out, padded, group=group)
        for t, o in zip(tensor_list, out):
            t.copy_(o[:t.numel()].view(t.shape))
        return None

    torch.distributed.all_gather = all_gather


@dataclass(frozen=True)
class Patch:
    name: str
    fn: Callable[[], None]


PATCHES: tuple[Patch, ...] = (
    Patch("current_device", _patch_current_device),
    Patch("device_args", _patch_device_args),
    Patch("rng", _patch_rng),
    Patch("streams", _patch_streams),
    Patch("moe_split_sizes", _patch_moe_split_sizes),
    Patch("te_general_gemm", _patch_te_general_gemm),
    Patch("tensor_type_strings", _patch_tensor_type_strings),
    Patch("uneven_all_gather", _patch_uneven_all_gather),
)


def check_megatron_version() -> str:
    mcore = importlib.import_module("megatron.core.package_info")
    version = mcore.__version__
    if version not in SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron_vlm.runtime.cpu was written for megatron-core {SUPPORTED_MEGATRON_CORE}, "
            f"found {version}: re-check every patch in megatron_vlm/runtime/cpu.py against it"
        )
    return version


def apply(skip: tuple[str, ...] = ()) -> list[str]:
    """Apply every patch not in ``skip`` (once). Returns the names applied by this call."""
    if torch.cuda.is_available():
        raise RuntimeError("megatron_vlm.runtime.cpu must not be applied on a machine with CUDA")
    unknown = set(skip) - {p.name for p in PATCHES}
    if unknown:
        raise ValueError(f"unknown CPU patch name(s) {sorted(unknown)}; known: {[p.name for p in PATCHES]}")
    check_megatron_version()
    done = []
    for patch in PATCHES:
        if patch.name in skip or patch.name in _applied:
            continue
        patch.fn()
        _applied.add(patch.name)
        done.append(patch.name)
    return done


def applied() -> frozenset[str]:
    return frozenset(_applied)


@contextlib.contextmanager
def device_mode_paused():
    """The ``device_args`` mode off inside the block (every torch call otherwise pays a Python
    ``__torch_function__`` hop: ~3 ms per decoding step of a 4-layer model, more than the layers'
    own Python). For code that names no CUDA device, e.g. generation's decoding steps once the
    prefill has allocated the caches; a no-op when the mode is not applied or not the innermost
    one."""
    mode = _device_mode
    if mode is None or torch.overrides._get_current_function_mode() is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()
