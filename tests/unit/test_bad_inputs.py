"""Every flag of ``pretrain_vlm.py`` given a wrong-typed and an out-of-range value: exit 2, one
line on stderr, no traceback, nothing written. The flags come from the parser itself, so a new flag
is swept without editing this file. The sweep runs the CLI's own check path in-process
(``training.cli.check_command_line``, what ``run`` calls before starting the runtime); a few real
``pretrain_vlm.py`` processes show that the CLI prints the same line.

Also the one-line errors of issue 15 that need no training: malformed YAML, ranges (--min-lr,
--log-interval, --keep-last), everything frozen, unwritable --save/--log-dir, --help texts."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vlm.testing.cli import TINY_ARGV, check_in_process as _check_in_process
from megatron_vlm.training import cli

ROOT = Path(__file__).resolve().parents[2]
# flags whose generic out-of-range value (-1 / a path under a file / 'nope') is legal: none today;
# a new flag for which -1 is legal gets its out-of-range value here
OUT_OF_RANGE_OVERRIDES: dict[str, str] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny shard dataset (so --data-path/--tokenizer-path matter), a file, an output root."""
    from megatron_vlm.data import synthetic

    root = tmp_path_factory.mktemp("sweep")
    synthetic.prepare(root / "data", num_train=8, num_val=4, image_size=8, shard_size=4, vocab_size=300)
    (root / "afile").write_text("not a folder")
    (root / "out").mkdir()
    return root


def _base(world) -> list[str]:
    argv = list(TINY_ARGV)
    argv[argv.index("--data-path") + 1] = str(world / "data")
    return argv + ["--train-iters", "2", "--save", str(world / "out" / "ckpt"), "--log-dir", str(world / "out" / "logs")]


