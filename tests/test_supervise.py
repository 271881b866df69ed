"""Supervised background work follows the code; unsupervised work is named in the vote (issue 13).

:mod:`node_agent.supervision` with a real :class:`SupervisedLoader` (the
agent's default) on a throwaway package: a supervised thread or task is
stopped at a safe point before the switch and restarted on the new code at
finish, and on the old code at rollback (dependencies first, dependents
stopped first); a thread or task outside supervision that runs a module the
release changes is named in prepare's warnings, with its module, function
and thread or task.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from node_agent import supervision
from node_agent.supervision import SupervisedLoader, asupervise, supervise, supervised
from tests.agents import wait_for
from tests.codebase import Codebase


def jobs(version: str) -> str:
    """A module with a thread loop and a task loop, each logging the version it runs."""
    return f"""
        import asyncio

        def poll(log, stop):
            log.append(("start", "poll", "{version}"))
            while not stop.wait(0.005):
                log.append(("tick", "poll", "{version}"))
            log.append(("stop", "poll", "{version}"))

        async def beat(log):
            while True:
                log.append(("tick", "beat", "{version}"))
                await asyncio.sleep(0.005)
        """


def worker(version: str) -> str:
    """A module that imports ``jobs``: its loops depend on it."""
    return f"""
        from . import jobs

        def work(log, stop):
            log.append(("start", "work", "{version}"))
            while not stop.wait(0.005):
                pass
            log.append(("stop", "work", "{version}"))
        """


@pytest.fixture
def loader(cb: Codebase) -> Iterator[SupervisedLoader]:
    """A supervised loader over v1 of the package; every unit a test starts is closed after it."""
    cb.boot({"jobs": jobs("1"), "worker": worker("1")})
    before = set(map(id, supervised()))
    try:
        yield SupervisedLoader([cb.root], drain_timeout=2.0)
    finally:
        for unit in supervised():
            if id(unit) not in before:
                unit.close()


def ticks(log: list[Any], since: int, fn: str) -> set[str]:
    return {v for kind, f, v in log[since:] if kind == "tick" and f == fn}


@pytest.fixture
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        for task in asyncio.all_tasks(loop):
            loop.call_soon_threadsafe(task.cancel)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_unsupervised_thread_and_task_are_named_in_the_vote(
    cb: Codebase, loader: SupervisedLoader, event_loop_thread: asyncio.AbstractEventLoop
) -> None:
    mod = cb.module("jobs")
    log: list[Any] = []
    stop = threading.Event()
    thread = threading.Thread(target=mod.poll, args=(log, stop), name="poller", daemon=True)
    thread.start()
    task = asyncio.run_coroutine_threadsafe(_named(mod.beat(log), "beater"), event_loop_thread)
    try:
        wait_for(lambda: ticks(log, 0, "poll") and ticks(log, 0, "beat"), 5)
        prepared = loader.prepare(cb.release("2", {"jobs": jobs("2")}))
        warnings = [w for w in prepared.warnings if w.startswith("unsupervised")]
        assert any(
            "thread 'poller'" in w and f"{cb.pkg}.jobs:poll" in w and f"module {cb.pkg}.jobs" in w
            for w in warnings
        ), prepared.warnings
        assert any(
            "task 'beater'" in w and f"{cb.pkg}.jobs:beat" in w and "asupervise" in w
            for w in warnings
        ), prepared.warnings
        loader.abort(prepared)
        # a release that leaves the module alone names nothing
        prepared = loader.prepare(cb.release("3", {"worker": worker("3")}))
        assert not [w for w in prepared.warnings if w.startswith("unsupervised")], prepared.warnings
        loader.abort(prepared)
    finally:
        stop.set()
        thread.join(5)
        task.cancel()


async def _named(coro: Any, name: str) -> None:
    """Run ``coro`` as a task called ``name`` on the current loop (what an app's lifespan does)."""
    await asyncio.get_running_loop().create_task(coro, name=name)


def test_a_supervised_thread_restarts_on_the_new_code_at_finish_and_the_old_at_rollback(
    cb: Codebase, loader: SupervisedLoader
) -> None:
    log: list[Any] = []
    unit = supervise(cb.module("jobs").poll, log, name="poller")
    first = unit.thread
    wait_for(lambda: ticks(log, 0, "poll") == {"1"}, 5)

    prepared = loader.prepare(cb.release("2", {"jobs": jobs("2")}))
    assert (
        f"supervised thread 'poller' ({cb.pkg}.jobs:poll) restarts on the new code at finish"
        in (prepared.warnings)
    )
    assert not [w for w in prepared.warnings if w.startswith("unsupervised")], prepared.warnings
    loader.finish(prepared)
    mark = len(log)
    assert unit.restarts == 1 and unit.thread is not first and unit.running
    # the old loop stopped at its safe point before the switch, the new one started after it
    assert ("stop", "poll", "1") in log and ("start", "poll", "2") in log
    assert log.index(("stop", "poll", "1")) < log.index(("start", "poll", "2"))
    wait_for(lambda: ticks(log, mark, "poll"), 5)
    assert ticks(log, log.index(("start", "poll", "2")), "poll") == {"2"}

    loader.rollback()
    assert unit.restarts == 2 and unit.running
    back = log.index(("start", "poll", "1"), log.index(("start", "poll", "2")))
    wait_for(lambda: ticks(log, back, "poll"), 5)
    assert ticks(log, back, "poll") == {"1"}
    assert unit.close() is None and not unit.running


def test_supervised_units_stop_dependents_first_and_start_dependencies_first(
    cb: Codebase, loader: SupervisedLoader
) -> None:
    log: list[Any] = []
    # registered dependent first: the order comes from the imports, not the registration
    supervise(cb.module("worker").work, log, name="work")
    supervise(cb.module("jobs").poll, log, name="poll")
    wait_for(lambda: ("start", "poll", "1") in log and ("start", "work", "1") in log, 5)
    mark = len(log)
    loader.finish(loader.prepare(cb.release("2", {"jobs": jobs("2"), "worker": worker("2")})))
    events = [(kind, fn, v) for kind, fn, v in log[mark:] if kind != "tick"]
    assert events == [
        ("stop", "work", "1"),
        ("stop", "poll", "1"),
        ("start", "poll", "2"),
        ("start", "work", "2"),
    ], events


def test_a_thread_that_misses_its_safe_point_is_named_in_the_finish(
    cb: Codebase, loader: SupervisedLoader
) -> None:
    release = threading.Event()

    def stubborn(stop: threading.Event) -> None:
        release.wait(10)  # never looks at stop

    unit = supervise(stubborn, name="stubborn", stop_timeout=0.2)
    try:
        wait_for(lambda: unit.running, 5)
        report = loader.finish(loader.prepare(cb.release("2", {"jobs": jobs("2")})))
        assert any(
            "supervised thread 'stubborn'" in w and "keeps running its old code" in w
            for w in report.warnings
        ), report.warnings
    finally:
        release.set()


def test_a_supervised_task_restarts_on_the_new_code_at_finish_and_the_old_at_rollback(
    cb: Codebase, loader: SupervisedLoader, event_loop_thread: asyncio.AbstractEventLoop
) -> None:
    log: list[Any] = []
    unit = asupervise(cb.module("jobs").beat, log, name="beat", loop=event_loop_thread)
    wait_for(lambda: ticks(log, 0, "beat") == {"1"}, 5)
    loader.finish(loader.prepare(cb.release("2", {"jobs": jobs("2")})))
    assert unit.restarts == 1
    mark = len(log)
    wait_for(lambda: "2" in ticks(log, mark, "beat"), 5)
    settled = len(log)  # the restarted task is the only one left
    wait_for(lambda: len(log) > settled + 3, 5)
    assert ticks(log, settled, "beat") == {"2"}

    loader.rollback()
    assert unit.restarts == 2
    mark = len(log)
    wait_for(lambda: "1" in ticks(log, mark, "beat"), 5)
    settled = len(log)
    wait_for(lambda: len(log) > settled + 3, 5)
    assert ticks(log, settled, "beat") == {"1"}


def test_supervise_refuses_a_loop_without_a_safe_point() -> None:
    def no_stop() -> None:
        pass

    async def coro_fn() -> None:
        pass

    with pytest.raises(TypeError, match="stop"):
        supervise(no_stop)
    with pytest.raises(TypeError, match="coroutine"):
        asupervise(no_stop)  # type: ignore[arg-type]
    assert coro_fn not in [u.fn for u in supervision.supervised()]
