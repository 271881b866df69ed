"""The drain barrier: what makes a finish atomic for guarded work.

Request handling enters reloadable code through :meth:`DrainBarrier.guard`
(threads), :meth:`DrainBarrier.aguard` (asyncio) or one of the middlewares.
The loader's finish runs its swap inside :meth:`DrainBarrier.hold`, which
closes the gate so new work waits, waits (bounded) until the work already
inside has left, lets the caller swap, and always reopens.  So no guarded unit
of work ever sees half of a release: it either ran entirely before the swap or
starts entirely after it (unless the drain timed out, which
:class:`HoldInfo` reports instead of hiding).

Every piece of shared state is protected by one ``threading.Lock`` and two
conditions on it; nothing relies on the GIL or the switch interval, so the
barrier stays correct on free-threaded CPython.

**Who counts as inside.**  A *unit of work* is counted once, however deeply
guards nest.  The current unit is remembered in a :class:`contextvars.ContextVar`
together with its *owner* (the thread, or the asyncio task): a guard entered by
the same owner inside its own unit is a free re-entry, which is what lets a
guarded thread nest guards or call :meth:`~DrainBarrier.hold` itself without
deadlocking.  Work that merely *inherits* the context of a unit still in flight
(a child task, ``asyncio.to_thread``, a thread started with a copied context)
is admitted even through a closed gate, because its parent is typically waiting
for it and would otherwise never leave; it is counted on its own, so a hold
also waits for it.  Known limit: ``loop.run_in_executor`` does not copy the
context, so a guard in such a thread is a stranger and waits at a closed gate.

**Blocking.**  :meth:`~DrainBarrier.guard` and :meth:`~DrainBarrier.hold`
block their thread; in asyncio code use :meth:`~DrainBarrier.aguard`, which
parks only the task, and run a hold off the loop (e.g. ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from _typeshed import OptExcInfo

__all__ = [
    "ASGIMiddleware",
    "BarrierStats",
    "DrainBarrier",
    "HoldInfo",
    "RequestRecord",
    "WSGIMiddleware",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HoldInfo:
    """What a hold found, for the finish report.

    Counts exclude the holder's own unit of work (see :meth:`DrainBarrier.hold`).
    """

    drained: bool
    """True if in-flight work reached zero before the timeout."""
    waited_s: float
    """Time spent waiting for in-flight work to leave."""
    in_flight_at_close: int
    still_in_flight: int
    """More than zero only when ``drained`` is False."""


@dataclass(frozen=True)
class RequestRecord:
    """One guarded request that ended, as given to a middleware's observer.

    The observer feeds health analysis, so ``duration_s`` is what the client
    waited, from the call (including any wait at a held gate) to the end of the
    response.
    """

    duration_s: float
    status: int | None
    """HTTP status if known; 500 when an ``Exception`` escaped before any status."""
    error: BaseException | None
    """The exception that escaped the application, if any."""


@dataclass(frozen=True)
class BarrierStats:
    """Counters for metrics; a consistent snapshot taken under the barrier's lock."""

    entered_total: int
    """Units of work admitted (nested re-entries are not counted)."""
    held_total: int
    """Holds that closed the gate."""
    last_hold_s: float
    """How long the gate stayed closed during the last completed hold."""
    max_hold_s: float
    waiting_now: int
    """Guards (sync and async) currently parked at the closed gate."""


class _Ticket:
    """One counted unit of work.

    ``active`` is shared state, read and written only under the barrier's lock;
    ``parent`` (the unit whose context this one inherited) never changes.
    """

    __slots__ = ("active", "parent")

    def __init__(self, parent: _Ticket | None) -> None:
        self.parent = parent
        self.active = True

    def lineage(self) -> Iterator[_Ticket]:
        ticket: _Ticket | None = self
        while ticket is not None:
            yield ticket
            ticket = ticket.parent


@dataclass(frozen=True, slots=True)
class _Mark:
    """What the context remembers: which unit is current, and who runs it."""

    owner: object
    ticket: _Ticket


class _Gate(enum.Enum):
    CLOSED = enum.auto()


