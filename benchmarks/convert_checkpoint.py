"""Benchmark: import-hf / export-hf time and peak RSS for a ~1B-parameter random LLaVA.

    python benchmarks/convert_checkpoint.py [--work DIR] [--dtype bfloat16|float32] [--keep]

1. writes a random LLaVA (CLIP ViT-B/16-224 + a 1B Llama-style decoder) HF folder, tensor by tensor
   (the model is never materialised here);
2. runs ``tools/convert_checkpoint.py import-hf`` and ``export-hf`` each in its own process,
   reading the process's own peak RSS (``ru_maxrss``) and sampling the process tree's PSS every
   50 ms (psutil; dist_checkpointing forks writer processes that share the parent's pages);
3. checks the round trip (every tensor equal) and prints the numbers, with peak RSS as a ratio to
   the checkpoint size and the RSS of a process that only imports the libraries.

The streaming rule being measured: import holds the Megatron model once plus the HF tensors of one
key-map entry; export holds no model, only one map entry's tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, patch_size=16)


def write_random_llava(folder: Path, dtype_name: str, seed: int = 0) -> tuple[int, int]:
    """Random LLaVA weights written shard by shard; returns (parameters, bytes)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from megatron_vlm.conversion import hf_io

    dtype = hf_io.DTYPES[dtype_name]
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION).to_dict(),
                      text_config=LlamaConfig(**TEXT).to_dict(), image_token_index=32000,
                      image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2)
    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(cfg)
    # the on-disk names save_pretrained uses (the key map's names)
    from megatron_vlm.archs.joint_decoder.hf_llava import RENAME

    entries = [(RENAME(k), tuple(v.shape), dtype) for k, v in meta.state_dict().items()]
    del meta
    g = torch.Generator().manual_seed(seed)

    def produce():
        for name, shape, dt in entries:
            t = torch.randn(shape, generator=g)
            if name.endswith(("norm.weight", "layernorm.weight", "layrnorm.weight", "layer_norm1.weight",
                              "layer_norm2.weight")):
                t = 1 + 0.1 * t
            else:
                t = t * (0.02 if len(shape) > 1 else 0.1)
            yield name, t.to(dt)

    folder.mkdir(parents=True)
    hf_io.write_safetensors_shards(folder, entries, produce(), max_shard_bytes=2 * 1024 ** 3)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.dtype = dtype_name
    cfg.save_pretrained(str(folder))
    params = sum(int(torch.Size(s).numel()) for _, s, _ in entries)
    return params, sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _child(argv: list[str]) -> int:
    """Run the CLI in this process and report its own peak RSS on the last line."""
    from tools.convert_checkpoint import main

    rc = main(argv)
    print(f"MAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    return rc


def _baseline() -> int:
    import megatron.core  # noqa: F401
    import transformers  # noqa: F401

    import megatron_vlm.conversion.convert  # noqa: F401
    import megatron_vlm.models  # noqa: F401

    print(f"MAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    return 0


def measure(args: list[str]) -> dict:
    """Run ``benchmarks/convert_checkpoint.py --child ARGS``; wall time, tree peak RSS, own peak."""
    import psutil

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:  # PSS: forked checkpoint writers share the parent's pages; RSS would count them twice
                procs = [p] + p.children(recursive=True)
                peak[0] = max(peak[0], sum(q.memory_full_info().pss for q in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step {args[:2]} failed (rc={proc.returncode}):\n{out[-4000:]}")
    own = [int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("MAXRSS_KB")]
    return {"wall_s": wall, "tree_peak_bytes": peak[0], "own_peak_bytes": own[-1] if own else None,
            "log": [line for line in out.splitlines() if line.startswith("[convert]")]}


def compare(a: Path, b: Path) -> int:
    import torch

    from megatron_vlm.conversion.hf_io import HFReader

    ra, rb = HFReader(a), HFReader(b)
    if set(ra.keys()) != set(rb.keys()):
        raise SystemExit(f"round trip: key sets differ: {sorted(set(ra.keys()) ^ set(rb.keys()))[:5]}")
    for k in ra.keys():
        x, y = ra.get(k), rb.get(k)
        if x.dtype != y.dtype or not torch.equal(x, y):
            raise SystemExit(f"round trip: {k} differs")
    return len(ra.keys())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="work folder (default: a temp dir, removed)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="convert_bench_"))
    hf, mcore, back = work / "hf", work / "mcore", work / "back"
    for p in (hf, mcore, back):
        if p.exists():
            shutil.rmtree(p)
    gib = 1024 ** 3
    try:
        t0 = time.perf_counter()
        params, size = write_random_llava(hf, args.dtype)
        print(f"random LLaVA: {params / 1e9:.3f} B parameters, {size / gib:.2f} GiB {args.dtype} "
              f"safetensors (written in {time.perf_counter() - t0:.1f} s)", flush=True)
        base = measure(["--baseline"])
        imp = measure(["--child", "import-hf", "--hf-path", str(hf), "--save", str(mcore), "--dtype", args.dtype])
        mcore_size = sum(p.stat().st_size for p in mcore.rglob("*") if p.is_file())
        exp = measure(["--child", "export-hf", "--load", str(mcore), "--hf-path", str(back)])
        n = compare(hf, back)
        result = {
            "parameters": params, "dtype": args.dtype, "hf_checkpoint_bytes": size,
            "megatron_checkpoint_bytes": mcore_size, "baseline_rss_bytes": base["own_peak_bytes"],
            "import": {k: v for k, v in imp.items() if k != "log"},
            "export": {k: v for k, v in exp.items() if k != "log"}, "round_trip_tensors_equal": n,
        }
        print(f"libraries only (python + torch + megatron + transformers): peak RSS "
              f"{base['own_peak_bytes'] / gib:.2f} GiB")
        for name, r in (("import-hf", imp), ("export-hf", exp)):
            print(f"{name}: {r['wall_s']:.1f} s, peak RSS {r['own_peak_bytes'] / gib:.2f} GiB "
                  f"(process tree PSS {r['tree_peak_bytes'] / gib:.2f} GiB) = "
                  f"{r['own_peak_bytes'] / size:.2f} x checkpoint "
                  f"({(r['own_peak_bytes'] - base['own_peak_bytes']) / size:.2f} x above the libraries)")
        print(f"round trip: {n} tensors bit-identical")
        print("RESULT " + json.dumps(result))
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's spawn workers re-import __main__
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        sys.exit(_baseline())
    sys.exit(main())
