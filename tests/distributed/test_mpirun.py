"""Real launchers, not run_distributed: ``mpirun -np 2`` (Open MPI) and ``torchrun`` start
``examples/mpirun_hello.py``, which initialises through ``megatron_vlm.runtime.initialize`` at
TP=2, runs one forward/backward of a tiny joint_decoder VLM and prints one JSON line per rank.

mpirun is the Open MPI wheel's, next to the venv's python. Without it the mpirun test is skipped,
except under CI (env ``CI`` set), where a missing mpirun is a failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "mpirun_hello.py"
TIMEOUT_S = 420


def _mpirun() -> str | None:
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    return shutil.which("mpirun")


def _launch(cmd: list[str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the launcher under test must provide them
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        output, _ = proc.communicate()
        pytest.fail(f"{cmd[:3]} timed out after {TIMEOUT_S}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{cmd} exited with {proc.returncode}:\n{output[-4000:]}"
    reports = [json.loads(m) for m in re.findall(r"MPIRUN_HELLO (\{[^{}]*\})", output)]
    return sorted(reports, key=lambda r: r["rank"])


def _check_world(reports: list[dict], launcher: str) -> None:
    assert [r["rank"] for r in reports] == [0, 1], reports  # both ranks ran, once each
    for r in reports:
        assert r["world"] == 2 and r["launcher"] == launcher and r["backend"] == "gloo", r
        assert r["tp_size"] == 2 and r["tp_rank"] == r["rank"] and r["local_rank"] == r["rank"], r
    assert reports[0]["master"] == reports[1]["master"]  # one rendezvous
    loss = reports[0]["loss"]
    assert math.isfinite(loss) and abs(loss - math.log(256)) < 1.0  # random init: ~log(vocab)
    assert reports[1]["loss"] == loss  # TP: the all-reduced loss is identical on both ranks
    # each TP rank holds different weight shards, so its local gradients differ
    assert reports[0]["local_grad_norm"] != reports[1]["local_grad_norm"]


@pytest.fixture(scope="module")
def mpirun_reports():
    mpirun = _mpirun()
    if mpirun is None:
        if os.environ.get("CI"):
            pytest.fail("mpirun not found next to the venv's python or on PATH, and CI is set")
        pytest.skip("mpirun not installed (the Open MPI wheel provides it)")
    return _launch([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
                    sys.executable, str(SCRIPT)])


def test_mpirun_two_ranks(mpirun_reports):
    _check_world(mpirun_reports, "openmpi")
    # without MASTER_ADDR/MASTER_PORT from the launcher, the runtime chose them itself
    assert mpirun_reports[0]["master"].startswith("127.0.0.1:")


def test_torchrun_same_script_same_loss(mpirun_reports):
    reports = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", "2", str(SCRIPT)])
    _check_world(reports, "torchrun")
    assert reports[0]["loss"] == mpirun_reports[0]["loss"]  # the launcher does not change the model
