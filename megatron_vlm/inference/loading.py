"""A checkpoint for generation: its config and tokenizer (cheap, before any rank starts), then the
model at the requested tensor-parallel size (megatron's dist_checkpointing reshards a checkpoint
saved at any TP/PP/EP on load).

Generation runs with PP=1 (``--pipeline-model-parallel-size`` > 1 is a one-line error), without
sequence parallelism (a decoding step of one position cannot be split over TP ranks; megatron's
MoE layers compute the same under TP without it outside training: MoMa's training rule "TP needs
SP" is checked with SP on, the model built with it off), and with MoMa's causal ``aux`` routing
(expert choice selects over the whole sequence, which a decoder does not have yet).

Tokenizer: ``--tokenizer-path``, else the checkpoint's: the training config's
``data.tokenizer_path``, else ``<data.data_path>/tokenizer``, else a ``tokenizer/`` folder next to
the checkpoint's ``latest`` file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_vlm.config import Config, ConfigError, ParallelConfig, from_dict, validate
from megatron_vlm.data.tokenizer import TOKENIZER_FILE, Tokenizer


class LoadError(ValueError):
    """A checkpoint/tokenizer problem (one line)."""


@dataclass
class Checkpoint:
    load: str
    cfg: Config
    tokenizer: Tokenizer
    tokenizer_path: str

    @property
    def vocab_size(self) -> int:
        """Ids generation may produce: the tokenizer's (megatron pads the embedding beyond them)."""
        lang = self.cfg.model.language
        return min(self.tokenizer.vocab_size, lang.unpadded_vocab_size or lang.vocab_size)

    @property
    def banned_ids(self) -> list[int]:
        """Never generated: the image token of the inline layout (its positions take image features)."""
        from megatron_vlm.archs import get_arch
        from megatron_vlm.data.layout import TokenLayout

        if get_arch(self.cfg.model.arch).token_layout is not TokenLayout.INLINE:
            return []
        mc = self.cfg.model
        return [mc.image_token_id if mc.image_token_id is not None else self.tokenizer.image_token_id]

    @property
    def context_length(self) -> int:
        return self.cfg.model.language.seq_length


def _tokenizer_candidates(load: str, cfg: Config) -> list[Path]:
    out = []
    if cfg.data.tokenizer_path:
        out.append(Path(cfg.data.tokenizer_path))
    if cfg.data.data_path and cfg.data.data_path != "mock":
        out.append(Path(cfg.data.data_path) / "tokenizer")
    out.append(Path(load) / "tokenizer")
    return out


def read_checkpoint(load: str, tokenizer_path: str | None = None, tp: int = 1, pp: int = 1) -> Checkpoint:
    """Config + tokenizer of ``load``, and the layout checked (no model built: cheap)."""
    from megatron_vlm.archs import get_arch
    from megatron_vlm.training.checkpointing import read_config

    if pp != 1:
        raise LoadError(f"--pipeline-model-parallel-size {pp}: generation runs with PP=1 (any TP); a "
                        "checkpoint saved at any PP loads resharded")
    try:
        raw = read_config(load)
    except FileNotFoundError as e:
        raise LoadError(str(e) if str(e).startswith("--load") else f"--load {load}: {e}") from None
    if not raw:
        raise LoadError(f"--load {load}: no config.yaml in the latest checkpoint")
    cfg = from_dict(raw)
    arch = get_arch(cfg.model.arch)
    cfg.parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=tp > 1 and arch.experts)
    cfg.training.bf16 = False
    cfg.training.fp8_format = None
    moma = getattr(cfg.model, "moma", None) if arch.experts else None
    if moma is not None and getattr(moma, "eval_routing", "aux") != "aux":
        moma.eval_routing = "aux"  # generation is causal: the auxiliary routers decide
    try:
        validate(cfg)
    except ConfigError as e:
        raise LoadError(f"--tensor-model-parallel-size {tp}: {e}") from None
    cfg.parallel.sequence_parallel = False
    if tokenizer_path is not None:
        if not (Path(tokenizer_path) / TOKENIZER_FILE).is_file() and not Path(tokenizer_path).is_file():
            raise LoadError(f"--tokenizer-path {tokenizer_path}: no {TOKENIZER_FILE}")
        path = Path(tokenizer_path)
    else:
        found = [p for p in _tokenizer_candidates(load, cfg) if (p / TOKENIZER_FILE).is_file()]
        if not found:
            tried = ", ".join(str(p) for p in _tokenizer_candidates(load, cfg))
            raise LoadError(f"--load {load}: the checkpoint names no tokenizer that exists (tried {tried}); "
                            "pass --tokenizer-path DIR")
        path = found[0]
    tokenizer = Tokenizer.from_pretrained(path)
    lang = cfg.model.language
    if tokenizer.vocab_size > lang.vocab_size:
        raise LoadError(f"tokenizer {path}: {tokenizer.vocab_size} ids, more than the model's vocabulary "
                        f"of {lang.vocab_size}")
    if cfg.model.image_token_id is None:
        cfg.model.image_token_id = tokenizer.image_token_id
    return Checkpoint(load, cfg, tokenizer, str(path))


def load_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32):
    """This rank's model at the checkpoint config's TP (PP=1), weights loaded (resharded), eval
    mode. Collective; initialises the runtime if needed."""
    from megatron_vlm import runtime
    from megatron_vlm.conversion.megatron_io import ensure_runtime
    from megatron_vlm.inference.engine import weights_in_huge_pages
    from megatron_vlm.models import build_model
    from megatron_vlm.training.checkpointing import load_checkpoint

    cfg = copy.deepcopy(ckpt.cfg)
    ensure_runtime(cfg.parallel.tensor_model_parallel_size, 1)
    model = runtime.place(build_model(cfg, pre_process=True, post_process=True, dtype=dtype,
                                      image_token_id=cfg.model.image_token_id))
    load_checkpoint(ckpt.load, [model], strict=True, load_rng=False)
    weights_in_huge_pages(model)  # faster CPU decoding steps (an inference-only model)
    return model.eval()
