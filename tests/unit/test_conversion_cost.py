"""What ``import-hf`` must not spend (timings and memory: ``benchmarks/convert_checkpoint.py``).

* no random initialisation of the weights it overwrites next: not one call of torch's random init
  functions on a real (not 'meta') tensor (megatron's ``init_method``, torch modules' and
  transformers' ``_init_weights`` all go through them) while ``import-hf`` builds and fills a tiny Mllama (megatron layers + the wrapped HF vision
  tower); the same spies count > 0 for a normal ``build_model`` (the control);
* no process outlives it: ``tools/convert_checkpoint.py import-hf`` runs in a session of its own
  and, as soon as it has exited, no process of that session is left (megatron's checkpoint writer
  starts a multiprocessing Manager and the resource tracker, which used to outlive it).
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
