"""Nothing lost, one line for every bad input (issue 15) — what needs a real checkpoint or dataset:
--keep-last and a --save folder holding other checkpoints, --load of a checkpoint that differs /
is truncated / whose 'latest' names a deleted folder, a truncated shard, the --save lock, --finetune
onto another dataset (and the one-line error naming it without), verify across families, the
convert_checkpoint.py flag sweep, prepare_data --overwrite and non-UTF-8 manifest lines."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vlm.testing.cli import TINY_ARGV, check_in_process as _check
from megatron_vlm.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def _cli(argv):
    from megatron_vlm.training.cli import run

    return run(argv)


def _argv(data: Path, *extra) -> list[str]:
    argv = list(TINY_ARGV)
    argv[argv.index("--data-path") + 1] = str(data)
    return argv + ["--set", "data.num_threads=1", *extra]


def _losses(log_dir) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in recs if r.get("loss") is not None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Dataset A (24 train samples), dataset B (other seed, 8 samples), and a joint_decoder
    checkpoint trained 3 iterations on A (12 samples consumed: past B's one epoch of 8)."""
    from megatron_vlm.data import synthetic

    root = tmp_path_factory.mktemp("robust")
    synthetic.prepare(root / "A", num_train=24, num_val=4, image_size=8, shard_size=8, vocab_size=300)
    synthetic.prepare(root / "B", num_train=8, num_val=4, image_size=8, shard_size=4, vocab_size=300, seed=5)
    (rc,) = run_distributed(_cli, 1, _argv(root / "A", "--train-iters", "3", "--save", str(root / "ckpt")))
    assert rc == 0 and (root / "ckpt" / "latest").read_text() == "3"
    return root


