#!/usr/bin/env python
"""One MoT decoder layer against the dense decoder layer of the same shape, side by side in one run.

* MoT layer: ``megatron_vlm.archs.mot.layers.MoTLayer`` (per-modality norms, Q/K/V, output
  projection and SwiGLU FFN; tokens selected per modality, projected, scattered back; one global
  causal attention), a sequence that is 1/4 image tokens.
* Dense layer: megatron-core ``TransformerLayer`` from ``models/specs.py`` (same FLOPs per token).

Forward + backward, fp32, world of 1, A/B interleaved, median of ``--reps``; prints the ratio
(target <= 1.2x: the routing costs index_select / index_copy only).

    python benchmarks/mot_layer.py          # ~1 minute on 2 cores
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


def _bench(hidden: int, ffn: int, seq: int, batch: int, reps: int, image_share: float) -> dict:
    from megatron.core.transformer.spec_utils import build_module

    from megatron_vlm import runtime
    from megatron_vlm.archs.mot.layers import mot_layer_spec
    from megatron_vlm.config import Config
    from megatron_vlm.data.batch import modality_context
    from megatron_vlm.models import specs
    from megatron_vlm.models.backends import provider
    from megatron_vlm.models.vlm import language_transformer_config

    runtime.initialize(seed=1)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = Config()
    lang = cfg.model.language
    lang.num_layers, lang.hidden_size, lang.ffn_hidden_size, lang.seq_length = 1, hidden, ffn, seq
    lang.num_attention_heads, lang.num_query_groups = max(1, hidden // 64), max(1, hidden // 128)
    tcfg = language_transformer_config(cfg.model, cfg.parallel)
    backend = provider("local")
    dense = build_module(specs.language_layer_spec(backend), config=tcfg, layer_number=1)
    mot = build_module(mot_layer_spec(backend), config=tcfg, layer_number=1)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(tcfg.kv_channels, rotary_percent=1.0)(seq)
    ids = torch.ones(batch, seq, dtype=torch.long)
    ids[:, 1:1 + int(image_share * seq)] = 0
    ctx = modality_context(ids)
    x = torch.randn(seq, batch, hidden, requires_grad=True)

    def step(layer):
        start = time.perf_counter()
        out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope, padding_mask=ctx)
        out.sum().backward()
        return time.perf_counter() - start

    for _ in range(3):  # warm up
        step(dense), step(mot)
    times = {"dense": [], "mot": []}
    for _ in range(reps):
        times["dense"].append(step(dense))
        times["mot"].append(step(mot))
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("dense", dense), ("mot", mot))}
    return {k: statistics.median(v) for k, v in times.items()} | {"params": params}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--image-share", type=float, default=0.25)
    a = ap.parse_args(argv)
    (r,) = run_distributed(_bench, 1, a.hidden, a.ffn, a.seq, a.batch, a.reps, a.image_share)
    print(f"layer h={a.hidden} f={a.ffn} s={a.seq} b={a.batch}, {a.image_share:.0%} image tokens, "
          f"fwd+bwd median of {a.reps}")
    print(f"  dense layer  {1e3 * r['dense']:8.1f} ms   {r['params']['dense']:>10,} params")
    print(f"  MoT layer    {1e3 * r['mot']:8.1f} ms   {r['params']['mot']:>10,} params")
    print(f"  MoT / dense step time: {r['mot'] / r['dense']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
