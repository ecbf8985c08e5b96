"""Webdataset shards for DALI: build them from (image, text) manifests, index them, read them back.

A shard folder (output of :func:`build_shards`)::

    shard-000000.tar   per sample: <key>.jpg (JPEG bytes) + <key>.json (the manifest record + "key")
    shard-000000.idx   DALI webdataset index, one line per sample: "ext offset size name" per component
    ...
    report.json        samples written, shards, and every skipped record with its path and reason

Manifests: JSONL, one ``{"image": "rel/path.jpg", "text": "..."}`` object per line (or
``"question"`` + ``"answer"`` instead of ``"text"``; extra fields are kept), or CSV with at least the
columns ``image`` and ``text``. A record may carry ``"encoder_weights": [w_0, ...]`` (the data
router's per-sample weights, :mod:`megatron_vlm.data.encoder_weights`): checked before any image is
read (a bad value is a one-line error naming ``file:line``, nothing written) and also kept in
``shard-NNNNNN.weights.json`` next to the shard, so that loading checks them without reading the
shards. Image paths are relative to the image root (default: the manifest's
folder). Every image is decode-validated (PIL ``verify()`` and a full ``load()``); unreadable,
corrupt or missing images are skipped and listed in ``report.json``, never written. Upright JPEGs
(RGB/grayscale, no EXIF rotation) are stored byte for byte; everything else is stored as the upright
8-bit RGB pixels re-encoded as JPEG (EXIF orientation applied, 16-bit and float images scaled to
0..255, transparency composited onto white: see :func:`_to_rgb`). Files appear
under their final names only when complete (temporary name, then rename).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from megatron_vlm.data import encoder_weights

SHARD_PREFIX = "shard"
INDEX_VERSION = "v1.2"
REPORT_FILE = "report.json"
STAGING_DIR = ".staging"  # build_shards writes here, then moves the shards into place
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")


class BadImage(ValueError):
    """An image that cannot be stored: the message is the reason."""


class Skip(Exception):
    """A manifest entry that is left out of the shards: ``path`` (image or manifest line) + ``reason``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class ManifestEntry:
    """One manifest record; ``where`` names it in reports (``file:line``)."""
    where: str
    record: dict | None
    error: str | None = None


@dataclass
class ShardInfo:
    tar: Path
    index: Path
    num_samples: int


@dataclass
class BuildReport:
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self, shard_size: int) -> dict:
        return {"written": self.written, "skipped_count": len(self.skipped), "shard_size": shard_size,
                "shards": self.shards, "skipped": self.skipped}


# ------------------------------------------------------------------------------------------------
# Manifests
# ------------------------------------------------------------------------------------------------

