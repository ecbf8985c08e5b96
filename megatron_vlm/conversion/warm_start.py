"""Warm start: ``LlamaForCausalLM`` + ``CLIPVisionModel`` / ``SiglipVisionModel`` -> any of our archs.

The arch's model is built with its own initialisation (seeded), then the pretrained tensors are
streamed in; everything the two HF models do not provide keeps the arch's init, which is the
arch's identity-at-step-0 rule where it has one (``cross_attention``: tanh gates at 0, so the
decoder computes exactly the Llama text model; the projector is freshly initialised everywhere).

* language: the Llama map (``llama.py``). Where the arch adds layers of its own (its
  ``ArchSpec.place_text_layers``; ``cross_attention``: CA layers every
  ``model.cross_attention.every``, default 4 = Mllama's cadence), Llama layer ``j`` goes to the
  position the arch gives it and ``language.num_layers`` counts both.
* vision: CLIP -> megatron's CLIP ViT (``clip.py``; as deep as ``vision_feature_layer``, LLaVA's
  -2 by default, class token dropped); SigLIP -> the wrapped HF SigLIP tower
  (``model.vision.hf_config``; ``vision_model.hf.*`` = the HF names, pooling head dropped).
* other archs: the same maps; any pretrained tensor the arch has no place for is an error listing
  the keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_vlm.config import Config, ConfigError, ModelConfig, VisionConfig, set_key
from megatron_vlm.conversion import clip, hf_io, llama, megatron_io
from megatron_vlm.conversion.mapping import (ConversionError, Pair, check_pairs, hf_to_mcore,
                                             key_report)
from megatron_vlm.conversion.megatron_io import build_config, log

VISION_PREFIXES = ("vision_model.", "vision_tower.")
SIGLIP_UNUSED_PREFIX = "head."


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


def import_warm_start(llama_path: str, vision_path: str | None, save: str, arch: str | None = None,
                      tp: int = 1, pp: int = 1, ep: int = 1, dtype: torch.dtype | None = None,
                      overwrite: bool = False, vocab_multiple: int = 128, seed: int = 1234,
                      vision_feature_layer: int = -2, model_overrides: dict | None = None) -> Path:
    if vision_path is None:
        raise ConversionError(f"--hf-path {llama_path} is a text-only model: warm start needs --vision-path "
                              f"(a CLIPVisionModel or SiglipVisionModel folder)")
    arch = arch or "joint_decoder"
    lcfg_json = hf_io.read_config_json(llama_path)
    if "LlamaForCausalLM" not in (lcfg_json.get("architectures") or []):
        raise ConversionError(f"--hf-path {llama_path}: warm start expects LlamaForCausalLM, found "
                              f"{lcfg_json.get('architectures')}")
    vcfg_json = hf_io.read_config_json(vision_path)
    vtype = vcfg_json.get("model_type")
    if vtype in ("clip", "siglip"):  # a full CLIPModel/SiglipModel folder: use its vision part
        vcfg_json = dict(vcfg_json["vision_config"], model_type=f"{vtype}_vision_model")
        vtype = vcfg_json["model_type"]
    if vtype not in ("clip_vision_model", "siglip_vision_model"):
        raise ConversionError(f"--vision-path {vision_path}: model_type {vtype!r}; supported: "
                              f"clip_vision_model, siglip_vision_model (or full clip / siglip)")
    tc = hf_io.load_hf_config(llama_path)
    language = llama.language_config_from_hf(tc, vocab_multiple, where="--hf-path config")
    text_layers = language.num_layers

    from transformers import CLIPVisionConfig, SiglipVisionConfig

    vreader = hf_io.HFReader(vision_path, _vision_rename)
    vkeys = set(vreader.keys())
    if vtype == "clip_vision_model":
        vc = CLIPVisionConfig(**{k: v for k, v in vcfg_json.items() if k != "model_type"})
        k = clip.used_layers(vc.num_hidden_layers, vision_feature_layer, "--vision-feature-layer")
        mean, std = hf_io.read_image_stats(vision_path)
        vision = clip.vision_config_from_hf(vc, k, "--vision-path config", mean, std)
        vision_pairs = clip.pairs(vision, "vision_model.", "")
        ignored = set(clip.unused_keys(vc.num_hidden_layers, k, ""))
        drop_cls = True
    else:
        vc = SiglipVisionConfig(**{k: v for k, v in vcfg_json.items() if k != "model_type"})
        hf_dict = {k: v for k, v in vc.to_dict().items()
                   if k not in ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path")}
        hf_dict["vision_use_head"] = False
        vision = VisionConfig(num_layers=vc.num_hidden_layers, hidden_size=vc.hidden_size,
                              num_attention_heads=vc.num_attention_heads, ffn_hidden_size=vc.intermediate_size,
                              image_size=vc.image_size, patch_size=vc.patch_size, add_class_token=False,
                              layernorm_epsilon=vc.layer_norm_eps, hf_config=hf_dict,
                              image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
        from megatron_vlm.models.hf_vision import build_hf_vision_encoder

        with torch.device("meta"):
            wrapped = build_hf_vision_encoder(hf_dict)
        vision_pairs = [Pair(f"vision_model.{k}", (_vision_rename(k[len("hf."):]),))
                        for k in wrapped.state_dict()]
        ignored = {k for k in vkeys if k.startswith(SIGLIP_UNUSED_PREFIX)}
        drop_cls = False

    mc = ModelConfig(arch=arch, vision=[vision], language=language, projector="mlp",
                     drop_vision_class_token=drop_cls)
    apply_model_overrides(mc, model_overrides)
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
    check_pairs(vision_pairs)

    lreader = hf_io.HFReader(llama_path, _llama_rename)
    for reader, pairs, skip, where in ((lreader, language_pairs, set(), f"--hf-path {llama_path}"),
                                       (vreader, vision_pairs, ignored, f"--vision-path {vision_path}")):
        needed = {k for p in pairs for k in p.hf}
        present = set(reader.keys())
        missing, unexpected = needed - present, present - needed - skip
        if missing or unexpected:
            raise ConversionError(key_report(where, missing, unexpected))
    hf_io.check_output_dir(save, overwrite, "--save")
    log(f"warm start LlamaForCausalLM + {vtype} -> {arch}: {len(language_pairs)} + {len(vision_pairs)} "
        f"tensors, dtype {hf_io.dtype_name(dtype)}, target TP={tp} PP={pp} EP={ep}")

    megatron_io.ensure_runtime()
    from megatron.core import tensor_parallel

    from megatron_vlm import runtime
    from megatron_vlm.models import build_model

    runtime.set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    with hf_io.atomic_output_dir(save, overwrite, "--save") as tmp:
        model = build_model(megatron_io.single_process_config(cfg), pre_process=True,
                            post_process=True, dtype=dtype)

        def stream():
            for key, t in hf_to_mcore(language_pairs, lreader.get, dtype):
                for target in spec.from_dense(mc, key):  # MoMa: the MLP into every expert
                    yield target, t
            yield from hf_to_mcore(vision_pairs, vreader.get, dtype)

        kept = megatron_io.fill_model(model, stream(), allow_missing=True)
        ckpt = megatron_io.save_model(tmp, model, cfg, extra={"warm_start": {
            "language": str(Path(llama_path).absolute()), "vision": str(Path(vision_path).absolute()),
            "initialised_by_arch": kept}})
        del model
    groups = sorted({".".join(re.sub(r"\.layers\.\d+\.", ".layers.*.", k).split(".")[:5]) for k in kept})
    log(f"parameters initialised by the {arch} arch (not pretrained): {len(kept)} tensors in {groups}")
    log(f"wrote {save}/{ckpt.name}")
    return Path(save)
