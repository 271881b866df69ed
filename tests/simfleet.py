"""Simulated nodes: the real participant, decision watch and wire translation, no code loading.

A :class:`SimNode` is what a node agent is to the coordinator, minus the
loader: the same :class:`~node_agent.participant.Participant` (state
machine, idempotence, decision handling), the same decision watch reading
etcd, the same protobuf translation, a membership record in etcd that it
republishes on every state change, and a monotonic epoch fence.  Its
:class:`SimCode` only records which release is current, so a protocol test
runs in milliseconds and can restart a node by replacing it.

Unit-level isolation of the loader, not a mock of the system: every
coordinator-side part (engine, election, decisions, convergence, etcd) is
real.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from coordinator.engine import Engine
from coordinator.transport import InProcessTransport, empty_health
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.errors import ModuleError, Reason
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.release import Release
from hotfleet.wire import manifest_from_proto
from node_agent.decision_watch import DecisionWatches
from node_agent.errors import FinishError, PrepareError
from node_agent.loader import FinishReport, ReleaseInfo
from node_agent.participant import Participant, label
from node_agent.participant_wire import WireParticipant
from tests.agents import release
from tests.fleet import Leader


def _until(at: float) -> None:
    """Wait for a commit instant, as the loader's hold does (``Code.finish(..., at=)``)."""
    wait = at - time.time() if at else 0.0
    if wait > 0:
        time.sleep(wait)