def test_save_folder_with_other_checkpoints_is_refused_and_prune_keeps_the_new_one(trained, capsys, tmp_path):
    from megatron_vlm.training import checkpointing as ck

    # the case: a fresh run into a folder holding iter 6 and 8 of an earlier run
    old = tmp_path / "old"
    for it in (6, 8):
        (old / f"iter_{it:07d}").mkdir(parents=True)
    (old / "latest").write_text("8")
    rc, err = _check(_argv(trained / "A", "--train-iters", "2", "--save", str(old), "--keep-last", "2"), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--save {old}: already holds checkpoints (iter_0000008); to continue that run pass --load {old}" in err
    # --load elsewhere into it: refused too (it would mix two runs in one folder)
    rc, err = _check(_argv(trained / "A", "--train-iters", "5", "--save", str(old), "--load", str(trained / "ckpt")), capsys)
    assert rc == 2 and "already holds checkpoints" in err
    # prune: the checkpoint just written survives whatever else the folder holds
    removed = ck.prune(old, keep_last=2, current=2)
    assert removed == [] and sorted(p.name for p in old.iterdir() if p.is_dir()) == ["iter_0000006", "iter_0000008"]
    (old / "iter_0000002").mkdir()
    for it in (3, 4, 5):
        (old / f"iter_{it:07d}").mkdir()
    ck.prune(old, keep_last=2, current=5)
    assert sorted(p.name for p in old.iterdir() if p.is_dir()) == ["iter_0000004", "iter_0000005", "iter_0000006",
                                                                    "iter_0000008"]
    ck.prune(old, keep_last=1, current=5)
    assert (old / "iter_0000005").is_dir() and not (old / "iter_0000004").exists()


def test_load_errors_are_one_line_before_building(trained, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    base = _argv(trained / "A", "--train-iters", "5", "--load", str(ckpt), "--save", str(ckpt))
    rc, err = _check(base, capsys)
    assert rc == 0, err
    # arch / sizes differ: name the fields
    rc, err = _check(base + ["--hidden-size", "64", "--ffn-hidden-size", "96"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "model.language.hidden_size: checkpoint 32, this run 64" in err
    assert "model.language.ffn_hidden_size: checkpoint 48, this run 96" in err
    rc, err = _check(base + ["--arch", "cross_attention", "--set", "model.cross_attention.every=1"], capsys)
    assert rc == 2 and "model.arch: checkpoint 'joint_decoder', this run 'cross_attention'" in err, err
    # a truncated file of the checkpoint: named
    shard = sorted((ckpt / "iter_0000003").glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    rc, err = _check(base, capsys)
    assert rc == 2 and f"{shard}: truncated" in err and len(err.strip().splitlines()) == 1, err
    shard.write_bytes(data)
    meta = ckpt / "iter_0000003" / ".metadata"
    meta_bytes = meta.read_bytes()
    meta.write_bytes(meta_bytes[:100])
    rc, err = _check(base, capsys)
    assert rc == 2 and f"{meta}: truncated or corrupt" in err, err
    meta.write_bytes(meta_bytes)
    # 'latest' names a deleted folder
    shutil.rmtree(ckpt / "iter_0000003")
    rc, err = _check(base, capsys)
    assert rc == 2 and "'latest' names iteration 3 but iter_0000003/ is missing" in err, err


def test_truncated_shard_is_named(trained, capsys, tmp_path):
    data = tmp_path / "A"
    shutil.copytree(trained / "A", data)
    tar = sorted((data / "train").glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:3000])
    rc, err = _check(_argv(data, "--train-iters", "2"), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"shard {tar}: truncated" in err, err


def test_finetune_onto_another_dataset(trained, capsys, tmp_path):
    """Without --finetune: one line naming it (A's data position does not fit B); with it: trains
    from A's weights at iteration 0 with a fresh optimizer and data position."""
    common = _argv(trained / "B", "--train-iters", "2", "--load", str(trained / "ckpt"))
    rc, err = _check(common + ["--save", str(tmp_path / "ft")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "beyond one epoch of --data-path" in err and "pass --finetune" in err
    rc, err = _check(_argv("mock", "--train-iters", "4", "--vocab-size", "384", "--load", str(trained / "ckpt")), capsys)
    assert rc == 2 and "not --data-path mock" in err and "--finetune" in err, err
    rc, err = _check(common + ["--finetune", "--save", str(trained / "ckpt")], capsys)
    assert rc == 2 and "--finetune starts a new run at iteration 0, so --save must be another folder" in err, err
    (rc,) = run_distributed(_cli, 1, common + ["--finetune", "--save", str(tmp_path / "ft"), "--log-dir",
                                               str(tmp_path / "ft_logs")])
    assert rc == 0
    assert sorted(_losses(tmp_path / "ft_logs")) == [1, 2]  # iteration 0 + 2, not 3 + ...
    state = json.loads((tmp_path / "ft" / "iter_0000002" / "state.json").read_text())
    assert state["iteration"] == 2 and state["extra"]["data"]["train"] == {"epoch": 0, "samples_consumed": 8}


def test_second_job_on_a_locked_save_folder_gets_one_line(trained, tmp_path):
    from megatron_vlm.training.checkpointing import SaveLock

    save = tmp_path / "ckpt"
    lock = SaveLock(save)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "pretrain_vlm.py"),
                               *_argv("mock", "--train-iters", "1", "--save", str(save))],
                              cwd=ROOT, capture_output=True, text=True, timeout=180,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
    finally:
        lock.release()
    err = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert f"--save {save}: in use by another job (pid {os.getpid()} on " in err[0]
    assert "model: arch=" not in proc.stdout and not (save / "iter_0000001").exists()


# ------------------------------------------------------------------------------------------------
# convert_checkpoint.py: verify across families, and the flag sweep (one spawned process)
# ------------------------------------------------------------------------------------------------

def _convert_cases(llava: str, mllama: str, ckpt: str, out: str, under_file: str) -> list[dict]:
    """Run every case of the convert sweep in this process; return what each printed and did."""
    import io

    from megatron_vlm import runtime
    from megatron_vlm.conversion import cli

    imported = f"{out}/base_import"
    bases = {"import-hf": ["--hf-path", llava, "--save", f"{out}/imported"],
             "export-hf": ["--load", ckpt, "--hf-path", f"{out}/exported"],
             "upcycle": ["--load", ckpt, "--save", f"{out}/upcycled", "--arch", "moma"],
             "verify": ["--hf-path", llava, "--load", imported]}
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))

    def run(argv):
        buf, real = io.StringIO(), sys.stderr
        sys.stderr = buf
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            import traceback

            buf.write(traceback.format_exc())
            rc = "exception"
        finally:
            sys.stderr = real
            runtime.shutdown()
        return rc, buf.getvalue()

    def listing():
        return sorted(str(p) for p in Path(out).rglob("*"))

    results = []
    rc, err = run(["import-hf", "--hf-path", llava, "--save", imported])  # the verify base's checkpoint
    results.append({"case": "base import-hf", "rc": rc, "err": err, "wrote": []})
    # across families: our LLaVA-layout checkpoint against an Mllama folder
    rc, err = run(["verify", "--hf-path", mllama, "--load", ckpt])
    results.append({"case": "verify across families", "rc": rc, "err": err, "wrote": []})
    for command, parser in sub.choices.items():
        before = listing()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = max(action.option_strings, key=len)
            if action.nargs == 0:
                cases = [("wrong-typed", [f"{flag}=1"])]
            else:
                try:
                    (action.type or str)("abc")
                    typed = False
                except (ValueError, TypeError, argparse.ArgumentTypeError):
                    typed = True
                if typed:
                    cases = [("wrong-typed", [flag, "abc"]), ("out-of-range", [flag, "-1"])]
                else:
                    bad = "nope" if action.metavar and str(action.metavar).startswith("{") else under_file
                    cases = [("wrong-typed", [f"{flag}="]), ("out-of-range", [flag, bad])]
            for kind, extra in cases:
                rc, err = run([command, *bases[command], *extra])
                after = listing()
                results.append({"case": f"{command} {flag} {kind} {extra}", "rc": rc, "err": err,
                                "wrote": sorted(set(after) - set(before))})
    # each base command line is valid: every case above failed because of its one bad value
    bases_ok = {command: run([command, *argv])[0] for command, argv in bases.items() if command != "import-hf"}
    return results, bases_ok


def test_convert_checkpoint_flag_sweep_and_verify_across_families(trained, tmp_path):
    from megatron_vlm.conversion import tiny

    llava, mllama = tiny.save_llava(tmp_path / "llava"), tiny.save_mllama(tmp_path / "mllama")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "out").mkdir()
    ((results, bases_ok),) = run_distributed(_convert_cases, 1, str(llava), str(mllama), str(trained / "ckpt"),
                                             str(tmp_path / "out"), str(tmp_path / "afile" / "sub"), timeout=600)
    assert results[0]["rc"] == 0, results[0]  # import-hf base
    assert bases_ok == {"export-hf": 0, "upcycle": 0, "verify": 0}, bases_ok
    results = results[1:]
    first = results[0]
    assert first["rc"] == 2 and "holds MllamaForConditionalGeneration but --load" in first["err"], first
    assert "is a joint_decoder checkpoint" in first["err"]
    failures = []
    for r in results:
        lines = [ln for ln in r["err"].splitlines() if ln.strip()]
        if not (r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("convert_checkpoint.py")
                and "Traceback" not in r["err"] and not r["wrote"]):
            failures.append(f"{r['case']}: rc={r['rc']} wrote={r['wrote'][:3]} err={r['err'][-300:]!r}")
    assert len(results) > 60
    assert not failures, f"{len(failures)} of {len(results)}:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------------------
# prepare_data.py
# ------------------------------------------------------------------------------------------------

def _manifest(folder: Path, n: int, bad_line: bytes | None = None) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": f"red {i}"}).encode())
    if bad_line is not None:
        lines.insert(1, bad_line)
    (folder / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "manifest.jsonl"


def test_prepare_data_overwrite_keeps_old_shards_until_the_new_build_succeeded(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import prepare_data

    from megatron_vlm.data import shards

    manifest = _manifest(tmp_path / "raw", 6)
    out = tmp_path / "train"
    assert prepare_data.main(["--manifest", str(manifest), "--output", str(out), "--shard-size", "4"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a build that fails half-way (the 4th image raises): the old shards are untouched
    real = shards.jpeg_bytes
    calls = {"n": 0}

    def failing(path, quality=95):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk went away")
        return real(path, quality)

    monkeypatch.setattr(shards, "jpeg_bytes", failing)
    with pytest.raises(OSError):
        prepare_data.main(["--manifest", str(manifest), "--output", str(out), "--shard-size", "2", "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(shards, "jpeg_bytes", real)
    # a build where every image is bad: no samples, the old shards stay (exit 1, said so)
    for png in (tmp_path / "raw").glob("*.png"):
        png.write_bytes(b"not a png")
    assert prepare_data.main(["--manifest", str(manifest), "--output", str(out), "--overwrite"]) == 1
    assert "are unchanged" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a good rebuild replaces them (2 shards of 3 instead of 2 of 4 + 2)
    manifest = _manifest(tmp_path / "raw2", 6)
    assert prepare_data.main(["--manifest", str(manifest), "--output", str(out), "--shard-size", "3",
                              "--overwrite"]) == 0
    assert [s.num_samples for s in shards.list_shards(out)] == [3, 3] and not (out / ".staging").exists()


def test_non_utf8_manifest_line_is_skipped_and_reported(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import prepare_data

    manifest = _manifest(tmp_path / "raw", 3, bad_line=b'{"image": "0.png", "text": "caf\xe9"}')
    out = tmp_path / "train"
    assert prepare_data.main(["--manifest", str(manifest), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 3 and report["skipped_count"] == 1
    (row,) = report["skipped"]
    assert row["where"] == f"{manifest}:2" and row["reason"].startswith("not UTF-8 text (byte 0xe9")
    assert f"{manifest}:2" in capsys.readouterr().out


def test_cpu_reports_no_mfu():
    """The CPU has no known peak: no MFU (it read up to 160% against a measured GEMM rate)."""
    from megatron_vlm.config import Config
    from megatron_vlm.training import flops

    peak, source = flops.peak_tflops(Config())
    assert peak is None and "CPU" in source
    cfg = Config()
    cfg.training.peak_tflops = 100.0
    assert flops.peak_tflops(cfg) == (100.0, "--peak-tflops")
