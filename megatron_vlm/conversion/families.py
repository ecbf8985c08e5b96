"""Conversion families: an HF architecture <-> one of our archs. Each arch names its family in its
``ArchSpec.conversion_family`` (e.g. ``megatron_vlm/archs/joint_decoder/hf_llava.py``); the
lookups below ask the arch registry.

A family supplies these, all declarative or close to it:

* ``rename(stored_key)``: normalise the names an HF folder may use (transformers 4.x/5.x layouts)
  to the ones the key map is written in (what ``save_pretrained`` writes);
* ``model_config_from_hf`` / ``hf_config_from_model``: our ``ModelConfig`` <-> the HF config;
  anything our model cannot represent raises :class:`ConversionError` with one line;
* ``pairs(model_config)``: the key map (list of :class:`~megatron_vlm.conversion.mapping.Pair`);
* ``unused_hf_keys(hf_config, model_config)``: HF tensors the model does not use (carried through
  an import so that export restores them);
* for ``verify``: ``sample_inputs(model_config)`` (our :class:`~megatron_vlm.data.batch.ModelInputs`),
  ``hf_logits(hf_model, inputs)`` and ``hf_generate(hf_model, inputs, n)`` on the same inputs.
"""

from __future__ import annotations

from typing import Callable

from megatron_vlm.conversion.mapping import ConversionError


class Family:
    name = "base"
    hf_architectures: tuple[str, ...] = ()
    arch = ""

    def rename(self, key: str) -> str:
        return key

    def model_config_from_hf(self, hf_config, folder, vocab_multiple: int):
        raise NotImplementedError

    def hf_config_from_model(self, model_config, base: dict | None = None):
        raise NotImplementedError

    def pairs(self, model_config) -> list:
        raise NotImplementedError

    def unused_hf_keys(self, hf_config, model_config) -> list[str]:
        return []

    def structure(self, model_config) -> dict:
        """The part of ``model_config`` an HF config determines (what ``base_matches`` compares)."""
        raise NotImplementedError

    def base_matches(self, model_config, base: dict) -> bool:
        """Whether the HF config an import started from (``base``, a config dict) still describes
        ``model_config``."""
        try:
            theirs = self.model_config_from_hf(self.hf_model_class().config_class.from_dict(base), None, 1)
        except ConversionError:
            return False
        return self.structure(theirs) == self.structure(model_config)

    def fill_unused(self, key: str, hf_config):
        """A neutral value for an unused HF tensor when no carried copy exists (or None)."""
        return None

    def hf_model_class(self):
        raise NotImplementedError


def _families() -> dict[str, "Family"]:
    """``{arch name: its family}`` over the registered archs that have one."""
    from megatron_vlm.archs import registered_archs

    return {name: spec.family() for name, spec in registered_archs().items() if spec.conversion_family}


def family_for_hf(architectures: list[str] | None, model_type: str | None, where: str) -> Family:
    families = _families().values()
    for fam in families:
        if architectures and any(a in fam.hf_architectures for a in architectures):
            return fam
    supported = sorted(a for f in families for a in f.hf_architectures)
    raise ConversionError(f"{where}: unsupported HF architecture {architectures or model_type!r}; "
                          f"supported: {supported} (warm start from LlamaForCausalLM + a vision "
                          f"tower: use --vision-path)")


def family_for_arch(arch: str) -> Family:
    families = _families()
    if arch not in families:
        raise ConversionError(f"model.arch={arch!r}: no HF export for this arch; exportable archs: "
                              f"{sorted(families)}")
    return families[arch]


def check_one_vision_encoder(model, where: str, command: str) -> None:
    """HF LLaVA / Mllama hold one vision tower: refuse (one line) a model with several encoders.
    ``model``: a ``ModelConfig`` or the raw ``model`` section of a checkpoint's config.yaml."""
    vision = model.get("vision") if isinstance(model, dict) else model.vision
    if isinstance(vision, list) and len(vision) > 1:
        names = [v.get("name", "vision") if isinstance(v, dict) else v.name for v in vision]
        raise ConversionError(f"{where}: {command} takes a checkpoint with one vision encoder (HF LLaVA / "
                              f"Mllama hold one vision tower); this one has {len(vision)}: {names} "
                              f"(several encoders convert one way only: import-hf with repeated --vision-path)")


def prefix_renamer(table: list[tuple[str, str]]) -> Callable[[str], str]:
    def rename(key: str) -> str:
        for old, new in table:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    return rename
