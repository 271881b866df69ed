"""The health sampler tells a worker recycled on purpose from a crash.

A gunicorn worker recycled by ``max_requests`` (or one worker's graceful
reload) announces ``stopping`` in its membership record before it exits, and
its successor takes the same node id with a new pid.  Inside a rollback
window that must not read as a crash (it would roll a good release back),
while a process that changed without a word still does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from coordinator.analysis import EventKind
from coordinator.fleet import NodeInfo
from coordinator.health import HealthSampler
from coordinator.transport import InProcessTransport, empty_health


def sampler_seeing(*rounds: list[NodeInfo]) -> HealthSampler:
    queue = list(rounds)
    sampler = HealthSampler(lambda: queue.pop(0), InProcessTransport(), interval_s=0.1)
    for _ in rounds:
        sampler.sample_once()  # Health answers UNAVAILABLE: only membership is read
    return sampler


def node(pid: int, state: str = "idle") -> NodeInfo:
    return NodeInfo("n1", address="sim://n1", pid=pid, state=state)


def test_a_worker_recycled_on_purpose_is_not_a_crash() -> None:
    # the judge sees the successor before the sampler's next round ...
    sampler = sampler_seeing([node(10)], [node(10, "stopping")])
    assert sampler.lost(["n1"], 0.0, {"n1": node(11)}) == []
    # ... or after it: the successor's pid is then known as a recycle
    sampler = sampler_seeing([node(10)], [node(10, "stopping")], [node(11)], [node(11)])
    assert sampler.lost(["n1"], 0.0, {"n1": node(11)}) == []


def test_a_successor_that_says_whom_it_replaces_is_a_recycle_even_unseen() -> None:
    """The "stopping" record lives well under a second: sampling rounds can miss it
    (seen in a gunicorn test: a good release rolled back as "a-w1 crash")."""
    successor = NodeInfo("n1", address="sim://n1", pid=11, state="idle", replaces=10)
    sampler = sampler_seeing([node(10)], [node(10)])  # never saw "stopping"
    assert sampler.lost(["n1"], 0.0, {"n1": successor}) == []
    sampler = sampler_seeing([node(10)], [node(10)], [successor], [successor])
    assert sampler.lost(["n1"], 0.0, {"n1": successor}) == []
    impostor = NodeInfo("n1", address="sim://n1", pid=11, state="idle", replaces=9)
    (event,) = sampler_seeing([node(10)]).lost(["n1"], 0.0, {"n1": impostor})
    assert event.kind is EventKind.CRASH  # it replaced someone else: 10 died unannounced


def test_a_process_that_changed_without_a_word_is_a_crash() -> None:
    sampler = sampler_seeing([node(10)], [node(10)])
    (event,) = sampler.lost(["n1"], 0.0, {"n1": node(11)})
    assert event.kind is EventKind.CRASH and "pid 10 -> 11" in event.detail


class _CountingNode:
    """An in-process node whose first Health call runs ``on_first`` (e.g. a 2PC pausing)."""

    def __init__(self, asked: list[str], name: str, on_first: Callable[[], None]) -> None:
        self.asked, self.name, self.on_first = asked, name, on_first

    def fence(self, epoch: int) -> str | None:
        return None

    def health(self) -> Any:
        with _FIRST:
            first = not self.asked
            self.asked.append(self.name)
        if first:
            self.on_first()
        return empty_health()


_FIRST = threading.Lock()


def test_a_pause_stops_the_round_in_flight() -> None:
    """A rollout that starts mid-round gets the fleet to itself: the nodes not asked yet
    are not asked (1000 Health RPCs finishing the round would compete with its prepare)."""
    transport = InProcessTransport()
    nodes = [NodeInfo(f"n{i:02d}", address=f"sim://n{i:02d}") for i in range(60)]
    sampler = HealthSampler(lambda: nodes, transport, interval_s=0.1)
    asked: list[str] = []
    for n in nodes:
        transport.add(n.address, _CountingNode(asked, n.node_id, sampler.pause))
    sampler.sample_once()
    # at most the calls already under way when the first answer paused the sampler
    assert 1 <= len(asked) <= 16 < len(nodes), asked
