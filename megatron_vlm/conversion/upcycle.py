"""Warm start one of our archs from a trained dense checkpoint of ours (``convert_checkpoint.py
upcycle``), e.g. ``joint_decoder`` -> ``moma``: every tensor of the dense model goes where the target
arch's ``ArchSpec.from_dense`` says (MoMa: each expert of a MoMa layer = a copy of that layer's dense
MLP, optionally with noise); what the dense model lacks (routers, auxiliary routers) keeps the target
arch's init. Reads one global tensor at a time from any saved layout; writes a checkpoint that
``pretrain_vlm.py --load`` starts from (iteration 0, no optimizer state), atomically.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from megatron_vlm.config import Config, ConfigError, ParallelConfig, set_key
from megatron_vlm.conversion import hf_io, megatron_io
from megatron_vlm.conversion.mapping import ConversionError
from megatron_vlm.conversion.megatron_io import log


def upcycled_config(dense: Config, arch: str, overrides: dict, tp: int, pp: int, ep: int) -> Config:
    """The dense checkpoint's model config with ``model.arch = arch`` and ``overrides``, validated
    at the target layout."""
    from megatron_vlm.config import validate

    cfg = Config(model=copy.deepcopy(dense.model), data=copy.deepcopy(dense.data),
                 parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         expert_model_parallel_size=ep,
                                         sequence_parallel=tp > 1 and dense.parallel.sequence_parallel))
    cfg.training.bf16 = dense.training.bf16
    try:
        set_key(cfg, "model.arch", arch, f"--arch {arch}")
        for key, value in overrides.items():
            set_key(cfg, f"model.{key}", value, f"--set model.{key}")
        validate(cfg)
    except ConfigError as e:
        raise ConversionError(f"upcycle to {arch} at TP={tp} PP={pp} EP={ep}: {e}") from None
    return cfg


def upcycle(load: str, save: str, arch: str, overrides: dict | None = None, tp: int = 1, pp: int = 1,
            ep: int = 1, noise: float = 0.0, seed: int = 1234, overwrite: bool = False) -> Path:
    from megatron_vlm.archs import get_arch

    reader = megatron_io.MegatronReader(load)
    if reader.config.model.arch == arch:
        raise ConversionError(f"--arch {arch}: the checkpoint in {load} is already {arch}")
    try:
        spec = get_arch(arch)
    except ValueError as e:
        raise ConversionError(f"--arch {arch}: {e}") from None
    if noise < 0:
        raise ConversionError(f"--expert-noise {noise}: must be >= 0 (relative std of the noise)")
    cfg = upcycled_config(reader.config, arch, overrides or {}, tp, pp, ep)
    hf_io.check_output_dir(save, overwrite, "--save")
    log(f"upcycle {reader.config.model.arch} ({load}, iteration {reader.iteration}) -> {arch}, "
        f"target TP={tp} PP={pp} EP={ep}")
    megatron_io.ensure_runtime()
    from megatron_vlm import runtime
    from megatron_vlm.models import build_model, built_on_host

    runtime.set_seed(seed)
    g = torch.Generator().manual_seed(seed)
    copies = {}

    def stream():
        for key in sorted(reader.model_keys()):
            t = reader.get(key)
            targets = spec.from_dense(cfg.model, key)
            if len(targets) > 1:
                copies[re.sub(r"\.layers\.\d+\.", ".layers.*.", key)] = len(targets)
            for target in targets:
                out = t.clone()
                if noise and len(targets) > 1:
                    out += noise * t.abs().mean() * torch.randn(t.shape, generator=g, dtype=t.dtype)
                yield target, out

    dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    with hf_io.atomic_output_dir(save, overwrite, "--save") as tmp, built_on_host():
        model = build_model(megatron_io.single_process_config(cfg), pre_process=True, post_process=True,
                            dtype=dtype)
        kept = megatron_io.fill_model(model, stream(), allow_missing=True)
        ckpt = megatron_io.save_model(tmp, model, cfg, extra={"upcycled_from": {
            "load": str(Path(load).absolute()), "iteration": reader.iteration,
            "arch": reader.config.model.arch, "initialised_by_arch": kept}})
        del model
    for key, n in sorted(copies.items()):
        log(f"{key}: {n} copies")
    groups = sorted({".".join(re.sub(r"\.layers\.\d+\.", ".layers.*.", k).split(".")[:6]) for k in kept})
    log(f"parameters initialised by the {arch} arch: {len(kept)} tensors in {groups}")
    log(f"wrote {save}/{ckpt.name}")
    return Path(save)
