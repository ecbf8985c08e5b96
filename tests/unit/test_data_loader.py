"""DALI loader: data-parallel slices, TP peers, exact resume, epochs, image values, errors."""

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vlm.config import Config
from megatron_vlm.data import dali_loader, shards, synthetic
from megatron_vlm.data.dali_loader import build_loader, build_loaders
from megatron_vlm.data.tokenizer import train_bpe

NUM_TRAIN, NUM_VAL = 48, 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    synthetic.prepare(out, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=16, seed=3, shard_size=8,
                      vocab_size=300)
    return out


def _cfg(data_dir, mbs=4, seed=5, arch="joint_decoder") -> Config:
    cfg = Config()
    cfg.data.data_path = str(data_dir)
    cfg.training.micro_batch_size = mbs
    cfg.training.seed = seed
    cfg.model.arch = arch
    cfg.model.vision_encoder.image_size, cfg.model.vision_encoder.patch_size = 16, 8
    cfg.model.language.seq_length = 32
    return cfg


def _train(data_dir, dp_rank=0, dp_size=1, **kw):
    return build_loaders(_cfg(data_dir, **kw), dp_rank=dp_rank, dp_size=dp_size)[0]


def _epoch_keys(loader) -> list[str]:
    keys = []
    for _ in range(loader.batches_per_epoch):
        loader.next_batch()
        keys += loader.last_keys
    return keys


def _same(a, b) -> bool:
    return all((getattr(a, f.name) is None and getattr(b, f.name) is None)
               or torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def test_dp_ranks_read_disjoint_slices_covering_each_epoch(data_dir):
    ranks = [_train(data_dir, r, 2) for r in range(2)]
    assert [r.batches_per_epoch for r in ranks] == [6, 6]
    all_keys = {f"{i:09d}" for i in range(NUM_TRAIN)}
    epochs = []
    for _ in range(2):
        k0, k1 = (_epoch_keys(r) for r in ranks)
        assert len(set(k0)) == len(k0) == 24 and not set(k0) & set(k1)
        assert set(k0) | set(k1) == all_keys
        epochs.append(k0 + k1)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert [r.epoch for r in ranks] == [1, 1]


def test_uneven_split_keeps_ranks_in_lockstep(data_dir):
    cfg = _cfg(data_dir, mbs=2)
    loaders = [build_loader(cfg, "val", dali_loader.load_tokenizer(cfg), r, 3) for r in range(3)]
    assert [ld.batches_per_epoch for ld in loaders] == [2, 2, 2]  # 16 // 3 = 5 samples -> 2 batches
    keys = [_epoch_keys(ld) for ld in loaders]
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) == 12


def test_tensor_parallel_peers_get_identical_batches(data_dir):
    a, b = _train(data_dir, 1, 2), _train(data_dir, 1, 2)  # same dp rank, e.g. tp rank 0 and 1
    for _ in range(8):  # crosses the epoch boundary (6 batches per epoch)
        assert _same(a.next_batch(), b.next_batch()) and a.last_keys == b.last_keys


def test_seed_determines_order(data_dir):
    assert _epoch_keys(_train(data_dir, seed=1)) == _epoch_keys(_train(data_dir, seed=1))
    assert _epoch_keys(_train(data_dir, seed=1)) != _epoch_keys(_train(data_dir, seed=2))


@pytest.mark.parametrize("consumed_batches", [3, 12, 13])
def test_resume_continues_exactly(data_dir, consumed_batches):
    reference = _train(data_dir, 1, 2)
    expected = [reference.next_batch() for _ in range(consumed_batches + 4)][consumed_batches:]
    first = _train(data_dir, 1, 2)
    for _ in range(consumed_batches):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (state.json)
    assert set(state) == {"epoch", "samples_consumed"}
    assert state["epoch"] * 6 + state["samples_consumed"] // 8 == consumed_batches  # 6 batches/epoch
    resumed = _train(data_dir, 1, 2)
    resumed.load_state_dict(state)
    for batch in expected:
        assert _same(resumed.next_batch(), batch)


