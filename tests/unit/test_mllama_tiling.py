"""Mllama tiling (``model.vision.max_tiles``): our DALI data path vs transformers'
MllamaImageProcessor on the same JPEG files; config rules; mock batches; ``verify`` (our imported
model vs transformers' MllamaForConditionalGeneration) on a multi-tile image; multi-tile images
training through pretrain_vlm (cross_attention, DALI shards).

Tolerance of the pixel comparison: mean |ours - HF| <= 0.01 per image in normalised units (about
0.7 of one 8-bit level at std 0.27). Both resize with a linear filter widened for downscaling
(DALI ``INTERP_LINEAR`` + antialias vs PIL ``BILINEAR``) and round to uint8, but their kernels and
rounding differ slightly; the measured mean is <= 0.003 (max 0.1 on sharp edges), exact where no
resize happens. A wrong grid, offset, tile order or normalisation costs > 0.1. Grids, aspect-ratio
ids and tile masks must be equal, and unused tiles exactly 0.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vlm.config import Config, ConfigError, validate
from megatron_vlm.conversion import tiny
from megatron_vlm.data import dali_loader, shards
from megatron_vlm.data.tiling import aspect_ratio_ids, supported_grids, tile_mask
from megatron_vlm.data.tokenizer import train_bpe
from megatron_vlm.testing.images import gradient_image

TILE, TILES = 28, 4
# (height, width): upscaled 1 tile, exact 1x2 fit (no resize), 2x2 downscaled, 2x2 unresized
# (padded), wide and tall beyond 4 tiles (1x4 / 4x1, padded), 3x1 of an odd size, a near-square
# that still gets 2x2, a tiny wide one (upscaled, 1x2)
SIZES = [(10, 10), (28, 56), (100, 100), (40, 45), (20, 500), (300, 50), (61, 30), (200, 190), (9, 25)]
MEAN_ABS_TOL = 0.01


@functools.lru_cache(maxsize=1)
def _tower() -> dict:
    return dict(tiny.mllama_config(image_size=TILE).vision_config.to_dict(), model_type="mllama_vision_model")


def _mllama_cfg(arch: str = "cross_attention", tiles: int = TILES) -> Config:
    cfg = Config()
    cfg.model.arch = arch
    cfg.model.projector = "affine"
    cfg.model.cross_attention.every = 1
    v = cfg.model.vision_encoder
    v.image_size, v.patch_size, v.max_tiles = TILE, 14, tiles
    v.hf_config = copy.deepcopy(_tower())
    return cfg


def _image(h: int, w: int, seed: int) -> Image.Image:
    return gradient_image(h, w, seed)


@pytest.fixture(scope="module")
def tiled_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    entries = []
    for i, (h, w) in enumerate(SIZES):
        _image(h, w, i).save(root / f"{i}.jpg", quality=95)
        entries.append(shards.ManifestEntry(str(i), {"image": f"{i}.jpg", "text": f"image {i}"}))
    shards.build_shards(entries, root / "data" / "val", root, shard_size=4)
    train_bpe(["image 0 1 2 3 4 5 6 7 8"], 300, root / "data" / "tokenizer")
    return root


def test_dali_tiles_match_mllama_image_processor(tiled_data):
    from transformers import MllamaImageProcessor

    cfg = _mllama_cfg()
    cfg.data.data_path = str(tiled_data / "data")
    cfg.training.micro_batch_size = len(SIZES)
    cfg.model.language.seq_length = 16
    batch = dali_loader.build_loader(cfg, "val", dali_loader.load_tokenizer(cfg), 0, 1).next_batch()
    v = cfg.model.vision_encoder
    # the same files, as the processor gets them (decoded by PIL); our mean/std
    files = [Image.open(io.BytesIO((tiled_data / f"{i}.jpg").read_bytes())).convert("RGB") for i in range(len(SIZES))]
    ref = MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=TILES,
                               image_mean=list(v.image_mean), image_std=list(v.image_std))([[f] for f in files],
                                                                                           return_tensors="pt")
    assert batch.images.shape == (len(SIZES), 1, TILES, 3, TILE, TILE)
    assert torch.equal(batch.aspect_ratio_ids, ref["aspect_ratio_ids"])
    assert torch.equal(batch.aspect_ratio_mask.long(), ref["aspect_ratio_mask"])
    assert [int(m.sum()) for m in batch.aspect_ratio_mask[:, 0]] == [n[0] for n in ref["num_tiles"]]
    assert len(set(batch.aspect_ratio_ids[:, 0].tolist())) >= 6  # the cases cover most grids
    pixels = ref["pixel_values"]
    for i in range(len(SIZES)):
        real = batch.aspect_ratio_mask[i, 0]
        assert (batch.images[i, 0, ~real] == 0).all() and (pixels[i, 0, ~real] == 0).all()
        diff = (batch.images[i, 0, real] - pixels[i, 0, real]).abs()
        print(f"{SIZES[i]} -> id {int(batch.aspect_ratio_ids[i, 0])}, {int(real.sum())} tiles: "
              f"mean abs {diff.mean():.4f} max {diff.max():.3f}")
        assert diff.mean() <= MEAN_ABS_TOL, SIZES[i]
    # the tolerance separates: tiles in the wrong order are far off
    square = SIZES.index((100, 100))
    swapped = batch.images[square, 0, [1, 0, 3, 2]]
    assert (swapped - pixels[square, 0]).abs().mean() > 10 * MEAN_ABS_TOL


def test_tiled_loader_resumes_exactly(tiled_data):
    """The reader state moves into the tiled graph's checkpoint (its other operators are stateless)."""
    cfg = _mllama_cfg()
    cfg.data.data_path = str(tiled_data / "data")
    cfg.training.micro_batch_size = 3
    cfg.model.language.seq_length = 16
    tok = dali_loader.load_tokenizer(cfg)
    loader = dali_loader.build_loader(cfg, "val", tok, 0, 1)
    first, second = loader.next_batch(), loader.next_batch()
    resumed = dali_loader.build_loader(cfg, "val", tok, 0, 1)
    resumed.load_state_dict(loader.state_dict() | {"samples_consumed": 3})
    again = resumed.next_batch()
    assert not torch.equal(first.images, second.images)
    for name in ("images", "aspect_ratio_ids", "aspect_ratio_mask", "tokens"):
        assert torch.equal(getattr(again, name), getattr(second, name)), name


