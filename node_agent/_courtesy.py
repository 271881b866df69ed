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
import sys
import threading
from collections.abc import Iterator

__all__ = ["PREPARE_SWITCH_INTERVAL_S", "yielding_gil"]

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