def _current_owner() -> object:
    """The current asyncio task if any, else the current thread.

    Tasks on one loop share a thread but are separate units of work, so within
    a task the task is the owner.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        task = None
    return task if task is not None else threading.current_thread()


def _wake(waiters: set[asyncio.Future[None]]) -> None:
    """Resume tasks waiting at a reopened gate (outside the barrier's lock: a loop's own
    lock must not nest in ours).  A closed loop refuses: its task never resumes anyway."""
    for waiter in waiters:
        with suppress(RuntimeError):
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # it may have been cancelled meanwhile
        waiter.set_result(None)


class _Span:
    """A unit of work's presence inside the barrier, detached from any one block.

    ``guard`` and ``aguard`` use a span for exactly one ``with`` block; the WSGI
    middleware keeps one open from the call until the response is closed and
    marks only the stretches when application code runs (``step``), because a
    WSGI server may resume the response from another context.
    """

    __slots__ = ("_barrier", "_ticket")

    def __init__(self, barrier: DrainBarrier, ticket: _Ticket | None) -> None:
        self._barrier = barrier
        self._ticket = ticket  # None: a re-entry, the enclosing unit does the counting

    @contextmanager
    def step(self) -> Iterator[None]:
        """Make this unit current while application code runs, so it can re-enter."""
        if self._ticket is None:
            yield
            return
        token = self._barrier._mark.set(_Mark(_current_owner(), self._ticket))
        try:
            yield
        finally:
            self._barrier._mark.reset(token)

    def end(self) -> None:
        """Leave the barrier; idempotent."""
        if self._ticket is not None:
            self._barrier._leave(self._ticket)

    @contextmanager
    def active(self) -> Iterator[None]:
        """The whole life of a span that fits in one block."""
        try:
            with self.step():
                yield
        finally:
            self.end()


class DrainBarrier:
    """Gate between request handling and the loader's swap; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gate_open = threading.Condition(self._lock)  # notified when a hold reopens
        self._drained = threading.Condition(self._lock)  # notified when work leaves a held gate
        self._hold_lock = threading.Lock()  # serializes holds
        self._mark: ContextVar[_Mark | None] = ContextVar(
            f"hotfleet_drain_{id(self):x}", default=None
        )
        # Everything below is guarded by self._lock.
        self._closed = False
        self._holder: threading.Thread | None = None
        self._closed_at: float | None = None
        self._in_flight = 0
        self._async_waiters: set[asyncio.Future[None]] = set()
        self._waiting = 0
        self._entered_total = 0
        self._held_total = 0
        self._last_hold_s = 0.0
        self._max_hold_s = 0.0

    # ------------------------------------------------------------------ guards
    @contextmanager
    def guard(self) -> Iterator[None]:
        """Mark the enclosed work as in flight, waiting first if a hold closed the gate.

        Re-entrant: a unit of work already inside never blocks on a nested guard
        (otherwise a hold waiting for it, and it waiting for the hold, would
        deadlock).
        """
        with self._open_span().active():
            yield

    @asynccontextmanager
    async def aguard(self) -> AsyncIterator[None]:
        """:meth:`guard` for asyncio: waiting at a closed gate parks only this task.

        Each waiting task gets its own future, resolved through
        ``loop.call_soon_threadsafe`` when the gate reopens, so the event loop
        keeps running (and in-flight tasks can finish) during the hold.
        Re-entrant per task.
        """
        span = await self._aopen_span()
        with span.active():
            yield

    def _open_span(self) -> _Span:
        mark, owner = self._mark.get(), _current_owner()
        # Allocate outside the lock: a thread that loses the GIL while holding
        # it makes every other request wait a whole switch interval.
        fresh = _Ticket(None) if mark is None else None
        with self._lock:
            while (entered := self._try_enter_locked(mark, owner, fresh)) is _Gate.CLOSED:
                self._waiting += 1
                try:
                    self._gate_open.wait()
                finally:
                    self._waiting -= 1
        return _Span(self, entered)

    async def _aopen_span(self) -> _Span:
        mark, owner = self._mark.get(), _current_owner()
        loop = asyncio.get_running_loop()
        fresh = _Ticket(None) if mark is None else None
        while True:
            with self._lock:
                entered = self._try_enter_locked(mark, owner, fresh)
                if entered is not _Gate.CLOSED:
                    break
                waiter: asyncio.Future[None] = loop.create_future()
                self._async_waiters.add(waiter)
                self._waiting += 1
            try:
                await waiter
            finally:  # woken, or cancelled while parked
                with self._lock:
                    self._waiting -= 1
                    self._async_waiters.discard(waiter)
        return _Span(self, entered)

    def _try_enter_locked(
        self, mark: _Mark | None, owner: object, fresh: _Ticket | None = None
    ) -> _Ticket | Literal[_Gate.CLOSED] | None:
        """Admit a unit (new ticket), recognise a re-entry (None) or refuse."""
        parent: _Ticket | None = None
        if mark is not None:
            if mark.owner is owner and mark.ticket.active:
                return None  # a free re-entry: nothing to count, nothing to end
            parent = next((t for t in mark.ticket.lineage() if t.active), None)
        if parent is None and self._closed and self._holder is not threading.current_thread():
            # The holder itself may run guarded code (e.g. a state migration)
            # during its own hold; anyone else waits.
            return _Gate.CLOSED
        self._in_flight += 1
        self._entered_total += 1
        return fresh if fresh is not None and parent is None else _Ticket(parent)

    def _leave(self, ticket: _Ticket) -> None:
        with self._lock:
            if not ticket.active:
                return
            ticket.active = False
            self._in_flight -= 1
            if self._closed:
                self._drained.notify_all()

    # -------------------------------------------------------------------- hold
    @contextmanager
    def hold(self, timeout: float) -> Iterator[HoldInfo]:
        """Close the gate, wait up to ``timeout`` s for in-flight work, yield, reopen.

        The holder's own unit of work (and any unit whose context it inherited,
        which is waiting for it) is not waited for: a guarded thread may hold
        without deadlocking, and so may ``asyncio.to_thread`` called from a
        guarded task.  After a timeout the body still runs, with
        ``drained=False``; the caller decides whether that is acceptable.  The
        gate reopens and every waiter, sync or async, is woken even if the body
        raises.  Concurrent holds from several threads run one after another;
        a nested hold in the same thread raises ``RuntimeError``.
        """
        if not timeout >= 0:  # also refuses NaN
            raise ValueError(f"timeout must be >= 0, got {timeout!r}")
        me = threading.current_thread()
        mark = self._mark.get()
        own = tuple(mark.ticket.lineage()) if mark is not None else ()
        with self._lock:
            if self._holder is me:
                raise RuntimeError("hold() is not re-entrant: this thread already holds the gate")
        self._hold_lock.acquire()  # released by whoever reopens: this hold or a take-over
        try:
            yield self._close_and_drain(me, own, timeout)
        finally:
            self._end_hold(me)

    def take_over(self, holder: threading.Thread) -> bool:
        """Reopen a gate that ``holder`` closed and cannot reopen itself (it is stuck).

        For the loader's deadline on release code run inside a hold: the
        thread running it may be blocked in a C call for ever, and the caller
        that walked away from it restores the previous version, then reopens
        the gate here and lets the next hold in.  The stuck hold, if it ever
        ends, finds the gate no longer its own and leaves it alone.  Returns
        False if ``holder`` does not hold the gate (its hold just ended).
        """
        with self._lock:
            if self._holder is not holder:
                return False
            woken = self._reopen_locked()
        _wake(woken)
        return True

    def _close_and_drain(
        self, me: threading.Thread, own: tuple[_Ticket, ...], timeout: float
    ) -> HoldInfo:
        def others() -> int:
            return self._in_flight - sum(t.active for t in own)

        with self._lock:
            self._closed, self._holder = True, me
            self._closed_at = closed_at = time.monotonic()
            self._held_total += 1
            at_close = others()
            drained = self._drained.wait_for(
                lambda: others() == 0, None if math.isinf(timeout) else timeout
            )
            return HoldInfo(
                drained=drained,
                waited_s=time.monotonic() - closed_at,
                in_flight_at_close=at_close,
                still_in_flight=others(),
            )

    def _end_hold(self, me: threading.Thread) -> None:
        with self._lock:
            if self._holder is not me:  # taken over (see take_over): not ours any more
                return
            woken = self._reopen_locked()
        _wake(woken)

    def _reopen_locked(self) -> set[asyncio.Future[None]]:
        """Open the gate and let the next hold in; returns the async waiters to wake."""
        if self._closed_at is not None:
            self._last_hold_s = time.monotonic() - self._closed_at
            self._max_hold_s = max(self._max_hold_s, self._last_hold_s)
        self._closed, self._holder, self._closed_at = False, None, None
        woken, self._async_waiters = self._async_waiters, set()
        self._gate_open.notify_all()
        self._hold_lock.release()
        return woken

    # -------------------------------------------------------------- inspection
    @property
    def in_flight(self) -> int:
        """Units of work inside right now (re-entries count once)."""
        with self._lock:
            return self._in_flight

    @property
    def held(self) -> bool:
        """Whether a hold has the gate closed."""
        with self._lock:
            return self._closed

    def stats(self) -> BarrierStats:
        with self._lock:
            return BarrierStats(
                entered_total=self._entered_total,
                held_total=self._held_total,
                last_hold_s=self._last_hold_s,
                max_hold_s=self._max_hold_s,
                waiting_now=self._waiting,
            )


