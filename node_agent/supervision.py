"""Supervised background work: long-lived threads and asyncio tasks that follow the code.

A running loop keeps the code it started with for ever: a thread's frame, a
task's coroutine.  Under supervision it does not::

    from node_agent import supervise, asupervise

    def poll_prices(stop):                 # a thread: checks ``stop`` at its safe points
        while not stop.wait(1.0):
            refresh()

    async def heartbeat():                 # a task: every ``await`` is a safe point
        while True:
            await asyncio.sleep(1)
            beat()

    supervise(poll_prices)                 # starts the thread now
    asupervise(heartbeat)                  # starts the task now, on the running loop

At a finish (and at a rollback) of a release that changes any code, every
supervised unit is stopped at a safe point *before* the switch (a thread
when it returns after ``stop`` is set; a task when it returns after its
``stop`` event, if it takes one, else by cancellation at its next ``await``),
then, after the switch, restarted on the new code: the function is looked up
again by module and name, so a redefined function is the one that runs.
Units stop dependents first and start dependencies first, by the import
order of the modules that define them (the release's load order; modules
outside the release first), then in the order they were registered.  A unit
that does not stop within ``stop_timeout`` is cancelled (a task) or left
running and named in the finish's warnings (a thread); either way the switch
goes on.

At prepare, background work *not* under supervision that runs a module the
release changes is named in the vote's warnings (module, function, thread
or task): it keeps its old code until it returns.

:class:`SupervisedLoader` is the :class:`~node_agent.loader.Loader` the agent
uses; the hooks are its ``prepare``, ``finish`` and ``rollback``.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import replace
from types import FrameType
from typing import Any

from hotfleet.release import Release
from node_agent.loader import FinishReport, Loader, Prepared

__all__ = [
    "SupervisedLoader",
    "SupervisedTask",
    "SupervisedThread",
    "asupervise",
    "supervise",
    "supervised",
]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_registry: list[Supervised] = []
_serial = iter(range(1, 1 << 62))


def supervised() -> list[Supervised]:
    """Every supervised unit of this process, in registration order."""
    with _lock:
        return list(_registry)


def _takes_stop(fn: Callable[..., Any]) -> bool:
    try:
        return "stop" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


class Supervised(abc.ABC):
    """One supervised unit; :meth:`stop` at a safe point, :meth:`start` on the current code."""

    kind = "?"

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], name: str | None, stop_timeout: float
    ) -> None:
        if not stop_timeout >= 0:
            raise ValueError(f"stop_timeout must be >= 0, got {stop_timeout!r}")
        self.fn = fn
        self.args = args
        self.module = str(getattr(fn, "__module__", "") or "")
        self.qualname = str(getattr(fn, "__qualname__", "") or "")
        self.name = name or self.qualname or repr(fn)
        self.stop_timeout = stop_timeout
        self.serial = next(_serial)
        self.restarts = 0
        self.closed = False

    def current_fn(self) -> Callable[..., Any]:
        """The function as its module defines it now (a redefinition replaces it)."""
        module = sys.modules.get(self.module)
        if module is not None and self.qualname and "<" not in self.qualname:
            obj: Any = module
            for part in self.qualname.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    return self.fn
            if callable(obj):
                self.fn = obj
        return self.fn

    def describe(self) -> str:
        return f"supervised {self.kind} {self.name!r} ({self.module}:{self.qualname})"

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> str | None:
        """Stop at a safe point; None when it stopped, else what happened instead."""

    @property
    @abc.abstractmethod
    def running(self) -> bool: ...

    def close(self) -> str | None:
        """Stop for good and leave supervision."""
        self.closed = True
        with _lock:
            if self in _registry:
                _registry.remove(self)
        return self.stop()


class SupervisedThread(Supervised):
    """A thread running ``fn(*args, stop=<threading.Event>)`` until ``stop`` is set."""

    kind = "thread"

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], name: str | None, stop_timeout: float
    ) -> None:
        if not _takes_stop(fn):
            raise TypeError(
                f"{_where(fn)} takes no 'stop' parameter: a supervised thread stops at the safe "
                "points it chooses, by checking stop.is_set() or waiting on stop.wait(timeout)"
            )
        super().__init__(fn, args, name, stop_timeout)
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.closed or self.running:
            return
        self._stop = threading.Event()
        fn, stop = self.current_fn(), self._stop
        self.thread = threading.Thread(
            target=self._run, args=(fn, stop), name=f"supervised:{self.name}", daemon=True
        )
        self.thread.start()

    def _run(self, fn: Callable[..., Any], stop: threading.Event) -> None:
        try:
            fn(*self.args, stop=stop)
        except Exception:
            log.exception("%s raised; it stays stopped until the next release", self.describe())

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> str | None:
        thread = self.thread
        self._stop.set()
        if thread is None or thread is threading.current_thread():
            return None
        thread.join(self.stop_timeout)
        if thread.is_alive():
            return (
                f"{self.describe()} did not reach a safe point within {self.stop_timeout:g}s "
                "and keeps running its old code"
            )
        return None


class SupervisedTask(Supervised):
    """An asyncio task running ``coro_fn(*args[, stop=<asyncio.Event>])`` on one loop."""

    kind = "task"

    def __init__(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
        name: str | None,
        stop_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(fn, args, name, stop_timeout)
        self.loop = loop
        self.task: asyncio.Task[Any] | None = None
        self._stop_event: asyncio.Event | None = None
        self._done = threading.Event()
        self._done.set()

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def start(self) -> None:
        if self.closed or self.running or self.loop.is_closed():
            return
        self._done.clear()
        if self._on_loop():
            self._create()
        else:
            self.loop.call_soon_threadsafe(self._create)

    def _create(self) -> None:
        fn = self.current_fn()
        kwargs: dict[str, Any] = {}
        if _takes_stop(fn):
            self._stop_event = asyncio.Event()
            kwargs["stop"] = self._stop_event
        else:
            self._stop_event = None
        self.task = self.loop.create_task(self._run(fn, kwargs), name=f"supervised:{self.name}")

    async def _run(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        try:
            await fn(*self.args, **kwargs)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s raised; it stays stopped until the next release", self.describe())
        finally:
            self._done.set()

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def _ask_stop(self) -> None:
        if self.task is None or self.task.done():
            return
        if self._stop_event is not None:
            self._stop_event.set()
        else:
            self.task.cancel()

    def _cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def stop(self) -> str | None:
        if self._done.is_set() or self.loop.is_closed():
            return None
        if self._on_loop():  # cannot wait for the loop on the loop itself
            self._cancel()
            return None
        try:
            self.loop.call_soon_threadsafe(self._ask_stop)
        except RuntimeError:  # the loop closed meanwhile
            return None
        if self._done.wait(self.stop_timeout):
            return None
        try:
            self.loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:
            return None
        if self._done.wait(1.0):
            return f"{self.describe()} did not stop within {self.stop_timeout:g}s: cancelled"
        return f"{self.describe()} ignores cancellation and keeps running its old code"


def _register(unit: Supervised) -> None:
    with _lock:
        _registry.append(unit)


def supervise(
    fn: Callable[..., Any], *args: Any, name: str | None = None, stop_timeout: float = 5.0
) -> SupervisedThread:
    """Run ``fn(*args, stop=event)`` on a thread under supervision, starting now.

    ``fn`` must return soon after ``stop`` is set (check ``stop.is_set()`` or
    sleep with ``stop.wait(seconds)``): that is its safe point.
    """
    unit = SupervisedThread(fn, args, name, stop_timeout)
    _register(unit)
    unit.start()
    return unit


def asupervise(
    coro_fn: Callable[..., Coroutine[Any, Any, Any]],
    *args: Any,
    name: str | None = None,
    stop_timeout: float = 5.0,
    loop: asyncio.AbstractEventLoop | None = None,
) -> SupervisedTask:
    """Run ``coro_fn(*args)`` as an asyncio task under supervision, starting now.

    Called on the running loop (or give ``loop``).  If ``coro_fn`` takes a
    ``stop`` parameter it gets an :class:`asyncio.Event` and should return
    once it is set; otherwise, and after ``stop_timeout``, the task is
    cancelled (every ``await`` is a safe point).
    """
    if not inspect.iscoroutinefunction(coro_fn):
        raise TypeError(f"{_where(coro_fn)} is not a coroutine function (async def)")
    unit = SupervisedTask(coro_fn, args, name, stop_timeout, loop or asyncio.get_running_loop())
    _register(unit)
    unit.start()
    return unit


# ------------------------------------------------------------ the loader's hooks
def _ordered(units: Iterable[Supervised], order: list[tuple[str, ...]]) -> list[Supervised]:
    """Dependencies first: by the module's place in the load order, then registration."""
    rank = {name: i for i, unit in enumerate(order) for name in unit}
    return sorted(units, key=lambda u: (rank.get(u.module, -1), u.serial))


