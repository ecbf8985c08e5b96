"""Smallest end-to-end check of a launcher: every rank initialises through
``megatron_vlm.runtime.initialize`` (launcher detection, rendezvous, gloo or nccl, megatron
parallel state), builds a tiny joint_decoder VLM with tensor parallelism, runs one forward/backward
on a fixed batch and prints one JSON line per rank::

    mpirun -np 2 python examples/mpirun_hello.py            # Open MPI (as root: --allow-run-as-root)
    torchrun --standalone --nproc-per-node 2 examples/mpirun_hello.py
    srun -n 2 python examples/mpirun_hello.py               # Slurm (one node)

With tensor parallelism the loss is all-reduced inside the model, so every rank must print the
same loss. ``--tp`` sets the tensor-parallel size (default 2; it must divide the world size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def tiny_config(tp: int):
    from megatron_vlm.config import Config

    cfg = Config()
    lang, v = cfg.model.language, cfg.model.vision_encoder
    lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups = 2, 64, 4, 2
    lang.ffn_hidden_size, lang.vocab_size, lang.seq_length = 96, 256, 32
    v.num_layers, v.hidden_size, v.num_attention_heads, v.ffn_hidden_size = 1, 32, 4, 64
    v.image_size, v.patch_size = 16, 4
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.training.seed = 1234
    return cfg


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from megatron.core import parallel_state

    from megatron_vlm import runtime
    from megatron_vlm.config import validate
    from megatron_vlm.models import build_model
    from megatron_vlm.data.mock import random_batch

    ctx = runtime.initialize(tensor_model_parallel_size=args.tp, seed=1234)
    try:
        cfg = validate(tiny_config(args.tp), world_size=ctx.world_size)
        model = build_model(cfg).to(ctx.device)
        batch = random_batch(cfg.model, batch_size=2, seed=0).to(ctx.device)  # same on every rank
        per_token = model(batch.model_inputs())
        loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
        loss.backward()
        grad_sq = sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None)
        report = {
            "rank": ctx.rank,
            "world": ctx.world_size,
            "local_rank": ctx.launch.local_rank,
            "launcher": ctx.launch.launcher,
            "backend": ctx.backend,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
            "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            "loss": loss.item(),
            "local_grad_norm": float(torch.sqrt(grad_sq)),
        }
        print("MPIRUN_HELLO " + json.dumps(report), flush=True)
        return report
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
