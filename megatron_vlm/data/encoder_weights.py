"""Per-sample weights of the data router (``model.fusion.router: data``, several vision encoders).

Manifest key (JSONL: a list; CSV: the column's text is a JSON list)::

    {"image": "a.jpg", "text": "...", "encoder_weights": [0.7, 0.3, 0.0]}

one weight per encoder in ``model.vision`` order, raw (finite, >= 0, not all 0; the model divides
the used entries by their sum, once). Checked twice, each time before any expensive work, one line
per problem naming the sample:

* ``tools/prepare_data.py`` (no model config): a list of numbers, finite, non-negative, not all 0,
  the same length in every record of the manifest (:func:`manifest_problem`).
* load time (``pretrain_vlm.py``, ``tools/evaluate.py``): every sample of a split has weights and
  their count equals the number of encoders (:func:`check_split`). It reads the shards' side files
  ``<shard>.weights.json`` (``{"keys": [...], "encoder_weights": [...]}``, written next to each
  shard by :class:`~megatron_vlm.data.shards.ShardWriter`), never an image; shards without one
  (built before) are read through their index, json members only.

The batch field (``VLMBatch.router_weights`` ``[b, E]`` float32) comes from each sample's json
record (:func:`weights_tensor`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

KEY = "encoder_weights"
SIDE_SUFFIX = ".weights.json"
ALLOWED = "allowed: a list of finite numbers >= 0, not all 0, one per encoder in model.vision order"


def router_encoders(model) -> int | None:
    """E when the model takes per-sample data weights (several encoders, a fusion method with a
    router, ``router: data``), else None."""
    fusion = getattr(model, "fusion", None)
    if len(model.vision) < 2 or fusion is None:
        return None
    if fusion.method == "sequence_append" or fusion.router != "data":
        return None
    return len(model.vision)


def _show(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def value_problem(value) -> str | None:
    """Why ``value`` is not a valid weight list (no model config needed), or None."""
    if not isinstance(value, list) or not value:
        return f"{KEY} {_show(value)}: not a non-empty list; {ALLOWED}"
    for w in value:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            return f"{KEY} {_show(value)}: {_show(w)} is not a number; {ALLOWED}"
        if not math.isfinite(w):
            return f"{KEY} {_show(value)}: {w} is not finite; {ALLOWED}"
        if w < 0:
            return f"{KEY} {_show(value)}: {w} is negative; {ALLOWED}"
    if not any(value):
        return f"{KEY} {_show(value)}: all 0; {ALLOWED}"
    return None


def parse(value):
    """A manifest value as a list: CSV cells hold the list as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def length_problem(value: list, num_encoders: int) -> str | None:
    if len(value) != num_encoders:
        return (f"{KEY} {_show(value)}: {len(value)} value(s) but model.vision has {num_encoders} "
                f"encoders; {ALLOWED}")
    return None


def missing_problem(num_encoders: int, where: str = "every sample's manifest record") -> str:
    return (f"no {KEY}: model.fusion.router 'data' needs {num_encoders} weights (one per encoder, "
            f"model.vision order) in {where}")


def manifest_problem(entries) -> str | None:
    """The first problem of the ``encoder_weights`` of manifest ``entries`` (``where: reason``), or
    None. Normalises CSV text to lists in place. Records that fail otherwise are left to the build
    (skipped and reported there)."""
    first = None  # (where, length) of the first record with weights
    for entry in entries:
        record = entry.record
        if not isinstance(record, dict) or KEY not in record:
            continue
        record[KEY] = value = parse(record[KEY])
        problem = value_problem(value)
        if problem is not None:
            return f"{entry.where}: {problem}"
        if first is None:
            first = (entry.where, len(value))
        elif len(value) != first[1]:
            return (f"{entry.where}: {KEY} {_show(value)}: {len(value)} value(s) but {first[0]} has "
                    f"{first[1]}; every record needs one weight per encoder")
    return None


def sample_problem(value, num_encoders: int, where: str = "every sample's manifest record") -> str | None:
    """Load-time check of one sample's value (``None`` = missing; ``where`` they belong)."""
    if value is None:
        return missing_problem(num_encoders, where)
    return value_problem(value) or length_problem(value, num_encoders)


def _shard_weights(tar: Path, index: Path):
    """(key, value or None) of every sample of one shard: its side file, else its json members."""
    side = tar.with_name(tar.stem + SIDE_SUFFIX)
    if side.is_file():
        data = json.loads(side.read_text())
        yield from zip(data["keys"], data[KEY])
        return
    from megatron_vlm.data.shards import read_index

    with open(tar, "rb") as f:
        for components in read_index(index):
            for ext, offset, size, name in components:
                if ext == "json":
                    f.seek(offset)
                    record = json.loads(f.read(size))
                    yield record.get("key", name.rsplit(".", 1)[0]), record.get(KEY)


def check_split(folder: str | os.PathLike, num_encoders: int) -> int:
    """Every sample of the shard folder has valid weights of ``num_encoders`` values; raises a
    one-line ValueError naming the first bad sample (shard and key). Returns the samples checked."""
    from megatron_vlm.data.shards import list_shards

    count = 0
    for shard in list_shards(folder):
        for key, value in _shard_weights(shard.tar, shard.index):
            problem = sample_problem(value, num_encoders)
            if problem is not None:
                raise ValueError(f"{shard.tar} sample {key}: {problem}")
            count += 1
    return count


def weights_tensor(records: list[dict], num_encoders: int):
    """``[b, E]`` float32 of the records' weights (each checked; one-line ValueError naming the key)."""
    import torch

    rows = []
    for record in records:
        value = record.get(KEY)
        problem = sample_problem(value, num_encoders)
        if problem is not None:
            raise ValueError(f"sample {record.get('key', '?')}: {problem}")
        rows.append([float(w) for w in value])
    return torch.tensor(rows, dtype=torch.float32)
