"""How many sibling workers of one host may prepare at the same time.

A deploy asks every worker of a host to prepare at the same instant: 8
gunicorn workers on 4 cores parse, plan and fork their staging processes
together, and for those tens of milliseconds the host has no CPU left for
the requests its workers are still serving (measured on 2 cores, 3 sync
workers: requests 5-8x slower than before the change while all three
prepared, ``benchmarks/RESULTS.md``, reload-vs-restart).  Prepare is
background work; serving is not.  So the workers of one host take turns:
at most ``slots`` prepare at once, the rest wait for a slot — and find the
host code cache (:mod:`node_agent._codecache`) filled by the ones before
them, so waiting costs less than it seems.

A slot is an ``flock`` on one of ``slots`` files in a directory the host's
workers share: the kernel frees it when its holder dies (a worker killed
mid-prepare never blocks its siblings).  The wait polls (a few ms) so it can
honour the prepare's deadline and its cancellation (Abort, agent stop).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PrepareSlots", "SlotWaitCancelled", "SlotWaitTimeout", "default_slot_count"]

_POLL_S = 0.005


class SlotWaitTimeout(Exception):
    """No slot came free before the prepare's deadline."""


class SlotWaitCancelled(Exception):
    """The prepare was cancelled while it waited for a slot."""


def default_slot_count() -> int:
    """Half the cores this process may run on, at least one: the rest keep serving."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


class PrepareSlots:
    """``slots`` turns to prepare, shared by every process that names the same ``directory``."""

    def __init__(
        self, directory: str | os.PathLike[str], slots: int, scope: str = "prepare"
    ) -> None:
        if slots < 1:
            raise ValueError(f"prepare slots must be at least 1, got {slots}")
        self.directory = Path(directory)
        self.slots = slots
        tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in scope)[:80]
        self._paths = [self.directory / f"{tag}.prepare.{i}.lock" for i in range(slots)]

    def __repr__(self) -> str:
        return f"PrepareSlots({str(self.directory)!r}, {self.slots})"

    @contextlib.contextmanager
    def turn(self, deadline: float, cancel: threading.Event | None = None) -> Iterator[float]:
        """Hold a slot for the block; yields the seconds waited for it.

        ``deadline`` is a ``time.perf_counter()`` instant: past it the wait
        raises :class:`SlotWaitTimeout`; ``cancel`` set raises
        :class:`SlotWaitCancelled`.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        started = time.perf_counter()
        fd = self._take(deadline, cancel)
        try:
            yield time.perf_counter() - started
        finally:
            os.close(fd)  # closing the descriptor drops its flock

    def _take(self, deadline: float, cancel: threading.Event | None) -> int:
        while True:
            for path in self._paths:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                return fd
            if cancel is not None and cancel.is_set():
                raise SlotWaitCancelled
            left = deadline - time.perf_counter()
            if left <= 0:
                raise SlotWaitTimeout
            if cancel is not None:
                cancel.wait(min(_POLL_S, left))
            else:
                time.sleep(min(_POLL_S, left))