def _flag_cases(parser: argparse.ArgumentParser, under_file: str):
    """(flag, kind, extra argv) for every option of ``parser``: a wrong-typed and an out-of-range value."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch: giving it a value is the wrong type; it has no range
            yield flag, "wrong-typed", [f"{flag}=1"]
            continue
        conv = action.type or str
        try:
            conv("abc")
            typed = False
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            typed = True
        if typed:  # a number
            yield flag, "wrong-typed", [flag, "abc"]
            yield flag, "out-of-range", [flag, OUT_OF_RANGE_OVERRIDES.get(flag, "-1")]
        else:  # text: empty is the wrong type; out of range: not an allowed choice / an impossible path
            yield flag, "wrong-typed", [f"{flag}="]
            bad = "nope" if action.metavar and str(action.metavar).startswith("{") else under_file
            yield flag, "out-of-range", [flag, OUT_OF_RANGE_OVERRIDES.get(flag, bad)]


def _listing(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_every_pretrain_flag_has_help_and_choice_flags_show_their_choices():
    from megatron_vlm.config import flag_choices

    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings}: no --help text"
    shown = {max(a.option_strings, key=len): a.metavar for a in parser._actions if a.option_strings}
    assert {"cross_attention", "joint_decoder", "mmca", "moma", "mot"} <= set(flag_choices("arch"))
    for name in ("arch", "transformer_impl", "lr_decay_style", "fp8_format", "fp8_recipe", "recompute_granularity"):
        assert shown["--" + name.replace("_", "-")] == "{" + ",".join(flag_choices(name)) + "}"
    text = parser.format_help()
    assert "--finetune" in text and "--no-load-optim" in text and "--no-load-rng" in text


def test_bad_value_sweep_over_every_pretrain_flag(world, capsys, monkeypatch):
    monkeypatch.chdir(world / "out")
    base = _base(world)
    rc, err = _check_in_process(base, capsys)
    assert rc == 0, err  # the base command line is valid: each case fails because of its one bad value
    before = _listing(world)
    cases = list(_flag_cases(cli.build_parser(), str(world / "afile" / "sub")))
    flags = {c[0] for c in cases}
    assert {"--lr", "--keep-last", "--save", "--arch", "--bf16", "--set", "--finetune", "--no-load-optim"} <= flags
    failures = []
    for flag, kind, extra in cases:
        rc, err = _check_in_process(base + extra, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        ok = (rc == 2 and len(lines) == 1 and lines[0].startswith("pretrain_vlm.py: error:")
              and "Traceback" not in err and _listing(world) == before)
        if not ok:
            failures.append(f"{flag} {kind} {extra}: rc={rc} stderr={err[-300:]!r}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert len(cases) >= 2 * len(flags) - 20  # switches have one case, everything else two


@pytest.mark.parametrize("extra", [["--lr", "abc"], ["--keep-last", "-1"], ["--bf16=1"]])
def test_the_real_cli_prints_what_the_in_process_check_prints(world, extra, capsys):
    """The sweep's in-process path is the CLI's: same exit code, same single stderr line."""
    base = _base(world)
    expected = _check_in_process(base + extra, capsys)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_vlm.py"), *base, *extra], cwd=world / "out",
                          capture_output=True, text=True, timeout=120, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert (proc.returncode, lines) == (expected[0], expected[1].splitlines()), proc.stderr[-1000:]
    assert not (world / "out" / "ckpt").exists() and not (world / "out" / "logs").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--min-lr", "0.5"], "training.min_lr=0.5: must be a number in [0, training.lr=0.001]"),
    (["--min-lr", "-0.1"], "training.min_lr=-0.1"),
    (["--log-interval", "0"], "training.log_interval=0: must be a positive integer"),
    (["--keep-last", "-1"], "training.keep_last=-1: must be an integer >= 1 (checkpoints kept), or 0 = keep all"),
    (["--freeze-vision", "--freeze-projector", "--freeze-language"], "nothing would train"),
    (["--finetune"], "--finetune): needs --load"),
])
def test_range_errors_are_one_line(world, capsys, extra, expected):
    rc, err = _check_in_process(_base(world) + extra, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_keep_last_zero_keeps_all_and_is_accepted(world, capsys):
    rc, err = _check_in_process(_base(world) + ["--keep-last", "0"], capsys)
    assert rc == 0, err


def test_malformed_yaml_names_file_and_line(world, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: joint_decoder\n  language: {num_layers: 2\ntraining:\n  lr: 1\n")
    rc, err = _check_in_process(_base(world) + ["--config", str(bad)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--config {bad}:4: invalid YAML" in err


def test_save_and_log_dir_that_cannot_be_written_fail_before_building(world, capsys, monkeypatch, tmp_path):
    afile = world / "afile"
    for flag in ("--save", "--log-dir"):
        rc, err = _check_in_process(_base(world) + [flag, str(afile)], capsys)
        assert rc == 2 and f"{flag} {afile}: exists and is not a folder" in err, err
        rc, err = _check_in_process(_base(world) + [flag, str(afile / "x")], capsys)
        assert rc == 2 and f"{afile} is a file" in err, err
    locked = tmp_path / "ro"
    locked.mkdir()
    real_access = os.access
    # root may write anywhere, so the permission bit is simulated for this one folder
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    rc, err = _check_in_process(_base(world) + ["--save", str(locked / "ckpt")], capsys)
    assert rc == 2 and f"--save {locked / 'ckpt'}: {locked} is not writable by this user" in err, err
    assert not (locked / "ckpt").exists()


def test_single_process_port_is_a_free_one(monkeypatch):
    """Two single-process runs side by side: each asks the OS for a free port (was: fixed 29500)."""
    import socket

    from megatron_vlm.runtime.launcher_env import LaunchEnv, agreed_port, export_torch_env

    with socket.socket() as busy:
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # already taken by something else: the point stands
        launch = LaunchEnv("none", 0, 1, 0, 1)
        ports = {agreed_port(launch, {}) for _ in range(3)}
        assert 29500 not in ports
        env = export_torch_env(launch, {})
        assert env["MASTER_PORT"] != "29500"
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(env["MASTER_PORT"])))  # really free
