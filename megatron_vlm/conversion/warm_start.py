"""Warm start: ``LlamaForCausalLM`` + one or several ``CLIPVisionModel`` / ``SiglipVisionModel`` ->
any of our archs.

The arch's model is built with its own initialisation (seeded), then the pretrained tensors are
streamed in; everything the HF models do not provide keeps the arch's init, which is the
arch's identity-at-step-0 rule where it has one (``cross_attention``: tanh gates at 0, so the
decoder computes exactly the Llama text model; the projector is freshly initialised everywhere).

* language: the Llama map (``llama.py``). Where the arch adds layers of its own (its
  ``ArchSpec.place_text_layers``; ``cross_attention``: CA layers every
  ``model.cross_attention.every``, default 4 = Mllama's cadence), Llama layer ``j`` goes to the
  position the arch gives it and ``language.num_layers`` counts both.
* vision: CLIP -> megatron's CLIP ViT (``clip.py``; as deep as ``vision_feature_layer``, LLaVA's
  -2 by default, class token dropped); SigLIP -> the wrapped HF SigLIP tower
  (``model.vision.hf_config``; ``<prefix>hf.*`` = the HF names, pooling head dropped).
* several vision models (``--vision-path`` repeated, ``[NAME=]DIR`` each): ``model.vision`` lists
  them in the given order, named NAME or after the folder (sanitised to an identifier,
  de-duplicated); encoder ``NAME``'s tensors go under ``vision_models.NAME.*``, the generalist is
  ``--generalist NAME`` (default: a ``--set model.vision.I.generalist=true``, else the first) and
  the fusion comes from ``--set model.fusion.*``; per-encoder projectors
  (``vision_projections.NAME.*``) and the fusion's parameters (``fusion.*``) keep the model's init.
  One vision model: exactly the single-encoder layout (``vision_model.*``, ``vision_projection.*``).
* other archs: the same maps; any pretrained tensor the arch has no place for is an error listing
  the keys.
"""

from __future__ import annotations

import keyword
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megatron_vlm.config import Config, ConfigError, ModelConfig, VisionConfig, set_key, usable_encoder_name
from megatron_vlm.conversion import clip, hf_io, llama, megatron_io
from megatron_vlm.conversion.mapping import (ConversionError, Pair, check_pairs, hf_to_mcore,
                                             key_report)
from megatron_vlm.conversion.megatron_io import build_config, log

VISION_PREFIXES = ("vision_model.", "vision_tower.")
SIGLIP_UNUSED_PREFIX = "head."
SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")


def _vision_rename(key: str) -> str:
    return clip.strip_prefix(key, VISION_PREFIXES)


def _llama_rename(key: str) -> str:
    return key


def apply_model_overrides(mc: ModelConfig, overrides: dict | None) -> None:
    """``{dotted model config key: value}`` (``--set model.KEY=VALUE``) into ``mc``."""
    for key, value in (overrides or {}).items():
        try:
            set_key(Config(model=mc), f"model.{key}", value, f"model.{key}")
        except ConfigError as e:
            raise ConversionError(str(e)) from None


# ------------------------------------------------------------------------------------------------
# --vision-path [NAME=]DIR (repeatable): names
# ------------------------------------------------------------------------------------------------

def _usable_name(name: str) -> bool:
    """An encoder name the model can key its encoders by (config's rule), and no Python keyword."""
    return usable_encoder_name(name) and not keyword.iskeyword(name)


