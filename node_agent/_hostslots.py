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
mid-prepare never blocks its siblings).

Waiting does not poll.  A waiter sleeps on the host's *bell*, a FIFO beside
the slot files, and a worker that gives its slot back rings it (one byte);
every waiter wakes and tries the slots again.  Each waiter looking every
5 ms woke 200 times a second (ten thousand Python wake-ups a second with 49
siblings waiting, taken from the one that prepares) and a turn given back
waited 0.24-1.19 ms on average for its next holder (3 to 50 waiting
processes, measured); rung, 0.19-0.72 ms.  The bell is a hint, never the truth: the
``flock`` decides who holds a slot, a byte nobody needed costs one spurious
wake-up, and a holder killed before it rang (the kernel freed its slot
silently) is found by the waiters' slow fallback look (:data:`_FALLBACK_S`).
A cancel (Abort, agent stop) rings the bell too (:meth:`PrepareSlots.ring`),
so a waiter leaves at once.  Where a FIFO cannot be made, waiting polls.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PrepareSlots", "SlotWaitCancelled", "SlotWaitTimeout", "default_slot_count"]

_POLL_S = 0.005  # without a bell
_FALLBACK_S = 0.1  # with one: how soon a slot freed by a killed holder is seen


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
        self._bell = self.directory / f"{tag}.prepare.bell"

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
            self.ring()

    def ring(self) -> None:
        """Wake every sibling waiting for a slot of this host (a slot came free, or a
        cancel came: each waiter looks again).  Nobody waiting: one failed ``open``."""
        try:
            fd = os.open(self._bell, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # ENXIO: no waiter has it open; ENOENT: never made
            return
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):  # never a byte into what is not the bell
                os.write(fd, b"\x01")
        except OSError:  # EAGAIN: its buffer is full of rings nobody needed; they wake anyway
            pass
        finally:
            os.close(fd)

    def _try(self) -> int | None:
        for path in self._paths:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            return fd
        return None

    def _take(self, deadline: float, cancel: threading.Event | None) -> int:
        bell: int | None = None
        poller = select.poll()  # poll, not select: a busy worker's fds may be numbered past 1024
        try:
            while True:
                fd = self._try()
                if fd is not None:
                    return fd
                if cancel is not None and cancel.is_set():
                    raise SlotWaitCancelled
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise SlotWaitTimeout
                if bell is None:
                    # listen first, then look again: a slot given back between our
                    # look and the open rang for nobody
                    bell = self._listen()
                    if bell >= 0:
                        poller.register(bell, select.POLLIN)
                    continue
                if bell < 0:
                    if cancel is not None:
                        cancel.wait(min(_POLL_S, left))
                    else:
                        time.sleep(min(_POLL_S, left))
                    continue
                if poller.poll(min(_FALLBACK_S, left) * 1000):
                    with contextlib.suppress(BlockingIOError):
                        os.read(bell, 4096)  # the rings so far: each waiter looks again anyway
        finally:
            if bell is not None and bell >= 0:
                os.close(bell)

    def _listen(self) -> int:
        """The bell, open to hear it (-1 where no FIFO can be made: then waiting polls).

        Opened read-write: a FIFO nobody writes to would read as end-of-file,
        and a poll on it would never sleep.
        """
        try:
            os.mkfifo(self._bell, 0o600)
        except FileExistsError:
            pass
        except OSError:
            return -1
        try:
            fd = os.open(self._bell, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return -1
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # something else has the name
            os.close(fd)
            return -1
        return fd
