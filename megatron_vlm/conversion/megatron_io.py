"""The Megatron side: write a dist checkpoint from a stream of tensors, read one tensor at a time.

Writing (import): one process builds the arch's model at TP=1/PP=1 (the only full copy in
memory), fills it from the stream and saves it with ``training.checkpointing.save_checkpoint`` —
megatron ``dist_checkpointing`` (torch_dist), which is layout-agnostic: ``pretrain_vlm.py --load``
at any TP/PP reshards on load. The *target* layout (``--tensor-model-parallel-size`` etc.) is
validated against the model (heads, groups, vocab, layers divisible) and recorded in the
checkpoint's ``config.yaml``.

Reading (export): no model is built. :class:`MegatronReader` asks megatron's loader for one global
tensor (or one layer of a stacked tensor) at a time, whatever TP/PP the checkpoint was written at.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from megatron_vlm.config import Config, ParallelConfig, from_dict
from megatron_vlm.conversion.mapping import ConversionError, key_report
from megatron_vlm.models.backends import te_norm_aliases

HF_SOURCE_DIR = "hf_source"          # inside iter_XXXXXXX/: what an import carries for export
CARRIED_FILE = "carried.safetensors"  # HF tensors our model does not represent
MODEL_PREFIXES = ("vision_model.", "vision_projection.", "language_model.")


def ensure_runtime(tp: int = 1, pp: int = 1) -> None:
    """Initialise the runtime for this process (a world of one unless launched otherwise)."""
    from megatron.core import parallel_state

    from megatron_vlm import runtime
    from megatron_vlm.runtime.launcher_env import detect, free_port

    if parallel_state.model_parallel_is_initialized() and torch.distributed.is_initialized():
        return
    if detect().launcher == "none" and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())  # never collide with another local job
    runtime.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def single_process_config(cfg: Config) -> Config:
    local = copy.deepcopy(cfg)
    local.parallel = ParallelConfig()
    return local


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict key (no ``_extra_state``)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}


@torch.no_grad()
def fill_model(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
               allow_missing: bool = False) -> list[str]:
    """Copy each streamed tensor into the model. Returns the keys left unfilled (error unless
    ``allow_missing``); any key the model does not have, or a shape mismatch, is an error."""
    target = model_tensors(model)
    filled, unexpected = set(), []
    for key, t in tensors:
        dst = target.get(key)
        if dst is None:
            unexpected.append(key)
            continue
        if tuple(dst.shape) != tuple(t.shape):
            raise ConversionError(f"{key}: converted shape {tuple(t.shape)} does not match the model's "
                                  f"{tuple(dst.shape)} (config mismatch)")
        dst.copy_(t)
        filled.add(key)
        del t
    missing = sorted(set(target) - filled)
    if unexpected or (missing and not allow_missing):
        raise ConversionError(key_report("megatron model", [] if allow_missing else missing, unexpected))
    return missing


def save_model(save_dir: Path, model, cfg: Config, extra: dict | None = None,
               consume: bool = False) -> Path:
    """Write ``save_dir/iter_0000000`` + ``latest`` with the training checkpoint contract.
    ``consume``: the model is not used after the save (see :func:`release_views_on_save`)."""
    from megatron_vlm.training.checkpointing import save_checkpoint

    if consume:
        release_views_on_save(model)
    return Path(save_checkpoint(str(save_dir), 0, [model], config=cfg, extra=extra or {}))


def release_views_on_save(model: torch.nn.Module) -> None:
    """Make the model's next ``sharded_state_dict`` hand megatron's writer contiguous copies of the
    tensors it would otherwise copy itself, releasing each parameter's memory once its pieces
    are copied: the model is unusable after the save.

    megatron's checkpoint writer clones every tensor that is a view of a larger storage (SwiGLU's
    ``linear_fc1`` is saved as two halves), all before writing: peak memory = model + every fc1.
    Copying one parameter's pieces at a time and then freeing the parameter keeps it at model +
    one parameter."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    build = model.sharded_state_dict

    def sharded_state_dict(*args, **kwargs):
        sd = build(*args, **kwargs)
        apply_factories(sd)  # e.g. the SwiGLU split: views of the parameter
        by_storage: dict[int, list] = {}
        for t in nested_values(sd):
            if isinstance(t, ShardedTensor) and isinstance(t.data, torch.Tensor) and t.data.device.type == "cpu":
                by_storage.setdefault(t.data.untyped_storage().data_ptr(), []).append(t)
        for pieces in by_storage.values():
            storage = pieces[0].data.untyped_storage()
            if all(storage.nbytes() == t.data.numel() * t.data.element_size() for t in pieces):
                continue  # whole tensors: the writer takes them as they are
            for t in pieces:
                t.data = t.data.detach().clone()
            try:
                storage.resize_(0)  # the parameter's memory (every tensor using it was copied)
            except RuntimeError:  # not resizable (not allocated by torch): keep it
                pass
        del model.sharded_state_dict  # back to the class's method
        return sd

    model.sharded_state_dict = sharded_state_dict


def log(msg: str) -> None:
    print(f"[convert] {msg}", flush=True)


def build_config(mc, tp: int, pp: int, ep: int, dtype: torch.dtype) -> Config:
    """The checkpoint's config at the target layout, validated (one-line ConversionError)."""
    from megatron_vlm.config import ConfigError, validate

    cfg = Config(model=mc, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                   pipeline_model_parallel_size=pp,
                                                   expert_model_parallel_size=ep))
    cfg.training.bf16 = dtype == torch.bfloat16
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConversionError(f"target layout TP={tp} PP={pp} EP={ep}: {e}") from None
    return cfg


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)\.(.*)$")
# TE specs fuse the norms into the next linear: accept those names too when reading.
_TE_ALIASES = te_norm_aliases()


