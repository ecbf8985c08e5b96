"""Benchmark: import-hf / export-hf against transformers' load + save of the same folder.

    python benchmarks/convert_checkpoint.py [--sizes 0.3b,0.6b] [--repeats 3] [--dtype bfloat16|float32]
        [--work DIR] [--keep]

Per size (random LLaVA: CLIP ViT-B/16-224 + a Llama-style decoder; 0.3b / 0.6b / 1b parameters):

1. writes the HF folder tensor by tensor (the model is never materialised here);
2. runs, each in its own process and ``--repeats`` times (medians; interleaved), after ``sync`` (so
   that no run waits on the disk writing back the previous run's output): transformers'
   ``from_pretrained`` + ``save_pretrained`` of that folder (the reference), our
   ``tools/convert_checkpoint.py import-hf`` and ``export-hf``, and ``export-hf`` of the same model
   stored in whole tensors (as training at TP=1 saves it; ``export_whole``);
3. samples every 50 ms the process tree's memory (``/proc/PID/smaps_rollup``, proportional: pages
   that forked checkpoint writers share with their parent count once): anonymous (``Pss_Anon`` +
   ``Pss_Shmem``: what the processes really hold) apart from file-backed pages (``Pss_File``:
   mapped files' page cache, which the kernel drops at will), plus each run's own peak RSS
   (``ru_maxrss``, which counts both);
4. checks the round trip (every tensor equal) and that no process of the conversion's session is
   left when it exits, and prints the ratios the targets name:
   import time / reference time (target <= 1.5), import peak anonymous memory / checkpoint bytes
   (target <= 1.2), export peak anonymous memory at both sizes, of both stored forms (target:
   independent of the size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, patch_size=16)
SIZES = {  # Llama-style decoders; total parameters with the ViT-B vision tower
    "0.3b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12),
    "0.6b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18),
}
TEXT = dict(num_attention_heads=16, num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)


def write_random_llava(folder: Path, dtype_name: str, size: str = "1b", seed: int = 0) -> tuple[int, int]:
    """Random LLaVA weights written shard by shard; returns (parameters, bytes)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from megatron_vlm.conversion import hf_io

    dtype = hf_io.DTYPES[dtype_name]
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION).to_dict(),
                      text_config=LlamaConfig(**TEXT, **SIZES[size]).to_dict(), image_token_index=32000,
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


