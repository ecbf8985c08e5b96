"""Model building blocks shared by the archs: ``VLMModel`` (vision -> projector -> decoder), layer
specs from a backend provider (``local`` | ``te``), core attention, wrapped HF vision towers.
The archs themselves live in ``megatron_vlm/archs/``."""

from megatron_vlm.models.vlm import VLMModel, build_model, built_on_host

__all__ = ["VLMModel", "build_model", "built_on_host"]
