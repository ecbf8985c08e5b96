"""Synthetic grounded dataset: seeded, grounded in the image, balanced per question, one command."""

import hashlib
import json
import time
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from megatron_vlm.data import synthetic
from megatron_vlm.data.shards import list_shards
from megatron_vlm.data.tokenizer import Tokenizer
from tools import make_synthetic_dataset


def _digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_seeded_determinism(tmp_path):
    a = synthetic.generate(tmp_path / "a", num_train=30, num_val=12, seed=7)
    b = synthetic.generate(tmp_path / "b", num_train=30, num_val=12, seed=7)
    c = synthetic.generate(tmp_path / "c", num_train=30, num_val=12, seed=8)
    assert a == b and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert a != c


def _colour_pixels(image: np.ndarray, colour: str) -> int:
    return int((np.abs(image.astype(int) - synthetic.COLOURS[colour]).sum(-1) < 60).sum())


def test_answers_are_grounded_in_the_image(tmp_path):
    records = synthetic.generate(tmp_path, num_train=120, num_val=30, image_size=32, seed=1)
    for r in records:
        objects = [tuple(o) for o in r["objects"]]
        image = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB"))
        for colour in synthetic.COLOURS:  # the drawn colours are exactly the described ones
            present = any(c == colour for _, c, _ in objects)
            assert (_colour_pixels(image, colour) > 30) == present, (r, colour)
        if r["qtype"] == "colour":
            shape = r["question"].split()[-1].rstrip("?")
            assert [c for s, c, _ in objects if s == shape] == [r["answer"]]
        elif r["qtype"] == "shape":
            colour = r["question"].split()[-1].rstrip("?")
            assert [s for s, c, _ in objects if c == colour] == [r["answer"]]
        elif r["qtype"] == "count":
            assert synthetic.COUNT_WORDS[len(objects) - 1] == r["answer"]
        else:
            assert r["text"] == synthetic.caption([synthetic.Item(*o) for o in objects])
    assert all("question" in r for r in records if r["split"] == "val")


def test_answers_are_balanced_given_the_question(tmp_path):
    records = synthetic.generate(tmp_path, num_train=600, num_val=120, seed=2)
    per_question = defaultdict(Counter)
    for r in records:
        if r["split"] == "train" and "question" in r:
            per_question[r["question"]][r["answer"]] += 1
    assert len(per_question) == len(synthetic.SHAPES) + len(synthetic.COLOURS) + 1
    for question, counts in per_question.items():
        qtype = "count" if question.startswith("how many") else "colour" if "colour" in question else "shape"
        assert set(counts) == set(synthetic.ANSWERS[qtype]), question
        assert max(counts.values()) - min(counts.values()) <= 1, (question, counts)
    chance = synthetic.chance_levels([r for r in records if r["split"] == "train"],
                                     [r for r in records if r["split"] == "val"])
    assert chance["colour"]["chance"] == 0.25 and chance["count"]["chance"] == pytest.approx(1 / 3)
    for qtype in synthetic.QUESTION_TYPES:  # text alone is no better than chance
        assert chance[qtype]["text_only"] <= chance[qtype]["chance"] + 0.15


def test_one_command_prepares_the_quickstart(tmp_path, capsys):
    out = tmp_path / "ds"
    start = time.time()
    assert make_synthetic_dataset.main(["--output", str(out), "--num-train", "200", "--num-val", "40",
                                        "--shard-size", "64"]) == 0
    assert time.time() - start < 30
    text = capsys.readouterr().out
    assert "chance-level accuracy" in text and "colour" in text and "25.0%" in text
    assert [s.num_samples for s in list_shards(out / "train")] == [64, 64, 64, 8]
    assert sum(s.num_samples for s in list_shards(out / "val")) == 40
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    assert all(len(tok.encode(" " + a)) == 1 for answers in synthetic.ANSWERS.values() for a in answers)
    assert json.loads((out / "train" / "report.json").read_text())["skipped"] == []
    # the training loop's data spec accepts the folder as --data-path
    from megatron_vlm.config import Config
    from megatron_vlm.training.data_adapter import DataSpec

    cfg = Config()
    cfg.data.data_path = str(out)
    spec = DataSpec.from_config(cfg)
    assert (spec.tokenizer_vocab_size, spec.image_token_id) == (tok.vocab_size, tok.image_token_id)


def test_bad_arguments(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert make_synthetic_dataset.main(["--output", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert make_synthetic_dataset.main(["--output", str(tmp_path / "n"), "--num-train", "0"]) == 2
    assert "num_train=0" in capsys.readouterr().err
    assert make_synthetic_dataset.main(["--output", str(tmp_path / "s"), "--shard-size", "0",
                                        "--num-train", "10", "--num-val", "5"]) == 2
    assert "shard size 0" in capsys.readouterr().err