def resolve_manifest(path: str | os.PathLike) -> Path:
    """The manifest file: ``path`` itself, or ``manifest.jsonl``/``manifest.csv`` inside a folder."""
    path = Path(path)
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"manifest folder {path}: no {' or '.join(MANIFEST_NAMES)}")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: no such file")
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"manifest {path}: expected a .jsonl or .csv file")
    return path


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Records of a JSONL or CSV manifest; malformed lines become entries with ``error`` set."""
    path = resolve_manifest(path)
    lines, bad = _utf8_lines(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO("".join(lines), newline=""))
        missing = {"image", "text"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"manifest {path}: CSV needs the columns image,text (missing {sorted(missing)})")
        rows = [ManifestEntry(f"{path}:{reader.line_num}", dict(row)) for row in reader]
        return sorted(rows + bad, key=lambda e: int(e.where.rsplit(":", 1)[1]))
    entries = list(bad)
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            entries.append(ManifestEntry(f"{path}:{i}", None, f"invalid JSON: {e.msg}"))
            continue
        if not isinstance(record, dict):
            entries.append(ManifestEntry(f"{path}:{i}", None, "not a JSON object"))
            continue
        entries.append(ManifestEntry(f"{path}:{i}", record))
    return sorted(entries, key=lambda e: int(e.where.rsplit(":", 1)[1]))


def _utf8_lines(path: Path) -> tuple[list[str], list[ManifestEntry]]:
    """The manifest's lines decoded as UTF-8; a line that is not UTF-8 becomes an empty line and an
    entry with ``error`` set (skipped and listed in the report, like a bad image)."""
    lines, bad = [], []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                lines.append(raw.decode("utf-8-sig" if i == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                lines.append("\n")
                bad.append(ManifestEntry(f"{path}:{i}", None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} "
                                                              f"at column {e.start + 1})"))
    return lines, bad


def record_problem(record: dict) -> str | None:
    """Why a record cannot become a sample (None when it can)."""
    if not isinstance(record.get("image"), str) or not record["image"]:
        return "no 'image' field"
    has_text = isinstance(record.get("text"), str) and record["text"].strip()
    has_qa = all(isinstance(record.get(k), str) and record[k].strip() for k in ("question", "answer"))
    if not (has_text or has_qa):
        return "no 'text' (or 'question' + 'answer') field"
    return None


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

# Alpha (RGBA, LA, PA, P with a transparent colour) is composited onto WHITE: transparent pixels
# become white, half-transparent ones a blend (value * a + 255 * (1 - a)), as a browser shows them.
BACKGROUND = (255, 255, 255)
ORIENTATION_TAG = 0x0112  # EXIF orientation; 1 (or absent) = stored upright


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        return 1


def _sample_range(im: Image.Image) -> float:
    """The value that means full intensity for a one-channel high-bit-depth image (modes I;16*,
    I, F): 65535 for 16-bit, 2^bits - 1 (2^(bits-1) - 1 signed) for an integer TIFF of its
    BitsPerSample, and for float images 1.0 when every value is in [0, 1], else 255 when every value
    is in [0, 255]; other float images have no known scale (:class:`BadImage`)."""
    if im.mode.startswith("I;16"):
        return 65535.0
    if im.mode == "I":
        tags = getattr(im, "tag_v2", None) or {}
        bits = tags.get(258, (16,))
        bits = int(bits[0] if isinstance(bits, (tuple, list)) else bits)
        signed = tags.get(339, (1,))
        signed = (signed[0] if isinstance(signed, (tuple, list)) else signed) == 2
        return float(2 ** (bits - 1 if signed else bits) - 1)
    lo, hi = im.getextrema()
    if lo >= 0 and hi <= 1:
        return 1.0
    if lo >= 0 and hi <= 255:
        return 255.0
    raise BadImage(f"float image (mode F) with values in [{lo:g}, {hi:g}]: no known scale "
                   "(expected 0..1 or 0..255)")


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of an image in any mode PIL opens, upright: EXIF orientation applied;
    high-bit-depth gray (I;16*, I, F) scaled to 0..255 by :func:`_sample_range` (PIL's own
    ``convert`` would clip it: a 16-bit PNG became white); alpha composited onto :data:`BACKGROUND`;
    every other mode through PIL's ``convert`` (16-bit RGB(A) PNGs PIL already reduces to 8 bits)."""
    # the scale before the transpose, which drops a TIFF's tags (its bit depth)
    full = _sample_range(im) if im.mode.startswith("I") or im.mode == "F" else None
    if _orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if full is not None:
        values = np.asarray(im, dtype=np.float64) * (255.0 / full)
        im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # mode L
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", im.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def jpeg_bytes(path: Path, quality: int = 95) -> bytes:
    """JPEG bytes of a fully decodable image file; raises :class:`BadImage` with the reason.
    Upright RGB/grayscale JPEGs are kept byte for byte; everything else (other modes, EXIF
    orientation != 1, other formats) is converted by :func:`_to_rgb` and re-encoded, so the shards
    hold upright 8-bit pixels that any decoder reads the same way."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would pass validation")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.format == "JPEG" and im.mode in ("RGB", "L") and _orientation(im) == 1:
                return raw
            out = io.BytesIO()
            _to_rgb(im).save(out, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: no chroma blur
            return out.getvalue()
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors)
        raise BadImage(f"not a decodable image ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class ShardWriter:
    """Writes ``prefix-NNNNNN.tar`` + ``.idx`` pairs of at most ``shard_size`` samples each."""

    def __init__(self, out_dir: Path, shard_size: int, prefix: str = SHARD_PREFIX):
        self.out_dir, self.shard_size, self.prefix = out_dir, shard_size, prefix
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp_tar = self._tmp_idx = None
        self._lines: list[str] = []
        self._weights: list[tuple[str, list | None]] = []  # (key, encoder_weights) per sample

    def add(self, key: str, jpeg: bytes, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r}: must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        components = []
        for ext, data in (("jpg", jpeg), ("json", json.dumps(meta, ensure_ascii=False).encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
            offset = self._tar.offset - _padded(len(data))  # data start = end - padded size
            components.append(f"{ext} {offset} {len(data)} {info.name}")
        self._lines.append(" ".join(components))
        self._weights.append((key, meta.get(encoder_weights.KEY)))
        if len(self._lines) == self.shard_size:
            self._close()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}"
        self._final = (self.out_dir / f"{name}.tar", self.out_dir / f"{name}.idx")
        self._tmp_tar = self.out_dir / f".{name}.tar.tmp"
        self._tmp_idx = self.out_dir / f".{name}.idx.tmp"
        self._tmp_weights = self.out_dir / f".{name}{encoder_weights.SIDE_SUFFIX}.tmp"
        self._tar = tarfile.open(self._tmp_tar, "w", format=tarfile.GNU_FORMAT)
        self._lines, self._weights = [], []

    def _close(self) -> None:
        self._tar.close()
        self._tmp_idx.write_text(f"{INDEX_VERSION} {len(self._lines)}\n" + "\n".join(self._lines) + "\n")
        tar, idx = self._final
        if any(w is not None for _, w in self._weights):  # the data router's weights, for load-time checks
            self._tmp_weights.write_text(json.dumps({"keys": [k for k, _ in self._weights],
                                                     encoder_weights.KEY: [w for _, w in self._weights]}))
            os.replace(self._tmp_weights, tar.with_name(tar.stem + encoder_weights.SIDE_SUFFIX))
        os.replace(self._tmp_idx, idx)  # the index first: a visible .tar always has its .idx
        os.replace(self._tmp_tar, tar)
        self.shards.append(tar.name)
        self._tar = None

    def close(self) -> None:
        if self._tar is not None:
            self._close()

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            for tmp in (self._tmp_tar, self._tmp_idx, self._tmp_weights):
                tmp.unlink(missing_ok=True)
            self._tar = None


def check_build_args(shard_size: int, output: Path, quality: int = 95) -> None:
    """One-line ValueError for arguments that make a build pointless."""
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard size {shard_size!r}: must be an integer >= 1 (samples per shard)")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality {quality}: must be in 1..100")
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output}: exists and is not a folder")


def _entry_jpeg(entry: ManifestEntry, image_root: Path, quality: int) -> bytes:
    """The entry's image as JPEG bytes; raises :class:`Skip` naming the path and the reason."""
    problem = entry.error or record_problem(entry.record)
    if problem is not None:
        path = entry.record.get("image") if entry.record and isinstance(entry.record.get("image"), str) else None
        raise Skip(str(image_root / path) if path else entry.where, problem)
    image_path = image_root / entry.record["image"]
    try:
        return jpeg_bytes(image_path, quality)
    except BadImage as e:
        raise Skip(str(image_path), str(e)) from None


