"""After the staging fork: take this process's own pages back before the hold.

A ``fork()`` makes every page of the parent copy-on-write.  Once the staging
child has exited the pages belong to the parent alone again, but the kernel
still maps them read-only: the parent's first write to each costs a page
fault (~2-3 µs in a VM).  The finish hold writes a few dozen such pages
(class bodies, the new code objects' first run, allocations), and every
serving thread pays the same faults on whatever it writes next.

:func:`take_back` asks the kernel (``madvise(MADV_POPULATE_WRITE)``, Linux
5.14+) to make writable, without writing them, the pages this process alone
maps; one such call costs less per page than the fault it replaces (measured
~1.7 against ~3 µs) and runs with the GIL released.  Pages shared with
another process (a gunicorn master's heap, inherited by its workers) are left
shared: taking those would copy them and undo the master's memory sharing.
Nothing is read or written through the pages themselves.  Elsewhere (not
Linux, an older kernel, no ``/proc/self/pagemap``) it does nothing.

When: as soon as the staging child is reaped (:func:`forked`), on a thread
of its own, so the vote does not wait for it; a hold that begins before it
ended waits for it before its gate closes (:func:`before_hold`, from
:mod:`node_agent._hold`), and so does the next fork (:func:`settled`).  Not
inside the finish: after a commit instant, many workers of a packed host
taking their pages back at once delayed the switch (commit skew at N=50 on 2
cores: 104 -> 168 ms p50).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = 23
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# the high byte of a pagemap entry: present (bit 63), file-page or shared-anon
# (61), exclusively mapped (56); ours = present, anonymous, mapped here only
_FLAGS = bytes((1 if b & 0xA1 == 0x81 else 0) for b in range(256))
_OURS = re.compile(b"\x01+")
_CHUNK_PAGES = 1 << 16  # pagemap read 512 KiB at a time


@dataclass(frozen=True)
class TakenBack:
    """What :func:`take_back` did: pages made writable, and its cost."""

    pages: int
    seconds: float
    failed: bool = False  # the kernel refused (then it is not tried again)


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not os.path.exists("/proc/self/pagemap"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_refused = False
_forked = False
_one_at_a_time = threading.Lock()
_thread: threading.Thread | None = None
TOTAL = {"pages": 0, "seconds": 0.0}  # every take-back of this process (benchmarks read it)


def forked(exiting: int | None = None) -> None:
    """A staging child is done: take our pages back now, on a thread of its own.

    ``exiting``: the pid of a child that sent its report and is still
    tearing its copy of the address space down (tens of milliseconds for a
    large heap): the thread reaps it first, since taking pages back while it
    still maps them would copy them.  The vote waits for neither; the next
    hold and the next fork wait for both (:func:`settled`).
    """
    global _forked, _thread
    _forked = True
    if exiting is None and (_madvise() is None or _refused):
        return
    thread = threading.Thread(
        target=_in_background, args=(exiting,), name="hotfleet-take-back", daemon=True
    )
    _thread = thread
    thread.start()


def _in_background(exiting: int | None) -> None:
    """The thread's body: a failure here is a bug of ours, logged as one, never an app error."""
    try:
        if exiting is not None:
            with contextlib.suppress(ChildProcessError):  # someone reaped it already
                os.waitpid(exiting, 0)
        take_back_if_forked()
    except Exception:
        log.exception("taking the pages back after the staging fork failed (a bug)")


def settled() -> None:
    """Wait for a take-back in progress: forking during one would copy every page it takes."""
    thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def before_hold() -> None:
    """Settle the staging fork's aftermath before a gate closes: wait for the thread
    :func:`forked` started (to its very end: a thread that exits inside the hold
    takes the GIL there), or take the pages back here if it could not start."""
    settled()
    take_back_if_forked()


def take_back_if_forked() -> TakenBack | None:
    """:func:`take_back`, once after each :func:`forked`; None when there was nothing to do."""
    global _forked
    with _one_at_a_time:
        if not _forked:
            return None
        _forked = False
        done = take_back()
        if done is not None:
            TOTAL["pages"] += done.pages
            TOTAL["seconds"] += done.seconds
        return done


def take_back() -> TakenBack | None:
    """Make this process's exclusively owned pages writable again; None where unsupported."""
    global _refused
    madvise = _madvise()
    if madvise is None or _refused:
        return None
    started = time.perf_counter()
    pages = 0
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for address, size in _runs(pagemap.fileno()):
                if madvise(address, size, _MADV_POPULATE_WRITE) != 0:
                    errno = ctypes.get_errno()
                    if errno in (22, 38):  # EINVAL, ENOSYS: a kernel without it
                        _refused = True
                        return TakenBack(pages, time.perf_counter() - started, failed=True)
                    continue  # the mapping changed under us (another thread): skip it
                pages += size // _PAGE
    except OSError:
        return TakenBack(pages, time.perf_counter() - started, failed=True)
    return TakenBack(pages, time.perf_counter() - started)


def _writable_private() -> Iterator[tuple[int, int]]:
    """``(start, end)`` of this process's private writable mappings."""
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            fields = line.split(None, 2)
            if len(fields) >= 2 and fields[1] == b"rw-p":
                start, _, end = fields[0].partition(b"-")
                yield int(start, 16), int(end, 16)


def _runs(pagemap: int) -> Iterator[tuple[int, int]]:
    """``(address, size)`` of runs of present pages that only this process maps."""
    for start, end in list(_writable_private()):
        first = start // _PAGE
        total = (end - start) // _PAGE
        for chunk in range(0, total, _CHUNK_PAGES):
            count = min(_CHUNK_PAGES, total - chunk)
            entries = os.pread(pagemap, count * 8, (first + chunk) * 8)
            flags = entries[7::8].translate(_FLAGS)
            for run in _OURS.finditer(flags):
                yield (
                    (first + chunk + run.start()) * _PAGE,
                    (run.end() - run.start()) * _PAGE,
                )