class MegatronReader:
    """One global (TP=1, PP=1 layout) tensor at a time from a dist checkpoint of any layout."""

    def __init__(self, load_dir: str | Path, iteration: int | None = None):
        from megatron_vlm.training.checkpointing import iteration_dir, read_config, read_latest

        self.load_dir = Path(load_dir)
        if not self.load_dir.is_dir():
            raise ConversionError(f"--load {self.load_dir}: not a directory")
        it = read_latest(self.load_dir) if iteration is None else iteration
        if it is None:
            raise ConversionError(f"--load {self.load_dir}: no 'latest' file: not a checkpoint directory")
        self.iteration = it
        self.dir = iteration_dir(self.load_dir, it)
        if not self.dir.is_dir():
            raise ConversionError(f"--load {self.load_dir}: 'latest' names iteration {it} but {self.dir} is missing")
        raw = read_config(self.load_dir, it)
        if not raw:
            raise ConversionError(f"--load {self.load_dir}: {self.dir}/config.yaml is missing; cannot "
                                  f"tell the model's shape")
        self.config: Config = from_dict(raw)
        from megatron.core import dist_checkpointing

        ensure_runtime()
        self._dc = dist_checkpointing
        meta = dist_checkpointing.load_tensors_metadata(str(self.dir))
        self.meta = {k: v for k, v in meta.items() if hasattr(v, "global_shape")}
        self.hf_source = self.dir / HF_SOURCE_DIR

    # -- key resolution -------------------------------------------------------------------------
    def _candidates(self, key: str) -> list[str]:
        out = [key]
        for local, te in _TE_ALIASES:
            if local in key:
                out.append(key.replace(local, te))
        return out

    def locate(self, key: str) -> tuple[str, int | None, int | None] | None:
        """``(stored key, layer index, stacked layers)``: stacked when the checkpoint was saved with
        homogeneous layers (one ``...layers.<param>`` tensor with a leading layer axis)."""
        for cand in self._candidates(key):
            if cand in self.meta:
                return cand, None, None
            m = _LAYER.match(cand)
            if m:
                stacked = m.group(1) + m.group(3)
                if stacked in self.meta:
                    return stacked, int(m.group(2)), self.meta[stacked].global_shape[0]
        return None

    def model_keys(self) -> set[str]:
        """Every model tensor in the checkpoint, named per layer in our local-spec names."""
        out = set()
        for k, sh in self.meta.items():
            if not k.startswith(MODEL_PREFIXES) or "_extra_state" in k:
                continue
            name = k
            for local, te in _TE_ALIASES:
                name = name.replace(te, local)
            if ".layers." in name and not _LAYER.match(name):  # stacked: leading layer axis
                prefix, rest = name.split(".layers.", 1)
                out.update(f"{prefix}.layers.{i}.{rest}" for i in range(sh.global_shape[0]))
            else:
                out.add(name)
        return out

    def shape(self, key: str) -> tuple:
        loc = self.locate(key)
        if loc is None:
            raise ConversionError(f"--load {self.load_dir}: tensor {key} not in the checkpoint")
        stored, idx, _ = loc
        shape = tuple(self.meta[stored].global_shape)
        return shape[1:] if idx is not None else shape

    def dtype(self, key: str) -> torch.dtype:
        loc = self.locate(key)
        return self.meta[loc[0]].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read the global tensors ``keys`` (a layer of a stacked tensor reads only that layer)."""
        requests = {}
        for key in keys:
            loc = self.locate(key)
            if loc is None:
                raise ConversionError(f"--load {self.load_dir}: tensor {key} not in the checkpoint")
            stored, idx, _ = loc
            sh = self.meta[stored]
            if idx is None:
                buf = torch.empty(tuple(sh.global_shape), dtype=sh.dtype)
                offsets = (0,) * buf.dim()
            else:
                buf = torch.empty((1,) + tuple(sh.global_shape[1:]), dtype=sh.dtype)
                offsets = (idx,) + (0,) * (buf.dim() - 1)
            requests[key] = (stored, buf, offsets)
        _read_regions(self.dir, list(requests.values()))
        return {k: (buf[0] if self.locate(k)[1] is not None else buf) for k, (_, buf, _) in requests.items()}

    # -- what an import carried --------------------------------------------------------------------
    def hf_source_config(self) -> dict | None:
        path = self.hf_source / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def carried(self) -> Iterator[str]:
        path = self.hf_source / CARRIED_FILE
        if not path.is_file():
            return iter(())
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return iter(list(f.keys()))

    def carried_reader(self):
        from safetensors import safe_open

        path = self.hf_source / CARRIED_FILE
        return safe_open(str(path), "pt") if path.is_file() else None


def _read_regions(ckpt_dir: Path, requests: list[tuple[str, torch.Tensor, tuple]]) -> None:
    """Fill each ``buf`` with the region at ``offsets`` of the stored global tensor ``key``.

    Uses torch.distributed.checkpoint directly with a planner that asks for exactly these regions
    (megatron's own loader cannot request a sub-region in a world of one). Needs no process group.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    by_fqn = {}
    for key, buf, offsets in requests:
        fqn = key if key not in by_fqn else None
        if fqn is None:
            raise ConversionError(f"internal: {key} requested twice in one read")
        by_fqn[key] = (buf, offsets)

    class RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for fqn, (buf, offsets) in by_fqn.items():
                md = self.metadata.state_dict_metadata[fqn]
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
                items += create_read_items_for_chunk_list(fqn, md, [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return by_fqn[index.fqn][0]

    dcp.load({}, storage_reader=dcp.FileSystemReader(str(ckpt_dir)), planner=RegionPlanner(),
             no_dist=True)
