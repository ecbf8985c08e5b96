"""Text tokenizer: a local Hugging Face ``tokenizer.json`` wrapped with the special tokens the data
layer needs (``<image>``, pad, bos, eos), plus byte-level BPE training for new datasets.

Special tokens: bos/eos/pad are taken from the folder's ``tokenizer_config.json`` when it names them
(e.g. Llama's ``<|begin_of_text|>``), else ``<s>``/``</s>``/``<pad>``; any that the vocabulary lacks
is appended as an added special token, and so is ``<image>``. ``encode`` treats text literally:
special-token strings inside the text (``"<image>"``, ``"</s>"``) are tokenised as plain text, so
data can never inject control tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

IMAGE_TOKEN = "<image>"
DEFAULT_SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _token_content(value) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """``tokenizers.Tokenizer`` plus ids of ``<image>``, pad, bos and eos."""

    def __init__(self, tokenizer: HFTokenizer, special_tokens: dict[str, str] | None = None):
        self._tok = tokenizer
        names = dict(DEFAULT_SPECIALS, **(special_tokens or {}))
        self.special_tokens = {**names, "image_token": IMAGE_TOKEN}
        missing = [t for t in self.special_tokens.values() if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        self._tok.encode_special_tokens = True  # text is literal, see module docstring
        ids = {k: tokenizer.token_to_id(v) for k, v in self.special_tokens.items()}
        self.pad_id: int = ids["pad_token"]
        self.bos_id: int = ids["bos_token"]
        self.eos_id: int = ids["eos_token"]
        self.image_token_id: int = ids["image_token"]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a folder holding ``tokenizer.json`` (+ optional ``tokenizer_config.json``) or the file."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer {path}: no {TOKENIZER_FILE}")
        specials = {}
        config = file.parent / CONFIG_FILE
        if config.is_file():
            data = json.loads(config.read_text())
            for key in DEFAULT_SPECIALS:
                content = _token_content(data.get(key))
                if content:
                    specials[key] = content
        return cls(HFTokenizer.from_file(str(file)), specials)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (every id is ``< vocab_size``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no bos/eos added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (loadable by this class and by
        ``transformers.PreTrainedTokenizerFast`` / ``AutoTokenizer``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / TOKENIZER_FILE, self._tok.to_str(pretty=True))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                  "extra_special_tokens": {"image_token": IMAGE_TOKEN},
                  "model_max_length": 1_000_000_000, "clean_up_tokenization_spaces": False}
        _atomic_write(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return out


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style, no unknown tokens) on ``texts`` and save it to ``out_dir``.

    ``vocab_size`` counts the 256 byte symbols and the 4 special tokens; the trainer may stop earlier
    when the corpus has no more merges.
    """
    specials = list(DEFAULT_SPECIALS.values()) + [IMAGE_TOKEN]
    minimum = 256 + len(specials)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r}: must be an integer >= {minimum} "
                         f"(256 byte symbols + {len(specials)} special tokens)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = Tokenizer(tok)
    wrapped.save(out_dir)
    return wrapped