# ---------------------------------------------------------------- middleware
_Observer = Callable[[RequestRecord], None]
_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_GUARDED_SCOPES = frozenset({"http", "websocket"})


class _Exchange:
    """Timing and status of one request, reported once to the observer.

    An observer is metrics plumbing: if it raises, the error is logged and the
    request's own outcome is left alone.
    """

    __slots__ = ("_observer", "_started", "status")

    def __init__(self, observer: _Observer | None) -> None:
        self._observer = observer
        self._started = time.perf_counter()
        self.status: int | None = None

    # Observing must never raise into the application: a malformed status is "unknown".
    def note_wsgi_status(self, status: str) -> None:
        code = status[:3]
        self.status = int(code) if code.isascii() and code.isdigit() else None

    def note_asgi_message(self, message: _Message) -> None:
        kind = message.get("type")
        if kind in ("http.response.start", "websocket.http.response.start"):
            status = message.get("status")
            self.status = status if isinstance(status, int) else None
        elif kind == "websocket.accept":
            self.status = 101
        elif kind == "websocket.close" and self.status is None:
            self.status = 403  # ASGI: closing before accepting is answered with 403

    def report(self, error: BaseException | None) -> None:
        if self._observer is None:
            return
        status = self.status
        if status is None and isinstance(error, Exception):
            # The server answers 500; cancellations and exits answer nothing.
            status = 500
        record = RequestRecord(time.perf_counter() - self._started, status, error)
        try:
            self._observer(record)
        except Exception:
            _log.exception("drain barrier observer failed on %r", record)


