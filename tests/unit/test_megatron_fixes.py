"""megatron_fixes.torch_adam_checkpoint: without it a distributed-optimizer checkpoint (torch Adam,
no apex/TE) cannot be loaded; with it the optimizer state round-trips exactly."""

import pytest

from megatron_vlm.testing.distributed import run_distributed


def _save_then_load(tmp: str, with_fix: bool):
    import torch

    from megatron_vlm import runtime
    from megatron_vlm.config import Config
    from megatron_vlm.runtime import megatron_fixes
    from megatron_vlm.testing.batches import random_micro_batches
    from megatron_vlm.training import checkpointing
    from megatron_vlm.training.step import build_model_chunks, build_optimizer, forward_backward

    if not with_fix:
        megatron_fixes._applied.add("torch_adam_checkpoint")  # initialize() then skips it
    runtime.initialize()
    assert megatron_fixes.needs_torch_adam_fix()
    cfg = Config()
    chunks = build_model_chunks(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    for _ in range(2):
        forward_backward(chunks, random_micro_batches(cfg.model, 1, 2), cfg.model.language.seq_length)
        opt.step()
    checkpointing.save_checkpoint(tmp, 2, chunks, opt, sched)
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
    before = [{k: v.clone() for k, v in s.items()} for s in inner.state.values()]
    chunks2 = build_model_chunks(cfg)
    opt2, sched2 = build_optimizer(cfg, chunks2)
    checkpointing.load_checkpoint(tmp, chunks2, opt2, sched2)
    inner2 = opt2.chained_optimizers[0].optimizer if hasattr(opt2, "chained_optimizers") else opt2.optimizer
    after = list(inner2.state.values())
    steps = [s["step"] for s in after]
    return {"same": all(torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a),
            "steps": [float(s) for s in steps], "shared_step": len({id(s) for s in steps}) < len(steps)}


def test_distributed_optimizer_checkpoint_round_trip(tmp_path):
    (r,) = run_distributed(_save_then_load, 1, str(tmp_path / "a"), True)
    assert r["same"] and set(r["steps"]) == {2.0} and not r["shared_step"], r


def test_without_the_fix_loading_fails(tmp_path):
    with pytest.raises(Exception, match="AssertionError|KeyError"):
        run_distributed(_save_then_load, 1, str(tmp_path / "b"), False)
