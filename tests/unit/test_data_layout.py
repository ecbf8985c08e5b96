"""Token layout of VLMBatch per arch: image tokens, modality ids, labels, loss mask, truncation."""

import pytest
import torch

from megatron_vlm.config import ModelConfig
from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY
from megatron_vlm.data.layout import TokenLayout
from megatron_vlm.data.samples import SequenceBuilder
from megatron_vlm.data.tokenizer import train_bpe

QA = {"question": "what colour is the circle?", "answer": "red", "key": "0"}
CAPTION = {"text": "a red circle and a blue square.", "key": "1"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["what colour is the circle? red", "a red circle and a blue square.", "how many shapes? two"] * 10
    return train_bpe(texts, 300, tmp_path_factory.mktemp("tok"))


def _images(b, size=8):
    return torch.randn(b, 3, size, size)


@pytest.mark.parametrize("layout", [TokenLayout.INLINE, "inline"])
def test_joint_layout(tok, layout):
    k, s = 5, 32
    builder = SequenceBuilder(tok, layout, s, k)
    batch = builder.collate([QA, CAPTION], _images(2))
    q, a = tok.encode(QA["question"]), tok.encode(" " + QA["answer"])
    c = tok.encode(CAPTION["text"])
    img = tok.image_token_id
    expect_qa = [tok.bos_id] + [img] * k + q + a + [tok.eos_id]
    expect_cap = [tok.bos_id] + [img] * k + c + [tok.eos_id]
    assert batch.tokens[0].tolist() == expect_qa + [tok.pad_id] * (s - len(expect_qa))
    assert batch.tokens[1].tolist() == expect_cap + [tok.pad_id] * (s - len(expect_cap))
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
    assert (batch.labels[:, -1] == tok.pad_id).all()
    # image positions: modality 0 exactly where the image tokens are
    assert torch.equal(batch.modality_ids == IMAGE_MODALITY, batch.tokens == img)
    assert (batch.modality_ids[:, 1:1 + k] == IMAGE_MODALITY).all() and int((batch.modality_ids == 0).sum()) == 2 * k
    # QA: loss exactly on the positions whose label is an answer token or eos
    n_prefix = 1 + k + len(q)
    assert batch.loss_mask[0].nonzero().flatten().tolist() == list(range(n_prefix - 1, n_prefix + len(a)))
    assert batch.labels[0][batch.loss_mask[0] > 0].tolist() == a + [tok.eos_id]
    # caption: loss on every caption token + eos (the last image position predicts the first word)
    assert batch.labels[1][batch.loss_mask[1] > 0].tolist() == c + [tok.eos_id]
    assert batch.loss_mask[1, :k].sum() == 0 and batch.loss_mask[1, k] == 1
    assert (batch.loss_mask[batch.labels == tok.pad_id] == 0).all()
    assert batch.text_image_mask is None


def test_batch_shapes_and_dtypes(tok):
    b, s, k = 3, 40, 4
    batch = SequenceBuilder(tok, TokenLayout.INLINE, s, k).collate([QA, CAPTION, QA], _images(b, 16))
    expected = {"tokens": ((b, s), torch.int64), "labels": ((b, s), torch.int64),
                "loss_mask": ((b, s), torch.float32), "position_ids": ((b, s), torch.int64),
                "modality_ids": ((b, s), torch.int64), "images": ((b, 1, 3, 16, 16), torch.float32),
                "image_mask": ((b, 1), torch.bool)}
    for name, (shape, dtype) in expected.items():
        value = getattr(batch, name)
        assert tuple(value.shape) == shape and value.dtype == dtype, name
    assert torch.equal(batch.position_ids[2], torch.arange(s)) and batch.image_mask.all()


def test_cross_attention_layout(tok):
    s = 24
    batch = SequenceBuilder(tok, TokenLayout.MARKER, s, num_image_tokens=16).collate([QA, CAPTION], _images(2))
    c = tok.encode(CAPTION["text"])
    assert batch.tokens[1, :len(c) + 3].tolist() == [tok.bos_id, tok.image_token_id] + c + [tok.eos_id]
    assert int((batch.tokens == tok.image_token_id).sum()) == 2  # one <image> token per sample
    assert (batch.modality_ids == TEXT_MODALITY).all()
    assert batch.text_image_mask.shape == (2, s, 1) and batch.text_image_mask.dtype == torch.bool
    assert not batch.text_image_mask[:, 0].any() and batch.text_image_mask[:, 1:].all()
    assert batch.labels[0][batch.loss_mask[0] > 0].tolist() == tok.encode(" red") + [tok.eos_id]
    assert batch.labels[1][batch.loss_mask[1] > 0].tolist() == c + [tok.eos_id]


def test_truncation_cuts_text_from_the_end(tok):
    k = 6
    c = tok.encode(CAPTION["text"])
    s = 1 + k + 3  # room for 3 caption tokens, no eos
    batch = SequenceBuilder(tok, TokenLayout.INLINE, s, k).collate([CAPTION], _images(1))
    assert batch.tokens[0].tolist() == [tok.bos_id] + [tok.image_token_id] * k + c[:3]
    assert batch.labels[0][batch.loss_mask[0] > 0].tolist() == c[:3]  # no eos: it was cut
    assert (batch.modality_ids[0, 1:1 + k] == IMAGE_MODALITY).all()


def test_image_tokens_that_do_not_fit_raise(tok):
    with pytest.raises(ValueError, match="seq_length=17: bos \\+ 16 image token"):
        SequenceBuilder(tok, TokenLayout.INLINE, 17, 16)
    with pytest.raises(ValueError, match="no token layout"):
        SequenceBuilder(tok, "unknown", 64, 4)
    cfg = ModelConfig()
    cfg.language.seq_length = cfg.num_image_tokens
    with pytest.raises(ValueError, match="leave no room for text"):
        SequenceBuilder.from_model_config(tok, cfg)


def test_image_placeholder_text_is_removed_and_model_image_id_used(tok):
    builder = SequenceBuilder(tok, TokenLayout.INLINE, 32, 2, image_token_id=7)
    batch = builder.collate([{"text": "<image>\na red circle."}], _images(1))
    assert batch.tokens[0, :3].tolist() == [tok.bos_id, 7, 7]
    assert batch.tokens[0, 3:3 + len(tok.encode("a red circle."))].tolist() == tok.encode("a red circle.")
    with pytest.raises(KeyError, match="neither 'text' nor"):
        builder.collate([{"image": "x.jpg", "key": "9"}], _images(1))
