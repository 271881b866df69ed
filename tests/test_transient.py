"""Retry policy: only transient etcd/gRPC failures are retried, and each is named by its cause."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import pytest
from etcd3 import exceptions as etcd3_errors

from hotfleet import transient
from hotfleet.etcd_client import EtcdConnectError


class Status(grpc.RpcError):
    """A gRPC failure as the grpc library raises it: ``code()`` and ``details()``."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def flaky(failures: list[BaseException]) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "done"

    return calls, call


def test_transient_failures_are_retried_until_they_pass() -> None:
    calls, call = flaky(
        [
            etcd3_errors.ConnectionFailedError(),
            etcd3_errors.ConnectionTimeoutError(),
            Status(grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed"),
            EtcdConnectError("cannot reach etcd"),
        ]
    )
    assert transient.retrying(10)(call) == "done"
    assert len(calls) == 5


@pytest.mark.parametrize(
    "error",
    [
        TypeError("a programming error"),
        KeyError("node"),
        Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"),
        Status(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
        etcd3_errors.PreconditionFailedError(),
    ],
)
def test_other_failures_are_raised_at_once(error: BaseException) -> None:
    calls, call = flaky([error])
    with pytest.raises(type(error)):
        transient.retrying(10)(call)
    assert len(calls) == 1


def test_causes_are_named() -> None:
    quota = Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
    assert transient.is_quota(quota) and not transient.is_transient(quota)
    assert transient.describe(quota).startswith("etcd quota exhausted")
    assert "--quota-backend-bytes" in transient.describe(quota)
    assert transient.describe(etcd3_errors.ConnectionFailedError()).startswith("etcd unreachable")
    assert transient.describe(etcd3_errors.ConnectionTimeoutError()).startswith("etcd timed out")
    denied = Status(grpc.StatusCode.PERMISSION_DENIED, "permission denied")
    assert transient.describe(denied) == "etcd refused: PERMISSION_DENIED: permission denied"


def test_a_request_budget_bounds_every_retry_inside_it() -> None:
    calls, call = flaky([etcd3_errors.ConnectionFailedError() for _ in range(1000)])
    started = time.monotonic()
    with transient.request_budget(0.3), pytest.raises(etcd3_errors.ConnectionFailedError):
        transient.retrying(30)(call)
    assert time.monotonic() - started < 5  # the request's budget, not the caller's 30 s
    assert len(calls) >= 2  # it did retry meanwhile


def test_a_stop_ends_the_retries_of_its_work_at_once() -> None:
    """A stopping owner's retries neither sleep on nor try again (a stop with etcd away)."""
    calls, call = flaky([etcd3_errors.ConnectionFailedError() for _ in range(1000)])
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with transient.cancelled_by(stop), pytest.raises(transient.Cancelled) as info:
        transient.retrying(30)(call)
    assert time.monotonic() - started < 1.0  # the backoff sleep is woken by the stop
    assert transient.from_etcd(info.value)  # logged as etcd's doing, not as a bug
    tried = len(calls)
    with transient.cancelled_by(stop), pytest.raises(etcd3_errors.ConnectionFailedError):
        transient.retrying(30)(call)  # already stopped: one attempt, its failure raised
    assert len(calls) == tried + 1


def test_from_etcd_tells_etcds_answers_from_our_bugs() -> None:
    """What is logged as an outage must be etcd's doing; anything else is logged as a bug."""
    from hotfleet import transient

    class Denied(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.PERMISSION_DENIED

    assert transient.from_etcd(Denied())  # etcd speaking, not transient, not a bug
    assert not transient.is_transient(Denied())
    assert transient.from_etcd(
        type("ConnectionFailedError", (Exception,), {"__module__": "etcd3.exceptions"})()
    )
    assert not transient.from_etcd(KeyError("x"))
    assert not transient.from_etcd(TypeError("bug"))
