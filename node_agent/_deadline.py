"""Deadlines for release code that runs in the live process (finish, rollback).

Release code runs in the live process only after the commit decision, behind
the drain barrier, so a statement that never returns would hold every guarded
request for ever.  Python threads cannot be killed, but a pure-Python loop can
be interrupted: :func:`interrupt_after` raises :class:`Overrun` in the running
thread through ``PyThreadState_SetAsyncExc`` when the deadline passes.  Code
blocked inside a C call (a lock acquired without timeout) only sees it when the
call returns; :func:`call_with_deadline` covers that case for the parts that
need no access to the switching thread (state migrations): it runs the call in
a thread of its own and walks away from it at the deadline.

``Overrun`` derives from ``BaseException`` so that release code's own
``except Exception`` cannot swallow it.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = [ctypes.c_ulong, ctypes.py_object]
_set_async_exc.restype = ctypes.c_int


class Overrun(BaseException):
    """Release code ran past its deadline (raised asynchronously in its thread)."""


def _inject(ident: int, exc: type[BaseException] | None) -> None:
    # None clears an exception that was set but not delivered yet
    _set_async_exc(ident, ctypes.py_object(exc) if exc is not None else ctypes.py_object())


@contextlib.contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """Raise :class:`Overrun` in this thread if the block is still running after ``seconds``.

    The timer and the block's exit are serialized by a lock, and an overrun
    set just as the block ends is cleared before it can land in unrelated
    code.
    """
    ident = threading.get_ident()
    lock = threading.Lock()
    state = {"active": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["active"]:
                state["fired"] = True
                _inject(ident, Overrun)

    timer = threading.Timer(seconds, fire)
    timer.name = "hotfleet-deadline"
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["active"] = False
            if state["fired"]:
                _inject(ident, None)
        timer.cancel()
        timer.join()


class Abandoned(Exception):
    """:func:`call_with_deadline` gave up waiting; the call may still be running."""


def call_with_deadline(fn: Callable[[], T], seconds: float, name: str) -> T:
    """``fn()`` in a thread of its own; :class:`Abandoned` if it has not returned in time.

    At the deadline the thread is also asked to stop (an :class:`Overrun`
    raised in it), which ends a pure-Python loop; whatever it returns later
    is ignored.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if thread.ident is not None:
            _inject(thread.ident, Overrun)
        raise Abandoned(f"{name} did not return within {seconds:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]
