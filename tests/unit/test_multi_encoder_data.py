"""Data side of several vision encoders (``model.vision`` a list, ``model.fusion``): one decode per
image and per-encoder resize / normalisation in the DALI graph (against PIL and against the
one-encoder graph), the data router's ``encoder_weights`` from manifest to batch, their checks
(prepare time without a model config, load time against it), and the inline layout's image
positions for sequence_append with 1-3 encoders.

Pixel tolerance: mean |ours - PIL| <= 1.0 of 255 levels per image and encoder, after undoing each
encoder's normalisation with its own mean/std (DALI's linear + antialias resize vs PIL's
BILINEAR, both from the same JPEG; measured <= 0.5). Another encoder's mean/std costs >= 10 levels.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vlm.config import Config, VisionConfig
from megatron_vlm.data import dali_loader, encoder_weights, shards
from megatron_vlm.data.dali_pipeline import ImageSpec, _encoded_graph, decode_images
from megatron_vlm.testing.images import gradient_image
from megatron_vlm.data.layout import TokenLayout
from megatron_vlm.data.mock import random_batch
from megatron_vlm.data.samples import SequenceBuilder
from megatron_vlm.data.tokenizer import train_bpe
from tools import prepare_data

# (image_size, patch_size, mean, std) per encoder; different sizes and normalisations
ENCODERS = [(16, 8, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
            (24, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            (12, 4, (0.2, 0.3, 0.4), (0.2, 0.25, 0.3))]
# (height, width): landscape / portrait / square; (W - H) even so the centre square is unambiguous
SIZES = [(30, 46), (40, 28), (20, 20), (36, 50)]
WEIGHTS = [[0.7, 0.3, 0.0], [0.0, 1.0, 2.0], [1, 1, 1], [0.25, 0.0, 0.75]]
MEAN_ABS_LEVELS = 1.0


def _cfg(n: int, method: str = "weighted_average", router: str = "data") -> Config:
    cfg = Config()
    cfg.model.vision = [VisionConfig(name=f"enc{i}", image_size=s, patch_size=p, image_mean=m, image_std=sd,
                                     generalist=i == 0)
                        for i, (s, p, m, sd) in enumerate(ENCODERS[:n])]
    cfg.model.fusion.method, cfg.model.fusion.router = method, router
    cfg.model.language.seq_length = 64
    return cfg


def _image(h: int, w: int, seed: int) -> Image.Image:
    return gradient_image(h, w, seed, period=16, step=12, noise=6)


def _manifest(root, rows: list[dict]) -> str:
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    rows = []
    for i, (h, w) in enumerate(SIZES):
        _image(h, w, i).save(root / f"{i}.jpg", quality=95)
        rows.append({"image": f"{i}.jpg", "text": f"image {i}", "encoder_weights": WEIGHTS[i]})
    entries = shards.read_manifest(_manifest(root, rows))
    for split in ("train", "val"):
        shards.build_shards(entries, root / "data" / split, root, shard_size=3)
    train_bpe([f"image {i}" for i in range(10)], 300, root / "data" / "tokenizer")
    return root


def _reference(jpeg: bytes, size: int, mean, std) -> np.ndarray:
    """PIL: shorter side centre square, bilinear resize to size x size, 0..255 HWC float."""
    im = Image.open(io.BytesIO(jpeg)).convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR), np.float64)


def _levels(chw: torch.Tensor, mean, std) -> np.ndarray:
    """Undo one encoder's normalisation: CHW normalised -> HWC 0..255."""
    x = chw.numpy().astype(np.float64).transpose(1, 2, 0)
    return (x * np.asarray(std) + np.asarray(mean)) * 255.0


