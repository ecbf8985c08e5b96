"""Model archs. Importing this package registers every arch in ``ARCHS``."""

from megatron_vlm.models.vlm import ARCHS, VLMModel, build_model, register_arch
from megatron_vlm.models import joint_decoder  # noqa: F401  (registers "joint_decoder")
from megatron_vlm.models import cross_attention  # noqa: F401  (registers "cross_attention")

__all__ = ["ARCHS", "VLMModel", "build_model", "register_arch"]
