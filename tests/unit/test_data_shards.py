"""Shard builder: validation and skip report, exact contents, DALI-readable indexes, CLI errors."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from megatron_vlm.data import shards
from tools import prepare_data


def _jpeg(path, value: int, size=(12, 10)) -> None:
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, format="JPEG")


@pytest.fixture
def raw(tmp_path):
    """7 good images (5 JPEG, 1 PNG, 1 RGBA PNG) + a truncated JPEG + a text file named .jpg."""
    root = tmp_path / "raw"
    (root / "img").mkdir(parents=True)
    records = []
    for i in range(5):
        _jpeg(root / "img" / f"ok{i}.jpg", 20 * i)
        records.append({"image": f"img/ok{i}.jpg", "text": f"caption {i}", "extra": i})
    Image.new("RGB", (9, 9), (0, 255, 0)).save(root / "img" / "green.png")
    Image.new("RGBA", (9, 9), (0, 0, 255, 128)).save(root / "img" / "alpha.png")
    records += [{"image": "img/green.png", "question": "what colour?", "answer": "green"},
                {"image": "img/alpha.png", "text": "half transparent"}]
    _jpeg(root / "img" / "trunc.jpg", 77, size=(64, 64))
    data = (root / "img" / "trunc.jpg").read_bytes()
    (root / "img" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "img" / "text.jpg").write_text("this is not an image\n")
    records.insert(2, {"image": "img/trunc.jpg", "text": "truncated"})
    records.insert(4, {"image": "img/text.jpg", "text": "not an image"})
    with open(root / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return root


def test_corrupt_images_are_reported_and_never_written(raw, tmp_path):
    out = tmp_path / "shards"
    report = shards.build_shards(shards.read_manifest(raw / "manifest.jsonl"), out, raw, shard_size=3)
    skipped = {row["path"]: row["reason"] for row in report.skipped}
    assert set(skipped) == {str(raw / "img" / "trunc.jpg"), str(raw / "img" / "text.jpg")}
    assert all("not a decodable image" in r for r in skipped.values())
    on_disk = json.loads((out / shards.REPORT_FILE).read_text())
    assert {row["path"] for row in on_disk["skipped"]} == set(skipped) and on_disk["written"] == 7

    assert [s.tar.name for s in shards.list_shards(out)] == [f"shard-00000{i}.tar" for i in range(3)]
    assert [s.num_samples for s in shards.list_shards(out)] == [3, 3, 1]
    samples = [s for info in shards.list_shards(out) for s in shards.read_shard(info.tar)]
    assert [meta["image"] for _, _, meta in samples] == [
        "img/ok0.jpg", "img/ok1.jpg", "img/ok2.jpg", "img/ok3.jpg", "img/ok4.jpg", "img/green.png", "img/alpha.png"]
    assert samples[0][2]["extra"] == 0 and samples[5][2]["answer"] == "green"
    assert samples[0][1] == (raw / "img" / "ok0.jpg").read_bytes()  # JPEGs stored byte for byte
    for key, jpeg, meta in samples:  # every stored image is a decodable RGB JPEG
        with Image.open(io.BytesIO(jpeg)) as im:
            im.load()
            assert im.format == "JPEG" and meta["key"] == key
    green = np.asarray(Image.open(io.BytesIO(samples[5][1])))
    assert abs(int(green[..., 1].mean()) - 255) < 8 and green[..., 0].mean() < 8
    assert not list(out.glob(".*.tmp"))


def test_index_matches_tar_offsets_and_dali_reads_it(raw, tmp_path):
    from nvidia.dali import fn, pipeline_def

    out = tmp_path / "shards"
    shards.build_shards(shards.read_manifest(raw / "manifest.jsonl"), out, raw, shard_size=4)
    infos = shards.list_shards(out)
    for info in infos:
        with tarfile.open(info.tar) as tar:
            members = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        for sample in shards.read_index(info.index):
            for ext, offset, size, name in sample:
                assert members[name] == (offset, size)

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)
    def pipe():
        images, meta = fn.readers.webdataset(paths=[str(i.tar) for i in infos], ext=["jpg", "json"],
                                             index_paths=[str(i.index) for i in infos])
        return fn.decoders.image(images, device="cpu"), meta

    p = pipe()
    p.build()
    images, meta = p.run()
    keys = [json.loads(np.asarray(meta[i]).tobytes())["key"] for i in range(7)]
    assert keys == [f"{i:09d}" for i in range(7)]
    assert np.asarray(images[0]).shape == (10, 12, 3)


def test_csv_manifest_and_missing_files(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    _jpeg(root / "a.jpg", 10)
    (root / "manifest.csv").write_text("image,text,source\na.jpg,hello,web\nmissing.jpg,gone,web\nb.jpg,,web\n")
    report = shards.build_shards(shards.read_manifest(root), tmp_path / "out", root, shard_size=10)
    assert report.written == 1
    reasons = {row["path"]: row["reason"] for row in report.skipped}
    assert reasons == {str(root / "missing.jpg"): "missing file",
                       str(root / "b.jpg"): "no 'text' (or 'question' + 'answer') field"}
    (_, _, meta), = shards.read_shard(tmp_path / "out" / "shard-000000.tar")
    assert meta["text"] == "hello" and meta["source"] == "web"


def test_existing_shards_need_overwrite(raw, tmp_path):
    out = tmp_path / "shards"
    shards.build_shards(shards.read_manifest(raw / "manifest.jsonl"), out, raw, shard_size=2)
    with pytest.raises(FileExistsError, match="already holds shards"):
        shards.build_shards(shards.read_manifest(raw / "manifest.jsonl"), out, raw, shard_size=5)
    shards.build_shards(shards.read_manifest(raw / "manifest.jsonl"), out, raw, shard_size=5, overwrite=True)
    assert [s.num_samples for s in shards.list_shards(out)] == [5, 2]


@pytest.mark.parametrize("argv, message", [
    (["--manifest", "{tmp}/nope.jsonl", "--output", "{tmp}/o"], "no such file"),
    (["--manifest", "{raw}/manifest.jsonl", "--output", "{tmp}/o", "--shard-size", "0"], "shard size 0"),
    (["--manifest", "{raw}/manifest.jsonl", "--output", "{raw}/manifest.jsonl"], "not a folder"),
    (["--manifest", "{raw}/manifest.jsonl", "--output", "{tmp}/o", "--image-root", "{tmp}/x"], "--image-root"),
    (["--manifest", "{tmp}", "--output", "{tmp}/o"], "no manifest.jsonl or manifest.csv"),
])
def test_cli_bad_arguments_give_one_line(raw, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, raw=raw) for a in argv]
    assert prepare_data.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("prepare_data.py: error:")
    assert not (tmp_path / "o").exists()


def test_cli_builds_shards(raw, tmp_path, capsys):
    assert prepare_data.main(["--input", str(raw / "manifest.jsonl"), "--output", str(tmp_path / "o"),
                              "--shard-size", "4"]) == 0
    assert "wrote 7 samples in 2 shard(s)" in capsys.readouterr().out
