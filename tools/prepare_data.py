#!/usr/bin/env python
"""Turn (image, text) pairs into webdataset shards + DALI index files.

    python tools/prepare_data.py --manifest data/raw/manifest.jsonl --output data/mine/train \
        --shard-size 1000

The manifest is JSONL ({"image": "rel/path.jpg", "text": "..."} or "question" + "answer"; extra
fields are kept) or CSV with columns image,text; a folder holding manifest.jsonl/.csv works too.
Images are decode-validated; bad ones are skipped and listed in OUTPUT/report.json. Upright
RGB/gray JPEGs are stored as they are; all others as upright 8-bit RGB JPEG (EXIF rotation applied,
16-bit/float images scaled, transparency composited onto white).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vlm.data import shards  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", "--input", dest="manifest", required=True,
                   help="manifest .jsonl/.csv, or a folder holding manifest.jsonl/manifest.csv")
    p.add_argument("--output", required=True, help="folder for the shards, indexes and report.json")
    p.add_argument("--image-root", default=None, help="image paths are relative to this (default: manifest's folder)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded images (non-JPEG, CMYK, EXIF-rotated; 4:4:4 chroma)")
    p.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the sample order before writing")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        output = Path(args.output)
        shards.check_build_args(args.shard_size, output, args.jpeg_quality)
        manifest = shards.resolve_manifest(args.manifest)
        image_root = Path(args.image_root) if args.image_root else manifest.parent
        if not image_root.is_dir():
            raise FileNotFoundError(f"--image-root {image_root}: no such folder")
        report = shards.build_shards(shards.read_manifest(manifest), output, image_root, args.shard_size,
                                     args.jpeg_quality, args.shuffle_seed, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    if report.written:
        print(f"wrote {report.written} samples in {len(report.shards)} shard(s) to {output}; "
              f"skipped {len(report.skipped)} (see {output / shards.REPORT_FILE})")
    for row in report.skipped[:10]:
        print(f"  skipped {row['where']} ({row['path']}): {row['reason']}")
    if report.written == 0:
        kept = any(output.glob(f"{shards.SHARD_PREFIX}-*.tar"))
        print(f"prepare_data.py: error: no valid samples ({len(report.skipped)} skipped)"
              + (f"; the shards already in {output} are unchanged" if kept else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
