"""HF folders: streaming safetensors reader/writer, config.json, tokenizer files, atomic output.

Reading never loads a whole checkpoint: :class:`HFReader` parses each safetensors header and reads
one tensor per ``get`` with plain file I/O (no mmap, so converted tensors' pages do not linger in
the process's resident set; ``out=`` reads straight into a parameter), or gives ``mapped`` views of
the file's pages for tensors written out unchanged (page cache, no copy). Writing is streamed too: :func:`write_safetensors_shards`
is given the plan (names, shapes, dtypes) first, writes each shard's header, then each tensor's
bytes as the producer yields it — only the tensors of one map entry are alive at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from megatron_vlm.conversion.mapping import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"  # checkpoints saved before safetensors (torch.save)
BIN_SINGLE_NAME = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3

_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}

TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                      "merges.txt", "*.model", "*.tiktoken", "chat_template.*",
                      "preprocessor_config.json", "processor_config.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name}: allowed {sorted(DTYPES)} or auto")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

class HFReader:
    """Tensors of a ``save_pretrained`` folder, one at a time. ``rename`` maps stored names to the
    names the key maps use (e.g. transformers' new-style ``model.language_model.*`` -> the
    ``language_model.model.*`` that ``save_pretrained`` writes).

    safetensors (``model.safetensors[.index.json]``) are read with plain file I/O; a folder saved
    before safetensors (``pytorch_model.bin[.index.json]``, torch's zip format) is memory-mapped
    file by file (``torch.load(mmap=True, weights_only=True)``: no tensor is resident until read)."""

    def __init__(self, folder: str | Path, rename=None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"--hf-path {self.folder}: not a directory")
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        self._maps: dict[Path, torch.UntypedStorage] = {}
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = self._weight_map(index)
        elif (self.folder / SINGLE_NAME).is_file():
            weight_map = {k: SINGLE_NAME for k in self._header(SINGLE_NAME)[1] if k != "__metadata__"}
        elif (self.folder / BIN_INDEX_NAME).is_file():
            weight_map = self._weight_map(self.folder / BIN_INDEX_NAME)
        elif (self.folder / BIN_SINGLE_NAME).is_file():
            weight_map = {k: BIN_SINGLE_NAME for k in self._bin_file(BIN_SINGLE_NAME)}
        else:
            raise ConversionError(f"--hf-path {self.folder}: no weights ({INDEX_NAME}, {SINGLE_NAME}, "
                                  f"{BIN_INDEX_NAME} or {BIN_SINGLE_NAME})")
        self._files: dict[str, str] = {}
        self._stored: dict[str, str] = {}
        for stored, fname in weight_map.items():
            name = rename(stored) if rename else stored
            if name in self._files:
                raise ConversionError(f"--hf-path {self.folder}: tensor {name} stored twice")
            self._files[name] = fname
            self._stored[name] = stored

    def _weight_map(self, index: Path) -> dict[str, str]:
        """An index's ``weight_map`` ({stored tensor name: file name in this folder}), checked."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ConversionError(f"--hf-path {self.folder}: {index.name} is not a weight index "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        bad = ([v for v in weight_map.values() if not isinstance(v, str) or Path(v).name != v or v in (".", "..")]
               if isinstance(weight_map, dict) else [weight_map])
        if bad:
            raise ConversionError(f"--hf-path {self.folder}: {index.name} names {bad[0]!r}: a weight_map value "
                                  f"must be the name of a file in this folder")
        return weight_map

    def _file(self, fname: str) -> Path:
        path = self.folder / fname
        if not path.is_file():
            raise ConversionError(f"--hf-path {self.folder}: {fname} named in the index is missing")
        return path

    def _bin_file(self, fname: str) -> dict[str, torch.Tensor]:
        """The tensors of one ``.bin`` file, memory-mapped (loaded once)."""
        tensors = self._bins.get(fname)
        if tensors is None:
            path = self._file(fname)
            try:
                tensors = torch.load(str(path), mmap=True, weights_only=True, map_location="cpu")
            except Exception as e:  # legacy (non-zip) format, foreign pickles, truncation
                raise ConversionError(f"--hf-path {self.folder}: cannot read {fname} as a torch state dict "
                                      f"({str(e).splitlines()[0][:200]}); re-save it as safetensors") from None
            if not isinstance(tensors, dict) or not all(torch.is_tensor(v) for v in tensors.values()):
                raise ConversionError(f"--hf-path {self.folder}: {fname} is not a dict of tensors")
            self._bins[fname] = tensors
        return tensors

    def _locate(self, key: str, contents) -> tuple[str, object]:
        """``(file name, what the file holds for key)``; ``contents(file name)`` is the file's
        ``{stored name: entry}``. A key the index lacks, or its file lacks: one line."""
        if key not in self._files:
            raise ConversionError(f"--hf-path {self.folder}: tensor {key} not found")
        fname, stored = self._files[key], self._stored[key]
        table = contents(fname)
        if stored not in table:
            raise ConversionError(f"--hf-path {self.folder}: tensor {stored} named in the index is not in {fname}")
        return fname, table[stored]

    def _bin_tensor(self, key: str) -> torch.Tensor | None:
        """The mapped tensor of ``key`` when its file is a ``.bin``, else None."""
        if not self._files.get(key, "").endswith(".bin"):
            return None  # a safetensors file, or a key the index lacks (_entry says so)
        return self._locate(key, self._bin_file)[1]

    def _header(self, fname: str) -> tuple[int, dict]:
        """(data start offset, header dict) of one safetensors file."""
        h = self._headers.get(fname)
        if h is None:
            path = self._file(fname)
            size = path.stat().st_size
            try:
                with open(path, "rb") as f:
                    n = struct.unpack("<Q", f.read(8))[0]
                    if n > size - 8:
                        raise ValueError(f"header of {n} bytes in a file of {size}")
                    header = json.loads(f.read(n))
                ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"]
            except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
                raise ConversionError(f"--hf-path {self.folder}: {fname} is not a safetensors file "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
            if ends and 8 + n + max(ends) > size:
                raise ConversionError(f"--hf-path {self.folder}: {fname} is truncated ({size} bytes; its header "
                                      f"describes {8 + n + max(ends)})")
            h = self._headers[fname] = (8 + n, header)
        return h

    def _entry(self, key: str) -> tuple[Path, int, dict]:
        """(file, data start offset, header entry) of a safetensors-stored ``key``."""
        fname, entry = self._locate(key, lambda f: self._header(f)[1])
        return self.folder / fname, self._header(fname)[0], entry

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, read with plain file I/O into fresh memory (no mmap: pages of tensors
        already converted do not stay resident), or straight into ``out`` (contiguous, of the
        stored shape and dtype)."""
        mapped = self._bin_tensor(key)
        if mapped is not None:
            if out is not None and (out.shape != mapped.shape or out.dtype != mapped.dtype):
                raise ConversionError(f"{key}: stored {mapped.dtype} {tuple(mapped.shape)} cannot be read into "
                                      f"a {out.dtype} {tuple(out.shape)} tensor")
            out = torch.empty(mapped.shape, dtype=mapped.dtype) if out is None else out
            return out.copy_(mapped)
        path, start, e = self._entry(key)
        if e["dtype"] not in _ST_TO_DTYPE:
            raise ConversionError(f"{key}: safetensors dtype {e['dtype']} is not supported")
        dtype = _ST_TO_DTYPE[e["dtype"]]
        if out is None:
            t = torch.empty(e["shape"], dtype=dtype)
        elif tuple(out.shape) != tuple(e["shape"]) or out.dtype != dtype or not out.is_contiguous():
            raise ConversionError(f"{key}: stored {e['dtype']} {tuple(e['shape'])} cannot be read into a "
                                  f"{out.dtype} {tuple(out.shape)} tensor")
        else:
            t = out
        begin, end = e["data_offsets"]
        if end > begin:
            with open(path, "rb") as f:
                f.seek(start + begin)
                # the tensor's own memory as a buffer (not via .numpy(), which would make its
                # storage non-resizable: a streaming save frees parameters by resizing them)
                view = (ctypes.c_char * (end - begin)).from_address(t.data_ptr())
                if f.readinto(view) != end - begin:
                    raise ConversionError(f"--hf-path {self.folder}: {path.name} is truncated at {key}")
        return t

    def mapped(self, key: str) -> torch.Tensor:
        """One tensor as a read-only view of its file's pages (a private memory map: no copy, the
        pages are page cache the kernel can drop). Do not write to it."""
        mapped = self._bin_tensor(key)
        if mapped is not None:
            return mapped
        path, start, e = self._entry(key)
        if e["dtype"] not in _ST_TO_DTYPE:
            raise ConversionError(f"{key}: safetensors dtype {e['dtype']} is not supported")
        storage = self._maps.get(path)
        if storage is None:
            storage = self._maps[path] = torch.UntypedStorage.from_file(str(path), shared=False,
                                                                         nbytes=path.stat().st_size)
        begin, end = e["data_offsets"]
        return torch.empty(0, dtype=_ST_TO_DTYPE[e["dtype"]]).set_(storage[start + begin:start + end], 0,
                                                                    e["shape"])

    def shape(self, key: str) -> tuple:
        mapped = self._bin_tensor(key)
        return tuple(mapped.shape) if mapped is not None else tuple(self._entry(key)[2]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        mapped = self._bin_tensor(key)
        return mapped.dtype if mapped is not None else _ST_TO_DTYPE[self._entry(key)[2]["dtype"]]

    def total_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self._files.values()))

    def close(self) -> None:
        self._headers.clear()
        self._maps.clear()
        self._bins.clear()


def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"--hf-path {folder}: no config.json")
    return json.loads(path.read_text())


def read_image_stats(folder) -> tuple:
    """``image_mean`` / ``image_std`` from ``preprocessor_config.json`` when the folder has one, each
    three floats (a single number, which HF image processors accept, is used for every channel);
    None where absent. Anything else, or a std that is not > 0: ConversionError naming the value."""
    path = Path(folder) / "preprocessor_config.json" if folder else None
    if path is None or not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    out = []
    for name in ("image_mean", "image_std"):
        v = data.get(name) if isinstance(data, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v] * 3
        ok = v is None or (isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))
        if ok and v is not None and name == "image_std":
            ok = all(x > 0 for x in v)
        if not ok:
            raise ConversionError(f"{path}: {name}={v!r}: expected 3 finite numbers (one per RGB channel)"
                                  + (", each > 0" if name == "image_std" else ""))
        out.append(None if v is None else tuple(float(x) for x in v))
    return tuple(out)


def load_hf_config(folder: str | Path):
    """transformers' config object (fills defaults that config.json may omit). Offline."""
    read_config_json(folder)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # unknown model_type etc.
        raise ConversionError(f"--hf-path {folder}: transformers cannot read config.json: "
                              f"{str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: Sequence[tuple[str, tuple, torch.dtype]], max_shard_bytes: int,
                groups: Sequence[int] | None = None) -> list[list[int]]:
    """Split entry indices into shards of at most ``max_shard_bytes`` (a single larger tensor gets
    its own shard). ``groups`` (entry -> group id) keeps a group's entries in one shard."""
    shards: list[list[int]] = [[]]
    size = 0
    i = 0
    n = len(entries)
    while i < n:
        j = i + 1
        if groups is not None:
            while j < n and groups[j] == groups[i]:
                j += 1
        block = sum(_nbytes(entries[k][1], entries[k][2]) for k in range(i, j))
        if shards[-1] and size + block > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(range(i, j))
        size += block
        i = j
    return shards


