"""The ``mot`` arch's config section ``model.mot`` and its rules.

YAML (every key optional)::

    model:
      arch: mot
      mot:
        modalities: [image, text]   # the modalities with their own weights (both, in any order)
        untie_norms: true           # per-modality input / pre-MLP norms (false: shared by both)
        qk_norm: false              # per-modality, per-head RMSNorm on queries and keys
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_vlm.config import Config, ConfigError
from megatron_vlm.data.batch import IMAGE_MODALITY, TEXT_MODALITY

MODALITIES = {"image": IMAGE_MODALITY, "text": TEXT_MODALITY}


@dataclass
class MoTConfig:
    modalities: list = field(default_factory=lambda: ["image", "text"])
    untie_norms: bool = True
    qk_norm: bool = False


def modality_names() -> tuple[str, ...]:
    """Modality names in modality-id order (index = id of ``megatron_vlm.data.batch``)."""
    return tuple(sorted(MODALITIES, key=MODALITIES.get))


def validate(cfg: Config) -> None:
    mot, p = cfg.model.mot, cfg.parallel
    mods = mot.modalities
    if not isinstance(mods, list) or sorted(map(str, mods)) != sorted(MODALITIES) or len(mods) != len(MODALITIES):
        raise ConfigError(f"model.mot.modalities={mods!r}: allowed {list(modality_names())} "
                          f"(each modality once; every non-embedding weight is untied between them)")
    for name in ("untie_norms", "qk_norm"):
        value = getattr(mot, name)
        if not isinstance(value, bool):
            raise ConfigError(f"model.mot.{name}={value!r}: allowed true or false")
    if p.context_parallel_size != 1:
        raise ConfigError(f"parallel.context_parallel_size={p.context_parallel_size} with mot: allowed 1 "
                          f"(MoT attention has no context parallelism)")
