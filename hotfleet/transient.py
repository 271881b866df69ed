"""Which etcd and gRPC failures are worth retrying, and what to call them.

Retrying is right for a failure that goes away by itself: an etcd member
restarting or electing a leader (``UNAVAILABLE``), a request that timed out
(``DEADLINE_EXCEEDED``).  It is wrong for everything else: a programming
error (``TypeError``) retried for 30 s only hides the traceback behind a
timeout, and etcd's ``RESOURCE_EXHAUSTED`` (the database quota is full) or
``PERMISSION_DENIED`` will say the same thing on every attempt.  So every
retry in hotfleet goes through :func:`retrying`: a tenacity policy whose
predicate is :func:`is_transient`, with full jitter (coordinators and agents
that lost etcd together do not come back in lock step), bounded by the
caller's budget and by the request budget of the RPC being answered
(:func:`request_budget`), so that a client asking through the coordinator
hears "etcd is unreachable" before its own deadline, not "coordinator timed
out".  A thread that owns a stop event runs its work in :func:`cancelled_by`:
once the event is set, its retries end at once (no sleep, no next attempt),
so stopping a coordinator while etcd is away costs one in-flight call, not a
30 s retry budget per thread.

:func:`describe` names the cause for a human: ``etcd unreachable``,
``etcd timed out``, ``etcd quota exhausted`` …
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import tenacity

__all__ = [
    "TRANSIENT_CODES",
    "Cancelled",
    "cancelled_by",
    "describe",
    "from_etcd",
    "is_quota",
    "is_transient",
    "request_budget",
    "retrying",
    "status_code",
]

log = logging.getLogger("hotfleet.retry")

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# python3-etcd3 turns some gRPC statuses into exceptions of its own (by name:
# no import of etcd3 needed to classify them).
_ETCD3_CODES = {
    "ConnectionFailedError": grpc.StatusCode.UNAVAILABLE,
    "NoServerAvailableError": grpc.StatusCode.UNAVAILABLE,
    "ConnectionTimeoutError": grpc.StatusCode.DEADLINE_EXCEEDED,
    "InternalServerError": grpc.StatusCode.INTERNAL,
    "PreconditionFailedError": grpc.StatusCode.FAILED_PRECONDITION,
}

# The deadline (time.monotonic()) of the request being served on this thread.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "hotfleet_request_deadline", default=None
)


def status_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind ``exc`` (a raw ``RpcError`` or an etcd3 exception), else None."""
    if isinstance(exc, grpc.RpcError):
        get = getattr(exc, "code", None)
        try:
            code = get() if callable(get) else None
        except Exception:
            code = None
        return code if isinstance(code, grpc.StatusCode) else None
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("etcd3") and cls.__name__ in _ETCD3_CODES:
            return _ETCD3_CODES[cls.__name__]
    if type(exc).__name__ == "EtcdConnectError":  # hotfleet.etcd_client: no endpoint answered
        return grpc.StatusCode.UNAVAILABLE
    return None


class Outage(Exception):
    """Mixin for project errors that mean "a dependency was unreachable": worth retrying."""


class Cancelled(Outage):
    """Retrying ended because the work's owner is stopping (see :func:`cancelled_by`)."""


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: etcd or a peer unreachable or slow, nothing about the request itself."""
    return isinstance(exc, Outage) or status_code(exc) in TRANSIENT_CODES


def from_etcd(exc: BaseException) -> bool:
    """Whether ``exc`` is etcd's (or a peer's) answer or silence, not a bug of ours.

    Wider than :func:`is_transient`: a compacted revision or a permission
    denied is etcd speaking, not worth retrying as is, and not a bug either.
    """
    if isinstance(exc, Outage) or status_code(exc) is not None:
        return True
    return any(cls.__module__.startswith("etcd3") for cls in type(exc).__mro__)


def is_quota(exc: BaseException) -> bool:
    return status_code(exc) is grpc.StatusCode.RESOURCE_EXHAUSTED


def _details(exc: BaseException) -> str:
    get = getattr(exc, "details", None)
    try:
        text = get() if callable(get) else ""
    except Exception:
        text = ""
    return str(text or exc or type(exc).__name__)


def describe(exc: BaseException, what: str = "etcd") -> str:
    """The cause in words, for an error message: ``etcd unreachable (…)`` and so on."""
    code = status_code(exc)
    detail = _details(exc)
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"{what} unreachable ({detail})"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{what} timed out ({detail})"
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return (
            f"{what} quota exhausted ({detail}): compact and defragment etcd, or raise its "
            "--quota-backend-bytes"
        )
    if code is not None:
        return f"{what} refused: {code.name}: {detail}"
    return f"{type(exc).__name__}: {detail}"


@contextlib.contextmanager
def request_budget(seconds: float | None) -> Iterator[None]:
    """Within this block, retries give up ``seconds`` from now (None: no request budget)."""
    token = _deadline.set(None if seconds is None else time.monotonic() + max(0.0, seconds))
    try:
        yield
    finally:
        _deadline.reset(token)


# The stop event of the work being done in this context (see cancelled_by).
_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "hotfleet_cancel", default=None
)


@contextlib.contextmanager
def cancelled_by(event: threading.Event) -> Iterator[None]:
    """Within this block, retries stop as soon as ``event`` is set (the last failure is raised)."""
    token = _cancel.set(event)
    try:
        yield
    finally:
        _cancel.reset(token)


def _budget(seconds: float) -> float:
    deadline = _deadline.get()
    if deadline is None:
        return seconds
    return max(0.0, min(seconds, deadline - time.monotonic()))


def _outcome(outcome: Any) -> str:
    exc = outcome.exception() if outcome is not None else None
    return describe(exc) if exc is not None else "?"


def retrying(budget_s: float, what: str = "etcd call") -> tenacity.Retrying:
    """Retry transient failures only, with full jitter, for at most ``budget_s``.

    The budget shrinks to what is left of the request being answered on this
    thread (:func:`request_budget`), and ends when the stop event of
    :func:`cancelled_by` is set.  The last failure is re-raised as is.
    """
    cancel = _cancel.get()
    stop: tenacity.stop.stop_base = tenacity.stop_after_delay(_budget(budget_s))
    sleep: Callable[[float], None] = time.sleep
    if cancel is not None:
        stop = stop | tenacity.stop_when_event_set(cancel)

        def sleep(seconds: float) -> None:  # woken by the stop: no further attempt
            if cancel.wait(seconds):
                raise Cancelled(f"{what}: given up, stopping (it was failing: etcd away?)")

    return tenacity.Retrying(
        stop=stop,
        sleep=sleep,
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=2.0),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=lambda state: log.warning(
            "%s failed: %s; retrying", what, _outcome(state.outcome)
        ),
        reraise=True,
    )