@dataclass
class SimPlan:
    release: Any
    changes: tuple[Any, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass
class SimCode:
    """Which release a simulated node runs; fails prepare/finish of the labels it is told to."""

    current_release: ReleaseInfo | None = None
    previous_release: ReleaseInfo | None = None
    permanent_release: ReleaseInfo | None = None
    refuse: set[str] = field(default_factory=set)  # labels whose prepare fails
    fail_finish: set[str] = field(default_factory=set)  # labels whose finish fails (restored)
    _backup: bool = False

    @property
    def can_rollback(self) -> bool:
        return self._backup

    def prepare(self, release: Any, *, force: bool = False) -> SimPlan:
        if release.label in self.refuse:
            raise PrepareError([ModuleError("sim", Reason.IMPORT_ERROR, "refused by the test")])
        return SimPlan(release)

    def finish(self, prepared: SimPlan, *, at: float = 0.0) -> FinishReport:
        _until(at)
        if prepared.release.label in self.fail_finish:
            err = ModuleError("sim", Reason.CODE_CHANGE_FAILED, "finish fails in the test")
            raise FinishError([err], restored=True)
        self.previous_release, self._backup = self.current_release, True
        self.current_release = ReleaseInfo.of(prepared.release)
        return FinishReport(self.current_release, 0.0, True, 0, 0)

    def abort(self, prepared: SimPlan) -> None:
        pass

    def rollback(self, *, at: float = 0.0) -> FinishReport:
        _until(at)
        self.current_release, self._backup = self.previous_release, False
        self.previous_release = None
        return FinishReport(self.current_release, 0.0, True, 0, 0)

    def make_permanent(self) -> None:
        self.permanent_release = self.current_release

    def cancel_prepare(self) -> None:
        pass


class SimNode:
    """One simulated agent at ``sim://<node_id>`` (see the module docstring)."""

    def __init__(self, node_id: str, client: EtcdClient, keys: Keys, code: SimCode) -> None:
        self.node_id = node_id
        self.address = f"sim://{node_id}"
        self.client = client
        self.keys = keys
        self.code = code
        self._epoch = 0
        self._fence_lock = threading.Lock()
        self.watches = DecisionWatches(keys, lambda: client, self._apply, interval=0.1)
        self.participant = Participant(
            code, node_id=node_id, watch=self.watches, on_state=self.publish
        )
        self.wire = WireParticipant(self.participant, node_id, _declared, lambda: self._epoch)

    # the InProcessNode interface
    def fence(self, epoch: int) -> str | None:
        with self._fence_lock:
            if epoch < self._epoch:
                return f"epoch {epoch} is lower than {self._epoch}"
            self._epoch = epoch
            return None

    def prepare(self, request: Any) -> Any:
        return self.wire.prepare(request)

    def finish(self, request: Any) -> Any:
        return self.wire.finish(request)

    def abort(self, request: Any) -> Any:
        return self.wire.abort(request)

    def rollback(self, request: Any) -> Any:
        return self.wire.rollback(request)

    def make_permanent(self, request: Any) -> Any:
        return self.wire.make_permanent(request)

    def status(self) -> Any:
        return agent_pb2.StatusReply(
            node_id=self.node_id,
            state=str(self.participant.state),
            current_release=label(self.code.current_release),
            previous_release=label(self.code.previous_release),
            permanent_release=label(self.code.permanent_release),
            epoch_seen=self._epoch,
            prepared_rollout=self.participant.prepared_rollout,
        )

    def health(self) -> Any:
        return empty_health()

    # membership and decisions
    def publish(self) -> None:
        record = {
            "node_id": self.node_id,
            "address": self.address,
            "current_release": label(self.code.current_release),
            "previous_release": label(self.code.previous_release),
            "permanent_release": label(self.code.permanent_release),
            "state": str(self.participant.state),
            "prepared_rollout": self.participant.prepared_rollout,
            "epoch_seen": self._epoch,
        }
        self.client.put(self.keys.node(self.node_id), json.dumps(record))

    def _apply(self, rollout_id: str, decision: str, watch: Any, participants: Any) -> bool:
        included = participants is None or self.node_id in participants
        return self.participant.apply_decision(rollout_id, decision, watch, included=included)

    def stop(self) -> None:
        self.participant.stop()
        self.watches.stop(2.0)


def _declared(request: Any) -> Release:
    """The release a Prepare names, as declared (no sources: nothing is loaded)."""
    return Release.from_manifest(manifest_from_proto(request.release), lambda _digest: b"")


class SimFleet:
    """Simulated nodes registered in etcd and reachable through one in-process transport."""

    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.transport = InProcessTransport()
        self.nodes: dict[str, SimNode] = {}

    def start(self, node_id: str, code: SimCode | None = None) -> SimNode:
        node = SimNode(node_id, self.client, self.keys, code or SimCode())
        self.nodes[node_id] = node
        self.transport.add(node.address, node)
        node.participant.settle()  # IDLE, published
        return node

    def restart(self, node_id: str) -> SimNode:
        """The node's process dies and comes back on its permanent release, nothing in memory."""
        old = self.nodes[node_id]
        old.stop()
        self.transport.remove(old.address)
        boot = old.code.permanent_release
        code = SimCode(boot, None, boot, set(old.code.refuse), set(old.code.fail_finish))
        return self.start(node_id, code)

    def restart_address(self, address: str) -> None:
        """:meth:`restart` by transport address (a :class:`Fault`'s ``then``)."""
        self.restart(address.removeprefix("sim://"))

    def current(self) -> dict[str, str]:
        return {n: label(node.code.current_release) for n, node in self.nodes.items()}

    def prepared(self) -> dict[str, str]:
        return {n: node.participant.prepared_rollout for n, node in self.nodes.items()}

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.transport.close()


def engine_over(fleet: SimFleet, client: EtcdClient, name: str) -> Engine:
    return Engine(client, fleet.keys, fleet.transport, address=name)


# ------------------------------------------------------------------ fixtures
# (a pytest plugin: see conftest)
@pytest.fixture
def sim_fleet(etcd_client: EtcdClient, etcd_prefix: str) -> Iterator[SimFleet]:
    """An empty simulated fleet in this test's etcd prefix; every node stopped at the end."""
    fleet = SimFleet(etcd_client, Keys(etcd_prefix))
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def sim_leader(sim_fleet: SimFleet, etcd_endpoint: str, etcd_prefix: str) -> Iterator[Leader]:
    """An elected leader reaching ``sim_fleet`` in process, with shop 2.0.0 pushed."""
    leader = Leader(etcd_endpoint, etcd_prefix, "leader-a", transport=sim_fleet.transport)
    leader.engine.push_release(release("shop-2.0.0"))
    try:
        yield leader
    finally:
        leader.close()
