"""Deadlines for release code that runs in the live process (finish, rollback).

Release code runs in the live process only after the commit decision, behind
the drain barrier, so a statement that never returns would hold every guarded
request for ever.  Python threads cannot be killed, but a pure-Python loop can
be interrupted: :func:`interrupt_after` has the process's watchdog thread
raise :class:`Overrun` in the running thread (``PyThreadState_SetAsyncExc``)
when the deadline passes.  Code blocked inside a C call (a lock acquired
without timeout) only sees it when the call returns; :class:`Worker` covers
that case for the parts that need no access to the switching thread (state
migrations): the call runs on a worker thread and the caller walks away from
it at the deadline.

Both threads are started *before* the drain hold (starting a thread costs
milliseconds on a busy host, handing work to a waiting one ~20 µs), and again
in a forked child, where no thread but the forking one survives.

``Overrun`` derives from ``BaseException`` so that release code's own
``except Exception`` cannot swallow it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = [ctypes.c_ulong, ctypes.py_object]
_set_async_exc.restype = ctypes.c_int


_POLL_S = 0.05


class Overrun(BaseException):
    """Release code ran past its deadline (raised asynchronously in its thread)."""


class Abandoned(Exception):
    """:meth:`Worker.run` gave up waiting on the step ``label``; it may still be running."""

    def __init__(self, label: object) -> None:
        super().__init__(f"step {label!r} overran its deadline")
        self.label = label


class Outcome(NamedTuple):
    """What one call handed to a :class:`Worker` did: returned ``value`` or raised it.

    A tuple: one is made per migration inside the hold, where a frozen
    dataclass's ``__init__`` costs several times as much.
    """

    ok: bool
    value: Any


def _inject(ident: int, exc: type[BaseException] | None) -> None:
    # None clears an exception that was set but not delivered yet
    _set_async_exc(ident, ctypes.py_object(exc) if exc is not None else ctypes.py_object())


@dataclass
class _Arm:
    deadline: float
    ident: int
    fired: bool = False


@dataclass
class _Watchdog:
    """One thread per process: raises :class:`Overrun` in threads past their deadline."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    armed: dict[int, _Arm] = field(default_factory=dict)
    tokens: Iterator[int] = field(default_factory=itertools.count)
    thread: threading.Thread | None = None
    pid: int = 0

    def start(self) -> None:
        """Make sure the thread runs in this process (call it outside any hold)."""
        with self.cond:
            if self.thread is not None and self.pid == os.getpid() and self.thread.is_alive():
                return
            self.pid = os.getpid()
            self.armed.clear()
            self.thread = threading.Thread(target=self._run, name="hotfleet-watchdog", daemon=True)
            self.thread.start()

    def arm(self, seconds: float, ident: int | None = None) -> int:
        self.start()
        with self.cond:
            token = next(self.tokens)
            self.armed[token] = _Arm(time.monotonic() + seconds, ident or threading.get_ident())
            self.cond.notify()
            return token

    def reset(self, token: int, seconds: float) -> None:
        """Move an armed deadline to ``seconds`` from now, without waking anybody.

        No lock (this runs at every step inside a hold): one attribute store
        is atomic, and the watchdog reads the deadline at its next look; a
        deadline that already fired stays fired, as with the lock.
        """
        arm = self.armed.get(token)
        if arm is not None:
            arm.deadline = time.monotonic() + seconds

    def disarm(self, token: int) -> None:
        with self.cond:
            arm = self.armed.pop(token, None)
            if arm is not None and arm.fired:
                _inject(arm.ident, None)  # not delivered yet: it must not land elsewhere

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                waiting = [a for a in self.armed.values() if not a.fired]
                for arm in waiting:
                    if arm.deadline <= now:
                        arm.fired = True
                        _inject(arm.ident, Overrun)
                pending = [a.deadline for a in waiting if not a.fired]
                # while armed, look again at least every _POLL_S: a reset() moves a
                # deadline without a notify (no wake-up inside a hold)
                self.cond.wait(min(min(pending) - now, _POLL_S) if pending else None)


_WATCHDOG = _Watchdog()


def _after_fork_in_child() -> None:
    # The forking thread is alone in the child: the watchdog's lock may have been
    # held by the parent's watchdog thread at the instant of the fork.
    _WATCHDOG.cond = threading.Condition()
    _WATCHDOG.armed = {}
    _WATCHDOG.thread = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def start_watchdog() -> None:
    """Start the watchdog thread now, so that no hold ever pays for starting it."""
    _WATCHDOG.start()


def arm(seconds: float) -> int:
    """Have :class:`Overrun` raised in this thread after ``seconds``, until :func:`disarm`.

    Arming wakes the watchdog thread: do it before a hold, not inside it;
    disarming wakes nobody (and is idempotent).
    """
    return _WATCHDOG.arm(seconds)


def reset(token: int, seconds: float) -> None:
    """The armed deadline is now ``seconds`` away (honoured within 50 ms; wakes nobody)."""
    _WATCHDOG.reset(token, seconds)


def disarm(token: int) -> None:
    _WATCHDOG.disarm(token)


