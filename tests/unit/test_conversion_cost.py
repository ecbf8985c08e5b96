"""What ``import-hf`` must not spend (timings and memory: ``benchmarks/convert_checkpoint.py``).

* no random initialisation of the weights it overwrites next: not one call of torch's random init
  functions on a real (not 'meta') tensor (megatron's ``init_method``, torch modules' and
  transformers' ``_init_weights`` all go through them) while ``import-hf`` builds and fills a tiny Mllama (megatron layers + the wrapped HF vision
  tower); the same spies count > 0 for a normal ``build_model`` (the control);
* no process outlives it: ``tools/convert_checkpoint.py import-hf`` runs in a session of its own
  and, as soon as it has exited, no process of that session is left (megatron's checkpoint writer
  starts a multiprocessing Manager and the resource tracker, which used to outlive it);
* bounded memory, by structure (the sizes are measured by the benchmark): import fills each
  parameter just before megatron's writer reaches it and frees it once written (never two filled
  parameters alive) or writes it from the HF files' pages when stored as is, stores tensors above
  ``STREAM_BYTES`` in row pieces, and export never reads
  such a tensor whole; the pieced checkpoint loads with megatron's loader (verify <= 1e-4) and
  round-trips bit-identically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from megatron_vlm.conversion import tiny

ROOT = Path(__file__).resolve().parents[2]

# runs in a fresh interpreter: spies on torch's random init functions, a control build with
# initialisation, then the CLI's own main() (as tools/convert_checkpoint.py runs it)
SCRIPT = textwrap.dedent("""
    import json, sys
    import torch

    calls = {}
    for name in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                 "xavier_uniform_", "xavier_normal_", "orthogonal_"):
        real = getattr(torch.nn.init, name)
        def spy(tensor, *args, _real=real, _name=name, **kwargs):
            if tensor.device.type != "meta":  # building on 'meta' (e.g. to list HF keys) costs nothing
                calls[_name] = calls.get(_name, 0) + 1
            return _real(tensor, *args, **kwargs)
        setattr(torch.nn.init, name, spy)

    from megatron_vlm.conversion import hf_io, megatron_io
    from megatron_vlm.conversion.families import family_for_hf
    from megatron_vlm.models import build_model

    hf, save = sys.argv[1], sys.argv[2]
    family = family_for_hf(["MllamaForConditionalGeneration"], None, hf)
    mc = family.model_config_from_hf(hf_io.load_hf_config(hf), hf, 128)
    megatron_io.ensure_runtime()
    build_model(megatron_io.build_config(mc, 1, 1, 1, torch.float32), pre_process=True, post_process=True)
    control = sum(calls.values())
    calls.clear()
    from tools.convert_checkpoint import main

    rc = main(["import-hf", "--hf-path", hf, "--save", save])
    print("RESULT " + json.dumps({"rc": rc, "control": control, "import": calls}), flush=True)
