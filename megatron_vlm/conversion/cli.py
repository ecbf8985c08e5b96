"""Command line of ``tools/convert_checkpoint.py``.

    convert_checkpoint.py import-hf --hf-path HF_DIR --save MCORE_DIR [--arch joint_decoder]
        [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P]
        [--expert-model-parallel-size E] [--dtype float32|bfloat16] [--overwrite]
        [--vision-path [NAME=]CLIP_OR_SIGLIP_DIR ...]   # warm start: --hf-path is a LlamaForCausalLM;
        [--generalist NAME] [--set model.fusion.method=cross_attn]   # repeat for several encoders
    convert_checkpoint.py export-hf --load MCORE_DIR --hf-path HF_DIR [--dtype ...]
        [--tokenizer-path TOK_DIR] [--max-shard-size 5GB] [--overwrite]
    convert_checkpoint.py upcycle --load OUR_DENSE_CKPT --save OUT --arch moma [--set model.moma.experts=...]
        [--expert-noise 0.0] [--tensor-model-parallel-size T] [--expert-model-parallel-size E]
    convert_checkpoint.py verify --hf-path HF_DIR --load MCORE_DIR [--tensor-model-parallel-size T]
        [--tolerance 1e-4] [--generate N]

Exit status: 0 ok, 1 verify above tolerance / generations differ, 2 usage or conversion error
(one line on stderr; key mismatches list the keys on the following lines).

TP/PP: ``import-hf`` runs in one process and writes a layout-agnostic megatron dist checkpoint;
the target layout is validated and recorded in its ``config.yaml`` and megatron reshards when
``pretrain_vlm.py --load`` starts at that layout. ``export-hf`` reads any layout. ``verify`` runs
the Megatron side at ``--tensor-model-parallel-size``: under torchrun/mpirun it uses the launched
ranks; started as a plain process it spawns the TP ranks itself.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from megatron_vlm.conversion.mapping import ConversionError

PROG = "convert_checkpoint.py"


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB, 500MB, 1048576")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).upper()]
    if m.group(3) and m.group(3).lower() == "ib":
        mult = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2).upper()]
    value = int(float(m.group(1)) * mult)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 byte")
    return value


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.cli_errors import OneLineArgumentParser, float_at_least, int_at_least

    parser = OneLineArgumentParser(prog=PROG, description="Megatron <-> HuggingFace checkpoint conversion")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--arch", default=None, help="our arch (checked against the HF architecture / checkpoint)")
        p.add_argument("--tensor-model-parallel-size", type=int_at_least(1), default=1, help="tensor-parallel ranks")
        p.add_argument("--pipeline-model-parallel-size", type=int_at_least(1), default=1, help="pipeline stages")
        p.add_argument("--expert-model-parallel-size", type=int_at_least(1), default=1,
                       help="expert-parallel ranks (archs with experts)")
        p.add_argument("--dtype", default=None, metavar="{float32,bfloat16,float16,auto}",
                       help="float32 | bfloat16 | float16 | auto (import: default float32; export: the "
                            "original HF dtype when known, else the checkpoint's)")

    p = sub.add_parser("import-hf", help="HF folder -> Megatron dist checkpoint")
    common(p)
    p.add_argument("--hf-path", required=True, help="HF model folder (LLaVA, Mllama, or LlamaForCausalLM for a warm start)")
    p.add_argument("--save", required=True, help="checkpoint folder to write")
    p.add_argument("--vision-path", action="append", default=None, metavar="[NAME=]DIR",
                   help="warm start: CLIPVisionModel / SiglipVisionModel folder (with --hf-path = "
                        "LlamaForCausalLM); repeat for several encoders (tensors under vision_models.NAME.*; "
                        "NAME defaults to the folder's name), fused by --set model.fusion.*")
    p.add_argument("--generalist", default=None, metavar="NAME",
                   help="warm start with several --vision-path: the generalist encoder (default: the first)")
    p.add_argument("--make-vocab-size-divisible-by", type=int_at_least(1), default=128,
                   help="pad the embedding/output rows to a multiple (Megatron-LM's default 128)")
    p.add_argument("--seed", type=int_at_least(0), default=1234, help="init seed for parameters a warm start adds")
    p.add_argument("--vision-feature-layer", type=int, default=None,
                   help="warm start from CLIP (--vision-path): hidden state used as image features "
                        "(default -2, LLaVA's)")
    p.add_argument("--cross-attention-every", type=int_at_least(1), default=None,
                   help="warm start into cross_attention: one CA layer per this many self-attention "
                        "layers (= --set model.cross_attention.every=N; default 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a model config key, e.g. --set model.cross_attention.every=2 (warm start) "
                        "or --set model.vision.max_tiles=4 (Mllama: train on tiled images)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save folder")

    p = sub.add_parser("export-hf", help="Megatron dist checkpoint (any TP/PP) -> HF folder")
    common(p)
    p.add_argument("--load", required=True, help="checkpoint folder of ours")
    p.add_argument("--hf-path", required=True, help="HF folder to write")
    p.add_argument("--tokenizer-path", default=None, help="copy tokenizer/processor files from this folder")
    p.add_argument("--max-shard-size", type=_size, default=_size("5GB"), help="largest safetensors file (e.g. 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --hf-path folder")

    p = sub.add_parser("upcycle", help="our dense checkpoint (e.g. joint_decoder) -> another arch (e.g. moma)")
    common(p)
    p.add_argument("--load", required=True, help="a checkpoint of ours (any layout)")
    p.add_argument("--save", required=True, help="checkpoint folder to write")
    p.add_argument("--expert-noise", type=float_at_least(0.0), default=0.0,
                   help="relative std of noise added to each copied expert (0 = exact copies)")
    p.add_argument("--seed", type=int_at_least(0), default=1234, help="init seed for parameters the target arch adds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a model config key of the target, e.g. --set model.moma.experts='{image: 2, text: 2}'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save folder")

    p = sub.add_parser("verify", help="compare logits of the HF folder and the Megatron checkpoint")
    common(p)
    p.add_argument("--hf-path", required=True, help="HF model folder")
    p.add_argument("--load", required=True, help="checkpoint folder of ours")
    p.add_argument("--tolerance", type=float_at_least(0.0, strict=True), default=1e-4,
                   help="largest max-abs logit difference that passes")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the sample image and text")
    p.add_argument("--generate", type=int_at_least(0), default=0, metavar="N",
                   help="also compare N greedy tokens (HF generate vs our model)")
    return parser


def _model_overrides(args) -> dict:
    """``--set model.KEY=VALUE`` (and ``--cross-attention-every``) as ``{KEY: value}``."""
    import yaml

    out = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("model."):
            raise ConversionError(f"--set {item!r}: expected model.KEY=VALUE, e.g. model.cross_attention.every=2")
        out[key[len("model."):]] = yaml.safe_load(raw)
    if getattr(args, "cross_attention_every", None) is not None:
        out["cross_attention.every"] = args.cross_attention_every
    return out


def _check_exportable(load: str, command: str) -> None:
    """A checkpoint of several vision encoders has no HF family: refuse before anything runs (reads
    config.yaml only; an unreadable checkpoint is reported by the command itself)."""
    from megatron_vlm.conversion.families import check_one_vision_encoder
    from megatron_vlm.training.checkpointing import read_config

    try:
        raw = read_config(load)
    except (OSError, ValueError):
        return
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        check_one_vision_encoder(raw["model"], f"--load {load}", command)


def _preflight(args) -> None:
    """Cheap checks of every flag before any work (one-line ConversionError)."""
    from megatron_vlm.cli_errors import check_output_folder

    for name, value in vars(args).items():
        if value == "" or (isinstance(value, list) and "" in value):
            raise ConversionError(f"--{name.replace('_', '-')}: an empty value")
    if args.arch is not None:
        from megatron_vlm.archs import registered_archs

        if args.arch not in registered_archs():
            raise ConversionError(f"--arch {args.arch}: allowed {sorted(registered_archs())}")
    tok = getattr(args, "tokenizer_path", None)
    if tok is not None and not os.path.isdir(tok):
        raise ConversionError(f"--tokenizer-path {tok}: no such folder")
    if args.command in ("export-hf", "verify"):
        _check_exportable(args.load, args.command)
    outputs = {"import-hf": ("--save", "save"), "upcycle": ("--save", "save"), "export-hf": ("--hf-path", "hf_path")}
    if args.command in outputs:
        flag, attr = outputs[args.command]
        try:
            check_output_folder(flag, getattr(args, attr))
        except ValueError as e:
            raise ConversionError(str(e)) from None


def _err(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _verify_rank(args: dict) -> dict | None:
    """One rank of verify (module level: spawned ranks import it)."""
    from megatron_vlm.conversion import hf_io
    from megatron_vlm.conversion.verify import verify

    result = verify(args["hf_path"], args["load"], args["tp"], args["pp"], args["tolerance"],
                    hf_io.parse_dtype(args["dtype"]), args["seed"], generate=args["generate"])
    return None if result is None else dict(result.__dict__, same_generation=result.same_generation)


def run_verify(args) -> int:
    from megatron_vlm.runtime.launcher_env import detect

    spec = {"hf_path": args.hf_path, "load": args.load, "tp": args.tensor_model_parallel_size,
            "pp": args.pipeline_model_parallel_size, "tolerance": args.tolerance, "dtype": args.dtype,
            "seed": args.seed, "generate": args.generate}
    ranks = spec["tp"] * spec["pp"]
    launch = detect()
    from megatron_vlm.conversion.verify import check_pair

    check_pair(args.hf_path, args.load)  # one family, before any rank starts
    if launch.world_size == 1 and ranks > 1:
        from megatron_vlm.runtime.spawn import SpawnError, run_distributed

        try:
            out = run_distributed(_verify_rank, ranks, spec, threads=max(1, (os.cpu_count() or 1) // ranks))[0]
        except SpawnError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            conv = [ln for ln in lines if "ConversionError" in ln or "ConfigError" in ln]
            return _err((conv[-1].split(": ", 1)[-1]) if conv else lines[-1])
    else:
        out = _verify_rank(spec)
    if launch.rank != 0 or out is None:
        return 0
    r = out
    print(f"verify: max abs diff {r['max_abs_diff']:.3e} (tolerance {r['tolerance']:.1e}) over logits "
          f"{list(r['shape'])} at TP={spec['tp']}; argmax agreement {100 * r['argmax_agree']:.1f}%: "
          f"{'PASS' if r['passed'] else 'FAIL'}", flush=True)
    ok = r["passed"]
    if r["same_generation"] is not None:
        print(f"generate: megatron {r['generated_megatron']} hf {r['generated_hf']}: "
              f"{'SAME' if r['same_generation'] else 'DIFFERENT'}", flush=True)
        ok = ok and r["same_generation"]
    return 0 if ok else 1


def quiet_warnings() -> None:
    """megatron/torch/transformers import-time warnings would bury the one-line errors."""
    import warnings

    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")  # spawned ranks
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_warnings()
    if args.command != "verify":  # no model runs: megatron-core's fused kernels are never called
        from megatron_vlm.runtime.megatron_fixes import import_megatron_without_jit_fusion

        import_megatron_without_jit_fusion()
    from megatron_vlm.config import ConfigError

    try:
        from megatron_vlm.conversion import hf_io

        _preflight(args)
        if args.command == "verify":
            return run_verify(args)
        dtype = hf_io.parse_dtype(args.dtype)
        if args.command == "import-hf":
            from megatron_vlm.conversion.convert import import_hf

            if args.vision_feature_layer is not None and not args.vision_path:
                return _err(f"--vision-feature-layer {args.vision_feature_layer}: only for a warm start "
                            f"(with --vision-path)")
            if args.generalist is not None and not args.vision_path:
                return _err(f"--generalist {args.generalist}: only for a warm start (with --vision-path)")
            if args.vision_feature_layer is None:
                args.vision_feature_layer = -2
            if args.vision_path:
                from megatron_vlm.conversion.warm_start import import_warm_start

                import_warm_start(args.hf_path, args.vision_path, args.save, arch=args.arch,
                                  tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                  ep=args.expert_model_parallel_size, dtype=dtype, overwrite=args.overwrite,
                                  vocab_multiple=args.make_vocab_size_divisible_by, seed=args.seed,
                                  vision_feature_layer=args.vision_feature_layer,
                                  model_overrides=_model_overrides(args), generalist=args.generalist)
                return 0
            import_hf(args.hf_path, args.save, tp=args.tensor_model_parallel_size,
                      pp=args.pipeline_model_parallel_size, ep=args.expert_model_parallel_size,
                      dtype=dtype, arch=args.arch, overwrite=args.overwrite,
                      vocab_multiple=args.make_vocab_size_divisible_by, vision_path=args.vision_path,
                      seed=args.seed, vision_feature_layer=args.vision_feature_layer,
                      model_overrides=_model_overrides(args))
        elif args.command == "upcycle":
            from megatron_vlm.conversion.upcycle import upcycle

            if args.arch is None:
                return _err("upcycle: --arch is required (the target arch, e.g. moma)")
            upcycle(args.load, args.save, args.arch, _model_overrides(args),
                    tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                    ep=args.expert_model_parallel_size, noise=args.expert_noise, seed=args.seed,
                    overwrite=args.overwrite)
        elif args.command == "export-hf":
            from megatron_vlm.conversion.convert import export_hf

            export_hf(args.load, args.hf_path, dtype=dtype, tokenizer_path=args.tokenizer_path,
                      overwrite=args.overwrite, max_shard_bytes=args.max_shard_size, arch=args.arch)
        return 0
    except (ConversionError, ConfigError, FileNotFoundError) as e:
        return _err(str(e))
