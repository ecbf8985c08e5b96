"""Command lines of ``tools/generate.py`` and ``tools/evaluate.py`` (thin: the work is in
:mod:`~megatron_vlm.inference.engine`, :mod:`~megatron_vlm.inference.prompts`,
:mod:`~megatron_vlm.inference.loading`, :mod:`~megatron_vlm.inference.evaluation`).

Layout: ``--tensor-model-parallel-size N``. Launched by mpirun/torchrun/srun, the world is
``TP x DP`` (rows are split over the data-parallel ranks); launched as one process with TP > 1, the
tool starts the TP ranks itself. Every input problem is one line on stderr, exit code 2, found
before a model is built (checkpoint, tokenizer, image files, prompt lengths); output files are
written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_vlm.inference.engine import SamplingParams


class CliError(ValueError):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True, help="checkpoint directory (pretrain_vlm.py --save, or converted)")
    p.add_argument("--tokenizer-path", default=None, help="tokenizer folder; None: the checkpoint's")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="must be 1 (any saved PP loads)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=32)


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description="Answer (image, prompt) pairs with a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image file (repeatable)")
    p.add_argument("--prompt", default=None, help="the text after the image(s)")
    p.add_argument("--encoder-weights", default=None, metavar="W0,W1,...",
                   help="with --prompt, a model with several encoders and model.fusion.router 'data': "
                        "the image's weight per encoder (model.vision order)")
    p.add_argument("--input", default=None, metavar="FILE.jsonl",
                   help='rows {"prompt": ..., "image": PATH | "images": [PATH, ...], "encoder_weights": '
                        '[W0, ...] (data router only)} (paths relative to the file)')
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="with --input: where to write; None: stdout")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (row i draws with seed + i)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence per token (slow; checks)")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Generative exact-match accuracy of a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p)
    p.set_defaults(max_new_tokens=16)
    p.add_argument("--data-path", default=None, help="dataset folder with <split>/ shards; None: the checkpoint's")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the result as JSON")
    return p


# ------------------------------------------------------------------------------------------------
# input checks (every rank, cheap, before any model)
# ------------------------------------------------------------------------------------------------

def _requests(args) -> list:
    from megatron_vlm.inference.prompts import Request

    if (args.prompt is None) == (args.input is None):
        raise CliError("give exactly one of --prompt TEXT (with --image PATH ...) or --input FILE.jsonl")
    from megatron_vlm.data.encoder_weights import value_problem

    if args.prompt is not None:
        weights = None
        if args.encoder_weights is not None:
            try:
                weights = [float(w) for w in args.encoder_weights.split(",")]
            except ValueError:
                raise CliError(f"--encoder-weights {args.encoder_weights}: expected comma-separated numbers") from None
            problem = value_problem(weights)
            if problem is not None:
                raise CliError(f"--encoder-weights {args.encoder_weights}: {problem}")
        return [Request(args.prompt, list(args.image), weights)]
    if args.image or args.encoder_weights is not None:
        raise CliError("--image / --encoder-weights go with --prompt; with --input each row names its images "
                       "and weights")
    path = Path(args.input)
    if not path.is_file():
        raise CliError(f"--input {args.input}: no such file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"--input {args.input} line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise CliError(f"--input {args.input} line {n}: expected an object with a \"prompt\" string")
        images = row.get("images", [row["image"]] if "image" in row else [])
        if isinstance(images, str) or not all(isinstance(i, str) for i in images):
            raise CliError(f"--input {args.input} line {n}: \"images\" must be a list of paths")
        images = [i if Path(i).is_absolute() or Path(i).exists() else str(path.parent / i) for i in images]
        weights = row.get("encoder_weights")
        problem = None if weights is None else value_problem(weights)
        if problem is not None:
            raise CliError(f"--input {args.input} line {n}: {problem}")
        out.append(Request(row["prompt"], images, weights))
    if not out:
        raise CliError(f"--input {args.input}: no rows")
    return out


def _check_common(args) -> None:
    if args.tensor_model_parallel_size < 1:
        raise CliError(f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: must be >= 1")
    if args.batch_size < 1:
        raise CliError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")


def _check_prompts(ckpt, builder, requests) -> None:
    from megatron_vlm.inference.prompts import read_image_file

    for r in requests:
        for image in r.images:
            read_image_file(image)
        problem = builder.weights_problem(r)
        if problem is not None:
            raise CliError(f"prompt {r.prompt[:40]!r}{'...' if len(r.prompt) > 40 else ''}: {problem}")
        n = len(builder.tokens(r.prompt, len(r.images)))
        if n >= ckpt.context_length:
            raise CliError(f"prompt {r.prompt[:40]!r}{'...' if len(r.prompt) > 40 else ''}: {n} tokens with its "
                           f"{len(r.images)} image(s), longer than the model's context of {ckpt.context_length} "
                           "positions minus one to generate")


# ------------------------------------------------------------------------------------------------
# ranks
# ------------------------------------------------------------------------------------------------

def _dp():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def generate_rank(spec: dict) -> list | None:
    """One rank of generate.py: the answers (rank 0), None elsewhere."""
    import torch

    from megatron_vlm.inference.engine import generate
    from megatron_vlm.inference.loading import load_model, read_checkpoint
    from megatron_vlm.inference.prompts import PromptBuilder, Request

    ckpt = read_checkpoint(spec["load"], spec["tokenizer_path"], spec["tp"])
    model = load_model(ckpt)
    requests = [Request(**r) for r in spec["requests"]]
    dp_rank, dp_size = _dp()
    mine = list(range(dp_rank, len(requests), dp_size))
    builder = PromptBuilder(ckpt.cfg.model, ckpt.tokenizer, ckpt.cfg.data.images_per_sample)
    sampling = SamplingParams(**spec["sampling"])
    results = {}
    by_images = {}  # one batch holds prompts with the same number of images
    for i in mine:
        by_images.setdefault(len(requests[i].images), []).append(i)
    batches = [group[k:k + spec["batch_size"]] for group in by_images.values()
               for k in range(0, len(group), spec["batch_size"])]
    for rows in batches:
        prompts = builder.build_all([requests[i] for i in rows])
        outs = generate(model, prompts, spec["max_new_tokens"], vocab_size=ckpt.vocab_size,
                        eos_id=ckpt.tokenizer.eos_id, banned=ckpt.banned_ids, sampling=sampling,
                        use_cache=not spec["no_cache"], max_sequence_length=ckpt.context_length, rows=rows)
        for i, out in zip(rows, outs):
            text = ckpt.tokenizer.decode([t for t in out if t != ckpt.tokenizer.eos_id])
            results[i] = {"generated": text, "tokens": out,
                          "stopped": "eos" if out and out[-1] == ckpt.tokenizer.eos_id else "length"}
    from megatron.core import parallel_state

    gathered = [None] * dp_size
    torch.distributed.all_gather_object(gathered, results, group=parallel_state.get_data_parallel_group())
    if torch.distributed.get_rank() != 0:
        return None
    merged = {k: v for part in gathered for k, v in part.items()}
    return [merged[i] for i in range(len(requests))]


def evaluate_rank(spec: dict) -> dict | None:
    import torch

    from megatron_vlm.inference.evaluation import evaluate
    from megatron_vlm.inference.loading import load_model, read_checkpoint

    ckpt = read_checkpoint(spec["load"], spec["tokenizer_path"], spec["tp"])
    model = load_model(ckpt)
    result = evaluate(model, ckpt, spec["data_path"], spec["split"], spec["batch_size"],
                      spec["max_new_tokens"], spec["limit"])
    return result if torch.distributed.get_rank() == 0 else None


def _launch(fn, spec: dict, tp: int):
    """Run ``fn(spec)`` on this launch's ranks (or on ``tp`` spawned ranks from one process)."""
    from megatron_vlm.runtime.launcher_env import detect

    launch = detect()
    if launch.world_size == 1 and tp > 1:
        from megatron_vlm.runtime.spawn import run_distributed

        return run_distributed(fn, tp, spec, threads=max(1, (os.cpu_count() or 1) // tp))[0]
    if launch.world_size % tp:
        raise CliError(f"--tensor-model-parallel-size {tp}: does not divide the {launch.world_size} launched ranks")
    try:
        return fn(spec)
    finally:
        from megatron_vlm import runtime

        runtime.shutdown()


def _write_atomic(path: str, text: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


def _err(prog: str, msg: str) -> int:
    from megatron_vlm.runtime.launcher_env import detect

    if detect().rank == 0:
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _spawn_error(e) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    ours = [ln for ln in lines if any(n in ln for n in ("CliError", "LoadError", "PromptError", "ConfigError"))]
    return ours[-1].split(": ", 1)[-1] if ours else lines[-1]


def generate_main(argv=None) -> int:
    from megatron_vlm.inference.loading import LoadError, read_checkpoint
    from megatron_vlm.inference.prompts import PromptBuilder, PromptError
    from megatron_vlm.runtime.spawn import SpawnError

    args = generate_parser().parse_args(argv)
    try:
        _check_common(args)
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        requests = _requests(args)
        ckpt = read_checkpoint(args.load, args.tokenizer_path, args.tensor_model_parallel_size,
                               args.pipeline_model_parallel_size)
        _check_prompts(ckpt, PromptBuilder(ckpt.cfg.model, ckpt.tokenizer), requests)
        spec = {"load": args.load, "tokenizer_path": args.tokenizer_path, "tp": args.tensor_model_parallel_size,
                "requests": [r.__dict__ for r in requests], "sampling": sampling.__dict__,
                "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "no_cache": args.no_cache}
        out = _launch(generate_rank, spec, args.tensor_model_parallel_size)
    except (CliError, LoadError, PromptError, ValueError) as e:
        return _err("generate.py", str(e))
    except SpawnError as e:
        return _err("generate.py", _spawn_error(e))
    if out is None:
        return 0
    if args.prompt is not None:
        print(out[0]["generated"].strip(), flush=True)
        return 0
    rows = [dict({k: v for k, v in r.__dict__.items() if not (k == "encoder_weights" and v is None)}, **o)
            for r, o in zip(requests, out)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if args.output:
        _write_atomic(args.output, text)
        print(f"generate.py: {len(rows)} rows -> {args.output}", flush=True)
    else:
        sys.stdout.write(text)
    return 0


def format_result(r: dict) -> str:
    lines = [f"evaluate: {r['samples']} samples of split {r['split']!r}"]
    for k, v in r["per_type"].items():
        lines.append(f"   {k:<10} {v['samples']:>5} samples  generative {100 * v['accuracy']:5.1f}%  "
                     f"teacher-forced {100 * v['teacher_forced_accuracy']:5.1f}%")
    lines.append(f"== generative accuracy {100 * r['accuracy']:.1f}% | teacher-forced {100 * r['teacher_forced_accuracy']:.1f}% "
                 f"| val loss {r['loss']:.3f}")
    return "\n".join(lines)


def evaluate_main(argv=None) -> int:
    from megatron_vlm.data.encoder_weights import check_split, router_encoders
    from megatron_vlm.data.shards import list_shards
    from megatron_vlm.inference.loading import LoadError, read_checkpoint
    from megatron_vlm.runtime.spawn import SpawnError

    args = evaluate_parser().parse_args(argv)
    try:
        _check_common(args)
        ckpt = read_checkpoint(args.load, args.tokenizer_path, args.tensor_model_parallel_size,
                               args.pipeline_model_parallel_size)
        data_path = args.data_path or ckpt.cfg.data.data_path
        if not data_path or data_path == "mock":
            raise CliError(f"--data-path: the checkpoint names no dataset ({data_path!r}); pass --data-path DIR")
        try:
            list_shards(Path(data_path) / args.split)
            num_encoders = router_encoders(ckpt.cfg.model)
            if num_encoders:  # the data router: every sample's weights, from the shards' side files
                check_split(Path(data_path) / args.split, num_encoders)
        except (FileNotFoundError, ValueError) as e:
            raise CliError(f"--data-path {data_path} --split {args.split}: {e}") from None
        if args.limit is not None and args.limit < 1:
            raise CliError(f"--limit {args.limit}: must be >= 1")
        spec = {"load": args.load, "tokenizer_path": args.tokenizer_path, "tp": args.tensor_model_parallel_size,
                "data_path": data_path, "split": args.split, "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens, "limit": args.limit}
        result = _launch(evaluate_rank, spec, args.tensor_model_parallel_size)
    except (CliError, LoadError, ValueError) as e:
        return _err("evaluate.py", str(e))
    except SpawnError as e:
        return _err("evaluate.py", _spawn_error(e))
    if result is None:
        return 0
    print(format_result(result), flush=True)
    if args.output:
        _write_atomic(args.output, json.dumps(result, indent=1) + "\n")
    return 0
