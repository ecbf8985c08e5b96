"""Command-line parsing that reports a bad flag as ONE line (``PROG: error: ...``, exit code 2)
instead of argparse's usage block, and argparse types for ranged numbers."""

from __future__ import annotations

import argparse
import math


class OneLineArgumentParser(argparse.ArgumentParser):
    """``error`` prints one line naming the flag, the value and what is allowed; subparsers made by
    ``add_subparsers`` inherit the behaviour."""

    def error(self, message: str):
        message = " ".join(message.split())  # argparse sometimes wraps lines
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(lo: int):
    """argparse type: an integer >= ``lo``."""

    def conv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value}: must be an integer >= {lo}")
        return value

    conv.__name__ = f"int>={lo}"
    return conv


def float_at_least(lo: float, strict: bool = False):
    """argparse type: a finite number >= ``lo`` (> ``lo`` when ``strict``)."""

    def conv(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        if not math.isfinite(value) or (value <= lo if strict else value < lo):
            raise argparse.ArgumentTypeError(f"{text}: must be a number {'>' if strict else '>='} {lo}")
        return value

    conv.__name__ = f"float>{'' if strict else '='}{lo}"
    return conv


def check_output_folder(flag: str, value: str | None) -> None:
    """``value`` is a folder or can be created as one by this user (checked without writing);
    ValueError (one line) otherwise."""
    import os
    from pathlib import Path

    if not value:
        return
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {value}: exists and is not a folder")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {value}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {value}: {probe} is not writable by this user")
