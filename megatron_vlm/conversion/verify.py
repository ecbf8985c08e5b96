"""verify: the same (image, text) input through both sides, compare logits.

The Megatron side is our own model code (the arch's ``VLMModel`` built at the requested TP, loaded
from the dist checkpoint with megatron's resharding loader, vocab-parallel logits gathered over
TP); the HF side is transformers' ``from_pretrained`` model. Both in fp32 unless ``--dtype`` says
otherwise. Only rank 0 builds the HF model.

Both sides get the same inputs: the family's ``sample_inputs`` (our ``ModelInputs``, passed to our
model as is, the one model-input contract) from which the family derives transformers' arguments.
Also: :func:`megatron_greedy` (greedy decoding with our model through the generation engine, KV
cache included) for the "exported folder generates the same tokens" check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_vlm import runtime
from megatron_vlm.config import Config, ConfigError, ParallelConfig, from_dict, validate
from megatron_vlm.conversion import megatron_io
from megatron_vlm.conversion.families import check_one_vision_encoder, family_for_arch
from megatron_vlm.conversion.llama import hf_vocab_size
from megatron_vlm.conversion.mapping import ConversionError


@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    shape: tuple
    passed: bool
    argmax_agree: float  # fraction of positions whose argmax token agrees
    generated_megatron: list | None = None
    generated_hf: list | None = None

    @property
    def same_generation(self) -> bool | None:
        if self.generated_hf is None:
            return None
        n = len(self.generated_hf)
        return n > 0 and self.generated_megatron[:n] == self.generated_hf


def load_megatron(load: str, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32):
    """Our model for this rank at TP=``tp`` (PP=1), weights loaded (resharded) from ``load``."""
    from megatron_vlm.models import build_model
    from megatron_vlm.training.checkpointing import load_checkpoint, read_config

    if pp != 1:
        raise ConversionError(f"--pipeline-model-parallel-size {pp}: verify/generate run the Megatron "
                              f"side with PP=1 (any TP); the checkpoint itself may have any layout")
    raw = read_config(load)
    if not raw:
        raise ConversionError(f"--load {load}: no config.yaml in the latest checkpoint")
    cfg: Config = from_dict(raw)
    cfg.parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    cfg.training.bf16 = dtype == torch.bfloat16
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConversionError(f"--tensor-model-parallel-size {tp}: {e}") from None
    megatron_io.ensure_runtime(tp, pp)
    model = runtime.place(build_model(cfg, pre_process=True, post_process=True, dtype=dtype, init_weights=False))
    load_checkpoint(load, [model], strict=True, load_rng=False)
    model.eval()
    return cfg, model


def load_hf(family, hf_path: str, dtype: torch.dtype):
    """transformers' model from a local folder (never the Hub)."""
    if not Path(hf_path, "config.json").is_file():
        raise ConversionError(f"--hf-path {hf_path}: not an HF folder (no config.json)")
    return family.hf_model_class().from_pretrained(hf_path, dtype=dtype, local_files_only=True).eval()


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits.contiguous())


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def check_pair(hf_path: str, load: str) -> None:
    """The HF folder and the checkpoint are of one family (cheap: reads their configs only);
    ConversionError (one line) otherwise."""
    import json

    from megatron_vlm.training.checkpointing import read_config

    cfg_file = Path(hf_path, "config.json")
    if not cfg_file.is_file():
        raise ConversionError(f"--hf-path {hf_path}: not an HF folder (no config.json)")
    try:
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
    except (ValueError, UnicodeDecodeError):
        raise ConversionError(f"{cfg_file}: not valid JSON") from None
    try:
        raw = read_config(load)
    except (ValueError, FileNotFoundError) as e:
        raise ConversionError(f"--load {load}: {e}") from None
    if not raw:
        raise ConversionError(f"--load {load}: no config.yaml in the latest checkpoint")
    arch = (raw.get("model") or {}).get("arch", "joint_decoder")
    check_one_vision_encoder(raw.get("model") or {}, f"--load {load}", "verify")
    family = family_for_arch(arch)
    if archs and not set(archs) & set(family.hf_architectures):
        raise ConversionError(f"--hf-path {hf_path} holds {archs[0]} but --load {load} is a {arch} checkpoint "
                              f"(HF {family.hf_architectures[0]}): verify compares one family")


@torch.no_grad()
def verify(hf_path: str, load: str, tp: int = 1, pp: int = 1, tolerance: float = 1e-4,
           dtype: torch.dtype | None = None, seed: int = 0, text_len: int = 12,
           generate: int = 0) -> VerifyResult | None:
    """Compare logits (and, with ``generate``, greedy tokens); the result on rank 0, None elsewhere."""
    dtype = dtype or torch.float32
    check_pair(hf_path, load)
    cfg, model = load_megatron(load, tp, pp, dtype)
    family = family_for_arch(cfg.model.arch)
    v = hf_vocab_size(cfg.model.language)
    device = next(model.parameters()).device  # both models run there (one after the other)
    inputs = family.sample_inputs(cfg.model, seed=seed, text_len=text_len).to(device)
    ours = gather_logits(model(inputs)).float().cpu()
    gen_inputs = family.sample_inputs(cfg.model, seed=seed + 1, text_len=max(2, text_len // 2)).to(device)
    ours_gen = megatron_greedy(model, gen_inputs, generate, v) if generate else None
    if not _rank0():
        return None
    del model
    hf_model = load_hf(family, hf_path, dtype).to(device)
    theirs = family.hf_logits(hf_model, inputs).float().cpu()
    if theirs.shape[-1] != v:
        raise ConversionError(f"--hf-path {hf_path}: vocab {theirs.shape[-1]} differs from the checkpoint's {v}")
    ours = ours[..., :v]
    if ours.shape != theirs.shape:
        raise ConversionError(f"logit shapes differ: megatron {tuple(ours.shape)} vs HF {tuple(theirs.shape)}")
    diff = (ours - theirs).abs().max().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    result = VerifyResult(diff, tolerance, tuple(ours.shape), diff <= tolerance, agree)
    if generate:
        result.generated_megatron = ours_gen
        result.generated_hf = family.hf_generate(hf_model, gen_inputs, generate)
    return result


def megatron_greedy(model, inputs, max_new_tokens: int, vocab: int) -> list[int]:
    """Greedy continuation of ``inputs`` (``ModelInputs``, batch 1) with our model: the generation
    engine's KV-cached decoding (argmax over the first ``vocab`` ids, no eos stop), so an export
    check also exercises the cache (the engine's tests show it equal to the full recompute)."""
    from megatron_vlm.inference.engine import generate

    return generate(model, [inputs], max_new_tokens, vocab_size=vocab, eos_id=None)[0]
