"""The drain barrier with real threads, a real event loop and hand-driven WSGI/ASGI calls.

Ordering is forced with Events, Conditions and the barrier's own observable
state (``held``, ``in_flight``, ``stats().waiting_now``), never with sleeps
that merely hope to be long enough.  The few short bounded waits that *do*
appear assert that something does NOT happen while it must not; a broken
barrier makes it happen within them.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, Generic, TypeVar
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest

from node_agent.drain import (
    ASGIMiddleware,
    DrainBarrier,
    HoldInfo,
    RequestRecord,
    WSGIMiddleware,
)

T = TypeVar("T")

TIMEOUT = 5.0  # upper bound for things that should happen promptly
ABSENCE = 0.1  # how long we watch for something that must not happen


def eventually(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll barrier state that offers no event to wait on (e.g. "a guard is parked")."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


async def aeventually(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


class Worker(Generic[T]):
    """A daemon thread whose result or exception surfaces in the test, with a deadline.

    A deadlocked barrier then fails the test instead of hanging it.
    """

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._result: T | None = None
        self._error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as exc:
            self._error = exc
        finally:
            self.done.set()

    def result(self, timeout: float = TIMEOUT) -> T:
        assert self.done.wait(timeout), "worker thread did not finish (deadlock?)"
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def park_inside(barrier: DrainBarrier) -> tuple[Worker[None], threading.Event]:
    """A worker that enters the guard and stays until the returned event is set."""
    inside, release = threading.Event(), threading.Event()

    def run() -> None:
        with barrier.guard():
            inside.set()
            assert release.wait(TIMEOUT)

    worker = Worker(run)
    assert inside.wait(TIMEOUT)
    return worker, release


def enter_once(barrier: DrainBarrier) -> Worker[None]:
    def run() -> None:
        with barrier.guard():
            pass

    return Worker(run)


class Boom(Exception):
    pass


# ------------------------------------------------------------------- threads
def test_hold_waits_for_in_flight_blocks_new_entries_and_reopens() -> None:
    barrier = DrainBarrier()
    log: list[str] = []
    inside, release_worker = threading.Event(), threading.Event()

    def worker() -> None:
        with barrier.guard():
            inside.set()
            assert release_worker.wait(TIMEOUT)
            log.append("worker-left")

    w = Worker(worker)
    assert inside.wait(TIMEOUT)

    in_body, release_holder = threading.Event(), threading.Event()

    def holder() -> tuple[HoldInfo, int]:
        with barrier.hold(TIMEOUT) as info:
            log.append("swap")
            in_flight_during_swap = barrier.in_flight
            in_body.set()
            assert release_holder.wait(TIMEOUT)
        return info, in_flight_during_swap

    h = Worker(holder)
    eventually(lambda: barrier.held)
    assert not in_body.wait(ABSENCE), "hold swapped while work was in flight"

    release_worker.set()
    w.result()
    assert in_body.wait(TIMEOUT)

    late_entered = threading.Event()

    def late() -> None:
        with barrier.guard():
            late_entered.set()

    late_worker = Worker(late)
    eventually(lambda: barrier.stats().waiting_now == 1)
    assert not late_entered.is_set()

    release_holder.set()
    info, in_flight_during_swap = h.result()
    late_worker.result()

    assert log == ["worker-left", "swap"]
    assert in_flight_during_swap == 0
    assert info.drained and info.in_flight_at_close == 1 and info.still_in_flight == 0
    assert 0 < info.waited_s < TIMEOUT
    assert not barrier.held and barrier.in_flight == 0
    stats = barrier.stats()
    assert (stats.entered_total, stats.held_total, stats.waiting_now) == (2, 1, 0)
    assert stats.last_hold_s >= info.waited_s and stats.max_hold_s == stats.last_hold_s


def test_hold_times_out_on_stuck_work_and_still_reopens() -> None:
    barrier = DrainBarrier()
    stuck, release = park_inside(barrier)
    try:
        start = time.monotonic()
        with barrier.hold(0.2) as info:
            assert barrier.held
        assert time.monotonic() - start >= 0.2
        assert info == HoldInfo(
            drained=False, waited_s=info.waited_s, in_flight_at_close=1, still_in_flight=1
        )
        assert 0.2 <= info.waited_s < 0.2 + TIMEOUT / 2
        assert not barrier.held
        enter_once(barrier).result()  # the stuck worker does not keep the gate shut

        # A raising body reopens too, and wakes whoever queued at the gate meanwhile.
        queued: list[Worker[None]] = []
        with pytest.raises(Boom), barrier.hold(0.05):
            queued.append(enter_once(barrier))
            eventually(lambda: barrier.stats().waiting_now == 1)
            raise Boom
        assert not barrier.held
        queued[0].result()
        enter_once(barrier).result()
        assert barrier.stats().max_hold_s >= 0.2
    finally:
        release.set()
    stuck.result()
    assert barrier.in_flight == 0


def test_a_stuck_hold_is_taken_over_and_never_reopens_anyone_elses() -> None:
    barrier = DrainBarrier()
    inside, unstick = threading.Event(), threading.Event()

    def stuck_holder() -> None:
        with barrier.hold(1.0):
            inside.set()
            unstick.wait()  # stands for release code blocked in C

    holder = threading.Thread(target=stuck_holder)
    holder.start()
    try:
        assert inside.wait(TIMEOUT)
        queued = enter_once(barrier)
        eventually(lambda: barrier.stats().waiting_now == 1)
        assert not barrier.take_over(threading.current_thread())  # not the holder: refused
        assert barrier.held
        assert barrier.take_over(holder)
        queued.result()  # the gate is open again, and its waiter woke
        with barrier.hold(1.0):  # the next hold is not kept out by the stuck one
            unstick.set()
            holder.join(TIMEOUT)  # the stuck hold ends inside ours...
            assert not holder.is_alive()
            assert barrier.held  # ...and leaves our gate closed
        assert not barrier.held
        enter_once(barrier).result()
    finally:
        unstick.set()
        holder.join(TIMEOUT)


def test_guarded_thread_nests_guards_and_holds_without_deadlock() -> None:
    barrier = DrainBarrier()

    def run() -> HoldInfo:
        with barrier.guard():
            with barrier.guard():
                assert barrier.in_flight == 1  # one unit of work, however deep
                # ...and runs guarded code inside its own swap.
                with barrier.hold(TIMEOUT) as info, barrier.guard():
                    pass
            assert barrier.in_flight == 1
        return info

    info = Worker(run).result()
    assert info.drained and info.in_flight_at_close == 0 and info.waited_s < TIMEOUT / 2
    assert barrier.in_flight == 0 and barrier.stats().entered_total == 1


def test_holder_outside_any_guard_may_run_guarded_code_during_its_hold() -> None:
    barrier = DrainBarrier()

    def run() -> int:
        with barrier.hold(TIMEOUT), barrier.guard():
            return barrier.in_flight

    assert Worker(run).result() == 1
    assert barrier.in_flight == 0


def test_nested_hold_in_one_thread_is_refused() -> None:
    barrier = DrainBarrier()

    def run() -> None:
        with barrier.hold(TIMEOUT), barrier.hold(TIMEOUT):
            pass

    with pytest.raises(RuntimeError, match="not re-entrant"):
        Worker(run).result()
    assert not barrier.held
    enter_once(barrier).result()


def test_concurrent_holds_run_one_after_another() -> None:
    barrier = DrainBarrier()
    log: list[str] = []
    first_in, release_first = threading.Event(), threading.Event()

    def first() -> None:
        with barrier.hold(TIMEOUT):
            log.append("first-in")
            first_in.set()
            assert release_first.wait(TIMEOUT)
            log.append("first-out")

    def second() -> None:
        with barrier.hold(TIMEOUT):
            log.append("second-in")
            assert barrier.held

    f = Worker(first)
    assert first_in.wait(TIMEOUT)
    s = Worker(second)
    assert not s.done.wait(ABSENCE), "second hold ran inside the first"
    release_first.set()
    f.result()
    s.result()
    assert log == ["first-in", "first-out", "second-in"]
    assert not barrier.held and barrier.stats().held_total == 2


def test_guarded_readers_never_see_a_half_done_swap() -> None:
    barrier = DrainBarrier()
    holds, readers = 200, 6

    class Shared:
        a = 0
        b = 0

    progress = threading.Condition()
    newest_seen = 0
    torn: list[tuple[int, int]] = []
    stop = threading.Event()

    def reader() -> None:
        nonlocal newest_seen
        while not stop.is_set():
            with barrier.guard():
                a = Shared.a
                time.sleep(0)  # let others run mid-read: widens the race, syncs nothing
                b = Shared.b
            if a != b:
                torn.append((a, b))
            with progress:
                newest_seen = max(newest_seen, a)
                progress.notify_all()

    def seen(value: int) -> Callable[[], bool]:
        return lambda: newest_seen >= value

    def holder() -> int:
        drained = 0
        for i in range(1, holds + 1):
            with barrier.hold(TIMEOUT) as info:
                drained += info.drained
                Shared.a = i
                time.sleep(0)
                Shared.b = i
            with progress:  # make every swap meet readers before the next one
                assert progress.wait_for(seen(i), TIMEOUT)
        return drained

    workers = [Worker(reader) for _ in range(readers)]
    try:
        drained = Worker(holder).result(timeout=4 * TIMEOUT)
    finally:
        stop.set()
    for w in workers:
        w.result()
    assert torn == []
    assert drained == holds
    stats = barrier.stats()
    assert stats.held_total == holds and stats.entered_total > holds
    assert barrier.in_flight == 0 and not barrier.held


# ------------------------------------------------------------------- asyncio
def test_async_guards_park_without_blocking_the_loop() -> None:
    barrier = DrainBarrier()
    log: list[str] = []
    log_lock = threading.Lock()

    def note(event: str) -> None:
        with log_lock:
            log.append(event)

    async def main() -> HoldInfo:
        inside, release_inflight = asyncio.Event(), asyncio.Event()

        async def in_flight() -> None:
            async with barrier.aguard():
                async with barrier.aguard():  # re-entrant per task
                    assert barrier.in_flight == 1
                inside.set()
                await release_inflight.wait()
                note("in-flight-left")

        running = asyncio.create_task(in_flight())
        await inside.wait()

        in_body, release_holder = threading.Event(), threading.Event()

        def holder() -> HoldInfo:  # the loader's finish, on its own thread
            with barrier.hold(TIMEOUT) as info:
                note("swap")
                in_body.set()
                assert release_holder.wait(TIMEOUT)
            return info

        h = Worker(holder)
        await aeventually(lambda: barrier.held)

        async def late(n: int) -> None:
            async with barrier.aguard():
                note(f"late-{n}")

        late_tasks = [asyncio.create_task(late(n)) for n in range(5)]
        await aeventually(lambda: barrier.stats().waiting_now == 5)

        ticks, ticked = 0, asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while ticks < 50:
                ticks += 1
                await asyncio.sleep(0)
            ticked.set()

        ticking = asyncio.create_task(ticker())
        await asyncio.wait_for(ticked.wait(), TIMEOUT)  # the loop runs while tasks are parked
        await ticking

        late_tasks[0].cancel()  # a parked task may be cancelled cleanly
        with pytest.raises(asyncio.CancelledError):
            await late_tasks[0]
        assert barrier.stats().waiting_now == 4

        # The in-flight task can only leave if the loop is free; then the hold drains.
        release_inflight.set()
        await running
        assert await asyncio.to_thread(in_body.wait, TIMEOUT)
        assert barrier.stats().waiting_now == 4 and not any(t.done() for t in late_tasks[1:])

        release_holder.set()
        await asyncio.wait_for(asyncio.gather(*late_tasks[1:]), TIMEOUT)
        return await asyncio.to_thread(h.result)

    info = asyncio.run(main())
    assert info.drained and info.in_flight_at_close == 1
    assert log[:2] == ["in-flight-left", "swap"]
    assert sorted(log[2:]) == [f"late-{n}" for n in range(1, 5)]
    assert barrier.in_flight == 0 and barrier.stats().waiting_now == 0


def test_to_thread_from_a_guarded_task_neither_deadlocks_nor_escapes() -> None:
    """Work inheriting a guarded context is admitted past a closed gate but still counted."""
    barrier = DrainBarrier()

    async def main() -> tuple[HoldInfo, int]:
        async with barrier.aguard():

            def finish_from_request() -> tuple[HoldInfo, int]:
                with barrier.hold(TIMEOUT) as info, barrier.guard():
                    return info, barrier.in_flight

            return await asyncio.to_thread(finish_from_request)

    info, in_flight = asyncio.run(main())
    assert info.drained and info.in_flight_at_close == 0
    assert in_flight == 2  # the task and the thread's own guarded work
    assert barrier.in_flight == 0


def test_child_task_of_guarded_task_is_admitted_and_counted_during_a_hold() -> None:
    """The parent waits for its child, so parking the child would stall the hold."""
    barrier = DrainBarrier()
    in_body = threading.Event()

    def holder() -> HoldInfo:
        with barrier.hold(TIMEOUT) as info:
            in_body.set()
        return info

    async def main() -> tuple[int, HoldInfo]:
        async with barrier.aguard():
            h = Worker(holder)
            await aeventually(lambda: barrier.held)

            async def child() -> int:
                async with barrier.aguard():
                    return barrier.in_flight

            in_flight = await asyncio.wait_for(asyncio.create_task(child()), TIMEOUT / 5)
            assert not in_body.is_set()
        return in_flight, await asyncio.to_thread(h.result)

    in_flight, info = asyncio.run(main())
    assert in_flight == 2  # parent and child both counted
    assert info.drained and info.in_flight_at_close == 1
    assert barrier.stats().entered_total == 2 and barrier.in_flight == 0


def test_context_copied_from_finished_work_gets_no_pass() -> None:
    barrier = DrainBarrier()

    def capture() -> contextvars.Context:
        with barrier.guard():
            return contextvars.copy_context()

    stale = Worker(capture).result()
    entered = threading.Event()

    def enter() -> None:
        with barrier.guard():
            entered.set()

    with barrier.hold(TIMEOUT):
        w = Worker(partial(stale.run, enter))
        eventually(lambda: barrier.stats().waiting_now == 1)
        assert not entered.is_set()
    w.result()
    assert entered.is_set()


# ------------------------------------------------------------------- WSGI
def discard_start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
) -> Callable[[bytes], object]:
    return lambda data: None


def call_wsgi(app: Callable[..., Iterable[bytes]], path: str = "/") -> tuple[str, bytes]:
    """What a WSGI server does: call, iterate, close."""
    environ: dict[str, Any] = {"SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": ""}
    setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(s: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return status[-1], body


def test_wsgi_reports_status_and_errors() -> None:
    barrier = DrainBarrier()
    records: list[RequestRecord] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        if environ["PATH_INFO"] == "/early-boom":
            raise Boom("before any status")
        start_response("201 Created", [("Content-Type", "text/plain")])
        yield b"made"
        if environ["PATH_INFO"] == "/late-boom":
            raise Boom("mid-stream")

    mw = WSGIMiddleware(app, barrier, records.append)
    assert call_wsgi(validator(mw)) == ("201 Created", b"made")
    assert records[-1].status == 201 and records[-1].error is None
    assert records[-1].duration_s >= 0

    with pytest.raises(Boom) as early:
        call_wsgi(mw, "/early-boom")
    assert records[-1].status == 500 and records[-1].error is early.value

    with pytest.raises(Boom) as late:
        call_wsgi(mw, "/late-boom")
    assert records[-1].status == 201 and records[-1].error is late.value

    assert len(records) == 3
    assert barrier.in_flight == 0 and barrier.stats().entered_total == 3


def test_wsgi_streaming_response_stays_in_flight_until_closed() -> None:
    barrier = DrainBarrier()
    records: list[RequestRecord] = []

    class Stream:
        closed = 0

        def __iter__(self) -> Iterator[bytes]:
            for chunk in (b"a", b"b", b"c"):
                with barrier.guard():  # app code during iteration is inside its request
                    assert barrier.in_flight == 1
                yield chunk

        def close(self) -> None:
            self.closed += 1
            assert barrier.in_flight == 1  # the app's close runs guarded too

    stream = Stream()

    def app(environ: Any, start_response: Any) -> Stream:
        start_response("200 OK", [])
        return stream

    mw = WSGIMiddleware(app, barrier, records.append)
    response = mw({}, discard_start_response)
    chunks = iter(response)
    assert next(chunks) == b"a"
    assert barrier.in_flight == 1 and records == []

    with barrier.hold(0.05) as info:
        pass
    assert not info.drained and info.still_in_flight == 1

    assert next(chunks) == b"b"
    response.close()  # type: ignore[attr-defined]  # the client went away early
    assert stream.closed == 1 and barrier.in_flight == 0
    assert [r.status for r in records] == [200] and records[0].error is None
    response.close()  # type: ignore[attr-defined]
    assert stream.closed == 1 and len(records) == 1
    with barrier.hold(TIMEOUT) as info:
        pass
    assert info.drained

    # Exhaustion also ends the request, even before the server gets to close().
    exhausted = mw({}, discard_start_response)
    assert list(exhausted) == [b"a", b"b", b"c"]
    assert barrier.in_flight == 0 and stream.closed == 2 and len(records) == 2


# ------------------------------------------------------------------- ASGI
class ASGIHarness:
    """Drives an ASGI app the way a server would, recording what it sends."""

    def __init__(self, incoming: list[dict[str, Any]] | None = None) -> None:
        self.incoming = list(incoming or [])
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return self.incoming.pop(0)

    async def send(self, message: Any) -> None:
        self.sent.append(dict(message))

    def run(self, app: Any, scope: dict[str, Any]) -> None:
        asyncio.run(asyncio.wait_for(app(scope, self.receive, self.send), TIMEOUT))


def make_asgi_app(barrier: DrainBarrier, seen: list[tuple[str, int, bool]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        passthrough = isinstance(getattr(send, "__self__", None), ASGIHarness)
        seen.append((scope["type"], barrier.in_flight, passthrough))
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
        elif scope["path"] == "/boom":
            raise Boom("no response started")
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"nope"})

    return app


def test_asgi_guards_requests_and_reports_status_and_errors() -> None:
    barrier = DrainBarrier()
    records: list[RequestRecord] = []
    seen: list[tuple[str, int, bool]] = []
    mw = ASGIMiddleware(make_asgi_app(barrier, seen), barrier, records.append)

    harness = ASGIHarness()
    harness.run(mw, {"type": "http", "path": "/"})
    assert [m["type"] for m in harness.sent] == ["http.response.start", "http.response.body"]
    assert records[-1].status == 404 and records[-1].error is None

    with pytest.raises(Boom) as boom:
        ASGIHarness().run(mw, {"type": "http", "path": "/boom"})
    assert records[-1].status == 500 and records[-1].error is boom.value

    ASGIHarness().run(mw, {"type": "websocket", "path": "/ws"})
    assert records[-1].status == 101 and records[-1].error is None

    assert seen == [("http", 1, False), ("http", 1, False), ("websocket", 1, False)]
    assert len(records) == 3 and barrier.in_flight == 0


def test_asgi_lifespan_passes_through_even_while_held() -> None:
    barrier = DrainBarrier()
    records: list[RequestRecord] = []
    seen: list[tuple[str, int, bool]] = []
    mw = ASGIMiddleware(make_asgi_app(barrier, seen), barrier, records.append)

    in_body, release_holder = threading.Event(), threading.Event()

    def holder() -> None:
        with barrier.hold(TIMEOUT):
            in_body.set()
            assert release_holder.wait(TIMEOUT)

    h = Worker(holder)
    try:
        assert in_body.wait(TIMEOUT)
        harness = ASGIHarness([{"type": "lifespan.startup"}])
        harness.run(mw, {"type": "lifespan"})
        assert harness.sent == [{"type": "lifespan.startup.complete"}]
        assert seen == [("lifespan", 0, True)]  # unguarded, with the server's own receive
        assert records == [] and barrier.stats().entered_total == 0
    finally:
        release_holder.set()
    h.result()