def test_ids_and_masks_follow_the_grid():
    assert supported_grids(4) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    grid = torch.tensor([[1, 1], [3, 1], [1, 4], [2, 2]])
    assert aspect_ratio_ids(grid, 4).tolist() == [1, 7, 4, 6]
    assert tile_mask(grid, 4).sum(1).tolist() == [1, 3, 4, 4]


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.model.vision_encoder, "max_tiles", 0), "model.vision.max_tiles=0: must be a positive integer"),
    (lambda c: setattr(c.model.vision_encoder, "max_tiles", 2), "must be 1 or the Mllama tower's max_num_tiles=4"),
    (lambda c: setattr(c.model, "arch", "joint_decoder"), "tiles need the cross_attention arch"),
    (lambda c: setattr(c.model.vision_encoder, "hf_config", None), "tiles need the wrapped Mllama vision tower"),
    (lambda c: c.model.vision_encoder.hf_config.update(supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [2, 2]]),
     "supported_aspect_ratios"),
])
def test_bad_tiling_configs_fail_with_one_line(change, message):
    cfg = _mllama_cfg()
    validate(cfg)
    change(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_mock_batches_are_tiled():
    from megatron_vlm.data.layout import TokenLayout
    from megatron_vlm.data.mock import random_batch

    cfg = _mllama_cfg()
    b = random_batch(cfg.model, 6, seed=0, layout=TokenLayout.MARKER)
    assert b.images.shape == (6, 1, TILES, 3, TILE, TILE) and b.aspect_ratio_ids.shape == (6, 1)
    real = b.aspect_ratio_mask
    assert (b.images[~real] == 0).all() and (b.images[real] != 0).all()
    grids = [supported_grids(TILES)[i - 1] for i in b.aspect_ratio_ids[:, 0].tolist()]
    assert real[:, 0].sum(1).tolist() == [h * w for h, w in grids]


# ------------------------------------------------------------------------------------------------
# the model: verify against transformers, training through pretrain_vlm (spawned processes)
# ------------------------------------------------------------------------------------------------

VERIFY_TOL = 5e-6  # tighter than the conversion tests' 1e-4 (fp32); measured 0 (bit-identical) on CPU


def _import_verify(hf: str, work: str) -> dict:
    from dataclasses import replace

    from megatron_vlm.conversion.convert import import_hf
    from megatron_vlm.conversion.families import family_for_arch
    from megatron_vlm.conversion.verify import load_hf, load_megatron, verify

    import_hf(hf, f"{work}/mcore", model_overrides={"vision.max_tiles": TILES})
    res = verify(hf, f"{work}/mcore", seed=1, generate=4)
    # the same sample; our model told that every tile is real: attends the padded tile as well
    cfg, model = load_megatron(f"{work}/mcore")
    family = family_for_arch("cross_attention")
    sample = family.sample_inputs(cfg.model, seed=1)
    with torch.no_grad():
        theirs = family.hf_logits(load_hf(family, hf, torch.float32), sample)
        opened = model(replace(sample, aspect_ratio_mask=torch.ones_like(sample.aspect_ratio_mask)))
    return dict(res.__dict__, images=tuple(sample.images.shape), tiles=sample.aspect_ratio_mask.sum().item(),
                padded_tile_attended=(opened[..., :theirs.shape[-1]] - theirs).abs().max().item())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny random Mllama (HF vocab 320: the test tokenizer's 300 ids fit), imported with
    ``--set model.vision.max_tiles=4`` and verified, in one spawned process."""
    from megatron_vlm.testing.distributed import run_distributed

    root = tmp_path_factory.mktemp("mllama")
    hf = tiny.save_mllama(root / "hf", image_size=TILE, vocab=320)
    (result,) = run_distributed(_import_verify, 1, str(hf), str(root), timeout=300)
    return root, result


def test_verify_multi_tile_image_against_transformers(imported):
    _, r = imported
    print(f"multi-tile verify: image {r['images']} ({r['tiles']} real tiles), max abs diff "
          f"{r['max_abs_diff']:.2e} over {r['shape']} (our model attending the padded tile: "
          f"{r['padded_tile_attended']:.3f}); generated {r['generated_megatron']} / {r['generated_hf']}")
    assert r["images"] == (1, 1, TILES, 3, TILE, TILE) and 1 < r["tiles"] < TILES
    assert r["max_abs_diff"] <= VERIFY_TOL and r["argmax_agree"] == 1.0
    assert r["generated_megatron"] == r["generated_hf"] and len(r["generated_hf"]) == 4
    assert r["padded_tile_attended"] > 1e-2  # the tile mask matters: HF hides the padded tile too


def _train_split(tiled_data) -> Path:
    data = tiled_data / "data"
    if not (data / "train").exists():
        entries = [shards.ManifestEntry(str(i), {"image": f"{i}.jpg", "text": f"image {i}"}) for i in range(len(SIZES))]
        shards.build_shards(entries, data / "train", tiled_data, shard_size=4)
    return data


def _train_argv(root: Path, data: Path, log: Path, micro_batch_size: int) -> list[str]:
    """Fine-tune the imported checkpoint on the tiled shards: 3 iterations of 3 samples."""
    return ["--config", str(root / "mcore" / "iter_0000000" / "config.yaml"), "--load", str(root / "mcore"),
            "--finetune", "--data-path", str(data), "--micro-batch-size", str(micro_batch_size),
            "--global-batch-size", "3", "--train-iters", "3", "--lr", "1e-2", "--weight-decay", "0",
            "--seq-length", "16", "--transformer-impl", "local", "--log-dir", str(log),
            "--set", "data.num_threads=1", "--set", "training.eval_interval=null"]


def test_multi_tile_images_train_through_pretrain_vlm(tiled_data, imported, tmp_path):
    """The imported tiny Mllama (max_tiles 4) on shards of 9 images of 6 different tile grids:
    pretrain_vlm (cross_attention, DALI) trains; the vision tower's tile position embedding rows
    of the grids in the data change, those of grids absent from the data stay exactly as imported
    (no weight decay, Adam): the aspect-ratio ids reach the tower, per image."""
    from megatron_vlm.testing.cli import pretrain, read_checkpoint
    from megatron_vlm.testing.distributed import run_distributed

    root, _ = imported
    data = _train_split(tiled_data)
    argv = _train_argv(root, data, tmp_path / "log", micro_batch_size=3) + ["--save", str(tmp_path / "out")]
    assert run_distributed(pretrain, 1, argv, timeout=300) == [0]
    records = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0], records
    key = "gated_positional_embedding.tile_embedding.weight"
    before = tiny.load_safetensors_dir(root / "hf")[f"vision_model.{key}"]
    after = read_checkpoint(str(tmp_path / "out"))[f"vision_model.hf.{key}"]
    changed = [i for i in range(before.shape[0]) if not torch.equal(before[i], after[i])]
    # grids of SIZES: ids 1, 2, 4, 6, 7, 8; never: 0 (no image), 3 (1x3), 5 (2x1)
    assert changed == [1, 2, 4, 6, 7, 8], changed


def test_pipeline_wire_and_flops_count_every_tile():
    from megatron_vlm.archs import get_arch

    cfg = _mllama_cfg()
    cfg.parallel.pipeline_model_parallel_size = 2
    k = cfg.model.num_image_tokens
    spec = get_arch("cross_attention")
    tiled, flops_tiled = spec.pipeline_seq_length(cfg), spec.flops(cfg, 8)
    cfg.model.vision_encoder.max_tiles = 1
    assert tiled == cfg.model.language.seq_length + TILES * k == spec.pipeline_seq_length(cfg) + (TILES - 1) * k
    assert flops_tiled > spec.flops(cfg, 8)


@pytest.mark.skipif(not os.environ.get("MEGATRON_VLM_SLOW_TESTS"), reason="slow: MEGATRON_VLM_SLOW_TESTS=1")
def test_pipeline_parallel_tiled_training_matches_one_stage(tiled_data, imported, tmp_path):
    """PP=2 (tile features packed behind the text to the second stage, tile masks there from the
    batch) gives the one-stage losses (measured: bit-identical)."""
    from megatron_vlm.testing.cli import pretrain
    from megatron_vlm.testing.distributed import run_distributed

    root, _ = imported
    data = _train_split(tiled_data)
    losses = []
    for pp in (1, 2):
        log = tmp_path / f"pp{pp}"
        argv = _train_argv(root, data, log, micro_batch_size=1) + ["--pipeline-model-parallel-size", str(pp)]
        run_distributed(pretrain, pp, argv, timeout=600)
        losses.append([json.loads(line).get("loss") for line in (log / "metrics.jsonl").read_text().splitlines()])
    assert len(losses[0]) == 3 and all(x is not None for x in losses[0])
    assert np.allclose(losses[0], losses[1], rtol=0, atol=1e-6), losses


# ------------------------------------------------------------------------------------------------
# generation / evaluation from image files (tools/generate.py, tools/evaluate.py)
# ------------------------------------------------------------------------------------------------

def test_generation_prompts_are_tiled_as_training(tiled_data):
    """A prompt's image goes through the same tiles branch as the shards: tiles, aspect-ratio ids
    and tile masks equal the training batch of the same image."""
    from megatron_vlm.inference.prompts import PromptBuilder, Request

    cfg = _mllama_cfg()
    cfg.data.data_path = str(tiled_data / "data")
    cfg.training.micro_batch_size, cfg.model.language.seq_length = 3, 16
    tok = dali_loader.load_tokenizer(cfg)
    loader = dali_loader.build_loader(cfg, "val", tok, 0, 1)
    batch = loader.next_batch()
    keys = [int(k) for k in loader.last_keys]
    prompts = PromptBuilder(cfg.model, tok).build_all([Request("image", [str(tiled_data / f"{k}.jpg")]) for k in keys])
    for i, p in enumerate(prompts):
        assert p.images.shape == (1, 1, TILES, 3, TILE, TILE)
        for name in ("images", "aspect_ratio_ids", "aspect_ratio_mask"):
            assert torch.equal(getattr(p, name), getattr(batch, name)[i:i + 1]), (keys[i], name)
    assert len({int(p.aspect_ratio_ids) for p in prompts}) > 1  # different grids


def _tiled_generate(root: str) -> dict:
    """A random tiny tiled (max_tiles 4) cross_attention checkpoint; generate.py cached and
    --no-cache on images of different tile grids; evaluate.py on the tiled split."""
    import contextlib

    from megatron_vlm import runtime
    from megatron_vlm.conversion.megatron_io import save_model
    from megatron_vlm.conversion.tiny import randomize_
    from megatron_vlm.data.tokenizer import Tokenizer
    from megatron_vlm.inference.cli import evaluate_main, generate_main
    from megatron_vlm.models import build_model

    root = Path(root)
    tok = Tokenizer.from_pretrained(root / "data" / "tokenizer")
    cfg = _mllama_cfg()
    cfg.model.language.vocab_size, cfg.model.language.seq_length = 320, 24
    cfg.model.image_token_id = tok.image_token_id
    cfg.data.data_path = str(root / "data")
    runtime.initialize(seed=1)
    runtime.set_seed(0)
    model = build_model(cfg)
    randomize_(model, seed=2)
    save_model(root / "ckpt", model, cfg)
    runtime.shutdown()
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "image", "image": f"{i}.jpg"}) + "\n" for i in (1, 2, 4)))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        codes = [generate_main(["--load", str(root / "ckpt"), "--input", str(rows), "--max-new-tokens", "4",
                                "--output", str(root / f"{name}.jsonl"), *extra])
                 for name, extra in (("cached", []), ("uncached", ["--no-cache"]))]
        codes.append(evaluate_main(["--load", str(root / "ckpt"), "--split", "val", "--limit", "3",
                                    "--max-new-tokens", "2", "--output", str(root / "eval.json")]))
    files = {name: root / f"{name}.jsonl" for name in ("cached", "uncached")}
    tokens = {name: [json.loads(line)["tokens"] for line in f.read_text().splitlines()] if f.is_file() else None
              for name, f in files.items()}
    return {"codes": codes, "stderr": err.getvalue(), **tokens,
            "eval": json.loads((root / "eval.json").read_text()) if (root / "eval.json").is_file() else None}


def test_tiled_checkpoint_generates_cached_as_uncached(tiled_data):
    """generate.py / evaluate.py take tiled (Mllama, max_tiles 4) models: the KV-cached answers on
    images of 1x2, 2x2 and 1x4 tiles equal the full recompute per token."""
    from megatron_vlm.testing.distributed import run_distributed

    (r,) = run_distributed(_tiled_generate, 1, str(tiled_data), timeout=300)
    print(f"tiled generation: cached {r['cached']} uncached {r['uncached']}")
    assert r["codes"] == [0, 0, 0], r["stderr"][-2000:]
    assert r["cached"] == r["uncached"] and all(len(t) == 4 for t in r["cached"]), r
    assert len({tuple(t) for t in r["cached"]}) > 1  # the images (tiles) matter
    assert r["eval"]["samples"] == 3 and math.isfinite(r["eval"]["loss"])
