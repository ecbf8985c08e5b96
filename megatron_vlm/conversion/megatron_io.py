"""The Megatron side: write a dist checkpoint from a stream of tensors, read one tensor at a time.

Writing (import): one process builds the arch's model at TP=1/PP=1, uninitialised, and saves it
with ``training.checkpointing.save_checkpoint`` — megatron ``dist_checkpointing`` (torch_dist),
which is layout-agnostic: ``pretrain_vlm.py --load`` at any TP/PP reshards on load — through
:func:`streaming_save`, which fills each parameter (:func:`fillers`) just before writing it and
frees it after, so the model is never resident as a whole. The *target* layout
(``--tensor-model-parallel-size`` etc.) is validated against the model (heads, groups, vocab,
layers divisible) and recorded in the checkpoint's ``config.yaml``.

Reading (export): no model is built. :class:`MegatronReader` reads one global tensor (or one layer
of a stacked tensor, or a block of at most ``STREAM_BYTES`` of rows) at a time, whatever TP/PP the
checkpoint was written at, straight from the stored pieces' bytes where the block is contiguous in
them (torch.distributed.checkpoint's loader otherwise).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from megatron_vlm.config import Config, ParallelConfig, from_dict
from megatron_vlm.conversion.mapping import ConversionError, key_report
from megatron_vlm.models.backends import te_norm_aliases

HF_SOURCE_DIR = "hf_source"          # inside iter_XXXXXXX/: what an import carries for export
CARRIED_FILE = "carried.safetensors"  # HF tensors our model does not represent
MODEL_PREFIXES = ("vision_model.", "vision_projection.", "language_model.",
                  "vision_models.", "vision_projections.", "fusion.")  # several encoders + fusion


def ensure_runtime(tp: int = 1, pp: int = 1) -> None:
    """Initialise the runtime for this process (a world of one unless launched otherwise)."""
    from megatron.core import parallel_state

    from megatron_vlm import runtime

    if parallel_state.model_parallel_is_initialized() and torch.distributed.is_initialized():
        return
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


def fillers(model: torch.nn.Module, pairs, reader, dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor], None]]:
    """``{state-dict key: fn(parameter)}`` filling each model tensor from its key-map entry (for
    :func:`save_model` ``fill``). Keys and shapes are checked now, before any tensor is read (the
    errors of :func:`fill_model`). Identity / gate-up / padded-rows entries whose HF dtype is the
    model's are read straight into the parameter (no intermediate copy), or, when every piece the
    writer stores of the parameter is such rows (``fill.source_rows(a, b)``), written from the HF
    files' pages without filling the parameter at all; the others are converted by their op, then
    copied."""
    from megatron_vlm.conversion.mapping import GateUp, Identity, PadRows, cast

    target = model_tensors(model)
    unexpected = [p.mcore for p in pairs if p.mcore not in target]
    missing = sorted(set(target) - {p.mcore for p in pairs})
    if unexpected or missing:
        raise ConversionError(key_report("megatron model", missing, unexpected))
    for p in pairs:
        dst = target[p.mcore]
        want = [tuple(s) for s in p.op.hf_shapes(tuple(dst.shape))]
        got = [tuple(reader.shape(k)) for k in p.hf]
        if want != got:
            raise ConversionError(f"{p.mcore}: HF shapes {got} do not match the model's {tuple(dst.shape)} "
                                  f"(expected {want}; config mismatch)")

    def make(p):
        direct = all(reader.dtype(k) == dtype for k in p.hf) and type(p.op) in (Identity, GateUp, PadRows)

        @torch.no_grad()
        def fill(dst: torch.Tensor) -> None:
            if direct and dst.dtype == dtype and dst.is_contiguous():
                if isinstance(p.op, GateUp):
                    half = dst.shape[0] // 2
                    reader.get(p.hf[0], out=dst[:half])
                    reader.get(p.hf[1], out=dst[half:])
                elif isinstance(p.op, PadRows):
                    reader.get(p.hf[0], out=dst[:p.op.hf_rows])
                    dst[p.op.hf_rows:].zero_()
                else:
                    reader.get(p.hf[0], out=dst)
                return
            t = cast(p.op.to_mcore([reader.get(k) for k in p.hf]), dtype)
            if tuple(t.shape) != tuple(dst.shape):
                raise ConversionError(f"{p.mcore}: converted shape {tuple(t.shape)} does not match the "
                                      f"model's {tuple(dst.shape)} (config mismatch)")
            dst.copy_(t)

        def source_rows(a: int, b: int) -> torch.Tensor | None:
            """Rows ``a:b`` of the Megatron tensor as a view of the HF file's pages when they are
            stored there as they are (same dtype; not across gate/up or into padding rows)."""
            if not direct:
                return None
            if isinstance(p.op, GateUp):
                half = reader.shape(p.hf[0])[0]
                if b <= half:
                    return reader.mapped(p.hf[0])[a:b]
                return reader.mapped(p.hf[1])[a - half:b - half] if a >= half else None
            if isinstance(p.op, PadRows) and b > p.op.hf_rows:
                return None
            return reader.mapped(p.hf[0])[a:b]

        fill.source_rows = source_rows
        return fill

    return {p.mcore: make(p) for p in pairs}


def save_model(save_dir: Path, model, cfg: Config, extra: dict | None = None,
               consume: bool = False, fill: dict[str, Callable[[torch.Tensor], None]] | None = None) -> Path:
    """Write ``save_dir/iter_0000000`` + ``latest`` with the training checkpoint contract.

    ``consume``: the model is not used after the save: it is written by :func:`streaming_save`
    (in this process, one parameter at a time, each parameter's memory freed once written).
    ``fill`` (with ``consume``): ``{state-dict key: fn(parameter)}`` called just before that
    parameter is written, so that the parameters never need to be resident all at once (an
    import builds the model uninitialised and fills it from the HF files this way)."""
    from megatron_vlm.training.checkpointing import save_checkpoint

    if fill and not consume:
        raise ValueError("save_model: fill needs consume=True")
    strategy = streaming_save(model, fill, chunk_bytes=STREAM_BYTES) if consume else None
    path = Path(save_checkpoint(str(save_dir), 0, [model], config=cfg, extra=extra or {},
                                sharded_strategy=strategy))
    if strategy is not None and fill:
        left = sorted(set(fill) - strategy.filled)
        if left:  # a tensor megatron's sharded state dict does not carry: the checkpoint would lack it
            raise ConversionError(key_report("megatron checkpoint: tensors not written", left, []))
    return path


def streaming_save(model: torch.nn.Module, fill: dict | None = None, chunk_bytes: int | None = None):
    """A megatron ``torch_dist`` save strategy (megatron's own planner, metadata and file format:
    loads like any other checkpoint, at any TP/PP) that writes in this process, one model
    parameter at a time: ``fill[key](param)`` first (when given), then the parameter's pieces
    (e.g. the two halves of SwiGLU's ``linear_fc1``; the row pieces of ``chunk_bytes``, see
    :func:`split_rows`), then the parameter's memory is freed. Peak memory: the parameter being
    written (and what its filler reads), not the model. No writer processes: megatron's default
    writer forks one process per file and collects results through a spawned ``multiprocessing``
    Manager (seconds per save), and clones every piece that views a larger tensor (written in place
    here). Records carry no CRC32 (``torch.load`` does not check it; same format otherwise).

    The model is unusable after the save."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict, save_state_dict_async_plan)

    class _Strategy(TorchDistSaveShardedStrategy):
        def async_save(self, sharded_state_dict, checkpoint_dir):
            if chunk_bytes:
                dict_list_map_inplace(lambda sh: split_rows(sh, chunk_bytes), sharded_state_dict)
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                   self.keep_only_main_replica)
            writer = _streaming_writer(checkpoint_dir, strategy)
            planned = save_state_dict_async_plan(
                mcore_to_pyt_state_dict(sd, False), writer, None, 0,
                planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                         flatten_state_dict=False))
            return self._get_save_and_finalize_callbacks(writer, planned[0])

    strategy = _Strategy("torch_dist", 1)
    tensors = model_tensors(model)
    strategy.params = {t.untyped_storage().data_ptr(): (k, t) for k, t in tensors.items() if t.numel()}
    strategy.order = {k: i for i, k in enumerate(fill or tensors)}
    strategy.fill = fill or {}
    strategy.filled = set()
    return strategy


