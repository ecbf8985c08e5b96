"""import-hf / export-hf: the two directions, streamed, atomic.

``import_hf``: HF folder -> Megatron dist checkpoint (``save/iter_0000000`` + ``latest``).
``export_hf``: Megatron dist checkpoint (any TP/PP) -> HF folder (sharded safetensors + index +
config.json [+ generation_config.json] [+ tokenizer files]).

Memory: import fills and writes one parameter at a time (the model is built uninitialised, never
resident as a whole) and stores tensors larger than ``megatron_io.STREAM_BYTES`` in row chunks;
export holds the tensors of one key-map entry, larger ones streamed in blocks of the checkpoint's
stored pieces (no model is built).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megatron_vlm.conversion import hf_io, megatron_io, warm_start
from megatron_vlm.conversion.families import (Family, check_one_vision_encoder, family_for_arch,
                                              family_for_hf)
from megatron_vlm.conversion.mapping import (ConversionError, check_pairs, key_report,
                                             cast)
from megatron_vlm.conversion.megatron_io import build_config, log


def check_hf_keys(reader: hf_io.HFReader, pairs, unused: list[str], where: str) -> list[str]:
    """Every mapped HF key must be present; every present key must be mapped or known-unused.
    Returns the unused keys that are present (carried)."""
    needed = {k for p in pairs for k in p.hf}
    present = set(reader.keys())
    missing = needed - present
    unexpected = present - needed - set(unused)
    if missing or unexpected:
        raise ConversionError(key_report(where, missing, unexpected))
    return [k for k in unused if k in present]


def write_carried(dest: Path, reader: hf_io.HFReader, keys: list[str], folder: Path) -> None:
    """Keep what the import does not map (HF config, generation config, unused tensors) inside the
    checkpoint so that export can restore the original folder exactly."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder / "config.json", dest / "config.json")
    for name in ("generation_config.json",):
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
    if keys:
        entries = [(k, reader.shape(k), reader.dtype(k)) for k in keys]
        hf_io.write_safetensors_shards(dest, entries, ((k, reader.get(k)) for k in keys),
                                       prefix="carried")
        # one file is enough for the few tensors carried: rename shard 1 of 1
        (dest / "carried-00001-of-00001.safetensors").rename(dest / megatron_io.CARRIED_FILE)
        (dest / "carried.safetensors.index.json").unlink()


# ------------------------------------------------------------------------------------------------
# import-hf
# ------------------------------------------------------------------------------------------------

def import_hf(hf_path: str, save: str, tp: int = 1, pp: int = 1, ep: int = 1,
              dtype: torch.dtype | None = None, arch: str | None = None, overwrite: bool = False,
              vocab_multiple: int = 128, vision_path: str | None = None, seed: int = 1234,
              vision_feature_layer: int = -2, model_overrides: dict | None = None) -> Path:
    """``model_overrides``: ``{dotted model config key: value}`` applied to a warm start's config
    before the layout is derived (e.g. ``{"cross_attention.every": 2}``), or to an imported family's
    config (e.g. ``{"vision.max_tiles": 4}``: Mllama tiling)."""
    folder = Path(hf_path)
    cfg_json = hf_io.read_config_json(folder)
    archs = cfg_json.get("architectures") or []
    if vision_path is not None or any(a in ("LlamaForCausalLM",) for a in archs):
        return warm_start.import_warm_start(hf_path, vision_path, save, arch=arch, tp=tp, pp=pp,
                                            ep=ep, dtype=dtype, overwrite=overwrite,
                                            vocab_multiple=vocab_multiple, seed=seed,
                                            vision_feature_layer=vision_feature_layer,
                                            model_overrides=model_overrides)
    family = family_for_hf(archs, cfg_json.get("model_type"), f"--hf-path {folder}")
    if arch is not None and arch != family.arch:
        raise ConversionError(f"--arch {arch}: {archs[0]} converts to the {family.arch!r} arch "
                              f"(other archs: warm start from LlamaForCausalLM + --vision-path)")
    hf_cfg = hf_io.load_hf_config(folder)
    mc = family.model_config_from_hf(hf_cfg, folder, vocab_multiple)
    warm_start.apply_model_overrides(mc, model_overrides)
    dtype = dtype or torch.float32
    cfg = build_config(mc, tp, pp, ep, dtype)
    pairs = family.pairs(mc)
    check_pairs(pairs)
    reader = hf_io.HFReader(folder, family.rename)
    carried = check_hf_keys(reader, pairs, family.unused_hf_keys(hf_cfg, mc), f"--hf-path {folder}")
    hf_io.check_output_dir(save, overwrite, "--save")
    log(f"{archs[0]} -> {family.arch} ({len(pairs)} tensors, {len(carried)} carried), "
        f"dtype {hf_io.dtype_name(dtype)}, target TP={tp} PP={pp} EP={ep}")
    megatron_io.ensure_runtime()
    from megatron_vlm.models import build_model, built_on_host

    with hf_io.atomic_output_dir(save, overwrite, "--save") as tmp, built_on_host():
        # every tensor is filled from the HF files: no random init (megatron's init was ~30% of the
        # import time); the parameters are filled one at a time as the checkpoint writer reaches
        # them and freed once written, so the model is never resident as a whole
        model = build_model(megatron_io.single_process_config(cfg), pre_process=True,
                            post_process=True, dtype=dtype, init_weights=False)
        fill = megatron_io.fillers(model, pairs, reader, dtype)
        ckpt = megatron_io.save_model(tmp, model, cfg, extra={"converted_from": {
            "hf_path": str(folder.absolute()), "family": family.name}}, consume=True, fill=fill)
        del model
        write_carried(tmp / ckpt.name / megatron_io.HF_SOURCE_DIR, reader, carried, folder)
    reader.close()
    log(f"wrote {save}/{ckpt.name} (load with: pretrain_vlm.py --config {save}/{ckpt.name}/config.yaml "
        f"--load {save} at TP={tp} PP={pp})")
    return Path(save)


