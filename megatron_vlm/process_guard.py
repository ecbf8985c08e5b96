"""Helpers for child processes that must not outlive their parent (imports nothing heavy: spawned
helper processes import this module to run :func:`die_with_parent`)."""

from __future__ import annotations

import signal


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: deliver ``sig`` to this process when its parent dies (``PR_SET_PDEATHSIG``); a no-op
    elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