def name_from_folder(path: str) -> str:
    """``/models/clip-vit-large-patch14/`` -> ``clip_vit_large_patch14``: the folder's name as an
    identifier (other characters -> ``_``; a digit first or a reserved name gets a prefix/suffix)."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", Path(os.path.abspath(path)).name).strip("_").lower() or "vision"
    if name[0].isdigit():
        name = f"v{name}"
    return name if _usable_name(name) else f"{name}_enc"


def parse_vision_paths(items: str | Sequence[str] | None) -> list[tuple[str | None, str]]:
    """``--vision-path`` values -> ``[(explicit name or None, folder)]`` in order. ``NAME=DIR``
    names the encoder (NAME an identifier); an existing folder, or a value with a ``/`` before its
    first ``=``, is a folder as is."""
    if items is None:
        return []
    out = []
    for item in [items] if isinstance(items, (str, os.PathLike)) else items:
        item = str(item)
        name, sep, folder = item.partition("=")
        if not sep or os.path.isdir(item) or "/" in name or os.sep in name:
            out.append((None, item))
            continue
        if not name.isidentifier():
            raise ConversionError(f"--vision-path {item}: encoder name {name!r} must be a Python identifier "
                                  f"(letters, digits, _; not a digit first)")
        if not _usable_name(name):
            raise ConversionError(f"--vision-path {item}: encoder name {name!r} is reserved (a Python keyword "
                                  f"or a torch ModuleDict attribute such as keys, train, to); choose another")
        if not folder:
            raise ConversionError(f"--vision-path {item}: no folder after '{name}='")
        out.append((name, folder))
    return out


def encoder_names(sources: list[tuple[str | None, str]]) -> list[str]:
    """Each encoder's name: the given one (two equal given names are an error), else derived from
    the folder and de-duplicated (``clip``, ``clip_2``, ...)."""
    given = [n for n, _ in sources if n is not None]
    dup = sorted({n for n in given if given.count(n) > 1})
    if dup:
        paths = [p for n, p in sources if n == dup[0]]
        raise ConversionError(f"--vision-path: two encoders named {dup[0]!r} ({', '.join(paths)}); "
                              f"give each a distinct NAME=DIR")
    taken, names = set(given), []
    for n, p in sources:
        if n is None:
            base = name_from_folder(p)
            n, i = base, 2
            while n in taken:
                n, i = f"{base}_{i}", i + 1
            taken.add(n)
        names.append(n)
    return names


# ------------------------------------------------------------------------------------------------
# one vision model
# ------------------------------------------------------------------------------------------------

@dataclass
class VisionSource:
    """A ``--vision-path`` folder read and mapped: ``vision`` (our encoder config), the key map to
    ``prefix`` (``vision_model.`` or ``vision_models.NAME.``), HF keys left out (``ignored``)."""
    name: str
    path: str
    model_type: str
    vision: VisionConfig
    reader: hf_io.HFReader
    ignored: set
    prefix: str = "vision_model."
    pairs: list | None = None

    def map_to(self, prefix: str) -> None:
        """The key map with our keys under ``prefix``."""
        self.prefix = prefix
        if self.model_type == "clip_vision_model":
            self.pairs = clip.pairs(self.vision, prefix, "")
            return
        from megatron_vlm.models.hf_vision import build_hf_vision_encoder

        with torch.device("meta"):
            wrapped = build_hf_vision_encoder(self.vision.hf_config)
        self.pairs = [Pair(f"{prefix}{k}", (_vision_rename(k[len("hf."):]),)) for k in wrapped.state_dict()]


def _as_vision_flag(e: ConversionError) -> ConversionError:
    """HF folder errors name ``--hf-path``; for a vision folder say ``--vision-path``."""
    return ConversionError(str(e).replace("--hf-path ", "--vision-path ", 1))


def read_vision_source(path: str, name: str, feature_layer: int) -> VisionSource:
    """Read ``path`` (a CLIP or SigLIP vision model, or a full CLIP / SigLIP model's vision part)."""
    try:
        vcfg_json = hf_io.read_config_json(path)
    except ConversionError as e:
        raise _as_vision_flag(e) from None
    vtype = vcfg_json.get("model_type")
    if vtype in ("clip", "siglip"):  # a full CLIPModel/SiglipModel folder: use its vision part
        vcfg_json = dict(vcfg_json["vision_config"], model_type=f"{vtype}_vision_model")
        vtype = vcfg_json["model_type"]
    if vtype not in SUPPORTED_VISION:
        raise ConversionError(f"--vision-path {path}: model_type {vtype!r}; supported: "
                              f"{', '.join(SUPPORTED_VISION)} (or full clip / siglip)")
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    try:
        reader = hf_io.HFReader(path, _vision_rename)
    except ConversionError as e:
        raise _as_vision_flag(e) from None
    mean, std = hf_io.read_image_stats(path)  # preprocessor_config.json, when the folder has one
    if vtype == "clip_vision_model":
        vc = CLIPVisionConfig(**{k: v for k, v in vcfg_json.items() if k != "model_type"})
        k = clip.used_layers(vc.num_hidden_layers, feature_layer, "--vision-feature-layer")
        vision = clip.vision_config_from_hf(vc, k, f"--vision-path {path} config", mean, std)
        ignored = set(clip.unused_keys(vc.num_hidden_layers, k, ""))
    else:
        vc = SiglipVisionConfig(**{k: v for k, v in vcfg_json.items() if k != "model_type"})
        hf_dict = {k: v for k, v in vc.to_dict().items()
                   if k not in ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path")}
        hf_dict["vision_use_head"] = False
        vision = VisionConfig(num_layers=vc.num_hidden_layers, hidden_size=vc.hidden_size,
                              num_attention_heads=vc.num_attention_heads, ffn_hidden_size=vc.intermediate_size,
                              image_size=vc.image_size, patch_size=vc.patch_size, add_class_token=False,
                              layernorm_epsilon=vc.layer_norm_eps, hf_config=hf_dict,
                              image_mean=tuple(float(x) for x in mean or (0.5, 0.5, 0.5)),
                              image_std=tuple(float(x) for x in std or (0.5, 0.5, 0.5)))  # SigLIP's usual
        ignored = {k for k in reader.keys() if k.startswith(SIGLIP_UNUSED_PREFIX)}
    vision.name = name
    return VisionSource(name, path, vtype, vision, reader, ignored)


def _mark_generalist(mc: ModelConfig, generalist: str | None) -> None:
    """Several encoders: ``--generalist NAME``, else the one ``--set`` marked, else the first."""
    names = [v.name for v in mc.vision]
    marked = [v.name for v in mc.vision if v.generalist]
    if generalist is not None:
        if generalist not in names:
            raise ConversionError(f"--generalist {generalist}: no encoder of that name; encoders: {names}")
        if marked and marked != [generalist]:
            raise ConversionError(f"--generalist {generalist}: --set marks {marked} generalist; "
                                  f"name the generalist once (--generalist or --set model.vision.I.generalist)")
        if len(names) == 1:
            return  # the one encoder: nothing to mark (keeps the single-encoder config as it is)
    elif marked or len(names) == 1:
        return  # --set marked it (validation checks that exactly one is)
    else:
        generalist = names[0]
    for v in mc.vision:
        v.generalist = v.name == generalist


# ------------------------------------------------------------------------------------------------
# the import
# ------------------------------------------------------------------------------------------------

def import_warm_start(llama_path: str, vision_path: str | Sequence[str] | None, save: str,
                      arch: str | None = None, tp: int = 1, pp: int = 1, ep: int = 1,
                      dtype: torch.dtype | None = None, overwrite: bool = False, vocab_multiple: int = 128,
                      seed: int = 1234, vision_feature_layer: int = -2, model_overrides: dict | None = None,
                      generalist: str | None = None) -> Path:
    """``vision_path``: one folder, or a list of ``[NAME=]DIR`` (several encoders, fused by
    ``model_overrides`` ``fusion.*``); ``generalist``: the generalist's name (default: the first)."""
    sources = parse_vision_paths(vision_path)
    if not sources:
        raise ConversionError(f"--hf-path {llama_path} is a text-only model: warm start needs --vision-path "
                              f"(a CLIPVisionModel or SiglipVisionModel folder; repeat it for several)")
    arch = arch or "joint_decoder"
    lcfg_json = hf_io.read_config_json(llama_path)
    if "LlamaForCausalLM" not in (lcfg_json.get("architectures") or []):
        raise ConversionError(f"--hf-path {llama_path}: warm start expects LlamaForCausalLM, found "
                              f"{lcfg_json.get('architectures')}")
    single = len(sources) == 1
    names = encoder_names(sources) if not single else [sources[0][0] or VisionConfig.name]
    tc = hf_io.load_hf_config(llama_path)
    language = llama.language_config_from_hf(tc, vocab_multiple, where="--hf-path config")
    text_layers = language.num_layers

    encoders = [read_vision_source(p, n, vision_feature_layer) for n, (_, p) in zip(names, sources)]
    # LLaVA drops CLIP's class token; a SigLIP tower has none
    drop_cls = any(e.model_type == "clip_vision_model" for e in encoders) or not single
    mc = ModelConfig(arch=arch, vision=[e.vision for e in encoders], language=language, projector="mlp",
                     drop_vision_class_token=drop_cls)
    apply_model_overrides(mc, model_overrides)
    _mark_generalist(mc, generalist)
    for e in encoders:  # after --set (which may rename an encoder: model.vision.I.name)
        e.name = e.vision.name
        e.map_to("vision_model." if single else f"vision_models.{e.name}.")
    from megatron_vlm.archs import get_arch

    try:
        spec = get_arch(arch)
    except ValueError as e:
        raise ConversionError(f"--arch {arch}: {e}") from None
    layer_map = None
    if spec.place_text_layers is not None:  # the arch has layers of its own among the text layers
        try:
            positions = spec.place_text_layers(mc, text_layers)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        layer_map = [(i, j) for j, i in enumerate(positions)]
    dtype = dtype or torch.float32
    cfg = build_config(mc, tp, pp, ep, dtype)
    cfg.training.seed = seed
    language_pairs = llama.pairs(language, "language_model.", "model.", "lm_head.weight", layers=layer_map)
    check_pairs(language_pairs)
    for e in encoders:
        check_pairs(e.pairs)

    lreader = hf_io.HFReader(llama_path, _llama_rename)
    checks = [(lreader, language_pairs, set(), f"--hf-path {llama_path}")]
    checks += [(e.reader, e.pairs, e.ignored, f"--vision-path {e.path}") for e in encoders]
    for reader, pairs, skip, where in checks:
        needed = {k for p in pairs for k in p.hf}
        present = set(reader.keys())
        missing, unexpected = needed - present, present - needed - skip
        if missing or unexpected:
            raise ConversionError(key_report(where, missing, unexpected))
    hf_io.check_output_dir(save, overwrite, "--save")
    vision_desc = " + ".join(e.model_type if single else
                             f"{e.model_type} ({e.name}{', generalist' if e.vision.generalist else ''})"
                             for e in encoders)
    log(f"warm start LlamaForCausalLM + {vision_desc} -> {arch}: {len(language_pairs)} + "
        f"{' + '.join(str(len(e.pairs)) for e in encoders)} tensors, dtype {hf_io.dtype_name(dtype)}, "
        f"target TP={tp} PP={pp} EP={ep}")

    megatron_io.ensure_runtime()
    from megatron.core import tensor_parallel

    from megatron_vlm import runtime
    from megatron_vlm.models import build_model, built_on_host

    runtime.set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    vision_record = (str(Path(encoders[0].path).absolute()) if single
                     else {e.name: str(Path(e.path).absolute()) for e in encoders})
    with hf_io.atomic_output_dir(save, overwrite, "--save") as tmp, built_on_host():
        model = build_model(megatron_io.single_process_config(cfg), pre_process=True,
                            post_process=True, dtype=dtype)

        def stream():
            for key, t in hf_to_mcore(language_pairs, lreader.get, dtype):
                for target in spec.from_dense(mc, key):  # MoMa: the MLP into every expert
                    yield target, t
            for e in encoders:
                yield from hf_to_mcore(e.pairs, e.reader.get, dtype)

        kept = megatron_io.fill_model(model, stream(), allow_missing=True)
        ckpt = megatron_io.save_model(tmp, model, cfg, extra={"warm_start": {
            "language": str(Path(llama_path).absolute()), "vision": vision_record,
            "initialised_by_arch": kept}})
        del model
    for reader in [lreader] + [e.reader for e in encoders]:
        reader.close()
    groups = sorted({".".join(re.sub(r"\.layers\.\d+\.", ".layers.*.", k).split(".")[:5]) for k in kept})
    log(f"parameters initialised by the {arch} arch (not pretrained): {len(kept)} tensors in {groups}")
    log(f"wrote {save}/{ckpt.name}")
    return Path(save)
