"""Fault sweep and stop signals under ``mpirun -np 2`` (the real launcher, the real CLI).

One chain of launches with the auto-resume idiom (``--save D --load D``): each launch is killed by
SIGKILL at a named point on rank 0 or rank 1 (``MEGATRON_VLM_TEST_KILL_AT``, a test-only hook in
``training/checkpointing.py:fault_point``) or stopped by SIGTERM/SIGINT sent to
``examples/graceful_stop.sh`` (what the launch scripts wrap mpirun in). For every launch: every
process of the job (ranks, prterun, dist_checkpointing's helper processes, found by a marker in
their environment) is gone within 30 s of the kill; the next launch resumes from ``latest`` and
each loss it logs equals the uninterrupted run's bit for bit. A stop signal ends in exit code 0 and
a checkpoint of the last iteration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from megatron_vlm.testing.cli import TINY_ARGV

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ITERS = 8
ARGV = TINY_ARGV + ["--train-iters", str(TRAIN_ITERS), "--save-interval", "2", "--lr-warmup-iters", "1"]

# what stops each launch of the chain ("kill RANK:POINT:ITERATION" or "signal NAME"); the next
# launch resumes from whatever 'latest' says, so each point must lie after the resumed iteration
CHAIN = [
    "kill 1:save_written:2",     # rank 1 dies after writing its part of a save, rank 0 may finish it
    "kill 0:save_renamed:4",     # rank 0 dies after the rename, before 'latest' moves on
    "kill 0:forward:5",          # during the forward pass
    "kill 1:optimizer:6",        # rank 1, between backward and the optimizer step
    "signal TERM",               # SIGTERM to the launch script: saves and exits 0
]
SLOW_CHAIN = [
    "kill 0:save_begin:2", "kill 1:forward:3", "kill 0:save_latest:4", "kill 1:save_begin:6",
    "kill 0:optimizer:6", "signal INT",
]
EXIT_WITHIN_S = 30


def _mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("mpirun not found next to the venv's python or on PATH, and CI is set")
        pytest.skip("mpirun not installed (the Open MPI wheel provides it)")
    return found


def _tagged_pids(tag: str) -> list[int]:
    """Processes whose environment holds our marker (survivors of a launch, orphans included)."""
    out = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"MEGATRON_VLM_TEST_TAG={tag}".encode() in env.read_bytes():
                out.append(int(env.parent.name))
        except OSError:
            pass
    return out


def _launch(cmd: list[str], env: dict, stop: str | None, first_logged: int | None = None) -> dict:
    """Run one launch; for ``signal X`` send it once the launch logged an iteration. Returns rc,
    output, seconds from the kill/signal to the last process gone."""
    tag = uuid.uuid4().hex
    env = dict(env, MEGATRON_VLM_TEST_TAG=tag)
    if stop and stop.startswith("kill "):
        env["MEGATRON_VLM_TEST_KILL_AT"] = stop.split()[1]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, marks = [], {}

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if "fault injection:" in line:
                marks.setdefault("stopped", time.monotonic())
            if stop and stop.startswith("signal ") and line.startswith("iter ") and "stopped" not in marks:
                marks["stopped"] = time.monotonic()
                proc.send_signal(getattr(signal, "SIG" + stop.split()[1]))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + EXIT_WITHIN_S
    while time.monotonic() < deadline and (proc.poll() is None or _tagged_pids(tag)):
        time.sleep(0.2)
    gone = time.monotonic()
    survivors = _tagged_pids(tag)
    for pid in survivors:  # clean up before failing
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    thread.join(timeout=10)
    return {"rc": proc.wait(), "out": "".join(lines), "survivors": survivors,
            "exit_s": gone - marks["stopped"] if "stopped" in marks else None}


def _losses(log_dir: Path) -> dict[int, float]:
    f = log_dir / "metrics.jsonl"
    if not f.is_file():
        return {}
    recs = [json.loads(ln) for ln in f.read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in recs if r.get("loss") is not None}


def _chain(tmp_path: Path, chain: list[str]) -> dict:
    mpirun = _mpirun()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "MEGATRON_VLM_TEST_KILL_AT"):
        env.pop(key, None)
    base = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, str(ROOT / "pretrain_vlm.py")]
    ref = _launch(base + ARGV + ["--log-dir", str(tmp_path / "ref")], env, None)
    assert ref["rc"] == 0, ref["out"][-3000:]
    reference = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, TRAIN_ITERS + 1))
    ckpt = tmp_path / "ckpt"
    counts = {"points": 0, "resumes": 0, "bit_exact": 0}
    for i, stop in enumerate(chain + [None]):
        logs = tmp_path / f"launch{i}"
        latest = (ckpt / "latest").read_text() if (ckpt / "latest").is_file() else None
        cmd = base + ARGV + ["--save", str(ckpt), "--load", str(ckpt), "--log-dir", str(logs)]
        if stop and stop.startswith("signal "):
            cmd = ["bash", str(ROOT / "examples" / "graceful_stop.sh")] + cmd
        t0 = time.monotonic()
        r = _launch(cmd, env, stop)
        what = f"launch {i} ({stop or 'to the end'}, resumed from {latest})"
        print(f"{what}: {time.monotonic() - t0:.1f}s, exit {r['exit_s'] and round(r['exit_s'], 1)}s after the stop")
        assert not r["survivors"], f"{what}: processes left: {r['survivors']}\n{r['out'][-2000:]}"
        if stop:
            counts["points"] += 1
            assert r["exit_s"] is not None, f"{what}: never reached its stop point\n{r['out'][-3000:]}"
            assert r["exit_s"] <= EXIT_WITHIN_S, f"{what}: took {r['exit_s']:.1f}s to exit"
        if stop is None or stop.startswith("signal "):
            assert r["rc"] == 0, f"{what}: rc {r['rc']}\n{r['out'][-3000:]}"
        else:
            assert r["rc"] != 0 and "fault injection:" in r["out"], f"{what}: rc {r['rc']}\n{r['out'][-3000:]}"
        if stop and stop.startswith("signal "):
            assert "stop requested" in r["out"]
            last = max(_losses(logs))
            assert (ckpt / "latest").read_text() == str(last), what
        got = _losses(logs)
        start = int(latest) if latest else 0
        assert all(it > start for it in got), f"{what}: logged {sorted(got)}"
        if latest:
            counts["resumes"] += 1
            assert got, f"{what}: resumed but logged nothing\n{r['out'][-2000:]}"
            assert min(got) == start + 1, f"{what}: did not resume from latest={latest}: {sorted(got)}"
        if got:
            mismatched = {it: (loss, reference[it]) for it, loss in got.items() if loss != reference[it]}
            assert not mismatched, f"{what}: losses differ from the uninterrupted run: {mismatched}"
            counts["bit_exact"] += bool(latest)
    assert (ckpt / "latest").read_text() == str(TRAIN_ITERS)
    return counts


def test_fault_sweep_and_sigterm_under_mpirun(tmp_path):
    counts = _chain(tmp_path, CHAIN)
    print(f"fault sweep: {counts['points']} stop points, {counts['resumes']} resumes, "
          f"{counts['bit_exact']} bit-exact")
    assert counts["points"] == len(CHAIN) and counts["bit_exact"] == counts["resumes"] >= len(CHAIN) - 1


@pytest.mark.skipif(not os.environ.get("MEGATRON_VLM_SLOW_TESTS"), reason="slow: MEGATRON_VLM_SLOW_TESTS=1")
def test_fault_sweep_more_points_and_sigint(tmp_path):
    counts = _chain(tmp_path, SLOW_CHAIN)
    print(f"fault sweep (slow): {counts['points']} stop points, {counts['resumes']} resumes, "
          f"{counts['bit_exact']} bit-exact")
    assert counts["points"] == len(SLOW_CHAIN) and counts["bit_exact"] == counts["resumes"]
