"""The fleet protocol at every fault point, deterministically, in process.

The coordinator side is real (engine, election, decisions, convergence loop,
etcd); the nodes are :mod:`tests.simfleet` participants — the agent's own
state machine, decision watch and wire translation, without code loading —
reached through :class:`coordinator.transport.InProcessTransport`, which
loses a request or a reply, or restarts a node, exactly where a test says.
Each case asserts the invariants of the protocol, not a log line:

* the rollout ends in a terminal phase, and the ``active`` claim is free;
* the outcome is all or nothing: ``permanent`` means every node runs the
  release (a node that missed it is caught up by the convergence loop),
  ``aborted``/``rolled_back`` means every node runs what it ran before;
* no node is left holding a prepared rollout;
* a yes vote is kept or the fleet goes back (never ``permanent`` with a
  node that failed to switch).
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from coordinator.engine import RolloutOptions, Target
from coordinator.model import Phase, Rollout
from coordinator.transport import Fault, TransportError
from hotfleet._proto.hotfleet.v1 import agent_pb2
from tests.agents import wait_for
from tests.fleet import Leader, opts
from tests.simfleet import SimFleet

pytestmark = pytest.mark.integration

NODES = ("n1", "n2", "n3")
NEW = "shop@2.0.0"
BOOT = ""  # every node starts on its boot code


class Crash(BaseException):
    """The leader's process dies here: escapes the engine's ``except Exception``."""


@pytest.fixture
def sim(sim_fleet: SimFleet) -> SimFleet:
    for name in NODES:
        sim_fleet.start(name)
    return sim_fleet


@pytest.fixture
def lead(sim: SimFleet, sim_leader: Leader) -> Leader:
    return sim_leader


def settled(sim: SimFleet, leader: Leader, rollout_id: str, timeout: float = 20) -> Rollout:
    """Wait for the rollout to end and the fleet to agree with it; assert the invariants."""
    done = leader.wait(rollout_id, timeout)
    want = NEW if done.phase is Phase.PERMANENT else BOOT
    wait_for(lambda: set(sim.current().values()) == {want}, timeout)
    wait_for(lambda: not any(sim.prepared().values()), timeout)
    assert leader.client.get(leader.keys.active)[0] is None
    return done


def upgrade(leader: Leader) -> str:
    return leader.engine.upgrade(NEW, Target(all=True), opts(timeout_s=5)).id


@pytest.mark.parametrize(
    ("point", "outcome"),
    [
        ("before_prepare", Phase.ABORTED),
        ("before_decision", Phase.ABORTED),
        ("after_decision", Phase.PERMANENT),
        ("after_finish", Phase.PERMANENT),
        ("before_permanent", Phase.PERMANENT),
    ],
)
def test_the_leader_dies_at_each_step_and_its_successor_settles_the_rollout(
    sim: SimFleet,
    lead: Leader,
    etcd_endpoint: str,
    etcd_prefix: str,
    point: str,
    outcome: Phase,
) -> None:
    def die(_rollout: Rollout) -> None:
        raise Crash(point)

    lead.engine.hooks[point] = die
    rid = upgrade(lead)
    wait_for(lambda: not lead.engine._driving.get(rid), timeout=10)  # the driver died
    lead.close()  # its lease goes with it: a standby wins the election at once
    successor = Leader(etcd_endpoint, etcd_prefix, "leader-b", transport=sim.transport)
    try:
        done = settled(sim, successor, rid)
        assert done.phase is outcome, done.reason
        if outcome is Phase.ABORTED:
            assert done.decision == "abort"
    finally:
        successor.close()


NODE_FAULTS = [
    # rpc, when, the node restarts, how the rollout must end
    ("Prepare", "before", False, Phase.ABORTED),  # the vote never came: abort
    ("Prepare", "after", False, Phase.ABORTED),  # prepared, vote lost: abort, dropped
    ("Prepare", "after", True, Phase.ABORTED),
    ("Finish", "before", False, Phase.PERMANENT),  # retried until it lands
    ("Finish", "after", False, Phase.PERMANENT),  # the retry is a replay
    ("Finish", "before", True, Phase.ROLLED_BACK),  # yes vote lost with the process
    ("Finish", "after", True, Phase.ROLLED_BACK),  # switched, restarted on the old code
    ("MakePermanent", "before", False, Phase.PERMANENT),
    ("MakePermanent", "after", True, Phase.PERMANENT),  # caught up after its restart
    ("Abort", "before", False, Phase.ABORTED),
]


@pytest.mark.parametrize(("rpc", "when", "restart", "outcome"), NODE_FAULTS)
def test_a_node_fault_at_each_step_ends_all_or_nothing(
    sim: SimFleet, lead: Leader, rpc: str, when: str, restart: bool, outcome: Phase
) -> None:
    then = sim.restart_address if restart else None
    if rpc == "Abort":
        sim.nodes["n3"].code.refuse.add(NEW)  # something to abort: n3 votes no
    sim.transport.inject("sim://n2", Fault(rpc, when, then=then))
    done = settled(sim, lead, upgrade(lead))
    assert done.phase is outcome, done.reason
    if outcome is Phase.ROLLED_BACK:
        assert "finish_failed" in done.reason or "n2" in done.reason, done.reason


def test_a_finish_that_fails_on_one_node_takes_the_fleet_back_through_a_lossy_rollback(
    sim: SimFleet, lead: Leader
) -> None:
    """The automatic rollback is itself a 2PC; its own faults must not strand anyone."""
    sim.nodes["n3"].code.fail_finish.add(NEW)

    def lossy(upgrade: Rollout) -> None:
        # the rollback's vote from n1 and its Finish to n2 are each lost once
        def theirs(request: Any) -> bool:
            return bool(request.rollout_id != upgrade.id)

        sim.transport.inject("sim://n1", Fault("Prepare", "after", match=theirs))
        sim.transport.inject("sim://n2", Fault("Finish", "before", match=theirs))

    lead.engine.hooks["after_decision"] = lossy
    rid = upgrade(lead)
    done = settled(sim, lead, rid, timeout=30)
    assert done.phase is Phase.ROLLED_BACK, done.reason
    assert "n3" in done.reason, done.reason
    rollback = lead.engine.rollouts(limit=2)[0]
    assert rollback.kind == "rollback" and rollback.phase.terminal, rollback


def test_a_deposed_leader_cannot_drive_a_node_that_obeys_its_successor(
    sim: SimFleet, lead: Leader, etcd_endpoint: str, etcd_prefix: str
) -> None:
    done = settled(sim, lead, upgrade(lead))
    assert done.phase is Phase.PERMANENT
    old_epoch = lead.lead.epoch
    lead.close()
    successor = Leader(etcd_endpoint, etcd_prefix, "leader-b", transport=sim.transport)
    try:
        assert successor.lead.epoch > old_epoch
        # the successor's epoch reaches n1 with any call; the old one is refused after it
        successor.engine.agents.stub("sim://n1").Abort(_abort(successor.lead.epoch))
        with pytest.raises(TransportError) as refused:
            sim.transport.stub("sim://n1").Abort(_abort(old_epoch))
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "lower than" in refused.value.details()
    finally:
        successor.close()


def _abort(epoch: int) -> agent_pb2.AbortRequest:
    return agent_pb2.AbortRequest(rollout_id="x", epoch=epoch)


@pytest.mark.parametrize("command", ["promote", "rollback"])
def test_an_operator_command_in_a_window_is_taken_by_the_windows_driver(
    sim: SimFleet, lead: Leader, command: str
) -> None:
    """One writer per rollout record: the operator's thread never writes the window's record.

    Its promote or rollback is a request the window's driver takes between
    two judgements, so it can never race the judge's own promote or rollback.
    """
    writers: list[tuple[str, str]] = []
    save = lead.engine._save

    def spy(leadership: Any, rollout: Rollout, *ops: Any) -> None:
        writers.append((rollout.id, threading.current_thread().name))
        save(leadership, rollout, *ops)

    lead.engine._save = spy  # type: ignore[method-assign]
    options = RolloutOptions(window_s=120, health={"min_samples": 4})
    rid = lead.engine.upgrade(NEW, Target(all=True), options).id
    wait_for(lambda: rid in lead.engine._requests, timeout=10)  # the window is being judged
    if command == "promote":
        assert lead.engine.promote(rid).phase is Phase.PERMANENT
    else:
        back = lead.engine.rollback(Target(all=True), None, RolloutOptions())
        assert back.kind == "rollback"
    done = settled(sim, lead, rid)
    assert done.phase is (Phase.PERMANENT if command == "promote" else Phase.ROLLED_BACK)
    operator = threading.current_thread().name
    assert writers and all(who != operator for rollout_id, who in writers if rollout_id == rid)
    assert rid not in lead.engine._requests  # the window's inbox went with its driver
