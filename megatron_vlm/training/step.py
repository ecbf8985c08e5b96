"""One training/eval step on megatron-core: model chunks (per virtual pipeline stage) wrapped in
megatron ``DistributedDataParallel``, ``DistributedOptimizer``, and megatron's pipeline schedules.

Loss: the loss function returns megatron's 3-tuple ``(sum of token losses, loss tokens, log)``.
With ``training.calculate_per_token_loss`` (default) megatron's schedule and
``finalize_model_grads`` divide by the loss tokens of the whole global batch (all micro batches,
all data-parallel ranks): the loss is the mean over every loss token. Without it, each micro
batch's mean is averaged (megatron's per-micro-batch behaviour).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_vlm import runtime
from megatron_vlm.config import Config
from megatron_vlm.data.batch import VLMBatch
from megatron_vlm.models import build_model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(model, (DistributedDataParallel, Float16Module)):
        model = model.module
    return model


def expert_params_apart(model: torch.nn.Module) -> None:
    """Expert weights always go to megatron's expert gradient buffers and their own optimizer,
    also at EP=1 (megatron only does so for EP > 1: ``allreduce = not (is_expert and EP > 1)``).
    At EP=1 the expert data-parallel group is the data-parallel group, so gradients are the same;
    what it buys is one optimizer layout (dense + experts, chained) at every EP, so a checkpoint
    saved at EP=2 resumes at EP=1 with its optimizer state and vice versa."""
    for module in model.modules():
        if getattr(module, "is_expert", False):
            for p in module.parameters(recurse=False):
                p.allreduce = False


def build_model_chunks(cfg: Config, image_token_id: int | None = None, wrap_ddp: bool = True) -> list:
    """The model chunks of this rank (one per virtual pipeline stage), DDP-wrapped if asked."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    chunks = [build_model(cfg, vp_stage=s, image_token_id=image_token_id) for s in stages]
    for c in chunks:
        expert_params_apart(c)
    chunks = [runtime.place(c) for c in chunks]
    if cfg.training.bf16:  # megatron's wrapper: casts the module to bf16, first-stage inputs too
        chunks = [Float16Module(c.config, c) for c in chunks]
    if not wrap_ddp:
        return chunks
    ddp_config = DistributedDataParallelConfig(
        average_in_collective=False,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.training.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                       disable_bucketing=(i > 0)) for i, c in enumerate(chunks)]
    for c in wrapped:
        c.broadcast_params()
    return wrapped


def build_optimizer(cfg: Config, model_chunks: list):
    t = cfg.training
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
        bf16=t.bf16, params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        use_distributed_optimizer=t.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    decay = t.lr_decay_iters or t.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if t.lr_warmup_iters else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=max(decay, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=decay, wd_incr_style="constant")
    return optimizer, scheduler


def masked_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Megatron's loss contract: ``(sum of the per-token loss [b, s] over loss_mask, number of loss
    tokens, {"lm loss": [sum, tokens]})``; the schedule turns it into a per-token or
    per-micro-batch mean (``calculate_per_token_loss``)."""
    mask = loss_mask.float().reshape(-1)
    total = (output.float().reshape(-1) * mask).sum()
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def next_batch(data_iterator: Iterator[VLMBatch]) -> VLMBatch:
    """The next micro batch, on this rank's device (the data layer yields host or device tensors)."""
    return next(data_iterator).to(torch.cuda.current_device())


def forward_step(data_iterator: Iterator[VLMBatch], model):
    """Megatron schedule hook: one micro batch through ``model`` -> (output, loss_func)."""
    batch = next_batch(data_iterator)
    return model(batch.model_inputs()), partial(masked_loss, batch.loss_mask)


def forward_backward(model_chunks: list, micro_batches: list[VLMBatch], seq_length: int,
                     forward_only: bool = False) -> list[dict]:
    """Run megatron's schedule (no pipelining / 1F1B / interleaved) over the micro batches.

    ``seq_length`` is the length of the tensors pipeline stages exchange. Returns the per-micro-batch
    loss dicts (non-empty on the last pipeline stage only).
    """
    config = unwrap(model_chunks[0]).config
    config.finalize_model_grads_func = finalize_model_grads
    if len(model_chunks) > 1:  # interleaved pipeline: megatron 0.16's batched p2p swaps tensors
        config.overlap_p2p_comm, config.batch_p2p_comm = True, False
    num_mb = len(micro_batches)
    if len(model_chunks) > 1:
        iterators = [iter(micro_batches) for _ in model_chunks]
    else:
        iterators = iter(micro_batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=model_chunks,
        num_microbatches=num_mb,
        seq_length=seq_length,
        micro_batch_size=micro_batches[0].tokens.shape[0],
        forward_only=forward_only,
    )


def reduce_losses(loss_dicts: list[dict], per_token: bool = True) -> float | None:
    """The iteration's loss on every rank: sum of token losses / loss tokens over all micro batches
    and data-parallel ranks (``per_token``), else the mean of the micro batches' means."""
    value = torch.zeros(2, device=torch.cuda.current_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and loss_dicts:
        sums = torch.stack([d["lm loss"] for d in loss_dicts]).to(value)  # [micro batches, (sum, tokens)]
        value.copy_(sums.sum(0) if per_token else
                    torch.stack([(sums[:, 0] / sums[:, 1].clamp(min=1)).mean(), torch.ones((), device=value.device)]))
    group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(value, src=last, group=group)
    # over data-parallel replicas (each saw different samples)
    torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return (value[0] / value[1].clamp(min=1)).item()


def zero_grads(model_chunks: list, optimizer=None) -> None:
    for chunk in model_chunks:
        if isinstance(chunk, DistributedDataParallel):
            chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