def _child(argv: list[str], store_whole: bool = False) -> int:
    """Run the conversion CLI in this process and report its own peak RSS on the last line;
    ``store_whole``: import-hf stores every tensor as one piece."""
    from tools.convert_checkpoint import main

    if store_whole:
        from megatron_vlm.conversion import megatron_io

        megatron_io.STREAM_BYTES = 1 << 62

    rc = main(argv)
    print(f"MAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    return rc


def _hf_child(src: str, dst: str, dtype_name: str) -> int:
    """The reference: transformers' from_pretrained + save_pretrained of the same folder."""
    from transformers import LlavaForConditionalGeneration

    from megatron_vlm.conversion import hf_io

    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=hf_io.DTYPES[dtype_name],
                                                          local_files_only=True)
    model.save_pretrained(dst)
    print(f"MAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    return 0


def _baseline() -> int:
    import megatron.core  # noqa: F401
    import transformers  # noqa: F401

    import megatron_vlm.conversion.convert  # noqa: F401
    import megatron_vlm.models  # noqa: F401

    print(f"MAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    return 0


def _memory_kb(pid: int) -> dict[str, int]:
    """Proportional set size by kind (``/proc/PID/smaps_rollup``): pages shared by forked
    processes count once over the tree."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Pss_Anon:", "Pss_File:", "Pss_Shmem:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/*/stat parent links)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier]
        tree += frontier
    return tree


def _session(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def measure(args: list[str]) -> dict:
    """Run ``benchmarks/convert_checkpoint.py ARGS`` in a session of its own: wall time, the
    process tree's peak anonymous / file-backed resident memory, its own peak RSS, and the
    processes of its session still alive right after it exited."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    peak = {"anon": 0, "file": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon = file = 0
            for pid in _tree(proc.pid):
                try:
                    st = _memory_kb(pid)
                except OSError:
                    continue
                anon += st.get("Pss_Anon", 0) + st.get("Pss_Shmem", 0)
                file += st.get("Pss_File", 0)
            peak["anon"] = max(peak["anon"], anon * 1024)
            peak["file"] = max(peak["file"], file * 1024)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    left = [pid for pid in _session(proc.pid) if pid != os.getpid()]
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step {args[:2]} failed (rc={proc.returncode}):\n{out[-4000:]}")
    own = [int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("MAXRSS_KB")]
    return {"wall_s": wall, "anon_peak_bytes": peak["anon"], "file_peak_bytes": peak["file"],
            "own_peak_rss_bytes": own[-1] if own else None, "left_processes": len(left)}


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


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if runs[0][k] is not None}


def bench_size(size: str, work: Path, dtype: str, repeats: int) -> dict:
    gib = 1024 ** 3
    hf, mcore, back, ref = work / "hf", work / "mcore", work / "back", work / "ref"
    whole, back_whole = work / "whole", work / "back_whole"
    for p in (hf, mcore, back, ref, whole):
        if p.exists():
            shutil.rmtree(p)
    t0 = time.perf_counter()
    params, nbytes = write_random_llava(hf, dtype, size)
    print(f"[{size}] random LLaVA: {params / 1e9:.3f} B parameters, {nbytes / gib:.2f} GiB {dtype} safetensors "
          f"(written in {time.perf_counter() - t0:.1f} s)", flush=True)
    measure(["--child-whole", "import-hf", "--hf-path", str(hf), "--save", str(whole), "--dtype", dtype])
    runs = {"reference": [], "import": [], "export": [], "export_whole": []}
    for i in range(repeats):  # interleaved, so that a busy spell hits all alike
        for p in (mcore, back, ref, back_whole):
            if p.exists():
                shutil.rmtree(p)
        runs["reference"].append(measure(["--hf-child", str(hf), str(ref), dtype]))
        runs["import"].append(measure(["--child", "import-hf", "--hf-path", str(hf), "--save", str(mcore),
                                       "--dtype", dtype]))
        runs["export"].append(measure(["--child", "export-hf", "--load", str(mcore), "--hf-path", str(back)]))
        runs["export_whole"].append(measure(["--child", "export-hf", "--load", str(whole), "--hf-path",
                                             str(back_whole)]))
        print(f"[{size}] run {i + 1}/{repeats}: " + ", ".join(
            f"{k} {v[-1]['wall_s']:.1f} s / {v[-1]['anon_peak_bytes'] / gib:.2f} GiB anon" for k, v in runs.items()),
            flush=True)
    n = compare(hf, back)
    compare(hf, back_whole)
    med = {k: _median(v) for k, v in runs.items()}
    result = {"size": size, "parameters": params, "dtype": dtype, "hf_checkpoint_bytes": nbytes,
              "repeats": repeats, "tensors_round_trip_equal": n, **med,
              "left_processes_max": max(r["left_processes"] for v in runs.values() for r in v),
              "import_time_ratio": med["import"]["wall_s"] / med["reference"]["wall_s"],
              "import_anon_ratio": med["import"]["anon_peak_bytes"] / nbytes,
              "reference_anon_ratio": med["reference"]["anon_peak_bytes"] / nbytes,
              "export_anon_ratio": med["export"]["anon_peak_bytes"] / nbytes,
              "export_whole_anon_ratio": med["export_whole"]["anon_peak_bytes"] / nbytes}
    for name in runs:
        r = med[name]
        print(f"[{size}] {name:12s}: {r['wall_s']:6.1f} s   peak anonymous {r['anon_peak_bytes'] / gib:5.2f} GiB "
              f"({r['anon_peak_bytes'] / nbytes:.2f} x checkpoint), file-backed {r['file_peak_bytes'] / gib:5.2f} GiB, "
              f"own peak RSS {r['own_peak_rss_bytes'] / gib:5.2f} GiB")
    print(f"[{size}] import / reference time: {result['import_time_ratio']:.2f} (target <= 1.5); import peak "
          f"anonymous / checkpoint: {result['import_anon_ratio']:.2f} (target <= 1.2; reference "
          f"{result['reference_anon_ratio']:.2f}); processes left after exit: {result['left_processes_max']}; "
          f"round trip: {n} tensors bit-identical (both stored forms)", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.3b,0.6b", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--work", default=None, help="work folder (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        parser.error(f"--sizes {args.sizes}: unknown {bad}; allowed {sorted(SIZES)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="convert_bench_"))
    gib = 1024 ** 3
    try:
        base = measure(["--baseline"])
        print(f"libraries only (python + torch + megatron + transformers): peak anonymous "
              f"{base['anon_peak_bytes'] / gib:.2f} GiB", flush=True)
        results = [bench_size(s, work / s, args.dtype, args.repeats) for s in sizes]
        if len(results) > 1:
            a, b = results[0], results[-1]
            for name in ("export", "export_whole"):
                print(f"{name} peak anonymous memory: {a[name]['anon_peak_bytes'] / gib:.2f} GiB at {a['size']} vs "
                      f"{b[name]['anon_peak_bytes'] / gib:.2f} GiB at {b['size']} "
                      f"({b['hf_checkpoint_bytes'] / a['hf_checkpoint_bytes']:.1f}x the checkpoint)")
        print("RESULT " + json.dumps({"baseline_anon_bytes": base["anon_peak_bytes"], "sizes": results}))
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's spawn workers re-import __main__
    if len(sys.argv) > 1 and sys.argv[1] in ("--child", "--child-whole"):
        sys.exit(_child(sys.argv[2:], store_whole=sys.argv[1] == "--child-whole"))
    if len(sys.argv) > 1 and sys.argv[1] == "--hf-child":
        sys.exit(_hf_child(*sys.argv[2:5]))
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        sys.exit(_baseline())
    sys.exit(main())
