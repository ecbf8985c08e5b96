#!/usr/bin/env python
"""One MoMa decoder layer against a dense layer of equal active FLOPs, and EP=2 against EP=1.

* MoMa layer: megatron-core ``TransformerLayer`` + ``MoELayer`` with the MoMa router, 4 image + 4
  text experts of FFN width ``f``, default capacity (each expert takes ceil(N_m / 4) tokens of its
  modality, so a token is processed ~once: the dense layer's MLP FLOPs), alltoall dispatcher.
* Dense layer: the same layer with one dense MLP of FFN width ``f``.
* Routing: the router's own forward (scores, expert-choice selection, auxiliary routers) timed
  alone, as a share of the MoMa layer's forward + backward.
* EP: the same MoMa layer on 2 ranks (each 2 image + 2 text experts, its own tokens, tokens crossing
  ranks through the alltoall dispatcher) against 1 rank holding all 8; as tokens/s per run.

Forward + backward, fp32, A/B interleaved, median of ``--reps``; prints ratios.

    python benchmarks/moma_layer.py          # ~1-2 minutes on 2 cores
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


def _config(hidden: int, ffn: int, seq: int, ep: int):
    from megatron_vlm.config import Config

    cfg = Config()
    cfg.model.arch, cfg.model.backend = "moma", "local"
    lang = cfg.model.language
    lang.num_layers, lang.hidden_size, lang.ffn_hidden_size, lang.seq_length = 1, hidden, ffn, seq
    lang.num_attention_heads, lang.num_query_groups = hidden // 64, hidden // 128
    cfg.model.moma.gumbel_noise = False
    cfg.parallel.expert_model_parallel_size = ep
    return cfg


def _layers(cfg):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_vlm.archs.moma import transformer_config
    from megatron_vlm.archs.moma.layers import moma_layer_spec, routing_settings
    from megatron_vlm.models import specs
    from megatron_vlm.models.backends import provider
    from megatron_vlm.models.vlm import language_transformer_config

    mc = cfg.model
    tcfg = language_transformer_config(mc, cfg.parallel, **transformer_config(mc))
    backend = provider("local")
    moma = build_module(moma_layer_spec(backend, routing_settings(mc)), config=tcfg, layer_number=1)
    if cfg.parallel.expert_model_parallel_size > 1:
        return moma, None
    dense = build_module(specs.language_layer_spec(backend), config=language_transformer_config(mc, cfg.parallel),
                         layer_number=1)
    return moma, dense


def _inputs(seq: int, batch: int, hidden: int, rank: int):
    from megatron_vlm.data.batch import modality_context

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(seq, batch, hidden, generator=g)
    ids = torch.ones(batch, seq, dtype=torch.long)
    ids[:, 1:1 + seq // 2] = 0  # half image tokens
    return x, modality_context(ids)


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step(layer, x, ctx):
    def run():
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi, attention_mask=None, padding_mask=ctx)
        out.sum().backward()
    return run


def _single(hidden, ffn, seq, batch, reps):
    from megatron_vlm import runtime

    runtime.initialize(seed=1)
    moma, dense = _layers(_config(hidden, ffn, seq, 1))
    x, ctx = _inputs(seq, batch, hidden, 0)
    router = moma.mlp.router

    def route():
        with torch.no_grad():
            router(x.reshape(seq, batch, hidden), ctx.transpose(0, 1))

    a, b, r = [], [], []
    for _ in range(reps):  # interleaved
        a.append(_time(_step(moma, x, ctx), 1))
        b.append(_time(_step(dense, x, ctx), 1))
        r.append(_time(route, 1))
    return {"moma": statistics.median(a), "dense": statistics.median(b), "route": statistics.median(r)}


def _ep(hidden, ffn, seq, batch, reps, ep):
    from megatron.core import parallel_state

    from megatron_vlm import runtime

    runtime.initialize(expert_model_parallel_size=ep, seed=1)
    torch.set_num_threads(1)  # one core per rank, also for the EP=1 reference
    moma, _ = _layers(_config(hidden, ffn, seq, ep))
    x, ctx = _inputs(seq, batch, hidden, parallel_state.get_data_parallel_rank())
    return _time(_step(moma, x, ctx), reps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    a = parser.parse_args(argv)
    tokens = a.seq * a.batch
    print(f"MoMa layer (4 image + 4 text experts, FFN {a.ffn}) vs dense (FFN {a.ffn}); hidden {a.hidden}, "
          f"{tokens} tokens (half image), fwd+bwd fp32, median of {a.reps}")
    (single,) = run_distributed(_single, 1, a.hidden, a.ffn, a.seq, a.batch, a.reps)
    print(f"  dense layer {1e3 * single['dense']:.1f} ms | MoMa layer {1e3 * single['moma']:.1f} ms | "
          f"ratio MoMa/dense {single['moma'] / single['dense']:.2f}x (target <= 1.5x)")
    print(f"  routing (router forward) {1e3 * single['route']:.1f} ms = "
          f"{100 * single['route'] / single['moma']:.1f}% of the MoMa layer (target <= 10%)")
    ep1 = run_distributed(_ep, 1, a.hidden, a.ffn, a.seq, a.batch, a.reps, 1)[0]
    ep2 = max(run_distributed(_ep, 2, a.hidden, a.ffn, a.seq, a.batch, a.reps, 2))
    print(f"  EP=1 (1 rank, 8 experts): {tokens / ep1:.0f} tokens/s | EP=2 (2 ranks x 4 experts, each its "
          f"own {tokens} tokens): {2 * tokens / ep2:.0f} tokens/s | EP=2/EP=1 throughput {ep1 * 2 / ep2:.2f}x")


if __name__ == "__main__":
    main()
