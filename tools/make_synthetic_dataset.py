#!/usr/bin/env python
"""Build the quickstart dataset in one command: seeded synthetic shape images with captions and
question/answer pairs, their train/val webdataset shards (+ DALI indexes) and a BPE tokenizer.

    python tools/make_synthetic_dataset.py --output data/shapes
    python pretrain_vlm.py --data-path data/shapes ...     # tokenizer: data/shapes/tokenizer
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vlm.data import synthetic  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="dataset folder (created; must be empty unless --overwrite)")
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-val", type=int, default=400)
    p.add_argument("--image-size", type=int, default=32, help="pixels per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caption-fraction", type=float, default=0.2, help="share of caption samples in train")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    p.add_argument("--vocab-size", type=int, default=384, help="BPE vocabulary size (incl. 256 bytes)")
    p.add_argument("--no-shards", dest="shards", action="store_false",
                   help="only images + manifest.jsonl (no shards, no tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    return p.parse_args(argv)


def print_chance(chance: dict) -> None:
    print("chance-level accuracy on val (1/#answers | text-only majority baseline):")
    for qtype, row in chance.items():
        print(f"  {qtype:8s} {100 * row['chance']:5.1f}% | {100 * row['text_only']:5.1f}%"
              f"   ({row['val_samples']} samples)")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        summary = synthetic.prepare(args.output, args.num_train, args.num_val, args.image_size, args.seed,
                                    args.caption_fraction, args.shards, args.shard_size, args.vocab_size,
                                    args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"make_synthetic_dataset.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['samples']['train']} train + {summary['samples']['val']} val samples to "
          f"{summary['dir']} in {time.time() - start:.1f} s")
    if args.shards:
        print(f"shards: {summary['train_shards']} train, {summary['val_shards']} val; "
              f"tokenizer vocab {summary['vocab_size']} -> {Path(args.output) / 'tokenizer'}")
    print_chance(summary["chance"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