@contextlib.contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """Raise :class:`Overrun` in this thread if the block is still running after ``seconds``.

    The watchdog and the block's exit are serialized by a lock, and an
    overrun set just as the block ends is cleared before it can land in
    unrelated code.
    """
    token = _WATCHDOG.arm(seconds)
    try:
        yield
    finally:
        _WATCHDOG.disarm(token)


class Progress:
    """Which step a call handed to a :class:`Worker` is in, since when, for how long.

    Written by the worker thread at each step (a few stores under an
    uncontended lock: no wake-up), read by the caller when its wait times
    out.  Once the caller has walked away (``abandoned``) the call cannot
    begin another step: :meth:`step` raises :class:`Overrun`, so a call that
    comes back late from a blocking C call stops at its next step instead
    of carrying on behind the caller's back.
    """

    def __init__(self) -> None:
        self.index = 0
        self.since = time.monotonic()
        self.limit = math.inf
        self.label: object = None
        self.abandoned = False
        self.token: int | None = None  # the worker's armed deadline, moved at each step
        self._lock = threading.Lock()

    def step(self, seconds: float, label: object = None) -> None:
        """A new step begins now and may take ``seconds``; raises Overrun once abandoned.

        With a ``token`` armed on the worker thread, the watchdog's deadline
        moves too, so a pure-Python loop is interrupted in the worker itself.
        """
        with self._lock:
            if self.abandoned:
                raise Overrun()
            self.index += 1
            self.since, self.limit, self.label = time.monotonic(), seconds, label
        if self.token is not None:
            reset(self.token, seconds)

    def checkpoint(self) -> None:
        """Raise Overrun if the caller walked away (before anything the caller would undo)."""
        if self.abandoned:
            raise Overrun()

    def overdue(self, grace: float) -> bool:
        """Walk away (True) if the current step is ``grace`` past its deadline.

        Atomic with :meth:`step`: a call either began its next step in time
        or can begin no other.
        """
        with self._lock:
            if time.monotonic() <= self.since + self.limit + grace:
                return False
            self.abandoned = True
            return True

    def run_steps(
        self, calls: Sequence[Callable[[], Any]], seconds: float, labels: Sequence[object]
    ) -> list[Outcome]:
        """On the worker: each call a step of ``seconds``; an Overrun names its label."""
        out: list[Outcome] = []
        for call, label in zip(calls, labels, strict=True):
            self.step(seconds, label)
            try:
                out.append(Outcome(True, call()))
            except Overrun:
                raise Abandoned(label) from None
            except Exception as exc:
                out.append(Outcome(False, exc))
        self.step(math.inf)  # none is left behind: the results may be used
        return out


class Worker:
    """A waiting thread that runs calls for a caller who may walk away at a deadline.

    After an abandoned call the worker is *stuck* (its thread may never come
    back): its owner replaces it (see :meth:`healthy`).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.stuck = False
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    @property
    def healthy(self) -> bool:
        return not self.stuck and self.pid == os.getpid() and self.thread.is_alive()

    def run(self, call: Callable[[Progress], T], grace: float = 0.0) -> T:
        """``call(progress)`` on the worker, in the caller's context; its value or exception.

        One hand-over and one wake-up back (each costs a thread wake-up,
        ~50-120 µs on a VM), nothing in between: the caller sleeps until the
        call ends or its current step's deadline (plus ``grace``) passes.  A
        step past its deadline is abandoned: :class:`Abandoned` names its
        label, the call is asked to stop (an :class:`Overrun` raised in it,
        which ends a pure-Python loop) and whatever it does later is ignored.
        """
        progress = Progress()
        out: list[Outcome] = []
        done = threading.Lock()
        done.acquire()
        context = contextvars.copy_context()

        def job() -> None:
            try:
                out.append(Outcome(True, context.run(call, progress)))
            except BaseException as exc:  # handed to the caller
                out.append(Outcome(False, exc))
            finally:
                done.release()

        self._jobs.put(job)
        # Polled, not notified: a step that begins must not wake the caller inside a
        # hold.  A wake-up every 50 ms costs nothing there: the woken caller waits
        # for the GIL, which the worker keeps until the hold ends or blocks.
        while not done.acquire(timeout=_POLL_S):
            if progress.overdue(grace):
                self.stuck = True
                if self.thread.ident is not None:
                    _inject(self.thread.ident, Overrun)
                raise Abandoned(progress.label)
        outcome = out[0]
        if outcome.ok:
            return outcome.value
        raise outcome.value

    def run_all(
        self,
        calls: Sequence[Callable[[], Any]],
        seconds: float,
        labels: Sequence[object] | None = None,
    ) -> list[Outcome]:
        """Each call on the worker, in order, each within ``seconds`` of its own start.

        Raises :class:`Abandoned` naming the label (by default the index) of
        the call that overran.
        """
        named = range(len(calls)) if labels is None else labels
        return self.run(lambda progress: progress.run_steps(calls, seconds, named))

    def close(self) -> None:
        """Let a healthy worker's thread end (a stuck one ends when its call does)."""
        self.stuck = True
        self._jobs.put(lambda: None)

    def _run(self) -> None:
        with contextlib.suppress(Overrun):  # one that lands after its call returned
            while not self.stuck:  # abandoned: its thread ends once the call comes back
                job = self._jobs.get()
                if self.stuck:
                    return
                job()
