#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on the texts of a manifest and save it as a tokenizer folder.

    python tools/train_tokenizer.py --input data/raw/manifest.jsonl --vocab-size 8000 --output data/tok

Texts: "text", or "question" + " " + "answer", of every record (JSONL or CSV manifest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vlm.data.samples import text_parts  # noqa: E402
from megatron_vlm.data.shards import read_manifest  # noqa: E402
from megatron_vlm.data.tokenizer import train_bpe  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="manifest .jsonl/.csv (or a folder holding one)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. 256 byte symbols")
    p.add_argument("--output", required=True, help="tokenizer folder (tokenizer.json + tokenizer_config.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        entries = read_manifest(args.input)
        texts = []
        for entry in entries:
            try:
                parts = text_parts(entry.record or {})
            except KeyError:  # a record without text
                continue
            texts.append(parts.prompt + parts.target)
        if not texts:
            raise ValueError(f"--input {args.input}: no record has text")
        tok = train_bpe(texts, args.vocab_size, args.output)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 2
    print(f"trained on {len(texts)} texts: vocab {tok.vocab_size} (pad {tok.pad_id}, bos {tok.bos_id}, "
          f"eos {tok.eos_id}, <image> {tok.image_token_id}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
