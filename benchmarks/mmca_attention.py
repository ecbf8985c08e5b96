#!/usr/bin/env python
"""MMCA core attention: the fast path (text branch = causal SDPA over the compacted text tokens,
image branch = SDPA over the compacted image tokens with an ``[s, s_img]`` mask) against the
explicit one (two ``[s, s]`` boolean masks, two SDPA calls), side by side in one run.

Layout per sample: 8 text tokens, images of ``--image-tokens`` tokens separated by text (1 image at
s=512, 2 at s=2048), text to the end, right padding on one sample. 8 heads / 2 query groups of 64,
batch 2, fp32, forward + backward (mask building included), A/B interleaved, median of ``--reps``.
Also checks that both paths agree (max relative difference of the output).

    python benchmarks/mmca_attention.py       # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def layout_context(s: int, images: int, image_tokens: int, batch: int) -> torch.Tensor:
    """Modality context ``[b, s, 2]`` bool (image, text; all False = padding)."""
    ctx = torch.zeros(batch, s, 2, dtype=torch.bool)
    ctx[..., 1] = True
    gap = (s - 8 - images * image_tokens) // (images + 1)
    start = 8
    for _ in range(images):
        ctx[:, start:start + image_tokens, 0], ctx[:, start:start + image_tokens, 1] = True, False
        start += image_tokens + gap
    ctx[-1, s - s // 16:] = False  # right padding
    return ctx


def bench(s: int, images: int, image_tokens: int, reps: int, batch: int = 2, heads: int = 8,
          groups: int = 2, d: int = 64) -> dict:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vlm.archs.mmca.attention import MMCAttention

    tc = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=groups,
                           attention_dropout=0.0)
    cores = {impl: MMCAttention(tc, 1, AttnMaskType.causal, num_image_tokens=image_tokens, impl=impl)
             for impl in ("fast", "explicit")}
    ctx = layout_context(s, images, image_tokens, batch)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, batch, heads, d, generator=g, requires_grad=True)
    k = torch.randn(s, batch, groups, d, generator=g, requires_grad=True)
    v = torch.randn(s, batch, groups, d, generator=g, requires_grad=True)
    grad = torch.randn(s, batch, heads * d, generator=g)
    outs = {impl: core(q, k, v, ctx).detach() for impl, core in cores.items()}
    agree = ((outs["fast"] - outs["explicit"]).abs().max() / outs["explicit"].abs().max()).item()

    def step(core):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        core(q, k, v, ctx).backward(grad)
        return time.perf_counter() - start

    for core in cores.values():
        step(core)  # warm up
    times = {impl: [] for impl in cores}
    for _ in range(reps):
        for impl, core in cores.items():
            times[impl].append(step(core))
    med = {impl: statistics.median(t) for impl, t in times.items()}
    return {"s": s, "fast_ms": 1e3 * med["fast"], "explicit_ms": 1e3 * med["explicit"],
            "ratio": med["fast"] / med["explicit"], "max_rel_diff": agree}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--image-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for s, images in ((512, 1), (2048, 2)):
        r = bench(s, images, args.image_tokens, args.reps)
        print(f"s={r['s']:>5}: fast {r['fast_ms']:8.1f} ms | explicit {r['explicit_ms']:8.1f} ms | "
              f"fast/explicit {r['ratio']:.2f} | outputs agree to {r['max_rel_diff']:.1e} (rel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
