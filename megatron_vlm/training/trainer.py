"""The training loop behind ``pretrain_vlm.py``.

Per iteration: one global batch (``global_batch_size`` samples, ``micro_batch_size`` x
``num_micro_batches`` per data-parallel rank) through megatron's schedule, a NaN/Inf check, the
(distributed) optimizer step with gradient clipping, the LR schedule, metrics, and eval / checkpoint
at their intervals. SIGTERM/SIGINT save a checkpoint at the end of the current iteration and exit.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_vlm import runtime
from megatron_vlm.archs import get_arch
from megatron_vlm.config import Config
from megatron_vlm.models.fusion import collect_metrics as fusion_metrics
from megatron_vlm.training import checkpointing, flops
from megatron_vlm.training.step import (build_model_chunks, build_optimizer, forward_backward,
                                        next_batch, reduce_losses, unwrap, zero_grads)


class TrainingError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# Evaluation: loss and answer accuracy
# ------------------------------------------------------------------------------------------------

def _eval_loss_func(batch, output):
    """Loss and exact-match accuracy from vocab-parallel logits ``[b, s, v/tp]`` (last stage).

    A sample is correct when the argmax at every ``loss_mask`` position equals its label (for the
    question/answer samples that is: the whole answer is right).
    """
    logits = output.float()
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                        batch.labels.t().contiguous()).t()
    mask = batch.loss_mask.float()
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    hit = (full.argmax(-1) == batch.labels) | (mask == 0)
    correct = hit.all(dim=1).float().sum()
    total = (loss * mask).sum()
    return total, mask.sum().to(torch.int), {
        "lm loss": total.detach().clone(), "tokens": mask.sum(), "correct": correct,
        "samples": torch.tensor(float(batch.tokens.shape[0]), device=logits.device)}


def _eval_forward_step(data_iterator, model):
    batch = next_batch(data_iterator)
    return model(batch.model_inputs(with_labels=False)), partial(_eval_loss_func, batch)


def evaluate(model_chunks, batches, seq_length: int) -> dict:
    """Loss per loss token and accuracy over ``batches`` (each a list of micro batches), on every
    rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for c in model_chunks:
        c.eval()
    sums = torch.zeros(4)  # loss sum, loss tokens, correct, samples
    with torch.no_grad():
        for micro_batches in batches:
            out = get_forward_backward_func()(
                forward_step_func=_eval_forward_step, data_iterator=iter(micro_batches),
                model=model_chunks, num_microbatches=len(micro_batches), seq_length=seq_length,
                micro_batch_size=micro_batches[0].tokens.shape[0], forward_only=True)
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                for d in out:
                    sums += torch.stack([d["lm loss"], d["tokens"], d["correct"], d["samples"]]).float().cpu()
    for c in model_chunks:
        c.train()
    sums = sums.to(torch.cuda.current_device())
    torch.distributed.broadcast(sums, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    sums = sums.cpu()
    return {"eval_loss": sums[0].item() / max(sums[1].item(), 1),
            "eval_accuracy": sums[2].item() / max(sums[3].item(), 1)}


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------

class MetricsLogger:
    """``log_dir/metrics.jsonl`` (one JSON object per logged iteration) + TensorBoard, rank 0 only."""

    def __init__(self, log_dir: str | None, enabled: bool):
        self.enabled = enabled and log_dir is not None
        self.file = self.tb = None
        if self.enabled:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(log_dir) / "metrics.jsonl", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["iteration"])
                elif isinstance(v, list):  # per-expert values etc.: one curve per index
                    for i, x in enumerate(v):
                        if isinstance(x, (int, float)):
                            self.tb.add_scalar(f"{k}/{i}", x, record["iteration"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _print0(*args) -> None:
    if torch.distributed.get_rank() == 0:
        print(*args, flush=True)


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """SIGTERM/SIGINT/SIGUSR1 set a flag; all ranks agree on it once per iteration (all_reduce).
    SIGUSR1 is the one launchers forward without killing the ranks (Open MPI 5's mpirun kills them
    right after forwarding SIGTERM/SIGINT): examples/graceful_stop.sh turns SIGTERM/SIGINT into it."""

    def __init__(self):
        self.requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=torch.cuda.current_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    iteration: int
    last_loss: float | None
    eval: dict | None
    stopped_by_signal: bool


def train(cfg: Config, data) -> TrainResult:
    """Train with ``data`` (a :class:`megatron_vlm.training.data_adapter.TrainingData`)."""
    t = cfg.training
    ctx = runtime.context()
    arch = get_arch(cfg.model.arch)
    # weights are initialised even when --load overwrites them next: megatron-core 0.16.1 sets the
    # tensor-parallel attributes of its linears' weights only in its init path, and without them the
    # gradient norm (clipping) counts TP-split weights once per TP group (TP parity breaks)
    model_chunks = build_model_chunks(cfg, image_token_id=data.image_token_id)
    optimizer, scheduler = build_optimizer(cfg, model_chunks)
    start_iter = 0
    if t.load:
        # --finetune: weights only (Megatron-LM's); --no-load-optim: fresh optimizer + scheduler
        load_optim = t.load_optim and not t.finetune
        try:
            state = checkpointing.load_checkpoint(t.load, model_chunks, optimizer if load_optim else None,
                                                  scheduler if load_optim else None,
                                                  load_rng=t.load_rng and not t.finetune)
        except Exception as e:
            msg = " ".join(str(e).split())[:500]
            raise TrainingError(f"--load {t.load}: cannot load the checkpoint ({type(e).__name__}: {msg})") from e
        if not state["optimizer_loaded"]:
            # the optimizer's fp32 main params (bf16/fp16) were copied from the weights at build
            # time: take the loaded weights (Megatron-LM does the same for --finetune/--no-load-optim)
            optimizer.reload_model_params()
        if t.finetune:
            _print0(f"loaded the weights of {t.load} (iteration {state['iteration']}); --finetune: "
                    f"starting at iteration 0 with a fresh optimizer and data position")
        else:
            start_iter = state["iteration"]
            data.load_state_dict(state["extra"].get("data", {}))
            _print0(f"loaded checkpoint {t.load} at iteration {start_iter}")

    seq_length = arch.pipeline_seq_length(cfg)
    dp = parallel_state.get_data_parallel_world_size()
    num_mb = t.global_batch_size // (t.micro_batch_size * dp)
    iter_flops = arch.flops(cfg, t.global_batch_size)
    peak, peak_source = flops.peak_tflops(cfg)
    _print0(f"model: arch={cfg.model.arch} backend={unwrap(model_chunks[0]).backend} "
            f"world={ctx.world_size} tp={cfg.parallel.tensor_model_parallel_size} "
            f"pp={cfg.parallel.pipeline_model_parallel_size} dp={dp} micro_batches={num_mb}; "
            + (f"MFU peak {round(peak, 3)} TFLOP/s ({peak_source})" if peak else f"no MFU ({peak_source})"))
    logger = MetricsLogger(t.log_dir, enabled=torch.distributed.get_rank() == 0)
    stop = StopRequest()
    bad_in_a_row = 0
    skipped_total = 0
    last_loss, eval_result, stopped = None, None, False

    def save(iteration):
        checkpointing.save_checkpoint(t.save, iteration, model_chunks, optimizer, scheduler, cfg,
                                      extra={"data": data.state_dict(), "skipped_steps": skipped_total},
                                      keep_last=t.keep_last)
        _print0(f"saved checkpoint {t.save}/iter_{iteration:07d}")

    iteration = start_iter
    try:
        while iteration < t.train_iters:
            start = time.perf_counter()
            micro_batches = data.next_train(num_mb)
            zero_grads(model_chunks, optimizer)
            checkpointing.fault_point("forward", iteration + 1)  # tests only (no-op unless set)
            losses = forward_backward(model_chunks, micro_batches, seq_length)
            loss = reduce_losses(losses, t.calculate_per_token_loss)
            arch_metrics = arch.collect_metrics(cfg)
            arch_metrics.update(fusion_metrics(cfg))  # router_weight_<encoder> (several encoders)
            iteration += 1
            if not math.isfinite(loss):
                bad_in_a_row += 1
                skipped_total += 1
                _print0(f"iteration {iteration}: loss is {loss}; step skipped "
                        f"({bad_in_a_row} in a row, limit {t.max_bad_steps})")
                logger.log({"iteration": iteration, "loss": None, "skipped": True,
                            "skipped_total": skipped_total})
                if bad_in_a_row >= t.max_bad_steps:
                    raise TrainingError(
                        f"loss was NaN/Inf for {bad_in_a_row} iterations in a row (limit "
                        f"--max-bad-steps={t.max_bad_steps}); stopping at iteration {iteration}")
                continue
            bad_in_a_row = 0
            checkpointing.fault_point("optimizer", iteration)  # tests only (no-op unless set)
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            elapsed = time.perf_counter() - start
            last_loss = loss
            tflops = iter_flops / elapsed / ctx.world_size / 1e12
            record = {
                "iteration": iteration, "loss": loss, "lr": scheduler.get_lr(optimizer.param_groups[0]),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": t.global_batch_size * cfg.model.language.seq_length / elapsed,
                "tflops_per_gpu": tflops, "mfu": None if not peak else tflops / peak,
                "iteration_time_s": elapsed, "skipped_total": skipped_total, **arch_metrics,
            }
            if iteration % t.log_interval == 0 or iteration == t.train_iters:
                logger.log(record)
                _print0(f"iter {iteration:>6}/{t.train_iters} | loss {loss:.4f} | lr {record['lr']:.3e} | "
                        f"grad {record['grad_norm'] or 0:.3f} | {record['tokens_per_s']:.0f} tok/s | "
                        f"{tflops:.4f} TFLOP/s/dev" + (f" | MFU {100 * record['mfu']:.2f}%" if peak else ""))
            if t.eval_interval and (iteration % t.eval_interval == 0 or iteration == t.train_iters):
                eval_result = evaluate(model_chunks, data.val_batches(num_mb, t.eval_iters), seq_length)
                eval_result.update(arch.collect_metrics(cfg, "eval_"))
                eval_result.update(fusion_metrics(cfg, "eval_"))
                logger.log({"iteration": iteration, **eval_result})
                extra = "".join(f" | {k[5:]} {100 * v:.1f}%" for k, v in eval_result.items()
                                if k.endswith("_acc") and k.startswith("eval_"))
                _print0(f"eval @ {iteration}: loss {eval_result['eval_loss']:.4f} | "
                        f"accuracy {100 * eval_result['eval_accuracy']:.1f}%" + extra)
            if stop.agreed():
                stopped = True
                _print0(f"stop requested (SIGTERM/SIGINT/SIGUSR1): saving at iteration {iteration}")
                if t.save:
                    save(iteration)
                break
            if t.save and t.save_interval and iteration % t.save_interval == 0:
                save(iteration)
        else:
            if t.save and not (t.save_interval and iteration % t.save_interval == 0) and iteration > start_iter:
                save(iteration)
    finally:
        logger.close()
    return TrainResult(iteration, last_loss, eval_result, stopped)
