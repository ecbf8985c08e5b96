"""Silence warnings that third-party libraries print on every rank and that say nothing actionable
about a training run (missing optional fused kernels, deprecations inside megatron-core/torch).
Installed by ``pretrain_vlm.py`` before megatron-core is imported; ``MEGATRON_VLM_ALL_WARNINGS=1``
keeps everything."""

from __future__ import annotations

import os
import warnings

KNOWN_NOISE = (  # (category, message regex)
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"When using async grad allreduce it is recommended"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    (FutureWarning, r"`load_state_dict` is deprecated"),
)


def silence_known_warnings() -> None:
    if os.environ.get("MEGATRON_VLM_ALL_WARNINGS") == "1":
        return
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
