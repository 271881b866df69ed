"""A real fleet for coordinator tests: agents, an elected in-process leader, request load.

Registered as a pytest plugin (see conftest), so ``agents`` and ``leader``
are fixtures; everything started here is stopped at teardown.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.election import Election, Session
from coordinator.engine import Engine, RolloutOptions
from coordinator.fleet import AgentPool
from coordinator.model import Rollout
from coordinator.traffic import TrafficProcess
from coordinator.transport import Transport
from hotfleet.etcd_client import connect
from hotfleet.keys import Keys
from tests.agents import SHOP_MODULES, AgentProcess, Agents, wait_for
from tests.coordinators import Coordinators


class Leader:
    """An engine that has won a real election (and can be deposed)."""

    def __init__(
        self,
        endpoint: str,
        prefix: str,
        name: str = "leader-a",
        transport: Transport | None = None,
    ) -> None:
        self.client = connect(endpoint)
        self.keys = Keys(prefix)
        self._owns_transport = transport is None  # a shared one outlives this leader
        self.engine = Engine(self.client, self.keys, transport or AgentPool(), address=name)
        self.session = Session(self.client, ttl=3)
        self.lead = Election(self.client, self.keys.election, self.session).campaign(
            name, timeout=10
        )
        self.engine.lead(self.lead)

    def wait(self, rollout_id: str, timeout: float = 30) -> Rollout:
        """The rollout once terminal; on timeout, fail with its record and the engine's threads."""
        try:
            return wait_for(
                lambda: (r := self.engine.rollout(rollout_id)).phase.terminal and r, timeout
            )
        except AssertionError:
            raise AssertionError(
                f"rollout {rollout_id} not terminal within {timeout:g}s: "
                f"{self.engine.rollout(rollout_id).dumps()}\n{engine_threads()}"
            ) from None

    def close(self) -> None:
        self.engine.close()
        self.session.close()
        if self._owns_transport:
            self.engine.agents.close()
        self.client.close()


def engine_threads() -> str:
    """Where every ``hotfleet-*`` thread of this process is, for a failure message."""
    frames = sys._current_frames()
    return "\n".join(
        f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
        for t in threading.enumerate()
        if t.name.startswith("hotfleet-") and t.ident in frames
    )


@pytest.fixture
def agents(tmp_path: Path, etcd_endpoint: str, etcd_prefix: str) -> Iterator[Agents]:
    fleet = Agents(tmp_path, etcd_endpoint, etcd_prefix)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def coordinators(tmp_path: Path, etcd_endpoint: str, etcd_prefix: str) -> Iterator[Coordinators]:
    owner = Coordinators(tmp_path, etcd_endpoint, etcd_prefix)
    try:
        yield owner
    finally:
        owner.close()


@pytest.fixture
def leader(etcd_endpoint: str, etcd_prefix: str) -> Iterator[Leader]:
    lead = Leader(etcd_endpoint, etcd_prefix)
    try:
        yield lead
    finally:
        lead.close()


def opts(**kw: object) -> RolloutOptions:
    """No rollback window unless a test asks for one: these tests are about the 2PC."""
    return RolloutOptions(**{"window_s": 0.0, **kw})  # type: ignore[arg-type]


def versions(nodes: list[AgentProcess]) -> set[str]:
    """Every module version served by every node (one element when the fleet agrees)."""
    return {v for n in nodes for m, v in n.versions().items() if m in SHOP_MODULES}


def start_fleet(agents: Agents, count: int, **kw: object) -> list[AgentProcess]:
    return [agents.start(f"n{i}", **kw) for i in range(1, count + 1)]  # type: ignore[arg-type]


class Load(TrafficProcess):
    """Steady closed-loop HTTP load on every node, from a process of its own.

    A :class:`coordinator.traffic.TrafficProcess` whose targets are named by
    node (or by address for a target without a node id); its ``reports()``
    are one per node (:meth:`coordinator.traffic.NodeStats.to_json`: ok,
    failed, http_500, other_failures, seen, mixed, mixes).
    """

    def __init__(
        self, nodes: list[AgentProcess], path: str = "/price?sku=apple&qty=2", threads: int = 2
    ) -> None:
        targets = {getattr(n, "node_id", "") or n.http_address: n.http_address for n in nodes}
        super().__init__(targets, None, threads=threads, path=path)
