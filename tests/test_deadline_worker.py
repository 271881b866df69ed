"""The worker a caller may walk away from (node_agent._deadline), with real threads.

What the loader's hold relies on: a step that overruns is abandoned at its
deadline plus the grace, the caller is never woken in between by the
worker, and a call that comes back late cannot begin another step.
"""

from __future__ import annotations

import threading
import time

import pytest

from node_agent._deadline import Abandoned, Overrun, Progress, Worker

TIMEOUT = 5.0


def test_a_call_returns_its_value_or_raises_its_exception_in_the_caller() -> None:
    worker = Worker("t-worker")
    try:
        assert worker.run(lambda progress: threading.current_thread().name) == "t-worker"
        with pytest.raises(KeyError):
            worker.run(lambda progress: {}["missing"])
        assert worker.healthy
    finally:
        worker.close()


def test_a_step_blocked_in_c_is_abandoned_at_its_deadline_and_cannot_go_on() -> None:
    worker = Worker("t-stuck")
    blocked, unblock, after = threading.Event(), threading.Event(), []

    def call(progress: Progress) -> None:
        progress.step(10.0, "first")  # long enough: not the one that overruns
        progress.step(0.2, "stuck")
        blocked.set()
        unblock.wait()  # a C call: the injected Overrun waits for it to return
        try:
            progress.step(1.0, "never")
        except Overrun:
            after.append("refused")

    try:
        started = time.monotonic()
        with pytest.raises(Abandoned) as err:
            worker.run(call, grace=0.1)
        assert err.value.label == "stuck"
        assert 0.3 <= time.monotonic() - started < 0.3 + TIMEOUT / 2
        assert blocked.is_set() and not worker.healthy  # its owner makes a new one
    finally:
        unblock.set()
    worker.thread.join(TIMEOUT)
    assert not worker.thread.is_alive()
    # back from the C call, it stopped at its next step (or at the Overrun, which
    # lands first): it never ran on into "never"
    assert after in ([], ["refused"])


def test_run_all_names_the_call_that_overran_and_skips_the_rest() -> None:
    worker = Worker("t-all")
    ran: list[int] = []
    release = threading.Event()
    try:
        calls = [
            lambda: ran.append(0),
            lambda: (ran.append(1), release.wait()),
            lambda: ran.append(2),
        ]
        with pytest.raises(Abandoned) as err:
            worker.run_all(calls, 0.2, labels=["a", "b", "c"])
        assert err.value.label == "b" and ran == [0, 1]
    finally:
        release.set()
    worker.thread.join(TIMEOUT)
    assert ran == [0, 1]  # the third call never ran


def test_a_pure_python_loop_is_ended_by_the_overrun_raised_in_it() -> None:
    worker = Worker("t-loop")

    def spin() -> None:
        while True:
            pass

    with pytest.raises(Abandoned) as err:
        worker.run_all([spin], 0.2)
    assert err.value.label == 0
    worker.thread.join(TIMEOUT)
    assert not worker.thread.is_alive()  # the injected Overrun ended the loop and the thread