def test_dali_batch_layout(data_dir):
    batch = _train(data_dir).next_batch()
    assert batch.tokens.shape == (4, 32) and batch.images.shape == (4, 1, 3, 16, 16)
    assert batch.images.dtype == torch.float32 and batch.image_mask.all()
    k = _cfg(data_dir).model.num_image_tokens
    assert ((batch.modality_ids == 0).sum(1) == k).all() and (batch.modality_ids[:, 1:1 + k] == 0).all()
    assert (batch.loss_mask[:, :k] == 0).all() and (batch.loss_mask.sum(1) > 0).all()
    cross = _train(data_dir, arch="cross_attention").next_batch()
    assert cross.text_image_mask.shape == (4, 32, 1) and (cross.modality_ids == 1).all()


def test_images_are_resized_cropped_and_normalised(tmp_path):
    """30x20 images, black 5 px bands left and right of a colour: the centre crop is the colour only,
    -> 8x8 with value (c/255 - mean) / std per channel."""
    colours = [(200, 30, 90), (10, 250, 130)]
    for i, c in enumerate(colours):
        pixels = np.zeros((20, 30, 3), np.uint8)
        pixels[:, 5:25] = c
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg", quality=100, subsampling=0)
    entries = [shards.ManifestEntry(str(i), {"image": f"{i}.jpg", "text": "x"}) for i in range(2)]
    shards.build_shards(entries, tmp_path / "data" / "val", tmp_path, shard_size=2)
    train_bpe(["x y z"], 300, tmp_path / "data" / "tokenizer")
    cfg = _cfg(tmp_path / "data", mbs=2)
    cfg.model.vision_encoder.image_size = 8
    batch = build_loader(cfg, "val", dali_loader.load_tokenizer(cfg), 0, 1).next_batch()
    mean, std = np.array(cfg.model.vision_encoder.image_mean), np.array(cfg.model.vision_encoder.image_std)
    assert batch.images.shape == (2, 1, 3, 8, 8)
    for i, c in enumerate(colours):
        expected = (np.array(c) / 255 - mean) / std
        got = batch.images[i, 0].mean(dim=(1, 2)).numpy()
        assert np.abs(got - expected).max() < 0.06 and batch.images[i, 0].std(dim=(1, 2)).max() < 0.06


def test_eval_batches_repeat_and_cap_at_one_pass(data_dir):
    cfg = _cfg(data_dir, mbs=2)
    val = build_loaders(cfg, dp_rank=0, dp_size=2)[1]
    first = val.eval_batches(num_micro_batches=2, eval_iters=10)
    assert len(first) == 2 and all(len(step) == 2 for step in first)  # 8 samples per rank = one pass
    again = val.eval_batches(num_micro_batches=2, eval_iters=1)
    assert len(again) == 1 and _same(again[0][0], first[0][0])
    with pytest.raises(ValueError, match="cannot fill one evaluation step"):
        val.eval_batches(num_micro_batches=5)


def test_dp_rank_and_size_come_from_parallel_state(data_dir, monkeypatch):
    from megatron.core import parallel_state

    assert dali_loader.data_parallel_rank_and_size() == (0, 1)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 1)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 2)
    train, val = build_loaders(_cfg(data_dir))
    assert (train.dp_rank, train.dp_size, val.dp_rank, val.dp_size) == (1, 2, 1, 2)
    assert train.shuffle and not val.shuffle


def test_bad_inputs_raise_clear_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="dp_rank=2: must be in"):
        _train(data_dir, 2, 2)
    with pytest.raises(ValueError, match="cannot give each of 4 data-parallel rank"):
        _train(data_dir, 0, 4, mbs=16)
    loader = _train(data_dir)
    with pytest.raises(ValueError, match="samples_consumed <= 48"):
        loader.load_state_dict({"epoch": 0, "samples_consumed": 52})
    cfg = _cfg(data_dir)
    cfg.model.language.vocab_size = 100
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_loaders(cfg, dp_rank=0, dp_size=1)
    cfg = _cfg(data_dir)
    cfg.data.images_per_sample = 2
    with pytest.raises(ValueError, match="images_per_sample=2"):
        build_loaders(cfg, dp_rank=0, dp_size=1)
    cfg = _cfg(data_dir)
    cfg.model.language.seq_length = 5
    with pytest.raises(ValueError, match="leave no room for text"):
        build_loaders(cfg, dp_rank=0, dp_size=1)
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        build_loaders(_cfg(tmp_path), tokenizer_path=data_dir / "tokenizer", dp_rank=0, dp_size=1)
