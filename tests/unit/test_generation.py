"""Generation pieces without a model: token choice (padded vocabulary and banned ids never chosen,
top-k / top-p, per-row seeded draws) and prompts laid out exactly as training lays out a sample
(tokens, cross-attention mask, image pixels through the same DALI preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vlm.config import Config
from megatron_vlm.data.dali_loader import image_spec
from megatron_vlm.data.dali_pipeline import decode_images
from megatron_vlm.data.samples import SequenceBuilder
from megatron_vlm.data.tokenizer import train_bpe
from megatron_vlm.inference.engine import SamplingParams, TokenChooser
from megatron_vlm.inference.prompts import PromptBuilder, PromptError, Request, read_image_file


def test_padded_vocab_and_banned_ids_are_never_chosen():
    logits = torch.zeros(3, 16)
    logits[:, 12:] = 100.0       # padded rows (vocab 12) with the largest logits
    logits[:, 5] = 50.0          # banned
    logits[:, 7] = 10.0
    greedy = TokenChooser(12, banned=[5])
    assert greedy(logits, [0, 1, 2]) == [7, 7, 7]
    sampled = TokenChooser(12, SamplingParams(temperature=5.0, seed=1), banned=[5])
    draws = {t for _ in range(50) for t in sampled(logits, [0, 1, 2])}
    assert draws and all(t < 12 and t != 5 for t in draws)


def test_top_k_top_p_and_seeded_rows():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_p = TokenChooser(4, SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {top_p(logits, [0])[0] for _ in range(200)} == {0, 1}  # 0.5 < 0.7 <= 0.8: two tokens
    top_k = TokenChooser(4, SamplingParams(temperature=1.0, top_k=3, seed=0))
    assert {top_k(logits, [0])[0] for _ in range(300)} == {0, 1, 2}
    a = TokenChooser(4, SamplingParams(temperature=1.0, seed=3))
    b = TokenChooser(4, SamplingParams(temperature=1.0, seed=3))
    seq_a = [a(logits.expand(2, 4), [0, 7]) for _ in range(20)]
    seq_b = [[b(logits, [0])[0], b(logits, [7])[0]] for _ in range(20)]  # row by row: the same draws
    assert seq_a == seq_b and len({tuple(x) for x in seq_a}) > 1
    with pytest.raises(ValueError, match="--top-p"):
        SamplingParams(top_p=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    tok = train_bpe(["what colour is the circle? red", "how many shapes? two"] * 3, 280, root / "tok")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(root / "img.jpg", quality=95)
    return root, tok


@pytest.mark.parametrize("arch", ["joint_decoder", "cross_attention"])
def test_prompt_is_the_training_layout(setup, arch):
    root, tok = setup
    cfg = Config()
    cfg.model.arch = arch
    cfg.model.vision_encoder.image_size, cfg.model.vision_encoder.patch_size = 16, 8
    cfg.model.language.seq_length = 40
    record = {"question": "what colour is the circle?", "answer": "red"}
    pixels, grid = decode_images([(root / "img.jpg").read_bytes()], image_spec(cfg.model.vision_encoder))
    assert grid is None
    batch = SequenceBuilder.from_model_config(tok, cfg.model).collate([record], pixels)
    (prompt,) = PromptBuilder(cfg.model, tok).build_all([Request(record["question"], [str(root / "img.jpg")])])
    n = prompt.tokens.shape[1]
    first_target = int(batch.loss_mask[0].nonzero()[0]) + 1  # loss_mask[t] = label t+1 is trained
    assert n == first_target  # the prompt is everything before the answer
    assert torch.equal(prompt.tokens, batch.tokens[:, :n])
    assert torch.equal(prompt.images, batch.images)
    if arch == "cross_attention":
        assert torch.equal(prompt.text_image_mask, batch.text_image_mask[:, :n])
    else:
        assert prompt.text_image_mask is None


def test_image_files_are_checked(setup, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(PromptError, match="no such file"):
        read_image_file(tmp_path / "missing.jpg")
    with pytest.raises(PromptError, match="bad.png: not a readable image"):
        read_image_file(tmp_path / "bad.png")