STREAM_BYTES = 16 * 1024 ** 2  # import stores larger tensors in row chunks of at most this; export reads by chunk


def split_rows(sh, chunk_bytes: int):
    """A megatron ShardedTensor larger than ``chunk_bytes`` as k equal row chunks (views; the
    global tensor is the same, stored as k pieces like a k-way split along its first local axis:
    any loader reassembles or reshards them), so that a reader never has to load more than
    ``chunk_bytes`` at once. Left whole when no k <= 64 divides the rows into small enough chunks."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if (not isinstance(sh, ShardedTensor) or sh.flattened_range is not None or sh.data is None
            or sh.data.dim() == 0 or sh.axis_fragmentations is None):
        return sh
    n = sh.local_shape[0]
    row = sh.data[0].numel() * sh.data.element_size() if n else 0
    if n * row <= chunk_bytes:
        return sh
    k = next((k for k in range(2, min(n, 64) + 1) if n % k == 0 and (n // k) * row <= chunk_bytes), None)
    if k is None:
        return sh
    ax, r = sh.prepend_axis_num, n // k
    out = []
    for i in range(k):
        offset, fragments = list(sh.global_offset), list(sh.axis_fragmentations)
        offset[ax] += i * r
        fragments[ax] *= k
        out.append(dataclasses.replace(sh, data=sh.data[i * r:(i + 1) * r], local_shape=(r, *sh.local_shape[1:]),
                                       global_offset=tuple(offset), axis_fragmentations=tuple(fragments)))
    return out


def row_gather(op, shape: tuple) -> list[list[tuple[int, int]]] | None:
    """For an op whose HF tensors are each a selection of the Megatron tensor's rows (identity,
    padded rows, gate/up, q/k/v, k/v): per HF tensor, the runs ``(start, stop)`` of Megatron rows
    it is made of, in order (found by converting the row indices themselves). None for other ops
    or 0-d tensors."""
    from megatron_vlm.conversion.mapping import KV, QKV, GateUp, Identity, PadRows

    if type(op) not in (Identity, PadRows, GateUp, QKV, KV) or not shape:
        return None
    n = shape[0]
    out = []
    for idx, hf_shape in zip(op.to_hf(torch.arange(n).reshape(n, 1)), op.hf_shapes(tuple(shape))):
        idx = idx.reshape(-1).tolist()
        if tuple(hf_shape) != (len(idx), *shape[1:]):
            return None
        runs = []
        for i in idx:
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        out.append([tuple(r) for r in runs])
    return out


def _sources(fill, param: torch.Tensor, pieces: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Each piece (a contiguous run of whole rows of ``param``) from ``fill.source_rows``, shaped
    like the piece; None unless every piece has one."""
    rows_of = getattr(fill, "source_rows", None)
    if rows_of is None or param.dim() == 0 or not param.is_contiguous() or param.storage_offset():
        return None
    row = param[0].numel()
    out = []
    for t in pieces:
        if not t.is_contiguous() or row == 0 or t.storage_offset() % row or t.numel() % row:
            return None
        a = t.storage_offset() // row
        src = rows_of(a, a + t.numel() // row)
        if src is None:
            return None
        out.append(src.reshape(t.shape))
    return out


def _streaming_writer(checkpoint_dir, strategy):
    """megatron's FileSystemWriterAsync with the write step replaced (see :func:`streaming_save`)."""
    import inspect

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from torch.distributed.checkpoint.api import _wrap_exception
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType

    class Writer(FileSystemWriterAsync):
        def prepare_write_data(self, plan, planner):
            self.write_buckets, self.results_queue = [], None
            self._plan, self._planner, self._results = plan, planner, None

        def get_save_function_and_args(self):
            return self._write, None, []

        def _write(self):
            import torch.serialization as ts

            # no CRC32 per record: torch.load (megatron's and torch.distributed.checkpoint's readers)
            # never checks it, and computing it cost as much as writing the bytes (~1.5 s per GB)
            crc = ts.get_crc32_options()
            ts.set_crc32_options(False)
            try:
                self._results = self._write_items()
            except Exception as e:  # reported by megatron's finalize step, like its own writer's
                self._results = e
            finally:
                ts.set_crc32_options(crc)

        def _write_items(self):
            kwargs = {}
            if "serialization_format" in inspect.signature(_write_item).parameters:
                from torch.distributed.checkpoint.filesystem import SerializationFormat

                kwargs["serialization_format"] = SerializationFormat.TORCH_SAVE
            transforms = [self.transforms] if hasattr(self, "transforms") else []
            name = f"{self._plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            items, groups = [], {}
            for item in self._plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    items.append(item)
                else:  # views of one parameter each: grouped so that it is filled / freed once
                    t = self._planner.resolve_data(item)
                    groups.setdefault(t.untyped_storage().data_ptr(), []).append((item, t))
            params = strategy.params
            ordered = sorted(groups.items(), key=lambda g: strategy.order.get(params.get(g[0], ("",))[0], -1))
            results = []
            with open(os.path.join(self.checkpoint_dir, name), "wb") as stream:
                for item in items:
                    results.append(_write_item(*transforms, stream, self._planner.resolve_data(item), item,
                                               name, **kwargs))
                for ptr, pieces in ordered:
                    key, param = params.get(ptr, (None, None))
                    if key in strategy.fill:
                        sources = _sources(strategy.fill[key], param, [t for _, t in pieces])
                        if sources is None:
                            strategy.fill[key](param.data)
                        else:  # the pieces' bytes as stored in the source files: no fill
                            pieces = [(item, src) for (item, _), src in zip(pieces, sources)]
                        strategy.filled.add(key)
                    for item, t in pieces:
                        t = t.detach()
                        nbytes = t.numel() * t.element_size()
                        if t.untyped_storage().nbytes() != nbytes:  # torch.save would write all of it
                            if t.is_contiguous():  # its own bytes of the parameter's memory, no copy
                                start = t.storage_offset() * t.element_size()
                                piece = t.untyped_storage()[start:start + nbytes]
                                t = torch.empty(0, dtype=t.dtype).set_(piece, 0, t.shape, t.stride())
                            else:
                                t = t.clone()
                        results.append(_write_item(*transforms, stream, t, item, name, **kwargs))
                        del t
                    del pieces
                    if key is not None:
                        param.data.untyped_storage().resize_(0)
                stream.flush()
                os.fsync(stream.fileno())
            return results

        def retrieve_write_results(self):
            if isinstance(self._results, Exception):
                return _wrap_exception(self._results)
            return self._results

    return Writer(checkpoint_dir, thread_count=1)


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
        self._dcp_metadata = None

    @property
    def dcp_metadata(self):
        """torch.distributed.checkpoint's metadata of the iteration (where each stored piece lies)."""
        if self._dcp_metadata is None:
            from torch.distributed.checkpoint import FileSystemReader

            self._dcp_metadata = FileSystemReader(str(self.dir)).read_metadata()
        return self._dcp_metadata

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

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * torch.empty((), dtype=self.dtype(key)).element_size()

    def row_bounds(self, key: str) -> list[int]:
        """Row indices where the checkpoint's stored pieces of ``key`` begin (reading across one
        costs a load of each piece touched)."""
        stored, idx, _ = self.locate(key)
        ax = 0 if idx is None else 1
        return sorted({c.offsets[ax] for c in self.dcp_metadata.state_dict_metadata[stored].chunks
                       if idx is None or c.offsets[0] <= idx < c.offsets[0] + c.sizes[0]})

    def iter_rows(self, key: str, runs: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """Rows ``start:stop`` of ``key`` for each run, in row blocks of at most ``STREAM_BYTES``
        (or one row) that never cross a stored piece, each read straight from the piece's bytes:
        memory is bounded whatever the size of the tensor or of the pieces it was saved in."""
        bounds = self.row_bounds(key)
        stored, idx, _ = self.locate(key)
        sh = self.meta[stored]
        rest = tuple(sh.global_shape[1:] if idx is None else sh.global_shape[2:])
        block = max(1, STREAM_BYTES // max(1, math.prod(rest) * sh.dtype.itemsize))
        for start, stop in runs:
            a = start
            while a < stop:
                b = min([stop, a + block] + [x for x in bounds if x > a])
                buf = torch.empty((b - a, *rest) if idx is None else (1, b - a, *rest), dtype=sh.dtype)
                offsets = (a,) + (0,) * len(rest) if idx is None else (idx, a) + (0,) * len(rest)
                _read_regions(self.dir, [(stored, buf, offsets)], self.dcp_metadata)
                yield buf if idx is None else buf[0]
                a = b

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
        _read_regions(self.dir, list(requests.values()), self.dcp_metadata)
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


def _read_regions(ckpt_dir: Path, requests: list[tuple[str, torch.Tensor, tuple]], metadata=None) -> None:
    """Fill each ``buf`` with the region at ``offsets`` of the stored global tensor ``key``.

    A region that is one contiguous byte range of each stored piece it touches (rows of a
    row-major piece, a layer of a stacked one) is read from the file with one ``readinto`` per
    piece (:func:`_read_direct`): only the bytes asked for, however large the piece. Anything else
    goes through torch.distributed.checkpoint with a planner that asks for exactly these regions
    (megatron's own loader cannot request a sub-region in a world of one); it loads every stored
    piece it touches whole. Needs no process group.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    if metadata is None:
        metadata = dcp.FileSystemReader(str(ckpt_dir)).read_metadata()
    seen, fallback = set(), {}  # fallback: {key: (buf, its read items)} for the general path
    for key, buf, offsets in requests:
        if key in seen:
            raise ConversionError(f"internal: {key} requested twice in one read")
        seen.add(key)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
        items = create_read_items_for_chunk_list(key, metadata.state_dict_metadata[key], [chunk])
        if not all(_read_direct(Path(ckpt_dir), metadata.storage_data[item.storage_index], item, buf)
                   for item in items):
            fallback[key] = (buf, items)
    if not fallback:
        return

    class RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            return LoadPlan([item for _, items in fallback.values() for item in items])

        def lookup_tensor(self, index):
            return fallback[index.fqn][0]

    try:
        dcp.load({}, storage_reader=dcp.FileSystemReader(str(ckpt_dir)), planner=RegionPlanner(),
                 no_dist=True)
    finally:  # the planner class is cyclic garbage (freed late): it must not keep the buffers alive
        fallback.clear()


class _FileView(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file as a seekable file of their own."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos + (0, self.pos, self.length)[whence])
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _read_direct(ckpt_dir: Path, info, item, buf: torch.Tensor) -> bool:
    """Copy one read item (a box of one stored piece) into ``buf`` straight from the file, when the
    box is a contiguous byte range of the piece; False (nothing read) otherwise.

    A stored piece is a ``torch.save`` archive at ``info.offset`` of ``info.relative_path``: loading
    it with ``map_location="meta"`` reads only its header and gives a tensor of the right shape and
    strides whose storage knows where its bytes start in the archive (``_checkpoint_offset``).
    Pieces with storage transforms (compression), another dtype or byte order take the general path.
    """
    if getattr(info, "transform_descriptors", None) or sys.byteorder != "little":
        return False
    with open(ckpt_dir / info.relative_path, "rb") as f:
        stored = torch.load(_FileView(f, info.offset, info.length), map_location="meta", weights_only=True)
        if not isinstance(stored, torch.Tensor) or stored.dtype != buf.dtype:
            return False
        start = getattr(stored.untyped_storage(), "_checkpoint_offset", None)
        if start is None:
            return False
        src, dst = stored, buf
        for ax, (so, do, n) in enumerate(zip(item.storage_offsets, item.dest_offsets, item.lengths)):
            src, dst = src.narrow(ax, so, n), dst.narrow(ax, do, n)
        if not src.is_contiguous():
            return False
        target = dst if dst.is_contiguous() else torch.empty(dst.shape, dtype=dst.dtype)
        nbytes = target.numel() * target.element_size()
        if nbytes:
            f.seek(info.offset + start + src.storage_offset() * src.element_size())
            if f.readinto(memoryview(target.reshape(-1).view(torch.uint8).numpy())) != nbytes:
                raise ConversionError(f"{ckpt_dir / info.relative_path}: truncated (a stored piece of "
                                      f"{item.dest_index.fqn} ends early)")
        if target is not dst:
            dst.copy_(target)
    return True
