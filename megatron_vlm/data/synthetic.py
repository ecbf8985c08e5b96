"""A seeded synthetic grounded dataset that a tiny model learns in minutes on a CPU.

Each image (default 32 x 32 px) shows 1-3 large shapes (circle, square, triangle) in 4 well
separated colours on a plain grey background, one shape per cell of a 2 x 2 grid. Each sample is
either a caption ("a red circle and a blue square.", shapes in reading order of their cells) or a
question with a one-word answer:

=========  ==============================  ==================================  ==================
type       question                        answer                              image guarantees
=========  ==============================  ==================================  ==================
colour     "what colour is the circle?"    red / green / blue / yellow         one circle
shape      "what shape is red?"            circle / square / triangle          one red shape
count      "how many shapes?"              one / two / three                   -
=========  ==============================  ==================================  ==================

Balance: (question parameter, answer) pairs are drawn by cycling through shuffled copies of all
combinations, so given the question text every answer is equally frequent (up to one incomplete
cycle): text alone cannot beat chance. ``chance_levels`` reports 1/#answers and the measured
text-only baseline (majority answer per question text on train, scored on val).

:func:`prepare` writes everything the quickstart needs under one folder::

    images/{train,val}/NNNNNN.jpg   manifest.jsonl (all records, with "split")
    train/*.tar|*.idx  val/*.tar|*.idx   (webdataset shards + DALI indexes + report.json)
    tokenizer/                            (byte-level BPE trained on the train texts)
    summary.json                          (sample counts, chance levels, vocab size)
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from megatron_vlm.data.shards import ManifestEntry, build_shards
from megatron_vlm.data.tokenizer import train_bpe

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (240, 220, 30)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
BACKGROUND = (128, 128, 128)
QUESTION_TYPES = ("colour", "shape", "count")
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNT_WORDS}
GRID = 2  # cells per side; one shape per cell


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    cell: int  # 0 .. GRID*GRID-1, reading order


@dataclass
class SplitSpec:
    name: str
    size: int
    caption_fraction: float


# ------------------------------------------------------------------------------------------------
# Scenes and texts
# ------------------------------------------------------------------------------------------------

def _cycled(rng: random.Random, items: list, n: int) -> list:
    """``n`` items: whole shuffled copies of ``items`` (+ part of one), so counts differ by <= 1."""
    out = []
    while len(out) < n:
        block = list(items)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def _scene(rng: random.Random, count: int, fixed: tuple[str, str] | None = None,
           other_shapes=SHAPES, other_colours=tuple(COLOURS)) -> list[Item]:
    """``count`` items in distinct cells; ``fixed`` (shape, colour) is one of them, the others
    take shapes from ``other_shapes`` and colours from ``other_colours``."""
    cells = rng.sample(range(GRID * GRID), count)
    items = [] if fixed is None else [Item(fixed[0], fixed[1], cells.pop())]
    items += [Item(rng.choice(other_shapes), rng.choice(other_colours), c) for c in cells]
    return sorted(items, key=lambda it: it.cell)


def draw(items: list[Item], size: int, rng: random.Random) -> Image.Image:
    """RGB image ``size`` x ``size``: each item fills 70-95% of its cell, jittered inside it."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    cell = size / GRID
    for it in items:
        side = cell * rng.uniform(0.7, 0.95)
        x0 = (it.cell % GRID) * cell + rng.uniform(0, cell - side)
        y0 = (it.cell // GRID) * cell + rng.uniform(0, cell - side)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        colour = COLOURS[it.colour]
        if it.shape == "circle":
            pen.ellipse(box, fill=colour)
        elif it.shape == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(x0 + side / 2, y0), (box[2], box[3]), (x0, box[3])], fill=colour)
    return image


def caption(items: list[Item]) -> str:
    words = [f"a {it.colour} {it.shape}" for it in items]
    return (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]) + "."


def _question_samples(rng: random.Random, qtype: str, n: int) -> list[tuple[list[Item], str, str]]:
    """``n`` (items, question, answer) of one type, answers balanced per question text."""
    out = []
    if qtype == "colour":
        for shape, colour in _cycled(rng, list(itertools.product(SHAPES, COLOURS)), n):
            others = tuple(s for s in SHAPES if s != shape)
            out.append((_scene(rng, rng.randint(1, 3), (shape, colour), other_shapes=others),
                        f"what colour is the {shape}?", colour))
    elif qtype == "shape":
        for colour, shape in _cycled(rng, list(itertools.product(COLOURS, SHAPES)), n):
            others = tuple(c for c in COLOURS if c != colour)
            out.append((_scene(rng, rng.randint(1, 3), (shape, colour), other_colours=others),
                        f"what shape is {colour}?", shape))
    elif qtype == "count":
        for count in _cycled(rng, [1, 2, 3], n):
            out.append((_scene(rng, count), "how many shapes?", COUNT_WORDS[count - 1]))
    else:
        raise ValueError(f"question type {qtype!r}: allowed {list(QUESTION_TYPES)}")
    return out


