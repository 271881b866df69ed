"""What a node says beyond yes/no reaches the rollout record, and what it runs after finish is checked.

Issue 13 item 4: the drain (completed or timed out, requests still in
flight) and the prepare and finish warnings of every node are kept in the
rollout record that ``coordctl status`` shows.  Issue 12 item 4: the
coordinator compares the release and digest each node reports after finish
with what it decided; a node that switched to anything else fails the
finish, and the fleet goes back.

The coordinator side is real (engine, election, decisions, etcd); the nodes
are :mod:`tests.simfleet` participants over the in-process transport.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from coordinator.engine import Target
from coordinator.model import Phase, Rollout
from coordinator.render import rollout_detail
from hotfleet.errors import Reason
from node_agent.loader import FinishReport, ReleaseInfo
from tests.agents import wait_for
from tests.fleet import Leader, opts
from tests.simfleet import SimCode, SimFleet, SimPlan

pytestmark = pytest.mark.integration

NEW = "shop@2.0.0"
LOOP = "unsupervised loop still running old code: shop.jobs:poll in thread 'poller'"


@dataclass
class TimedOutDrain(SimCode):
    """Votes with a warning; its finish times out draining 3 requests."""

    def prepare(self, release: object, *, force: bool = False) -> SimPlan:
        return SimPlan(super().prepare(release, force=force).release, warnings=(LOOP,))

    def finish(self, prepared: SimPlan, *, at: float = 0.0) -> FinishReport:
        report = super().finish(prepared, at=at)
        return FinishReport(
            report.release, 2.0, False, 3, 0, ("a running generator keeps its old code",)
        )


@dataclass
class Liar(SimCode):
    """Switches, then runs (and reports) ``runs`` instead of what it was told to."""

    runs: ReleaseInfo | None = None

    def finish(self, prepared: SimPlan, *, at: float = 0.0) -> FinishReport:
        report = super().finish(prepared, at=at)
        self.current_release = self.runs
        return report


@pytest.fixture
def sim(sim_fleet: SimFleet) -> SimFleet:
    return sim_fleet


@pytest.fixture
def lead(sim_leader: Leader) -> Leader:
    return sim_leader


def run(sim: SimFleet, leader: Leader) -> Rollout:
    """Upgrade every node to NEW; the rollout once it ended and the fleet agrees with it."""
    rid = leader.engine.upgrade(NEW, Target(all=True), opts(timeout_s=5)).id
    done = leader.wait(rid, 20)
    want = NEW if done.phase is Phase.PERMANENT else ""
    wait_for(
        lambda: {n: r or "" for n, r in sim.current().items()} == dict.fromkeys(sim.nodes, want), 20
    )
    wait_for(lambda: not any(sim.prepared().values()), 20)
    return done


def test_drain_and_warnings_of_every_node_reach_the_record_and_coordctl_status(
    sim: SimFleet, lead: Leader
) -> None:
    sim.start("n1")
    sim.start("n2", TimedOutDrain())
    done = run(sim, lead)
    assert done.phase is Phase.PERMANENT, done.reason
    n1, n2 = done.nodes["n1"], done.nodes["n2"]
    assert (n1.drained, n1.still_in_flight, n1.prepare_warnings, n1.finish_warnings) == (
        True,
        0,
        [],
        [],
    )
    assert (n2.drained, n2.still_in_flight) == (False, 3)
    assert n2.prepare_warnings == [LOOP]
    assert n2.finish_warnings == ["a running generator keeps its old code"]
    record = lead.engine.rollout(done.id).to_json()  # what `coordctl status -o json` prints
    assert record["nodes"]["n2"]["drained"] is False
    assert record["nodes"]["n2"]["still_in_flight"] == 3
    assert record["nodes"]["n2"]["prepare_warnings"] == [LOOP]
    text = rollout_detail(record)
    assert "n2: drain timed out: 3 request(s) still in flight" in text, text
    assert f"n2: prepare: {LOOP}" in text, text
    assert "n2: finish: a running generator keeps its old code" in text, text
    assert "n1:" not in text.partition("Notes:")[2], text


def test_a_node_on_an_older_agent_that_reports_no_digest_is_accepted(
    sim: SimFleet, lead: Leader
) -> None:
    sim.start("n1")
    sim.start("n2", Liar(runs=ReleaseInfo("shop", "2.0.0", "")))
    done = run(sim, lead)
    assert done.phase is Phase.PERMANENT, done.reason
    assert done.nodes["n2"].finished


@pytest.mark.parametrize(
    ("runs", "reason", "says"),
    [
        (ReleaseInfo("shop", "2.0.0", "0" * 64), Reason.DIGEST_MISMATCH, "digest 0000000000000000"),
        (ReleaseInfo("shop", "2.0.1", "0" * 64), Reason.BAD_RELEASE, "reported shop@2.0.1"),
        (None, Reason.BAD_RELEASE, "reported (boot code)"),
    ],
    ids=["digest", "release", "empty"],
)
def test_a_node_that_reports_another_release_after_finish_takes_the_fleet_back(
    sim: SimFleet, lead: Leader, runs: ReleaseInfo | None, reason: Reason, says: str
) -> None:
    sim.start("n1")
    sim.start("n2", Liar(runs=runs))
    sim.start("n3")
    done = run(sim, lead)
    assert done.phase is Phase.ROLLED_BACK, done.reason
    assert "finish_failed: n2: *:" in done.reason, done.reason
    n2 = done.nodes["n2"]
    assert not n2.finished
    assert says in n2.detail and f"decided {NEW}" in n2.detail, n2.detail
    assert [(e.node, e.reason) for e in n2.errors] == [("n2", reason)]
    assert "node n2 reported" in done.reason, done.reason
    assert all(done.nodes[n].finished for n in ("n1", "n3"))
    rollback = lead.engine.rollouts(limit=2)[0]
    assert rollback.kind == "rollback" and rollback.phase is Phase.PERMANENT, rollback.reason
    assert all(r.finished for r in rollback.nodes.values()), rollback.nodes


def test_a_catch_up_that_ends_on_another_release_is_not_counted_as_caught_up(
    sim: SimFleet, lead: Leader
) -> None:
    """The convergence loop checks what a node reports after its catch-up too."""
    sim.start("n1")
    assert run(sim, lead).phase is Phase.PERMANENT
    sim.start("n2", Liar(runs=None))  # joins late; will claim the boot code after finish
    keys = lead.keys

    def record() -> dict[str, str]:
        raw, _ = lead.client.get(keys.catchup("n2"))
        return json.loads(raw) if raw else {}

    failed = wait_for(lambda: record().get("outcome") == "failed" and record(), 20)
    assert "reported the boot code" in failed["detail"] and NEW in failed["detail"], failed
    status = {n.node_id: n for n in lead.engine.fleet()}
    assert status["n2"].convergence == "drifting" and status["n1"].convergence == "converged"