def test_one_decode_per_image_and_per_encoder_preprocessing(data):
    cfg = _cfg(3)
    cfg.data.data_path, cfg.training.micro_batch_size = str(data / "data"), 4
    tok = dali_loader.load_tokenizer(cfg)
    loader = dali_loader.build_loader(cfg, "val", tok, 0, 1)
    specs = dali_loader.model_images(cfg.model)
    assert isinstance(specs, tuple) and len(specs) == 3
    # the graph decodes once and resizes / normalises once per encoder
    pipe = _encoded_graph(specs, "cpu", lambda: [np.zeros(1, np.uint8)], batch_size=1, num_threads=1,
                          device_id=None, prefetch_queue_depth=1)
    pipe.build()
    names = [op.name for op in pipe._ops]
    decoders = [n for n in names if re.fullmatch(r"__Image(Crop|Slice|RandomCrop)?_\d+", n)]
    assert len(decoders) == 1 and sum("Resize" in n for n in names) == 3, names

    batch = loader.next_batch()
    keys = loader.last_keys
    jpegs = {key: jpeg for shard in shards.list_shards(data / "data" / "val")
             for key, jpeg, _ in shards.read_shard(shard.tar)}
    assert isinstance(batch.images, tuple) and len(batch.images) == 3
    worst = 0.0
    for e, (size, _, mean, std) in enumerate(ENCODERS):
        assert batch.images[e].shape == (4, 1, 3, size, size)
        # exactly what the one-encoder graph gives for this encoder
        alone, grid = decode_images([jpegs[k] for k in keys], ImageSpec(size, mean, std))
        assert grid is None and torch.equal(batch.images[e][:, 0], alone)
        for i, key in enumerate(keys):
            ref = _reference(jpegs[key], size, mean, std)
            err = np.abs(_levels(batch.images[e][i, 0], mean, std) - ref).mean()
            other = ENCODERS[(e + 1) % 3]  # the next encoder's normalisation: far off
            wrong = np.abs(_levels(batch.images[e][i, 0], other[2], other[3]) - ref).mean()
            assert err <= MEAN_ABS_LEVELS < 10 * MEAN_ABS_LEVELS <= wrong, (e, key, err, wrong)
            worst = max(worst, err)
    print(f"mean |DALI - PIL| per image and encoder: at most {worst:.3f} levels")
    # the data router's weights, per sample in model.vision order, raw
    assert batch.router_weights.dtype == torch.float32 and batch.router_weights.shape == (4, 3)
    assert torch.equal(batch.router_weights, torch.tensor([WEIGHTS[int(k)] for k in keys], dtype=torch.float32))
    # the same samples through generation's decode: the tuple, encoder by encoder
    both, _ = decode_images([jpegs[k] for k in keys], specs)
    assert all(torch.equal(a, b[:, 0]) for a, b in zip(both, batch.images))
    # a learned router: no weights in the batch; one encoder: the plain tensor as before
    cfg.model.fusion.router = "learned"
    assert dali_loader.build_loader(cfg, "val", tok, 0, 1).next_batch().router_weights is None
    one = _cfg(1)
    one.data.data_path, one.training.micro_batch_size = cfg.data.data_path, 4
    single = dali_loader.build_loader(one, "val", tok, 0, 1).next_batch()
    assert torch.is_tensor(single.images) and torch.equal(single.images, batch.images[0])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_inline_layout_reserves_the_fused_image_tokens(tmp_path_factory, n):
    """sequence_append: every encoder's tokens (its grid, no class token); weighted_average: the
    generalist's. The builder (shards), mock data and generation prompts agree."""
    tok = train_bpe(["image 0 1 2"], 300, tmp_path_factory.mktemp("tok"))
    grids = [(s // p) ** 2 for s, p, _, _ in ENCODERS[:n]]  # 4, 9, 9
    for method, expected in (("sequence_append", sum(grids)), ("weighted_average", grids[0])):
        model = _cfg(n, method).model
        builder = SequenceBuilder.from_model_config(tok, model)
        images = tuple(torch.zeros(2, 3, s, s) for s, *_ in ENCODERS[:n])
        records = [{"text": "image 1", "encoder_weights": WEIGHTS[0][:n] if n > 1 else None}] * 2
        batch = builder.collate(records, images if n > 1 else images[0])
        image_positions = (batch.tokens == tok.image_token_id).sum(1).tolist()
        assert image_positions == [expected] * 2 and (batch.modality_ids[:, 1:1 + expected] == 0).all()
        assert (batch.modality_ids == 0).sum(1).tolist() == [expected] * 2
        mock = random_batch(model, 2, seed=0, image_token_id=tok.image_token_id, layout=TokenLayout.INLINE)
        assert (mock.tokens == tok.image_token_id).sum(1).tolist() == [expected] * 2
        shapes = [tuple(t.shape) for t in (mock.images if n > 1 else (mock.images,))]
        assert shapes == [(2, 1, 3, s, s) for s, *_ in ENCODERS[:n]]
        uses_weights = n > 1 and method != "sequence_append"
        assert (mock.router_weights is not None) == uses_weights == (batch.router_weights is not None)
        if uses_weights:
            assert mock.router_weights.shape == (2, n) and (mock.router_weights >= 0).all()
        assert len(builder.prompt_tokens("image", 1)) == 1 + expected + len(tok.encode("image"))


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("weights, message", [
    ([0.5, -0.5], "[0.5, -0.5]: -0.5 is negative"),
    ([0.5, float("nan")], "[0.5, NaN]: nan is not finite"),
    ([1.0, float("inf")], "inf is not finite"),
    ([0, 0], "[0, 0]: all 0"),
    ([0.5, "x"], "\"x\" is not a number"),
    (0.5, "0.5: not a non-empty list"),
])
def test_bad_weights_in_a_manifest_stop_prepare_data(data, tmp_path, capsys, weights, message):
    rows = [{"image": "0.jpg", "text": "a", "encoder_weights": [1, 2]},
            {"image": "1.jpg", "text": "b", "encoder_weights": weights}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN/Infinity literals
    out = tmp_path / "out"
    assert prepare_data.main(["--manifest", str(tmp_path / "m.jsonl"), "--image-root", str(data),
                              "--output", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"prepare_data.py: error: {tmp_path / 'm.jsonl'}:2: encoder_weights ")
    assert message in line and "allowed: a list of finite numbers >= 0" in line, line
    assert not out.exists()  # checked before anything is read or written


def test_manifest_weight_lengths_must_agree_and_csv_cells_parse(data, tmp_path, capsys):
    rows = [{"image": "0.jpg", "text": "a", "encoder_weights": [1, 2]},
            {"image": "1.jpg", "text": "b", "encoder_weights": [1, 2, 3]}]
    assert prepare_data.main(["--manifest", _manifest(tmp_path, rows), "--image-root", str(data),
                              "--output", str(tmp_path / "o")]) == 2
    assert "manifest.jsonl:2: encoder_weights [1, 2, 3]: 3 value(s) but" in _one_line(capsys.readouterr().err)
    (tmp_path / "m.csv").write_text('image,text,encoder_weights\n0.jpg,a,"[1, 0.5]"\n1.jpg,b,"[0, 2]"\n')
    assert prepare_data.main(["--manifest", str(tmp_path / "m.csv"), "--image-root", str(data),
                              "--output", str(tmp_path / "c")]) == 0
    side = json.loads((tmp_path / "c" / f"shard-000000{encoder_weights.SIDE_SUFFIX}").read_text())
    assert side == {"keys": ["000000000", "000000001"], "encoder_weights": [[1, 0.5], [0, 2]]}


def _split(root, name: str, weights: list) -> str:
    """A dataset folder whose train and val splits hold one sample per ``weights`` (None = no key)."""
    rows = [{"image": f"{i % 4}.jpg", "text": "t", **({} if w is None else {"encoder_weights": w})}
            for i, w in enumerate(weights)]
    out = root / name
    entries = shards.read_manifest(_manifest(root, rows))
    for split in ("train", "val"):
        shards.build_shards(entries, out / split, root, shard_size=2)
    (out / "tokenizer").symlink_to(root / "data" / "tokenizer")
    return str(out)


def test_load_checks_length_and_presence_against_the_config(data, tmp_path):
    """Before any model: DataSpec (pretrain_vlm's data check) names the shard and the sample; from
    the side files, and through the shards' json members when a shard has none."""
    import shutil

    from megatron_vlm.training.data_adapter import DataSpec

    for name in ("0.jpg", "1.jpg", "2.jpg", "3.jpg"):
        shutil.copy(data / name, tmp_path / name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tokenizer").symlink_to(data / "data" / "tokenizer")
    cases = [([[0, 1], [1, 2], [3, 0]], r"shard-000000\.tar sample 000000000: encoder_weights \[0, 1\]: "
              r"2 value\(s\) but model.vision has 3 encoders"),
             ([[1, 0, 0], [0, 1, 1], None], r"shard-000001\.tar sample 000000002: no encoder_weights: "
              r"model.fusion.router 'data' needs 3 weights"),
             ([None, None], r"sample 000000000: no encoder_weights")]
    for i, (weights, message) in enumerate(cases):
        cfg = _cfg(3)
        cfg.data.data_path = _split(tmp_path, f"d{i}", weights)
        with pytest.raises(ValueError, match=message) as e:
            DataSpec.from_config(cfg)
        assert "\n" not in str(e.value)
    # no side file (shards from before): the json members are read, the same message
    for side in (tmp_path / "d0").glob(f"*/*{encoder_weights.SIDE_SUFFIX}"):
        side.unlink()
    cfg.data.data_path = str(tmp_path / "d0")
    with pytest.raises(ValueError, match=cases[0][1]):
        DataSpec.from_config(cfg)
    # the good dataset passes; a learned router or sequence_append does not look at weights
    cfg.data.data_path = str(data / "data")
    assert DataSpec.from_config(cfg).tokenizer_vocab_size is not None
    assert encoder_weights.check_split(data / "data" / "train", 3) == len(SIZES)
    for method, router in (("weighted_average", "learned"), ("sequence_append", "data")):
        cfg = _cfg(3, method, router)
        cfg.data.data_path = str(tmp_path / "d2")
        assert DataSpec.from_config(cfg).data_path == cfg.data.data_path
    # the batch itself checks again (a loader built without DataSpec)
    with pytest.raises(ValueError, match=r"sample 7: encoder_weights \[1.0\]: 1 value"):
        encoder_weights.weights_tensor([{"key": "7", "encoder_weights": [1.0]}], 3)
    assert math.isclose(encoder_weights.weights_tensor([{"encoder_weights": [1, 0.5, 0]}], 3)[0, 1].item(), 0.5)


E2E_CONFIG = """
model:
  arch: joint_decoder
  vision:
    - {name: g, generalist: true, num_layers: 1, hidden_size: 16, num_attention_heads: 2, ffn_hidden_size: 32,
       image_size: 16, patch_size: 8}
    - {name: s, num_layers: 1, hidden_size: 16, num_attention_heads: 2, ffn_hidden_size: 32, image_size: 24,
       patch_size: 8, image_mean: [0.5, 0.5, 0.5], image_std: [0.5, 0.5, 0.5]}
  fusion: {method: weighted_average, router: data}
  language: {num_layers: 2, hidden_size: 32, num_attention_heads: 4, ffn_hidden_size: 48, seq_length: 24}
"""


def _train_and_generate(argv: list[str], root: str) -> dict:
    """pretrain_vlm, then generate.py on its checkpoint: the same image under three data weights,
    batched (KV-cached) and --no-cache; and the prompts' last-position logits."""
    import contextlib
    import io

    import torch

    from megatron_vlm.inference.cli import generate_main
    from megatron_vlm.inference.loading import load_model, read_checkpoint
    from megatron_vlm.inference.prompts import PromptBuilder, Request
    from megatron_vlm.testing.cli import pretrain

    root = Path(root)
    out = {"train": pretrain(argv)}
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "image", "image": "0.jpg", "encoder_weights": w}) + "\n"
                            for w in WEIGHT_ROWS))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        out["codes"] = [generate_main(["--load", str(root / "ckpt"), "--input", str(rows), "--max-new-tokens", "4",
                                       "--output", str(root / f"{name}.jsonl"), *extra])
                        for name, extra in (("cached", []), ("uncached", ["--no-cache"]))]
    out["stderr"] = err.getvalue()[-2000:]
    for name in ("cached", "uncached"):
        out[name] = [json.loads(line)["tokens"] for line in (root / f"{name}.jsonl").read_text().splitlines()]
    ckpt = read_checkpoint(str(root / "ckpt"))
    model = load_model(ckpt)
    prompts = PromptBuilder(ckpt.cfg.model, ckpt.tokenizer).build_all(
        [Request("image", [str(root / "0.jpg")], w) for w in WEIGHT_ROWS])
    with torch.no_grad():
        out["logits"] = [model(p, runtime_gather_output=True)[0, -1] for p in prompts]
    out["router_weights"] = [p.router_weights.tolist() for p in prompts]
    return out


WEIGHT_ROWS = ([1, 0], [0, 1], [2, 0])


def test_two_encoders_train_and_generate_with_data_weights(data, tmp_path):
    """pretrain_vlm (DALI shards, 2 encoders of 16 and 24 px, weighted_average with the data
    router) trains; each iteration is one epoch of the 4 samples, so the logged mean router weight
    of the generalist is the mean of the manifest weights normalised per sample. generate.py on
    the checkpoint: per-prompt weights reach the model (one-hot weights on the two encoders answer
    differently; weights are normalised, [2, 0] = [1, 0]), KV-cached in one batch equals --no-cache."""
    from megatron_vlm.testing.distributed import run_distributed

    weights = [[1, 0], [1, 1], [1, 2], [0, 3]]
    path = _split(data, "e2e", weights)
    shutil.copy(data / "0.jpg", tmp_path / "0.jpg")
    (tmp_path / "cfg.yaml").write_text(E2E_CONFIG)
    argv = ["--config", str(tmp_path / "cfg.yaml"), "--data-path", path, "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3", "--transformer-impl", "local",
            "--log-dir", str(tmp_path / "log"), "--log-interval", "1", "--set", "data.num_threads=1",
            "--set", "training.eval_interval=null", "--save", str(tmp_path / "ckpt")]
    (r,) = run_distributed(_train_and_generate, 1, argv, str(tmp_path), timeout=300)
    assert r["router_weights"] == [[[float(x) for x in w]] for w in WEIGHT_ROWS]
    assert r["train"] == 0 and r["codes"] == [0, 0], r["stderr"]
    records = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    expected = sum(w[0] / sum(w) for w in weights) / len(weights)  # 0.4583
    logged = [r["router_weight_g"] for r in records if "router_weight_g" in r]
    assert len(logged) == 2 and all(math.isfinite(r["loss"]) for r in records if "loss" in r), records
    assert all(abs(x - expected) < 1e-6 for x in logged), (logged, expected)
    assert all(abs(r["router_weight_g"] + r["router_weight_s"] - 1) < 1e-6 for r in records if "router_weight_s" in r)
    assert r["cached"] == r["uncached"] and all(len(t) == 4 for t in r["cached"]), r
    one, other, scaled = r["logits"]
    diff = (one - other).abs().max().item()
    print(f"generated {r['cached']}; logits: [1,0] vs [0,1] differ by {diff:.2e}")
    assert diff > 1e-4 and torch.allclose(one, scaled, rtol=0, atol=1e-6)
