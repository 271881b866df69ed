"""SIGTERM/SIGINT for long-running daemons: noticed for sure, and a stop that cannot hang.

Why not ``signal.signal(SIGTERM, lambda *_: event.set())`` and ``event.wait()``,
the usual idiom (and what the daemons did until CI caught a coordinator that
ignored SIGTERM for 20 s):

* A Python signal handler runs on the main thread between two bytecodes, which
  may be while that very thread holds the Event's internal lock inside
  ``wait()``; ``set()`` from the handler then waits for a lock its own thread
  holds, for ever.
* The kernel may hand a process-directed signal to any thread that does not
  block it (gRPC and etcd threads included); the C-level handler then only
  flags it, and a main thread blocked in a lock wait is never woken to run the
  Python handler.

:class:`StopSignals` takes no lock in its handler (it appends to a list, atomic
under the GIL) and the main thread sleeps in bounded slices, so a signal is
acted on within :data:`POLL_S` wherever it lands.

:func:`bound_stop` is the other half: once a daemon starts stopping, it must be
gone within a budget.  A supervisor (systemd, Kubernetes, our own tests) waits
a while and then SIGKILLs, losing the evidence; here a stop that overruns
writes every thread's stack to stderr (the daemon's log) and exits with status
1, so the hang is seen and diagnosable instead of silent.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
import time
from collections.abc import Iterable

__all__ = ["POLL_S", "StopSignals", "bound_stop"]

#: Longest time between a signal's arrival and the main thread acting on it.
POLL_S = 0.2


class StopSignals:
    """Installs handlers for ``signals`` that only record which one arrived.

    Must be created on the main thread (``signal.signal`` requires it).
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._received: list[int] = []
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self._received.append(signum)  # no lock: see the module docstring

    @property
    def received(self) -> signal.Signals | None:
        """The first stop signal received, or ``None``."""
        return signal.Signals(self._received[0]) if self._received else None

    def wait(self, timeout: float | None = None, *, until: threading.Event | None = None) -> bool:
        """Sleep until a stop signal arrives or ``until`` is set (True), or ``timeout`` passes
        (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._received and not (until is not None and until.is_set()):
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True


def bound_stop(budget_s: float, what: str) -> None:
    """From now on, the process has ``budget_s`` to exit; past that, it dumps every thread's
    stack to stderr and exits with status 1.

    Arm it when stopping begins and never disarm it: interpreter shutdown (joining
    worker threads, atexit hooks) is part of the stop, and where hangs hide.
    """
    print(
        f"{what}: stopping; if not stopped within {budget_s:g}s, every thread's stack "
        "is written below and the process exits with status 1",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback_later(budget_s, exit=True, file=sys.stderr)