def stop_all(order: list[tuple[str, ...]]) -> tuple[list[Supervised], list[str]]:
    """Stop every running unit, dependents first; (the stopped ones, warnings)."""
    units = [u for u in supervised() if u.running]
    warnings: list[str] = []
    stopped: list[Supervised] = []
    for unit in reversed(_ordered(units, order)):
        problem = unit.stop()
        if problem:
            warnings.append(problem)
        stopped.append(unit)
    if stopped:
        log.info("stopped %d supervised units at a safe point", len(stopped))
    return stopped, warnings


def start_all(units: Iterable[Supervised], order: list[tuple[str, ...]]) -> None:
    """Start ``units`` on the current code, dependencies first."""
    for unit in _ordered(units, order):
        if unit.closed:
            continue
        unit.restarts += 1
        unit.start()


def _frames(frame: FrameType | None) -> Iterator[FrameType]:
    chain = []
    while frame is not None:
        chain.append(frame)
        frame = frame.f_back
    return reversed(chain)  # outermost first


def _all_tasks() -> list[asyncio.Task[Any]]:
    found: list[asyncio.Task[Any]] = []
    for attr in ("_all_tasks", "_scheduled_tasks", "_eager_tasks"):
        tasks = getattr(asyncio.tasks, attr, None)
        if tasks is not None:
            try:
                found.extend(list(tasks))
            except RuntimeError:  # changed size while copied: a snapshot is best effort
                continue
    return found


