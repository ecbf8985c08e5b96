#!/usr/bin/env python
"""Fusion of three vision encoders: the three ``model.fusion.method``s side by side in one run.

One tiny joint_decoder VLM per method with the same three CLIP ViT encoders (the generalist at
8 px patches, two specialists at 4 px and 16 px patches on 32 px images), fp32, world of 1. For
each method: the language-model tokens one image takes (``num_image_tokens``), the decoder
sequence length, and the median time of a training step (forward + backward + Adam step), A/B/C
interleaved over ``--reps`` rounds. Ratios are against ``weighted_average`` (the cheapest decoder
sequence); the one-encoder model (the generalist alone) is printed as the floor.

    python benchmarks/fusion.py            # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vlm.runtime.spawn import run_distributed  # noqa: E402

METHODS = ("sequence_append", "weighted_average", "cross_attn")


def _config(method: str | None, text_tokens: int, images: int):
    from megatron_vlm.config import Config, VisionConfig, validate

    cfg = Config()
    m = cfg.model
    encoder = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, image_size=32)
    m.vision = [VisionConfig(name="generalist", generalist=True, patch_size=8, **encoder)]
    if method is not None:
        m.vision += [VisionConfig(name="fine", patch_size=4, **encoder),
                     VisionConfig(name="coarse", patch_size=16, **encoder)]
        m.fusion.method = method
    lang = m.language
    lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups = 4, 128, 4, 2
    lang.ffn_hidden_size, lang.vocab_size = 384, 512
    cfg.data.images_per_sample = images
    lang.seq_length = m.num_image_tokens * images + text_tokens
    return validate(cfg)


def _bench(batch: int, text_tokens: int, images: int, reps: int) -> dict:
    from megatron_vlm import runtime
    from megatron_vlm.data.mock import random_batch
    from megatron_vlm.models.vlm import build_model

    runtime.initialize(seed=1)
    runs = {}
    for name in ("generalist only",) + METHODS:
        cfg = _config(None if name == "generalist only" else name, text_tokens, images)
        model = build_model(cfg)
        optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        inputs = random_batch(cfg.model, batch, seed=0).model_inputs()
        runs[name] = dict(cfg=cfg, model=model, optim=optim, inputs=inputs, times=[])

    def step(run):
        start = time.perf_counter()
        loss = run["model"](run["inputs"]).mean()
        loss.backward()
        run["optim"].step()
        run["optim"].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for run in runs.values():  # warm-up
        step(run)
    for _ in range(reps):
        for run in runs.values():
            run["times"].append(step(run))
    return {name: dict(image_tokens=run["cfg"].model.num_image_tokens,
                       seq_length=run["cfg"].model.language.seq_length,
                       params=sum(p.numel() for p in run["model"].parameters()),
                       step_s=statistics.median(run["times"])) for name, run in runs.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    res = run_distributed(_bench, 1, args.batch, args.text_tokens, args.images, args.reps, threads=2)[0]
    base = res["weighted_average"]
    print(f"3 encoders (generalist 8 px patches: 16 tokens, fine 4 px: 64, coarse 16 px: 4), batch {args.batch}, "
          f"{args.images} image(s) + {args.text_tokens} text tokens, median of {args.reps} steps")
    print(f"{'method':<18}{'image tokens':>13}{'LM sequence':>13}{'params':>10}{'step ms':>10}"
          f"{'tokens x':>10}{'time x':>8}")
    for name, r in res.items():
        print(f"{name:<18}{r['image_tokens']:>13}{r['seq_length']:>13}{r['params']:>10}{1e3 * r['step_s']:>10.1f}"
              f"{r['seq_length'] / base['seq_length']:>10.2f}{r['step_s'] / base['step_s']:>8.2f}")
    print("(x = ratio to weighted_average in this run)")


if __name__ == "__main__":
    main()