def generate_split(out_dir: Path, spec: SplitSpec, image_size: int, seed: int) -> list[dict]:
    """Write the split's images under ``out_dir/images/<split>/``; return its manifest records."""
    rng = random.Random(f"{seed}/{spec.name}")
    n_caption = round(spec.size * spec.caption_fraction)
    kinds = ["caption"] * n_caption + _cycled(rng, list(QUESTION_TYPES), spec.size - n_caption)
    rng.shuffle(kinds)
    pools = {q: iter(_question_samples(rng, q, kinds.count(q))) for q in QUESTION_TYPES}
    image_dir = out_dir / "images" / spec.name
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, kind in enumerate(kinds):
        rel = f"images/{spec.name}/{i:06d}.jpg"
        if kind == "caption":
            items = _scene(rng, rng.randint(1, 3))
            text = {"text": caption(items)}
        else:
            items, question, answer = next(pools[kind])
            text = {"question": question, "answer": answer}
        draw(items, image_size, rng).save(out_dir / rel, format="JPEG", quality=95, subsampling=0)
        records.append({"image": rel, **text, "qtype": kind, "split": spec.name,
                        "objects": [[it.shape, it.colour, it.cell] for it in items]})
    return records


def generate(out_dir: str | Path, num_train: int = 4000, num_val: int = 400, image_size: int = 32,
             seed: int = 0, caption_fraction: float = 0.2) -> list[dict]:
    """Images + ``manifest.jsonl`` for train (captions + questions) and val (questions only)."""
    if num_train < 1 or num_val < 1 or image_size < 8 or not 0 <= caption_fraction < 1:
        raise ValueError(f"num_train={num_train}, num_val={num_val}, image_size={image_size}, "
                         f"caption_fraction={caption_fraction}: need >= 1, >= 1, >= 8 px, in [0, 1)")
    out_dir = Path(out_dir)
    records = (generate_split(out_dir, SplitSpec("train", num_train, caption_fraction), image_size, seed)
               + generate_split(out_dir, SplitSpec("val", num_val, 0.0), image_size, seed))
    with open(out_dir / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


# ------------------------------------------------------------------------------------------------
# Chance levels
# ------------------------------------------------------------------------------------------------

def chance_levels(train: list[dict], val: list[dict]) -> dict[str, dict]:
    """Per question type: #answers, 1/#answers, and the text-only baseline's val accuracy
    (majority train answer of the same question text), plus the val-weighted ``overall``."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        if "question" in r:
            votes[r["question"]][r["answer"]] += 1
    out = {}
    for qtype in QUESTION_TYPES:
        rows = [r for r in val if r.get("qtype") == qtype]
        hits = sum(bool(votes[r["question"]]) and votes[r["question"]].most_common(1)[0][0] == r["answer"]
                   for r in rows)
        out[qtype] = {"answers": len(ANSWERS[qtype]), "chance": 1 / len(ANSWERS[qtype]),
                      "text_only": hits / max(len(rows), 1), "val_samples": len(rows)}
    total = sum(v["val_samples"] for v in out.values())
    out["overall"] = {key: sum(v[key] * v["val_samples"] for v in out.values()) / max(total, 1)
                      for key in ("chance", "text_only")} | {"val_samples": total}
    return out


def training_texts(records: list[dict]) -> list[str]:
    return [r["text"] if "text" in r else f"{r['question']} {r['answer']}" for r in records]


# ------------------------------------------------------------------------------------------------
# Everything for the quickstart
# ------------------------------------------------------------------------------------------------

def prepare(out_dir: str | Path, num_train: int = 4000, num_val: int = 400, image_size: int = 32,
            seed: int = 0, caption_fraction: float = 0.2, shards: bool = True, shard_size: int = 500,
            vocab_size: int = 384, overwrite: bool = False) -> dict:
    """Generate the dataset and (``shards``) its train/val shards and tokenizer; return a summary."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output {out_dir}: not empty (pass --overwrite to regenerate)")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = generate(out_dir, num_train, num_val, image_size, seed, caption_fraction)
    splits = {name: [r for r in records if r["split"] == name] for name in ("train", "val")}
    summary = {"dir": str(out_dir), "samples": {k: len(v) for k, v in splits.items()},
               "chance": chance_levels(splits["train"], splits["val"])}
    if shards:
        for name, rows in splits.items():
            entries = [ManifestEntry(f"{out_dir / 'manifest.jsonl'}:{name}:{i}", r) for i, r in enumerate(rows)]
            report = build_shards(entries, out_dir / name, out_dir, shard_size, overwrite=True)
            summary[f"{name}_shards"] = len(report.shards)
        tok = train_bpe(training_texts(splits["train"]), vocab_size, out_dir / "tokenizer")
        summary["vocab_size"] = tok.vocab_size
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
