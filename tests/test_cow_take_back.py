"""After the staging fork the node takes its own pages back, and only its own.

Real forks, real page faults counted by the kernel (``RUSAGE_THREAD``): a
write to each page of a buffer made before a fork faults once per page
unless :func:`node_agent._cow.take_back` ran after the child exited; pages a
live process still shares (a gunicorn master's heap in its workers) stay
shared; nothing is written through the pages.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import sys
import threading

import pytest

from node_agent import _cow
from node_agent._cow import _PAGE, take_back
from tests.codebase import Codebase

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE and pagemap are Linux's"
)

PAGES = 512


def _buffer() -> bytearray:
    buf = bytearray(os.urandom(PAGES * _PAGE))
    return buf


def _faults_writing(buf: bytearray) -> int:
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for offset in range(0, len(buf), _PAGE):
        buf[offset] ^= 0  # one write per page, value unchanged
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def _fork(stay: bool) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        if stay:
            signal.pause()
        os._exit(0)
    return pid


def _supported() -> None:
    probe = take_back()
    if probe is None or probe.failed:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14) or no pagemap")


def test_after_the_child_exits_the_parent_writes_its_pages_without_faults() -> None:
    _supported()
    control, buf = _buffer(), _buffer()
    os.waitpid(_fork(stay=False), 0)
    assert _faults_writing(control) >= PAGES * 0.9  # the fork's aftermath, unrepaired
    digest = hashlib.sha256(buf).digest()
    taken = take_back()
    assert taken is not None and not taken.failed and taken.pages >= PAGES
    assert _faults_writing(buf) <= PAGES * 0.05
    assert hashlib.sha256(buf).digest() == digest  # nothing written through the pages


def test_pages_another_live_process_shares_stay_shared() -> None:
    _supported()
    buf = _buffer()
    pid = _fork(stay=True)  # like a gunicorn master's heap inherited by a worker
    try:
        taken = take_back()
        assert taken is not None and not taken.failed
        # not copied by take_back: the first writes still fault (and copy) here
        assert _faults_writing(buf) >= PAGES * 0.9
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_pages_are_taken_back_once_after_each_staging_fork(cb: Codebase) -> None:
    """On a thread of its own after the child exits (the vote does not wait), once."""
    _supported()
    src = "import os\nX = 1\n\ndef f():\n    return X\n"
    mods = cb.boot({"m": src})
    pages = _cow.TOTAL["pages"]
    prepared = cb.loader.prepare(cb.release("2", {"m": src.replace("X = 1", "X = len(os.sep)")}))
    assert prepared.runs_code and prepared.rehearsal_s > 0  # it forked
    _cow.settled()
    taken = _cow.TOTAL["pages"]
    assert taken > pages
    cb.loader.finish(prepared)  # its hold finds nothing left to do
    cb.loader.rollback()
    assert mods["m"].f() == 1 and _cow.TOTAL["pages"] == taken


def _children_of_this_process() -> set[int]:
    out: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                out.update(int(p) for p in f.read().split())
        except FileNotFoundError:  # a thread that ended since the listing: no children
            continue
    return out


def test_a_staging_child_reaped_off_the_votes_path_leaves_no_zombie(cb: Codebase) -> None:
    """The child closes its pipe once its report (with its CPU time) is written, and
    the vote goes without waiting for it to unmap its heap; the thread that takes the
    pages back reaps it first: once settled, no zombie is left."""
    src = "import os\nX = 1\n\ndef f():\n    return X\n"
    cb.boot({"m2": src})
    before = _children_of_this_process()
    prepared = cb.loader.prepare(cb.release("2", {"m2": src.replace("X = 1", "X = len(os.sep)")}))
    assert prepared.runs_code and prepared.rehearsal_cpu_s > 0  # the child reported its CPU
    _cow.settled()
    assert _children_of_this_process() == before  # reaped, not a zombie
    cb.loader.abort(prepared)


def test_a_staging_child_stopped_after_its_report_does_not_hold_up_the_next_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: the child is SIGSTOPped right after it sent its report (an operator, a
    debugger).  The vote has what it needs; the reaping that the next hold and the next
    fork wait for (``settled``) must still end, not wait for a process that never exits."""
    from node_agent import _rehearsal

    real_close = _rehearsal._close

    def close_then_stop(fd: int) -> None:
        real_close(fd)
        os.kill(os.getpid(), signal.SIGSTOP)

    monkeypatch.setattr(_rehearsal, "_close", close_then_stop)
    before = _children_of_this_process()
    outcome = _rehearsal.rehearse(lambda: ([], ["rehearsed"]), timeout=10)
    assert outcome.warnings == ["rehearsed"] and not outcome.died
    waiter = threading.Thread(target=_cow.settled, daemon=True)
    waiter.start()
    waiter.join(10)
    stuck = _children_of_this_process() - before
    for pid in stuck:  # only if the guarantee broke: leave no stopped process behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not waiter.is_alive() and not stuck
