"""The staging process: where a release's code runs before the decision.

Prepare must change nothing in the live process, yet some refusals can only
be found by running the release (a new module whose body raises, a changed
statement, a class body, a default value, a state migration).  So prepare
forks: the child is an exact copy of the node at that instant (same
interpreter, same code paths, the current release and every registered
object's state), performs the switch and the migrations there, reports what
went wrong through a pipe and exits; its effects die with it.

Why a fork and not a warm spawned worker: only a fork mirrors the node's
state (registries, module globals, the stateful objects ``code_change``
migrates) without importing the application a second time, and it costs one
``fork()`` (copy-on-write) instead of a resident process per agent.  The
child never touches the parent's threads' resources: it runs the switch,
writes one JSON document and leaves with ``os._exit``; it is killed at the
deadline, when the prepare is cancelled (Abort, agent stop) and when the
parent dies (``PR_SET_PDEATHSIG`` on Linux).

Limits (documented in the README): a lock another thread of the node held at
the instant of the fork is held for ever in the child; the child replaces the
locks it finds in registered objects' state with fresh ones, and anything else
that waits on such a lock ends as ``timeout``.  File descriptors are shared
with the parent, so the child replaces sockets and files in migrated state
with stand-ins and says so in the vote.  Side effects outside the process
(a file written, a request sent by a module body) happen in the child too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import marshal
import os
import resource
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node_agent._cow import forked, settled

# Forking a threaded process is what this module is for; the child only runs
# the switch and exits (see the module docstring).
warnings.filterwarnings(
    "ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning
)

# The child reports through references taken now: the release it runs may
# monkeypatch json, os or anything else it likes (its effects die with it).
_dumps, _write, _close, _exit = marshal.dumps, os.write, os.close, os._exit
_getrusage, _RUSAGE_SELF = resource.getrusage, resource.RUSAGE_SELF
_clock = time.perf_counter  # CLOCK_MONOTONIC: the parent and the child read the same clock

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05  # how often a waiting parent looks at its cancel event
_MAX_REPORT = 1 << 20


@dataclass
class Outcome:
    """What the child reported (or what became of it)."""

    errors: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the child's user + system CPU
    # where the wall time went, from the parent's fork() on (a completed report only):
    # ``fork`` the parent's fork() call, ``child_start`` until the child began the work
    # (its start after the fork, the parent-death signal, the signals, the niceness),
    # ``work`` the switch and the migrations, ``report`` until the parent had the report
    phases: dict[str, float] = field(default_factory=dict)
    timed_out: bool = False
    cancelled: bool = False
    died: str = ""  # how the child ended when it sent no report


class Cancelled(Exception):
    """A prepare was cancelled while its staging process ran."""


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, resolved in the parent once per process.

    ``ctypes.util.find_library`` reads the linker cache through a
    subprocess or a file scan: ~4 ms of CPU that every staging child paid
    before it ran a line of the release (measured, a gunicorn worker on
    2 cores), and on a host preparing 8 workers at once that is 8 x 4 ms
    taken from the workers still serving requests.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    try:
        return ctypes.CDLL(libc_name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl: Callable[..., int] | None) -> None:
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child(
    write_fd: int,
    work: Callable[[], tuple[list[dict[str, str]], list[str]]],
    prctl: Callable[..., int] | None,
    nice: int,
) -> None:
    status = 0
    try:
        _die_with_parent(prctl)
        if nice:
            with contextlib.suppress(OSError):
                os.nice(nice)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()  # short-lived: no collections, and fewer copy-on-write faults
        working = _clock()
        try:
            errors, notes = work()
            report = {"errors": errors, "warnings": notes, "times": (working, _clock())}
        except BaseException as exc:  # reported to the parent, never raised in the child
            report = {
                "errors": [
                    {
                        "module": "*",
                        "reason": "import_error",
                        "detail": f"staging process: {type(exc).__name__}: {exc}"[:4096],
                    }
                ]
            }
        usage = _getrusage(_RUSAGE_SELF)
        report["cpu_s"] = usage.ru_utime + usage.ru_stime
        view = memoryview(_dumps(report))
        while view:
            view = view[_write(write_fd, view) :]
        # the report is complete: the parent need not wait for this process to
        # unmap its copy of the heap (it reaps it on a thread of its own)
        _close(write_fd)
    except BaseException:
        status = 70
    finally:
        _exit(status)


def rehearse(
    work: Callable[[], tuple[list[dict[str, str]], list[str]]],
    timeout: float,
    cancel: threading.Event | None = None,
    nice: int = 0,
) -> Outcome:
    """Run ``work`` in a forked copy of this process; its effects never reach this one.

    ``work`` returns ``(errors, warnings)``: errors as ``{"module", "reason",
    "detail"}`` dicts.  The child is killed at ``timeout`` (``timed_out``) or
    when ``cancel`` is set (``cancelled``).  ``nice`` is added to the child's
    niceness: it rehearses beside processes that are serving requests.
    """
    prctl = _prctl()
    settled()  # a take-back still running would copy every page it takes while the child lives
    read_fd, write_fd = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        os.close(read_fd)
        _child(write_fd, work, prctl, nice)
    forked_at = time.perf_counter()
    os.close(write_fd)
    out = Outcome()
    chunks: list[bytes] = []
    deadline = started + timeout
    poller = select.poll()
    poller.register(read_fd, select.POLLIN | select.POLLHUP)
    report: Any = None
    try:
        while True:
            if cancel is not None and cancel.is_set():
                out.cancelled = True
                break
            left = deadline - time.perf_counter()
            if left <= 0:
                out.timed_out = True
                break
            # poll, not select: a busy worker's descriptors may be numbered past 1024
            if poller.poll(min(left, _POLL_S) * 1000):
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break  # the child closed the pipe: its report is complete
                chunks.append(chunk)
                if sum(map(len, chunks)) > _MAX_REPORT:
                    out.died = "sent a report over 1 MiB"
                    break
        if not (out.timed_out or out.cancelled or out.died):
            try:
                report = marshal.loads(b"".join(chunks)) if chunks else None
            except (ValueError, EOFError, TypeError):
                report = None
    finally:
        os.close(read_fd)
        if out.timed_out or out.cancelled or out.died:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if isinstance(report, dict):
            # The report is all the child had to give: killed now, so that its
            # reaping (on the take-back thread, which the next hold waits for) is
            # bounded even for a child stopped or stuck on its way out.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            forked(exiting=pid)  # reaped, then our pages taken back, off the vote's path
        else:  # how it ended is the refusal's detail: waited for here
            _, status, usage = os.wait4(pid, 0)
            out.cpu_s = usage.ru_utime + usage.ru_stime
            forked()  # the child is gone: our pages are ours alone again (node_agent._cow)
    out.wall_s = time.perf_counter() - started
    if out.timed_out or out.cancelled or out.died:
        return out
    if not isinstance(report, dict):
        if os.WIFSIGNALED(status):
            out.died = f"killed by signal {os.WTERMSIG(status)}"
        else:
            out.died = f"exited with status {os.waitstatus_to_exitcode(status)} and no report"
        return out
    cpu = report.get("cpu_s")
    out.cpu_s = float(cpu) if isinstance(cpu, float | int) else 0.0
    out.phases = _phases(report.get("times"), started, forked_at, out.wall_s)
    out.errors = [e for e in report.get("errors") or [] if isinstance(e, dict)]
    out.warnings = [str(w) for w in report.get("warnings") or []]
    return out


def _phases(times: Any, started: float, forked_at: float, wall_s: float) -> dict[str, float]:
    """:attr:`Outcome.phases` from the child's two instants (empty if it sent none)."""
    if not (isinstance(times, tuple) and len(times) == 2):
        return {}
    working, done = (float(t) for t in times)
    return {
        "fork": forked_at - started,
        "child_start": working - forked_at,
        "work": done - working,
        "report": started + wall_s - done,
    }
