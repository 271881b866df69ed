"""The coordinator's fan-out: every node gets its call, at most ``concurrency`` at once,
and a call that raises (a bug: RPC errors are handled inside the calls) reaches the caller
only after every other node had its call, as ``ThreadPoolExecutor.map`` did."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.twophase import fan_out


def test_every_node_is_called_once_and_never_more_than_concurrency_at_a_time() -> None:
    lock = threading.Lock()
    running, most = 0, 0
    called: list[int] = []

    def call(item: int) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            called.append(item)
        time.sleep(0.002)  # long enough for the workers to overlap
        with lock:
            running -= 1

    items = list(range(200))
    fan_out(call, items, 8)
    assert sorted(called) == items
    assert 1 < most <= 8


def test_a_raising_call_reaches_the_caller_after_every_node_had_its_call() -> None:
    called: list[int] = []

    def call(item: int) -> None:
        called.append(item)
        if item == 3:
            raise RuntimeError("bug on node 3")

    with pytest.raises(RuntimeError, match="node 3"):
        fan_out(call, list(range(50)), 4)
    assert sorted(called) == list(range(50))
    assert not [t for t in threading.enumerate() if t.name.startswith("hotfleet-rpc")]
