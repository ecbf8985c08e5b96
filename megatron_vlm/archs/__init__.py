"""Arch registry: one package per arch under ``megatron_vlm/archs/``, each registering one
:class:`ArchSpec` in its ``__init__.py``.

Everything arch-specific is asked of the spec (config section and its rules, TransformerConfig
fields, layer specs per backend, model class, token layout, FLOPs, pipeline wire length, decode hook,
conversion family, warm start from a text-only decoder); the trainer, data layer, config core and
converter never branch on an arch name. Adding an arch = a new folder here with its registration
(found automatically), or ``register_arch(ArchSpec(...))`` from anywhere (a test file, a plugin).

Importing this package is cheap: model classes and conversion families are named as
``"module:attribute"`` strings and imported on first use.
"""

from __future__ import annotations

import importlib
import pkgutil

from megatron_vlm.archs.spec import ArchSpec, BlockSpecContext, lazy  # noqa: F401

_REGISTRY: dict[str, ArchSpec] = {}
_discovered = False


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry (a second spec of the same name replaces the first)."""
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for info in pkgutil.iter_modules(__path__):
            if info.ispkg:
                importlib.import_module(f"{__name__}.{info.name}")


def registered_archs() -> dict[str, ArchSpec]:
    _discover()
    return dict(_REGISTRY)


def get_arch(name: str) -> ArchSpec:
    archs = registered_archs()
    if name not in archs:
        raise ValueError(f"model.arch={name!r}: implemented archs are {sorted(archs)}")
    return archs[name]


def config_sections() -> dict[str, type]:
    """``{model.<section>: its config class}`` over the registered archs."""
    return {s.section: s.section_class for s in registered_archs().values() if s.section}
