"""``ArchSpec``: what an arch is, in one registry entry (see ``megatron_vlm/archs/__init__.py``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from megatron_vlm.data.layout import TokenLayout

if TYPE_CHECKING:
    from megatron_vlm.config import Config, ModelConfig


def lazy(target: str | Callable) -> Callable:
    """``"package.module:attribute"`` -> that attribute, imported now (callables pass through)."""
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class BlockSpecContext:
    """What a layer-spec builder gets: the arch's ModelConfig, the language decoder's
    TransformerConfig, the backend provider (``megatron_vlm.models.backends``), the virtual stage."""
    model: Any
    config: Any
    backend: Any
    vp_stage: int | None


def _no_rules(cfg: "Config") -> None:
    return None


def _no_fields(model: "ModelConfig") -> dict:
    return {}


def _text_seq_length(cfg: "Config") -> int:
    return cfg.model.language.seq_length


def _dense_flops(cfg: "Config", global_batch_size: int) -> float:
    from megatron_vlm.training.flops import iteration_flops

    return iteration_flops(cfg, global_batch_size)


def _same_key(model_config, key: str) -> list[str]:
    return [key]


def _append_tokens(inputs, new_tokens):
    return inputs.append_tokens(new_tokens)


@dataclass(frozen=True)
class ArchSpec:
    """One arch.

    * ``model_class``: ``"module:Class"`` of its :class:`~megatron_vlm.models.vlm.VLMModel` subclass;
      ``block_spec``: ``"module:function"``, ``f(BlockSpecContext) -> TransformerBlockSubmodules``
      (this pipeline stage's layer specs for the backend).
    * ``token_layout``: how the data layer lays out its sequences.
    * ``section`` / ``section_class``: its ``model.<section>`` config (a dataclass) and
      ``validate(cfg)`` its rules (raise ``ConfigError``, one line).
    * ``transformer_config(model_config) -> dict``: extra ``TransformerConfig`` fields of the
      language decoder (MoE fields, per-modality options).
    * ``flops(cfg, global_batch_size)``: training FLOPs of one iteration (MFU);
      ``pipeline_seq_length(cfg)``: length of the tensors pipeline stages exchange.
    * ``homogeneous_layers``: False when the decoder mixes layer types (dist checkpoints then
      store each layer on its own).
    * ``experts``: the arch has experts (``--expert-model-parallel-size`` > 1 allowed).
    * ``conversion_family``: ``"module:Class"`` of its HF conversion family, or None.
    * ``extend_inputs(inputs, new_tokens)``: the decode hook, the model inputs one step later.
    * ``place_text_layers(model_config, text_layers) -> [index]``: warm start from a text-only
      decoder of ``text_layers`` layers: sets ``language.num_layers`` and returns where text layer
      ``j`` goes; None = layer ``j`` is layer ``j``.
    * ``from_dense(model_config, key) -> [key]``: where a tensor of a dense decoder (our
      ``joint_decoder`` names, TP=1) goes in this arch when warm-starting from it (upcycling); one
      key each by default, several for copies (MoMa: every expert of a MoMa layer).
    * ``metrics(cfg, prefix) -> dict``: the arch's own metrics since the last call (a collective:
      every rank calls it after each training iteration and each evaluation), or None.
    """
    name: str
    summary: str
    model_class: str
    block_spec: str | Callable
    token_layout: TokenLayout
    section: str | None = None
    section_class: type | None = None
    validate: Callable[["Config"], None] = _no_rules
    transformer_config: Callable[["ModelConfig"], dict] = _no_fields
    flops: Callable[["Config", int], float] = _dense_flops
    pipeline_seq_length: Callable[["Config"], int] = _text_seq_length
    homogeneous_layers: bool = True
    experts: bool = False
    conversion_family: str | None = None
    extend_inputs: Callable = _append_tokens
    place_text_layers: Callable[["ModelConfig", int], list[int]] | None = None
    metrics: Callable[["Config", str], dict] | None = None
    from_dense: Callable[["ModelConfig", str], list[str]] = _same_key

    def collect_metrics(self, cfg: "Config", prefix: str = "") -> dict:
        return self.metrics(cfg, prefix) if self.metrics is not None else {}

    def model_cls(self) -> type:
        return lazy(self.model_class)

    def build_block_spec(self, context: BlockSpecContext):
        return lazy(self.block_spec)(context)

    def family(self):
        """The conversion family instance, or None."""
        return lazy(self.conversion_family)() if self.conversion_family else None

    def checkpoint_metadata(self) -> dict:
        """The ``sharded_state_dict`` metadata this arch's layers need."""
        return {"non_homogeneous_layers": not self.homogeneous_layers}