""")


def _session_processes(sid: int) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getsid(int(pid)) == sid:
                out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            pass
    return out


def test_import_builds_uninitialised_and_leaves_no_process(tmp_path):
    hf = tiny.save_mllama(tmp_path / "mllama")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(hf), str(tmp_path / "mcore")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    left = _session_processes(proc.pid)  # right after it exited, before anything could linger out
    for line in left:  # cleanup of what a failing run left (ours: the session we started)
        try:
            os.kill(int(line.split(":")[0]), 9)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, out[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    print(f"init calls: control build {r['control']}, import-hf {r['import']}; left: {left}")
    assert r["rc"] == 0 and (tmp_path / "mcore" / "latest").is_file()
    assert r["control"] > 0
    assert r["import"] == {}, f"import-hf initialised weights it overwrites: {r['import']}"
    assert left == [], f"processes of import-hf's session still alive after it exited: {left}"


def _streamed(hf: str, work: str) -> dict:
    """import + export of a tiny LLaVA with STREAM_BYTES = 16 KiB (its embedding: 384 x 64 fp32 =
    96 KiB), spying on the fills (parameters still holding memory) and on export's reads; then the
    export of the same model stored in whole tensors."""
    import pickle

    import torch

    from megatron_vlm.conversion import convert, megatron_io
    from megatron_vlm.conversion.verify import verify

    megatron_io.STREAM_BYTES = 16 * 1024
    alive_at_fill, reads, direct = [], {}, set()
    fillers = megatron_io.fillers

    def spy_fillers(model, pairs, reader, dtype):
        fns, done = fillers(model, pairs, reader, dtype), []
        tensors = megatron_io.model_tensors(model)

        def wrap(key, fn):
            def fill(dst):
                alive_at_fill.append(sum(tensors[k].untyped_storage().nbytes() > 0 for k in done))
                done.append(key)
                fn(dst)

            def source_rows(a, b):
                direct.add(key)
                return fn.source_rows(a, b)

            fill.source_rows = source_rows
            return fill

        return {k: wrap(k, fn) for k, fn in fns.items()}

    megatron_io.fillers = spy_fillers
    read_regions = megatron_io._read_regions

    def spy_read(ckpt, requests, metadata=None):
        for key, buf, _ in requests:
            reads[key] = max(reads.get(key, 0), buf.numel() * buf.element_size())
        return read_regions(ckpt, requests, metadata)

    megatron_io._read_regions = spy_read
    read_direct, whole_piece_loads = megatron_io._read_direct, []

    def spy_direct(ckpt, info, item, buf):
        done = read_direct(ckpt, info, item, buf)
        if not done:
            whole_piece_loads.append(item.dest_index.fqn)
        return done

    megatron_io._read_direct = spy_direct
    work = Path(work)
    convert.import_hf(hf, str(work / "mcore"))
    convert.export_hf(str(work / "mcore"), str(work / "back"))
    emb = "language_model.embedding.word_embeddings.weight"

    def stored(ckpt):  # how the checkpoint stores the embedding
        with open(work / ckpt / "iter_0000000" / ".metadata", "rb") as f:
            return pickle.load(f).state_dict_metadata[emb]

    full = stored("mcore").size.numel() * 4
    report = verify(hf, str(work / "mcore"), seed=1)
    a, b = tiny.load_safetensors_dir(hf), tiny.load_safetensors_dir(work / "back")
    out = {"alive_at_fill": alive_at_fill, "direct": len(direct), "pieces": len(stored("mcore").chunks), "full": full,
           "embedding_read_max": reads[emb], "verify": report.max_abs_diff,
           "equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}
    # stored whole (as training at TP=1 saves it): export still reads blocks of STREAM_BYTES, each
    # straight from the stored piece's bytes (no whole-piece load)
    megatron_io.STREAM_BYTES = 1 << 40
    convert.import_hf(hf, str(work / "whole"))
    megatron_io.STREAM_BYTES = 16 * 1024
    reads.clear()
    whole_piece_loads.clear()
    convert.export_hf(str(work / "whole"), str(work / "back_whole"))
    c = tiny.load_safetensors_dir(work / "back_whole")
    out.update(whole_pieces=len(stored("whole").chunks), whole_read_max=reads[emb], whole_piece_loads=whole_piece_loads,
               whole_equal=a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a))
    return out


def test_import_streams_one_parameter_at_a_time_and_export_reads_pieces(tmp_path):
    from megatron_vlm.testing.distributed import run_distributed

    hf = tiny.save_llava(tmp_path / "llava")
    (r,) = run_distributed(_streamed, 1, str(hf), str(tmp_path))
    print({k: v for k, v in r.items() if k != "alive_at_fill"}, "fills:", len(r["alive_at_fill"]))
    # filled (q/k/v, padded rows) or written from the HF files' pages (the others): never 2 alive
    assert len(r["alive_at_fill"]) > 5 and max(r["alive_at_fill"]) == 0, r["alive_at_fill"]
    assert r["direct"] > 20, r
    assert r["pieces"] > 1 and 0 < r["embedding_read_max"] <= 16 * 1024 < r["full"], r
    assert r["verify"] <= 1e-4 and r["equal"], r
    assert r["whole_pieces"] == 1 and 0 < r["whole_read_max"] <= 16 * 1024, r
    assert r["whole_piece_loads"] == [] and r["whole_equal"], r


def test_conversion_does_not_import_torch_compiler(tmp_path):
    """import-hf runs no model: megatron-core is imported with its jit_fuser a plain decorator, so
    dynamo and inductor (~1.3 s of every conversion) are never imported; torch.compile is restored."""
    hf = tiny.save_llava(tmp_path / "llava")
    script = ("import sys, torch; compile_ = torch.compile\n"
              "from tools.convert_checkpoint import main\n"
              "rc = main(sys.argv[1:])\n"
              "print('RESULT', rc, 'torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules,"
              " torch.compile is compile_)")
    out = subprocess.run([sys.executable, "-c", script, "import-hf", "--hf-path", str(hf), "--save",
                          str(tmp_path / "mcore")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=300).stdout
    assert out.splitlines()[-1] == "RESULT 0 False False True", out[-3000:]