# ------------------------------------------------------------------------------------------------
# export-hf
# ------------------------------------------------------------------------------------------------

def _carried_available(reader: megatron_io.MegatronReader, keys: list[str]) -> bool:
    have = set(reader.carried())
    return all(k in have for k in keys)


def export_hf(load: str, hf_path: str, dtype: torch.dtype | None = None,
              tokenizer_path: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES, arch: str | None = None) -> Path:
    reader = megatron_io.MegatronReader(load)
    mc = reader.config.model
    if arch is not None and arch != mc.arch:
        raise ConversionError(f"--arch {arch}: the checkpoint's config says model.arch={mc.arch!r}")
    check_one_vision_encoder(mc, f"--load {load}", "export-hf")
    family: Family = family_for_arch(mc.arch)
    base = reader.hf_source_config()
    use_base = base is not None and family.base_matches(mc, base)
    if base is not None and not use_base:
        log("the model no longer matches the HF config it was imported from: deriving a new config")
    hf_cfg = family.hf_config_from_model(mc, base if use_base else None)
    unused = family.unused_hf_keys(hf_cfg, mc)
    have = set(reader.carried())
    if use_base and not all(k in have or family.fill_unused(k, hf_cfg) is not None for k in unused):
        log("carried tensors are missing from the checkpoint: deriving an equivalent HF config")
        use_base = False
        hf_cfg = family.hf_config_from_model(mc, None)
        unused = family.unused_hf_keys(hf_cfg, mc)
    not_fillable = [k for k in unused if k not in have and family.fill_unused(k, hf_cfg) is None]
    if not_fillable:
        raise ConversionError(key_report(f"--load {load}: HF tensors with no source", not_fillable, []))
    pairs = family.pairs(mc)
    check_pairs(pairs)
    needed = {p.mcore for p in pairs}
    present = reader.model_keys()
    missing, unexpected = needed - present, present - needed
    if missing or unexpected:
        raise ConversionError(key_report(f"--load {load}", missing, unexpected))

    src_dtype = reader.dtype(pairs[0].mcore)
    if dtype is None:
        named = (base or {}).get("dtype") or (base or {}).get("torch_dtype")
        dtype = hf_io.DTYPES.get(named, src_dtype) if named else src_dtype
    entries, groups = [], []
    for g, p in enumerate(pairs):
        for k, shape in zip(p.hf, p.op.hf_shapes(reader.shape(p.mcore))):
            entries.append((k, tuple(shape), dtype))
            groups.append(g)
    carried = reader.carried_reader() if have else None

    def unused_tensor(k):
        return carried.get_tensor(k) if k in have else family.fill_unused(k, hf_cfg)

    for k in unused:
        shape = carried.get_slice(k).get_shape() if k in have else unused_tensor(k).shape
        entries.append((k, tuple(shape), dtype))
        groups.append(len(pairs) + len(groups))

    def produce():
        for p in pairs:
            shape = reader.shape(p.mcore)
            runs = (megatron_io.row_gather(p.op, shape) if reader.nbytes(p.mcore) > megatron_io.STREAM_BYTES
                    else None)
            if runs is not None:  # large: streamed in row blocks of the checkpoint's stored pieces
                for k, hf_shape, r in zip(p.hf, p.op.hf_shapes(shape), runs):
                    yield k, hf_io.RowBlocks(hf_shape, dtype, (cast(b, dtype) for b in reader.iter_rows(p.mcore, r)))
                continue
            t = reader.get(p.mcore)
            for k, x in zip(p.hf, p.op.to_hf(t)):
                yield k, cast(x, dtype).contiguous()
            del t
        for k in unused:
            yield k, cast(unused_tensor(k), dtype)

    hf_cfg.architectures = list(family.hf_architectures)
    hf_cfg.dtype = hf_io.dtype_name(dtype)
    log(f"{mc.arch} (iteration {reader.iteration}) -> {family.hf_architectures[0]}: "
        f"{len(entries)} tensors, dtype {hf_io.dtype_name(dtype)}"
        + (" (original HF config and carried tensors restored)" if use_base else " (derived HF config)"))
    with hf_io.atomic_output_dir(hf_path, overwrite, "--hf-path") as tmp:
        hf_io.write_safetensors_shards(tmp, entries, produce(), max_shard_bytes, groups)
        hf_cfg.save_pretrained(str(tmp))
        gen = reader.hf_source / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, tmp / "generation_config.json")
        if tokenizer_path:
            copied = hf_io.copy_tokenizer_files(tokenizer_path, tmp)
            log(f"tokenizer files: {', '.join(copied)}")
    log(f"wrote {hf_path}")
    return Path(hf_path)