class WSGIMiddleware:
    """Guards a WSGI application; a request is in flight until its response is closed.

    A streaming response runs application code while the server iterates it,
    so leaving at return would let a swap happen mid-response.  The response
    is wrapped instead: the request leaves when the server closes it (PEP 3333
    makes ``close()`` mandatory) or when it is exhausted, whichever comes first.
    """

    def __init__(
        self, app: WSGIApplication, barrier: DrainBarrier, observer: _Observer | None = None
    ) -> None:
        self._app = app
        self._barrier = barrier
        self._observer = observer

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        exchange = _Exchange(self._observer)

        def observed_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None, /
        ) -> Callable[[bytes], object]:
            exchange.note_wsgi_status(status)
            return start_response(status, headers, exc_info)

        span = self._barrier._open_span()
        try:
            with span.step():
                result = self._app(environ, observed_start_response)
        except BaseException as exc:
            span.end()
            exchange.report(exc)
            raise
        return _GuardedResponse(result, span, exchange)


class _GuardedResponse:
    """The application's response iterable, keeping its request in flight.

    Used by one server thread at a time (PEP 3333), so its own fields need no
    lock; the barrier state it touches is locked by the barrier.
    """

    def __init__(self, result: Iterable[bytes], span: _Span, exchange: _Exchange) -> None:
        self._result = result
        self._iterator: Iterator[bytes] | None = None
        self._span = span
        self._exchange = exchange
        self._finished = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            with self._span.step():
                if self._iterator is None:
                    self._iterator = iter(self._result)
                try:
                    return next(self._iterator)
                except StopIteration:
                    pass  # exhausted: finish outside the step, below
        except BaseException as exc:
            self._finish(exc)
            raise
        self._finish(None)
        raise StopIteration

    def close(self) -> None:
        self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        """Close the application's iterable, leave the barrier, report; once."""
        if self._finished:
            return
        self._finished = True
        close = getattr(self._result, "close", None)
        try:
            if close is not None:
                with self._span.step():
                    close()
        except BaseException as exc:
            error = error if error is not None else exc
            raise
        finally:
            self._span.end()
            self._exchange.report(error)


class ASGIMiddleware:
    """Guards ``http`` and ``websocket`` scopes of an ASGI application for the whole call.

    ``lifespan`` (and any other scope type) passes through untouched: startup
    and shutdown are not requests, and holding them would stall a server that
    is booting while a finish runs.
    """

    def __init__(
        self, app: _ASGIApp, barrier: DrainBarrier, observer: _Observer | None = None
    ) -> None:
        self._app = app
        self._barrier = barrier
        self._observer = observer

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope.get("type") not in _GUARDED_SCOPES:
            await self._app(scope, receive, send)
            return
        exchange = _Exchange(self._observer)

        async def observed_send(message: _Message) -> None:
            exchange.note_asgi_message(message)
            await send(message)

        error: BaseException | None = None
        try:
            async with self._barrier.aguard():
                await self._app(scope, receive, observed_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            exchange.report(error)
