"""N-rank vs single-rank parity for any arch: same full weights, same data, compare loss and every
gradient.

1. ``reference_step`` (world of 1): builds the model, saves its weights (dist_checkpointing),
   runs one forward/backward over the micro batches, saves the gradients as a checkpoint.
2. ``parallel_step`` (world of N, any TP/PP/DP): loads those weights (megatron reshards), runs
   the same step on its data-parallel slice, saves its gradients the same way.
3. ``compare_gradients`` (world of 1): loads both gradient checkpoints into one full model each
   (resharded back to TP=1/PP=1) and returns the largest relative difference per tensor.

Gradients travel through checkpoints so that no test code has to know how a parameter is split
across TP ranks or pipeline stages: megatron's own sharded_state_dict does.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from megatron.core import parallel_state

from megatron_vlm import runtime
from megatron_vlm.config import Config
from megatron_vlm.data.batch import VLMBatch
from megatron_vlm.training import checkpointing
from megatron_vlm.training.step import build_model_chunks, forward_backward, reduce_losses, unwrap


def _setup(cfg: Config, **runtime_kwargs):
    p = cfg.parallel
    runtime.initialize(tensor_model_parallel_size=p.tensor_model_parallel_size,
                       pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                       virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
                       expert_model_parallel_size=p.expert_model_parallel_size,
                       seed=cfg.training.seed, **runtime_kwargs)
    cfg = copy.deepcopy(cfg)
    cfg.training.use_distributed_optimizer = False  # all-reduced grads: every DP rank holds them all
    return build_model_chunks(cfg)


def _dp_slice(micro_batches: list[VLMBatch]) -> list[VLMBatch]:
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if len(micro_batches) % dp:
        raise ValueError(f"{len(micro_batches)} micro batches do not split over {dp} data-parallel ranks")
    per = len(micro_batches) // dp
    return micro_batches[rank * per:(rank + 1) * per]


def _step_and_save_grads(cfg, chunks, micro_batches, grads_dir, seq_length) -> float:
    losses = forward_backward(chunks, _dp_slice(micro_batches), seq_length)
    loss = reduce_losses(losses, cfg.training.calculate_per_token_loss)
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.module.parameters():
                if getattr(p, "main_grad", None) is not None:
                    p.data.copy_(p.main_grad)
                else:
                    p.data.zero_()
    checkpointing.save_checkpoint(grads_dir, 0, chunks)
    return loss


def reference_step(cfg: Config, micro_batches: list[VLMBatch], weights_dir: str, grads_dir: str,
                   seq_length: int | None = None, init_fn: Callable | None = None) -> float:
    """World of 1: save the initial weights, run the step, save the gradients; return the loss."""
    ref = copy.deepcopy(cfg)
    ref.parallel.tensor_model_parallel_size = ref.parallel.pipeline_model_parallel_size = 1
    ref.parallel.virtual_pipeline_model_parallel_size = None
    ref.parallel.sequence_parallel = False
    ref.parallel.expert_model_parallel_size = 1
    chunks = _setup(ref)
    if init_fn is not None:
        init_fn(unwrap(chunks[0]))
    checkpointing.save_checkpoint(weights_dir, 0, chunks)
    return _step_and_save_grads(ref, chunks, micro_batches, grads_dir,
                                seq_length or cfg.model.language.seq_length)


def parallel_step(cfg: Config, micro_batches: list[VLMBatch], weights_dir: str, grads_dir: str,
                  seq_length: int | None = None) -> float:
    """World of N: load the reference weights into this layout, run the step, save gradients."""
    chunks = _setup(cfg)
    checkpointing.load_checkpoint(weights_dir, chunks, load_rng=False)
    return _step_and_save_grads(cfg, chunks, micro_batches, grads_dir,
                                seq_length or cfg.model.language.seq_length)


def compare_gradients(cfg: Config, reference_dir: str, other_dirs: list[str]) -> list[dict]:
    """World of 1: for each of ``other_dirs`` the max over tensors of ``|g - g_ref| / max|g_ref|``
    (the worst tensor's name too), and the number of tensors compared."""
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.parallel.tensor_model_parallel_size = ref_cfg.parallel.pipeline_model_parallel_size = 1
    ref_cfg.parallel.virtual_pipeline_model_parallel_size = None
    ref_cfg.parallel.sequence_parallel = False
    ref_cfg.parallel.expert_model_parallel_size = 1
    ref_model = unwrap(_setup(ref_cfg)[0])
    checkpointing.load_checkpoint(reference_dir, [ref_model], load_rng=False)
    ref = {k: v.detach().clone() for k, v in ref_model.state_dict().items() if torch.is_tensor(v)}
    results = []
    for d in other_dirs:
        checkpointing.load_checkpoint(d, [ref_model], load_rng=False)
        worst, worst_name, n = 0.0, None, 0
        for k, v in ref_model.state_dict().items():
            if not torch.is_tensor(v) or k not in ref or not v.is_floating_point():
                continue
            scale = ref[k].abs().max().clamp(min=1e-12)
            diff = ((v - ref[k]).abs().max() / scale).item()
            n += 1
            if diff > worst:
                worst, worst_name = diff, k
        nonzero = sum(int(ref[k].abs().max() > 0) for k in ref if ref[k].is_floating_point())
        results.append({"max_rel_diff": worst, "worst": worst_name, "tensors": n, "nonzero_ref": nonzero})
    return results


def run_layouts(cfg: Config, micro_batches: list[VLMBatch], root, layouts: dict, init_fn: Callable | None = None,
                seq_length: Callable[[Config], int] | None = None) -> dict:
    """The whole parity flow of one arch: the single-rank reference from ``cfg``, then every layout
    ``{name: (world size, its config)}`` from the reference's weights, then ONE comparison run over
    all gradient checkpoints plus a control (the weights compared as if they were gradients, which
    must differ). ``seq_length(layout_cfg)``: the pipeline wire length (default: the text length).

    Returns ``{"ref_loss", "losses": {name: [loss per rank]}, "grads": {name: compare_gradients
    result}, "control": result}``."""
    from pathlib import Path

    from megatron_vlm.runtime.spawn import run_distributed

    root = Path(root)
    weights = str(root / "weights")
    (ref_loss,) = run_distributed(reference_step, 1, cfg, micro_batches, weights, str(root / "ref"),
                                  init_fn=init_fn)
    losses = {}
    for name, (world, layout_cfg) in layouts.items():
        length = seq_length(layout_cfg) if seq_length else None
        losses[name] = run_distributed(parallel_step, world, layout_cfg, micro_batches, weights,
                                       str(root / name), seq_length=length)
    (compared,) = run_distributed(compare_gradients, 1, cfg, str(root / "ref"),
                                  [weights] + [str(root / name) for name in layouts])
    return {"ref_loss": ref_loss, "losses": losses, "grads": dict(zip(layouts, compared[1:])),
            "control": compared[0]}