def build_shards(entries: Iterable[ManifestEntry], output: str | os.PathLike, image_root: str | os.PathLike,
                 shard_size: int, quality: int = 95, shuffle_seed: int | None = None,
                 overwrite: bool = False, prefix: str = SHARD_PREFIX) -> BuildReport:
    """Validate every entry's image and write the good ones into shards under ``output``.

    ``shuffle_seed`` shuffles the sample order before writing (DALI shuffles only within a buffer).
    Existing shards in ``output`` are an error unless ``overwrite``. The new shards are built in
    ``output/.staging/`` and replace the old ones only when the build succeeded with at least one
    sample: a failed or empty build leaves ``output`` as it was. Bad ``encoder_weights`` in any
    record raise a one-line ValueError before anything is read or written.
    """
    import shutil

    output, image_root = Path(output), Path(image_root)
    check_build_args(shard_size, output, quality)
    if not image_root.is_dir():
        raise FileNotFoundError(f"image root {image_root}: no such folder")
    entries = list(entries)
    problem = encoder_weights.manifest_problem(entries)
    if problem is not None:
        raise ValueError(problem)
    output.mkdir(parents=True, exist_ok=True)
    old = (sorted(output.glob(f"{prefix}-*.tar")) + sorted(output.glob(f"{prefix}-*.idx"))
           + sorted(output.glob(f"{prefix}-*{encoder_weights.SIDE_SUFFIX}")))
    if old and not overwrite:
        raise FileExistsError(f"output {output}: already holds shards ({old[0].name}, ...); "
                              "pass overwrite=True / --overwrite to replace them")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(entries)
    report = BuildReport()
    staging = output / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted build
    staging.mkdir()
    writer = ShardWriter(staging, shard_size, prefix)
    try:
        for entry in entries:
            try:
                jpeg = _entry_jpeg(entry, image_root, quality)
            except Skip as e:
                report.skipped.append({"path": e.path, "where": entry.where, "reason": e.reason})
                continue
            key = f"{report.written:09d}"
            writer.add(key, jpeg, {**entry.record, "key": key})
            report.written += 1
        writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.shards = writer.shards
    if report.written == 0 and old:  # nothing to replace them with: keep the old shards
        shutil.rmtree(staging, ignore_errors=True)
        return report
    new_names = set()
    for name in writer.shards:  # side files and the index first: a visible .tar always has them
        side = Path(name).stem + encoder_weights.SIDE_SUFFIX
        for f in ([side] if (staging / side).is_file() else []) + [Path(name).with_suffix(".idx").name, name]:
            os.replace(staging / f, output / f)
            new_names.add(f)
    for path in old:
        if path.name not in new_names:
            path.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    _write_json(output / REPORT_FILE, report.to_dict(shard_size))
    return report


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def _index_count(header: str, path) -> int:
    version, count = header.split()
    if version != INDEX_VERSION:
        raise ValueError(f"index {path}: version {version!r}, expected {INDEX_VERSION}")
    return int(count)