def unsupervised_warnings(changed: set[str]) -> list[str]:
    """Background threads and tasks, not supervised, whose own function is in ``changed``."""
    if not changed:
        return []
    warnings: list[str] = []
    mine = {u.thread.ident for u in supervised() if isinstance(u, SupervisedThread) and u.thread}
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    for ident, top in sys._current_frames().items():
        if ident == me or ident in mine:
            continue
        for frame in _frames(top):  # the thread's own function: its first frame outside threading
            module = frame.f_globals.get("__name__", "?")
            if module == "threading":
                continue
            if module in changed:
                warnings.append(
                    f"unsupervised thread {names.get(ident, ident)!r} runs {module}:"
                    f"{frame.f_code.co_qualname} (module {module}) and keeps its old code until "
                    "it returns; run it under node_agent.supervise() to restart it on the new code"
                )
            break
    tasks = {id(u.task) for u in supervised() if isinstance(u, SupervisedTask) and u.task}
    for task in _all_tasks():
        if id(task) in tasks or task.done():
            continue
        coro = task.get_coro()
        cr_frame: FrameType | None = getattr(coro, "cr_frame", None)
        if cr_frame is None:
            continue
        module = cr_frame.f_globals.get("__name__", "?")
        if module in changed:
            warnings.append(
                f"unsupervised task {task.get_name()!r} runs {module}:{cr_frame.f_code.co_qualname} "
                f"(module {module}) and keeps its old code until it returns; run it under "
                "node_agent.asupervise() to restart it on the new code"
            )
    return warnings


class SupervisedLoader(Loader):
    """The loader with supervision: stops and restarts supervised work around every switch."""

    _last_order: list[tuple[str, ...]] = []

    def prepare(self, release: Release, *, force: bool = False) -> Prepared:
        prepared = super().prepare(release, force=force)
        changed = {c.module for c in prepared.changes if c.kind != "unchanged"}
        units = supervised()
        if units and changed:
            qualnames = {u.qualname for u in units}
            # the loader's own "keeps running its old code" notes are wrong for these
            prepared.warnings[:] = [
                w
                for w in prepared.warnings
                if not (
                    w.endswith("keeps running its old code until it finishes")
                    and w.split(" ", 1)[0] in qualnames
                )
            ]
            prepared.warnings.extend(
                f"{u.describe()} restarts on the new code at finish" for u in units if u.running
            )
        prepared.warnings.extend(unsupervised_warnings(changed))
        return prepared

    def finish(self, prepared: Prepared, *, at: float = 0.0) -> FinishReport:
        changes = any(c.kind != "unchanged" for c in prepared.changes)
        if prepared.report is not None or not changes or not supervised():
            return _with_drain_warning(super().finish(prepared, at=at), self.drain_timeout)
        stopped, warnings = stop_all(prepared.order)
        try:
            report = super().finish(prepared, at=at)
            self._last_order = prepared.order
        finally:
            start_all(stopped, prepared.order)  # on the new code, or the old one if it failed
        report = replace(report, warnings=(*report.warnings, *warnings))
        prepared.report = _with_drain_warning(report, self.drain_timeout)
        return prepared.report

    def rollback(self, *, at: float = 0.0) -> FinishReport:
        if not supervised():
            return _with_drain_warning(super().rollback(at=at), self.drain_timeout)
        stopped, warnings = stop_all(self._last_order)
        try:
            report = super().rollback(at=at)
        finally:
            start_all(stopped, self._last_order)
        return _with_drain_warning(
            replace(report, warnings=(*report.warnings, *warnings)), self.drain_timeout
        )


def _with_drain_warning(report: FinishReport, timeout: float) -> FinishReport:
    """A drain that timed out is said in the report (long streams, websockets)."""
    if report.drained or any(w.startswith("drain timed out") for w in report.warnings):
        return report
    note = (
        f"drain timed out after {timeout:g}s: {report.still_in_flight} guarded unit(s) "
        "(e.g. a long stream or an open websocket) were still in flight and keep their old "
        "code until they end"
    )
    log.warning("%s", note)
    return replace(report, warnings=(*report.warnings, note))