def _header(entries: Sequence[tuple[str, tuple, torch.dtype]], metadata: dict | None) -> bytes:
    head: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        n = _nbytes(shape, dtype)
        head[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": [int(s) for s in shape],
                      "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class RowBlocks:
    """A tensor of ``shape`` / ``dtype`` given as consecutive row blocks (``[rows_i, *shape[1:]]``),
    for :func:`write_safetensors_shards` to write one block at a time."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, blocks: Iterable[torch.Tensor]):
        self.shape, self.dtype, self.blocks = tuple(shape), dtype, blocks


def _write_blocks(f, name: str, t: RowBlocks) -> None:
    rows = 0
    for b in t.blocks:
        if b.dtype != t.dtype or tuple(b.shape[1:]) != t.shape[1:]:
            raise ConversionError(f"internal: {name}: block {tuple(b.shape)} {b.dtype} does not fit "
                                  f"{t.shape} {t.dtype}")
        _write_tensor(f, b)
        rows += b.shape[0]
        del b
    if rows != t.shape[0]:
        raise ConversionError(f"internal: {name}: blocks gave {rows} rows of {t.shape[0]}")


def _write_tensor(f, t: torch.Tensor) -> None:
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return
    f.write(memoryview(t.view(torch.uint8).numpy()))


def write_safetensors_shards(out_dir: str | Path, entries: Sequence[tuple[str, tuple, torch.dtype]],
                             tensors: Iterator[tuple[str, torch.Tensor]],
                             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                             groups: Sequence[int] | None = None, prefix: str = "model",
                             index_metadata: dict | None = None) -> dict:
    """Write ``prefix-0000k-of-0000n.safetensors`` + ``prefix.safetensors.index.json``.

    ``entries`` = planned ``(name, shape, dtype)`` in the order ``tensors`` yields them; each
    yielded tensor (or :class:`RowBlocks`) is checked against its entry and written straight to disk."""
    out_dir = Path(out_dir)
    shards = plan_shards(entries, max_shard_bytes, groups)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s, idx in enumerate(shards):
        fname = f"{prefix}-{s + 1:05d}-of-{n:05d}.safetensors"
        shard_entries = [entries[k] for k in idx]
        with open(out_dir / fname, "wb") as f:
            f.write(_header(shard_entries, {"format": "pt"}))
            for name, shape, dtype in shard_entries:
                try:
                    got_name, t = next(tensors)
                except StopIteration:
                    raise ConversionError(f"internal: producer ended before {name}") from None
                if got_name != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise ConversionError(f"internal: planned {name} {tuple(shape)} {dtype}, produced "
                                          f"{got_name} {tuple(t.shape)} {t.dtype}")
                if isinstance(t, RowBlocks):
                    _write_blocks(f, name, t)
                else:
                    _write_tensor(f, t)
                weight_map[name] = fname
                total += _nbytes(shape, dtype)
                del t
    extra = next(tensors, None)
    if extra is not None:
        raise ConversionError(f"internal: producer yielded unplanned tensor {extra[0]}")
    index = {"metadata": {"total_size": total, **(index_metadata or {})}, "weight_map": weight_map}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_single_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    entries = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    with open(path, "wb") as f:
        f.write(_header(entries, {"format": "pt"}))
        for t in tensors.values():
            _write_tensor(f, t)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer / processor files (not weights, not config.json) from ``src`` to ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"--tokenizer-path {src}: not a directory")
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and p.name not in copied and not p.name.endswith(".safetensors"):
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    if not any(n.startswith("tokenizer") or n.endswith((".model", ".tiktoken")) or n.startswith("vocab.")
               for n in copied):
        raise ConversionError(f"--tokenizer-path {src}: no tokenizer files found "
                              f"(looked for {', '.join(TOKENIZER_PATTERNS[:5])}, ...)")
    return copied


# ------------------------------------------------------------------------------------------------
# Atomic output folders
# ------------------------------------------------------------------------------------------------

def check_output_dir(target: str | Path, overwrite: bool, flag: str) -> Path:
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ConversionError(f"{flag} {target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"{flag} {target}: exists and is not empty (pass --overwrite to replace it)")
    return target


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False, flag: str = "--save"):
    """Yield a fresh temp folder next to ``target``; on success it replaces ``target`` (only if
    ``target`` is absent, empty, or ``overwrite``), on any error it is removed and ``target`` is
    left untouched."""
    target = check_output_dir(target, overwrite, flag).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def iter_files(folder: Path) -> Iterable[Path]:
    return (p for p in folder.rglob("*") if p.is_file())
