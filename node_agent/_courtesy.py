"""Prepare shares the interpreter with requests: it hands the GIL back often.

A prepare runs on one of the agent's threads inside a process that is
serving: parsing, compiling and planning are pure Python, and CPython lets a
running thread keep the GIL for the whole switch interval (5 ms) before a
waiting one gets it.  A request that needs the GIL a few times (accept,
read, the app, write) then waits up to 5 ms each time, so a request that
arrives at a preparing gunicorn worker can take about as long as the
prepare itself.  For the prepare's few milliseconds the interval is lowered
so that waiting request threads get the GIL within ~0.5 ms; the prepare
pays a few extra switches.

The interval is process-wide: it is restored on the way out, unless
something else changed it meanwhile (then that value stands).  Nested or
concurrent uses keep the lowest interval until the last one leaves.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["PREPARE_SWITCH_INTERVAL_S", "in_background", "yielding_gil"]

PREPARE_SWITCH_INTERVAL_S = 0.0005

_lock = threading.Lock()
_users = 0
_saved = 0.0
_ours = 0.0


@contextlib.contextmanager
def yielding_gil(interval: float = PREPARE_SWITCH_INTERVAL_S) -> Iterator[None]:
    """Within the block, a thread waiting for the GIL gets it after ``interval`` at most."""
    global _users, _saved, _ours
    with _lock:
        if _users == 0:
            _saved = sys.getswitchinterval()
            _ours = min(_saved, interval)
            sys.setswitchinterval(_ours)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            # someone else set it meanwhile: theirs stands
            if _users == 0 and sys.getswitchinterval() == _ours:
                sys.setswitchinterval(_saved)


def in_background(fn: Callable[[], T], nice: int, name: str) -> T:
    """``fn()`` on a thread of its own at ``nice`` more niceness (Linux: per thread),
    joined: work that may wait for the CPU a serving thread wants.

    A thread of its own because an unprivileged thread cannot take its
    niceness back: the caller's (a gRPC pool thread) must keep its own.
    What ``fn`` raises is raised here.
    """
    out: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        if nice > 0:
            with contextlib.suppress(OSError, AttributeError):
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        try:
            with yielding_gil():
                out.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return out[0]
