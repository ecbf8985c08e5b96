"""Tokenizer: BPE training, save/load round trip, special tokens, transformers compatibility."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from megatron_vlm.data.tokenizer import IMAGE_TOKEN, Tokenizer, train_bpe
from tools import train_tokenizer

TEXTS = ["what colour is the circle? red", "a blue square and a green triangle.", "how many shapes? two"] * 20


def test_train_save_load_round_trip(tmp_path):
    tok = train_bpe(TEXTS, 300, tmp_path / "tok")
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.vocab_size == tok.vocab_size <= 300
    for attr in ("pad_id", "bos_id", "eos_id", "image_token_id"):
        assert getattr(loaded, attr) == getattr(tok, attr)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id}) == 4
    assert loaded.token_to_id(IMAGE_TOKEN) == tok.image_token_id
    text = "how many shapes? three, ünïcode ✓"  # unseen words and bytes: byte-level, no unknowns
    ids = loaded.encode(text)
    assert ids == tok.encode(text) and loaded.decode(ids) == text
    assert len(loaded.encode("what colour is the circle? red")) < len("what colour is the circle? red") / 2
    assert all(0 <= i < loaded.vocab_size for i in ids)


def test_special_token_strings_in_text_stay_text(tmp_path):
    tok = train_bpe(TEXTS, 300, tmp_path / "tok")
    ids = tok.encode("see <image> here </s>")
    assert tok.image_token_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "see <image> here </s>"


def test_transformers_loads_the_folder(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = train_bpe(TEXTS, 300, tmp_path / "tok")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    assert fast.encode("a red circle", add_special_tokens=False) == tok.encode("a red circle")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert auto.convert_tokens_to_ids([auto.bos_token, auto.eos_token, auto.pad_token, IMAGE_TOKEN]) == \
        [tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id]


def test_foreign_tokenizer_gets_missing_specials(tmp_path):
    """A tokenizer.json without our specials, with a config naming its own bos/eos."""
    base = HFTokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.add_special_tokens(["<|begin|>", "<|end|>"])
    (tmp_path / "foreign").mkdir()
    base.save(str(tmp_path / "foreign" / "tokenizer.json"))
    (tmp_path / "foreign" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>", "special": True}}))
    tok = Tokenizer.from_pretrained(tmp_path / "foreign")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.pad_id == 2 and tok.image_token_id == 3 and tok.vocab_size == 4


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(ValueError, match="vocab_size=10"):
        train_bpe(TEXTS, 10, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": "a.jpg", "text": t}) + "\n" for t in TEXTS))
    assert train_tokenizer.main(["--input", str(manifest), "--vocab-size", "5", "--output", str(tmp_path / "t")]) == 2
    assert "vocab_size=5" in capsys.readouterr().err
    assert train_tokenizer.main(["--input", str(manifest), "--vocab-size", "300", "--output", str(tmp_path / "t")]) == 0
    assert Tokenizer.from_pretrained(tmp_path / "t").encode("a red circle")
