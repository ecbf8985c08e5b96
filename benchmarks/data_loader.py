#!/usr/bin/env python
"""Image loading throughput: our DALI CPU pipeline vs a PIL + torch DataLoader on the same shards.

Both read the same webdataset shards and produce normalised float32 CHW tensors at S x S
(resize shorter side to S, centre crop, mean/std): DALI through ``fn.readers.webdataset`` +
``fn.decoders.image`` + ``fn.resize`` + ``fn.crop_mirror_normalize`` (the data layer's own
``image_pipeline``), the reference through Python ``tarfile`` + PIL in ``--workers`` DataLoader
worker processes. A pass = build the loader and read every image once. Prints images/s (median of
``--reps`` passes) and the ratio DALI / PIL for each size.

    python benchmarks/data_loader.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vlm.config import VisionConfig  # noqa: E402
from megatron_vlm.data.dali_pipeline import ImageSpec, ReaderSpec, image_pipeline, to_torch  # noqa: E402
from megatron_vlm.data.shards import ManifestEntry, build_shards, list_shards, read_shard  # noqa: E402


def make_photos(folder: Path, n: int, seed: int = 0) -> list[ManifestEntry]:
    """``n`` photo-like 500x375 JPEGs (a smooth random field upsampled, plus grain: ~55 KB each)."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3), dtype=np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
        entries.append(ManifestEntry(str(i), {"image": f"{i}.jpg", "text": "photo"}))
    return entries


class PILShards(torch.utils.data.IterableDataset):
    """Reference loader: ``tarfile`` + PIL decode/resize/crop + torch normalise, shards split over workers."""

    def __init__(self, tars: list[str], size: int, mean, std):
        self.tars, self.size = tars, size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def transform(self, jpeg: bytes) -> torch.Tensor:
        im = Image.open(io.BytesIO(jpeg)).convert("RGB")
        w, h = im.size
        scale = self.size / min(w, h)
        im = im.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BILINEAR)
        left, top = (im.width - self.size) // 2, (im.height - self.size) // 2
        im = im.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for tar in self.tars[wid::nw]:
            for _, jpeg, _ in read_shard(tar):
                yield self.transform(jpeg)


def pil_pass(tars, size, spec: ImageSpec, batch_size: int, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(PILShards(tars, size, spec.mean, spec.std), batch_size=batch_size,
                                         num_workers=workers)
    n = sum(batch.shape[0] for batch in loader)
    return time.perf_counter() - start, n


def dali_pass(shards, size, spec: ImageSpec, batch_size: int, threads: int) -> tuple[float, int]:
    start = time.perf_counter()
    total = sum(s.num_samples for s in shards)
    reader = ReaderSpec(paths=tuple(str(s.tar) for s in shards), index_paths=tuple(str(s.index) for s in shards),
                        shard_id=0, num_shards=1, shuffle=False, seed=0)
    pipe = image_pipeline(reader, ImageSpec(size, spec.mean, spec.std), batch_size, threads, device_id=None)
    n = 0
    for _ in range(total // batch_size):
        images, _ = pipe.run()
        n += to_torch(images).shape[0]
    elapsed = time.perf_counter() - start
    del pipe
    return elapsed, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 336])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="DALI num_threads")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the PIL reference")
    args = p.parse_args(argv)
    if args.num_images % args.batch_size:
        p.error("--num-images must be a multiple of --batch-size")
    torch.set_num_threads(1)
    v = VisionConfig()
    spec = ImageSpec(0, tuple(v.image_mean), tuple(v.image_std))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        t0 = time.perf_counter()
        entries = make_photos(tmp / "img", args.num_images)
        build_shards(entries, tmp / "shards", tmp / "img", args.shard_size)
        shards = list_shards(tmp / "shards")
        tars = [str(s.tar) for s in shards]
        mb = sum(s.tar.stat().st_size for s in shards) / 2**20
        print(f"{args.num_images} JPEGs 500x375 ({mb:.1f} MB) in {len(shards)} shards, "
              f"prepared in {time.perf_counter() - t0:.1f} s; batch {args.batch_size}, "
              f"DALI threads {args.threads}, PIL workers {args.workers}, median of {args.reps}")
        print(f"{'size':>6} {'PIL+DataLoader img/s':>22} {'DALI img/s':>12} {'ratio':>7}")
        for size in args.sizes:
            pil_pass(tars, size, spec, args.batch_size, args.workers)  # warm the page cache
            pil, dali = [], []
            for _ in range(args.reps):
                t, n = pil_pass(tars, size, spec, args.batch_size, args.workers)
                pil.append(n / t)
                t, n = dali_pass(shards, size, spec, args.batch_size, args.threads)
                dali.append(n / t)
            mp, md = statistics.median(pil), statistics.median(dali)
            print(f"{size:>6} {mp:>22.0f} {md:>12.0f} {md / mp:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