def read_index(path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Samples of a DALI index: per sample a list of (ext, offset, size, name) components."""
    lines = Path(path).read_text().splitlines()
    samples = []
    for line in lines[1:1 + _index_count(lines[0], path)]:
        parts = line.split()
        samples.append([(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                        for i in range(0, len(parts), 4)])
    return samples


def index_count(path: str | os.PathLike) -> int:
    """Number of samples an index lists (reads its header line only)."""
    with open(path) as f:
        return _index_count(f.readline(), path)


def list_shards(folder: str | os.PathLike) -> list[ShardInfo]:
    """The ``*.tar`` shards of a folder (sorted by name) with their index files and sample counts."""
    folder = Path(folder)
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"shard folder {folder}: no *.tar shards "
                                "(build them with tools/prepare_data.py)")
    shards = []
    for tar in tars:
        idx = tar.with_suffix(".idx")
        if not idx.is_file():
            raise FileNotFoundError(f"shard {tar}: no index {idx.name} (rebuild with tools/prepare_data.py)")
        shards.append(ShardInfo(tar, idx, index_count(idx)))
    return shards


def check_shards(folder: str | os.PathLike) -> list[ShardInfo]:
    """:func:`list_shards`, and every shard is as long as its index says (a truncated or damaged
    shard or index is named in a one-line ValueError, before any reader opens it)."""
    shards = []
    for tar in sorted(Path(folder).glob("*.tar")):
        idx = tar.with_suffix(".idx")
        if not idx.is_file():
            raise FileNotFoundError(f"shard {tar}: no index {idx.name} (rebuild with tools/prepare_data.py)")
        try:
            lines = [ln for ln in idx.read_text().splitlines() if ln.strip()]
            count = _index_count(lines[0], idx)
            ends = [int(parts[i + 1]) + int(parts[i + 2]) for ln in lines[1:1 + count]
                    for parts in [ln.split()] for i in range(0, len(parts), 4)]
        except (ValueError, IndexError, UnicodeDecodeError):
            raise ValueError(f"index {idx}: damaged (rebuild the shards with tools/prepare_data.py)") from None
        if len(lines) - 1 < count:
            raise ValueError(f"index {idx}: lists {len(lines) - 1} of its {count} samples (truncated)")
        size = tar.stat().st_size
        if ends and max(ends) > size:
            raise ValueError(f"shard {tar}: truncated ({size} bytes, its index needs {max(ends)}); "
                             "rebuild it with tools/prepare_data.py")
        shards.append(ShardInfo(tar, idx, count))
    if not shards:
        raise FileNotFoundError(f"shard folder {folder}: no *.tar shards (build them with tools/prepare_data.py)")
    return shards


def read_shard(tar_path: str | os.PathLike) -> Iterator[tuple[str, bytes, dict]]:
    """(key, JPEG bytes, json record) of every sample, in stored order, with Python's ``tarfile``."""
    with tarfile.open(tar_path) as tar:
        pending: dict[str, dict[str, bytes]] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, ext = member.name.split(".", 1)
            parts = pending.setdefault(key, {})
            parts[ext] = tar.extractfile(member).read()
            if "jpg" in parts and "json" in parts:
                del pending[key]
                yield key, parts["jpg"], json.loads(parts["json"])
