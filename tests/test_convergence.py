"""The fleet converges: every node on the fleet's release, through crashes and restarts.

Real agents, a real etcd and an elected in-process leader (with its
convergence loop).  Each test breaks the fleet the way issue "The fleet
converges" found it split, and shows it come back to one release by itself:
a node restarted inside the rollback window, a node that drifted off the
release, an automatic-style rollback after a crash in the window, and a
rollback on a node that holds no backup in memory.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import pytest

from coordinator.convergence import Convergence, Desired
from coordinator.engine import Refused, Target
from coordinator.model import Kind, Phase, Rollout
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from tests.agents import AgentProcess, Agents, publish, release, wait_for
from tests.fleet import Leader, opts, start_fleet, versions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _provisional(leader: Leader, ref: str) -> str:
    rid = leader.engine.upgrade(ref, Target(all=True), opts(window_s=120)).id
    wait_for(lambda: leader.engine.rollout(rid).phase is Phase.PROVISIONAL, timeout=30)
    return rid


def _fleet(leader: Leader) -> dict[str, tuple[str, str, str]]:
    return {
        n.node_id: (n.current_release, n.desired_release, n.convergence)
        for n in leader.engine.fleet()
    }


def test_node_restarted_inside_the_window_boots_the_fleets_current_release(
    agents: Agents, leader: Leader
) -> None:
    nodes = start_fleet(agents, 3)
    leader.engine.push_release(release("shop-2.0.0"))
    _provisional(leader, "shop@2.0.0")
    assert versions(nodes) == {"2"}
    nodes[1].signal(signal.SIGKILL)
    nodes[1].wait()
    back = agents.start("n2", code_path=nodes[1].code_path)  # boots the old code from disk
    assert versions([back]) == {"2"}  # ... and loads the window's release before it is ready
    assert back.status().previous_release == ""  # the boot code is its in-memory backup
    fleet = wait_for(lambda: (f := _fleet(leader))["n2"][2] == "converged" and f)
    assert {f[1] for f in fleet.values()} == {"shop@2.0.0"}


def test_leader_catches_up_a_node_that_drifted_inside_the_window(
    agents: Agents, leader: Leader
) -> None:
    from coordinator.telemetry import CoordinatorMetrics

    metrics = CoordinatorMetrics()
    leader.engine.convergence.on_catch_up = metrics.count_catch_up
    nodes = start_fleet(agents, 2)
    leader.engine.push_release(release("shop-2.0.0"))
    _provisional(leader, "shop@2.0.0")
    # n2 goes back on its own (an operator poking one node): the fleet is split
    back = nodes[1].stub.Rollback(
        agent_pb2.RollbackRequest(rollout_id="poke", epoch=leader.lead.epoch), timeout=10
    )
    assert back.ok and versions([nodes[1]]) == {"1"}
    # the leader brings it back to the fleet's release by itself, and records it
    wait_for(lambda: versions([nodes[1]]) == {"2"}, timeout=20)
    fleet = wait_for(lambda: (f := _fleet(leader))["n2"][2] == "converged" and f)
    assert fleet["n2"][:2] == ("shop@2.0.0", "shop@2.0.0")
    raw, _ = leader.client.get(leader.keys.catchup("n2"))
    assert raw is not None and b'"outcome": "ok"' in raw
    # counted once the catch-up's record is written: wait for it, do not race it
    wait_for(lambda: 'hotfleet_coordinator_catch_ups_total{outcome="ok"} 1' in metrics.render())


def test_crash_inside_the_window_then_rollback_converges_every_node(
    agents: Agents, leader: Leader
) -> None:
    """The issue's split: a node crashes in the window, the fleet is rolled back."""
    nodes = start_fleet(agents, 3)
    leader.engine.push_release(release("shop-2.0.0"))
    rid = _provisional(leader, "shop@2.0.0")
    nodes[2].signal(signal.SIGKILL)
    nodes[2].wait()
    nodes[2] = agents.start("n3", code_path=nodes[2].code_path)
    try:
        back_id = leader.engine.rollback(Target(), None, opts()).id
    except Refused as exc:  # the judge saw the crash and is rolling back by itself
        assert exc.code == "busy", exc
        back_id = leader.engine._active_id()
    back = leader.wait(back_id)
    assert back.phase is Phase.PERMANENT, back.reason
    wait_for(lambda: leader.engine.rollout(rid).phase is Phase.ROLLED_BACK, timeout=10)
    assert versions(nodes) == {"1"}
    fleet = wait_for(
        lambda: (f := _fleet(leader)) and {x[2] for x in f.values()} == {"converged"} and f
    )
    assert {x[0] for x in fleet.values()} == {""}  # all on the boot code again


def test_rollback_loads_the_target_from_the_store_when_no_backup_is_held(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    agent = agents.start("n-store")
    v1 = publish(etcd_client, etcd_prefix, release("shop-1.0.0"))
    v2 = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))
    stub = agent.stub
    assert stub.Prepare(agent_pb2.PrepareRequest(rollout_id="up", epoch=1, release=v2)).ok
    assert stub.Finish(agent_pb2.FinishRequest(rollout_id="up", epoch=1)).ok
    assert stub.MakePermanent(agent_pb2.MakePermanentRequest(rollout_id="up", epoch=1)).ok
    assert agent.status().previous_release == ""  # the backup is gone
    vote = stub.Prepare(
        agent_pb2.PrepareRequest(rollout_id="down", epoch=1, release=v1, rollback_target=True)
    )
    assert vote.ok, vote.errors
    done = stub.Finish(agent_pb2.FinishRequest(rollout_id="down", epoch=1))
    assert done.ok and done.release == "shop@1.0.0"
    assert versions([agent]) == {"1"}


def test_a_release_made_permanent_on_some_nodes_stays_on_those_nodes(
    agents: Agents, leader: Leader
) -> None:
    nodes = start_fleet(agents, 3)
    leader.engine.push_release(release("shop-1.0.0"))
    leader.engine.push_release(release("shop-2.0.0"))
    assert (
        leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts()).id).phase
        is Phase.PERMANENT
    )
    one = leader.engine.upgrade("shop@1.0.0", Target(nodes=["n1"]), opts(allow_downgrade=True))
    assert leader.wait(one.id).phase is Phase.PERMANENT
    # the leader does not pull the others to n1's release, nor n1 to theirs
    fleet = wait_for(
        lambda: (f := _fleet(leader)) and {x[2] for x in f.values()} == {"converged"} and f
    )
    assert fleet["n1"][:2] == ("shop@1.0.0", "shop@1.0.0")
    assert fleet["n2"][:2] == fleet["n3"][:2] == ("shop@2.0.0", "shop@2.0.0")
    # and a restart keeps each node on its own permanent release
    for i, name in ((0, "n1"), (1, "n2")):
        nodes[i].signal(signal.SIGKILL)
        nodes[i].wait()
        nodes[i] = agents.start(name, code_path=nodes[i].code_path)
    assert versions(nodes[:1]) == {"1"} and versions(nodes[1:]) == {"2"}


def test_an_override_goes_with_the_permanent_release_that_supersedes_it(
    agents: Agents, leader: Leader
) -> None:
    """A node's own permanent release (a canary's) and the fleet's change in one write.

    Before: an upgrade of every node turning permanent deleted the per-node
    overrides first and wrote the new permanent release after: in between, a
    node that was no target of it (down, or left out with --allow-missing)
    was wanted on the *old* fleet release, and the convergence loop could
    load that onto it before the new one.
    """
    nodes = start_fleet(agents, 2)
    for name in ("shop-1.0.0", "shop-2.0.0"):
        leader.engine.push_release(release(name))
    canary = leader.engine.upgrade("shop@2.0.0", Target(nodes=["n1"]), opts())
    assert leader.wait(canary.id).phase is Phase.PERMANENT
    want = leader.engine.convergence.desired
    assert (want()("n1").label, want()("n2").label) == ("shop@2.0.0", "")
    nodes[0].signal(signal.SIGTERM)  # n1 leaves: no target of the next rollout
    nodes[0].wait()
    wait_for(lambda: [n.node_id for n in leader.engine.nodes()] == ["n2"])
    seen: list[str] = []
    leader.engine.hooks["before_permanent"] = lambda _r: seen.append(want()("n1").label)
    up = leader.engine.upgrade("shop@1.0.0", Target(all=True), opts(allow_downgrade=True))
    assert leader.wait(up.id).phase is Phase.PERMANENT
    assert seen == ["shop@2.0.0"]  # until the fleet's release changes, n1's own stands
    assert want()("n1").label == "shop@1.0.0"  # then the fleet's, in the same write


def test_history_is_bounded_and_read_a_page_at_a_time(
    agents: Agents, leader: Leader, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.engine as engine_module

    monkeypatch.setattr(engine_module, "ROLLOUT_HISTORY", 3)
    monkeypatch.setattr(engine_module, "HISTORY_PAGE", 2)  # several pages per read
    start_fleet(agents, 1)
    leader.engine.push_release(release("shop-2.0.0"))
    ids = []
    for _ in range(5):
        rid = leader.engine.upgrade("shop@2.0.0", Target(all=True), opts(dry_run=True)).id
        assert leader.wait(rid).phase is Phase.DRY_RUN
        ids.append(rid)
    # the trim follows the terminal record's write: a reader may see the record first
    wait_for(lambda: [r.id for r in leader.engine.rollouts(limit=50)] == ids[::-1][:3])
    assert [r.id for r in leader.engine.rollouts(limit=2)] == ids[::-1][:2]
    left = {
        m.key.decode() for _, m in leader.client.get_prefix(leader.keys.rollouts, keys_only=True)
    }
    assert not any(old in key for old in ids[:2] for key in left)  # records and decisions gone


def test_a_stale_copy_of_a_rollout_record_can_never_overwrite_a_newer_one(
    agents: Agents, leader: Leader
) -> None:
    """One writer at a time: the operator's promote and a driver holding an old copy."""
    import coordinator.engine as engine_module

    start_fleet(agents, 1)
    leader.engine.push_release(release("shop-2.0.0"))
    rid = _provisional(leader, "shop@2.0.0")
    stale = leader.engine.rollout(rid)
    assert leader.engine.promote(rid).phase is Phase.PERMANENT
    stale.reason = "a driver that missed the promote"
    with pytest.raises(engine_module._Superseded):
        leader.engine._save(leader.lead, stale)
    after = leader.engine.rollout(rid)
    assert after.phase is Phase.PERMANENT and after.reason == "promoted by the operator"


def test_nodes_table_says_which_nodes_are_off_their_release() -> None:
    from coordinator import render

    rows = [
        {
            "node_id": "n1",
            "state": "idle",
            "current_release": "shop@2.0.0",
            "convergence": "converged",
        },
        {
            "node_id": "n2",
            "state": "idle",
            "current_release": "shop@1.0.0",
            "desired_release": "shop@2.0.0",
            "convergence": "drifting",
        },
        {"node_id": "n3", "state": "preparing", "convergence": "catching_up"},
    ]
    lines = render.nodes_table(rows).splitlines()
    assert lines[0].split()[:4] == ["NODE", "STATE", "RELEASE", "SYNC"]
    assert "ok" in lines[1] and "wants shop@2.0.0" in lines[2] and "catching up" in lines[3]


def test_a_node_killed_during_the_rollback_still_ends_rolled_back_and_converges(
    agents: Agents, leader: Leader
) -> None:
    """The way back has no way back: a rollback whose finish misses a node completes, and
    the convergence loop brings that node to the permanent release when it returns."""
    nodes = start_fleet(agents, 3)
    leader.engine.push_release(release("shop-2.0.0"))
    rid = _provisional(leader, "shop@2.0.0")

    def kill_n2(rollout: Rollout) -> None:
        if rollout.kind == "rollback":
            nodes[1].signal(signal.SIGKILL)
            nodes[1].wait()

    leader.engine.hooks["after_decision"] = kill_n2
    back = leader.wait(leader.engine.rollback(Target(), None, opts(timeout_s=3)).id)
    assert back.phase is Phase.PERMANENT, back.reason
    wait_for(lambda: leader.engine.rollout(rid).phase is Phase.ROLLED_BACK, timeout=10)
    leader.engine.hooks.clear()
    nodes[1] = agents.start("n2", code_path=nodes[1].code_path)
    wait_for(lambda: versions(nodes) == {"1"}, timeout=30)


def test_the_convergence_loop_never_pulls_nodes_back_during_a_rollback(
    agents: Agents, leader: Leader
) -> None:
    """Between a rollback's finish and its permanent record the loop must stay out."""
    nodes = start_fleet(agents, 2)
    leader.engine.push_release(release("shop-2.0.0"))
    _provisional(leader, "shop@2.0.0")
    tried: list[list[str]] = []

    def converge_now(rollout: Rollout) -> None:
        if rollout.kind == "rollback":
            tried.append(leader.engine.convergence.converge_once())

    leader.engine.hooks["after_finish"] = converge_now
    back = leader.wait(leader.engine.rollback(Target(), None, opts()).id)
    assert back.phase is Phase.PERMANENT and tried == [[]]
    assert versions(nodes) == {"1"}


def test_the_desired_state_is_read_at_one_revision(leader: Leader) -> None:
    """A window turning permanent is one transaction; the loop must never see half of it.

    Seen in CI: the loop read the permanent release (still 1.0.0), then the
    window's record (already deleted by the upgrade turning permanent), wanted
    1.0.0 of nodes on 2.0.0 and "caught them up" back to it; the operator's
    rollback then went one release too far.  Here a writer flips, in single
    transactions, between a window (permanent 1.0.0, n1 a target of 2.0.0) and
    its end (permanent 2.0.0, no window): n1 wants 2.0.0 in every state the
    store was ever in, so every read must say so.
    """
    tx, keys = leader.client.transactions, leader.keys
    old, new = json.dumps({"release": "shop@1.0.0"}), json.dumps({"release": "shop@2.0.0"})
    window = json.dumps({"release": "shop@2.0.0", "rollout": "r", "targets": ["n1"]})
    states = [
        [tx.put(keys.permanent, old), tx.put(keys.current, window)],
        [tx.put(keys.permanent, new), tx.delete(keys.current)],
    ]
    leader.client.transaction(compare=[], success=states[0], failure=[])  # before any read
    stop, flips = threading.Event(), [1]

    def flip() -> None:
        while not stop.is_set():
            leader.client.transaction(compare=[], success=states[flips[0] % 2], failure=[])
            flips[0] += 1

    writer = threading.Thread(target=flip, name="test-flipper")
    writer.start()
    try:
        seen = [leader.engine.convergence.desired()("n1").label for _ in range(400)]
    finally:
        stop.set()
        writer.join()
    assert flips[0] > 50  # the reads did straddle writes
    assert set(seen) == {"shop@2.0.0"}, f"{seen.count('shop@1.0.0')} torn reads of {len(seen)}"


def _two_nodes_in_the_window(
    agents: Agents, leader: Leader
) -> tuple[list[AgentProcess], Convergence, Callable[[str], Desired]]:
    """Two nodes on shop@2.0.0, provisional; the leader's loop and what it wants of each."""
    nodes = start_fleet(agents, 2)
    leader.engine.push_release(release("shop-2.0.0"))
    _provisional(leader, "shop@2.0.0")
    loop = leader.engine.convergence
    return nodes, loop, loop.desired()


def test_loading_the_release_a_node_runs_keeps_its_way_back(agents: Agents, leader: Leader) -> None:
    """A catch-up (or a retried upgrade) of the release a node already runs changes nothing.

    Seen in CI: the loop read a membership record written before the nodes'
    finish was published, loaded 2.0.0 again over 2.0.0, and the backup held
    in memory became 2.0.0: the fleet's rollback then "finished" on 2.0.0 and
    no command could bring the nodes back.
    """
    nodes, loop, want = _two_nodes_in_the_window(agents, leader)
    for node in leader.engine.nodes():
        d = want(node.node_id)
        assert d.label == "shop@2.0.0"
        stub = leader.engine.agents.stub(node.address)
        # the catch-up's own steps, past the loop's check: prepare, decide, finish
        assert loop._load(stub, leader.lead, f"again-{node.node_id}", node, d) == ""
    assert {n.status().previous_release for n in nodes} == {""}  # the boot code, still
    back = leader.wait(leader.engine.rollback(Target(), None, opts()).id)
    assert back.phase is Phase.PERMANENT, back.reason
    assert versions(nodes) == {"1"}


def test_the_loop_asks_the_node_before_acting_on_its_membership_record(
    agents: Agents, leader: Leader
) -> None:
    nodes, loop, want = _two_nodes_in_the_window(agents, leader)
    for node in leader.engine.nodes():
        stale = replace(node, current_release="", state="idle")  # as published before finish
        assert not loop._catch_up(stale, want(node.node_id))
        # nothing was tried: no catch-up recorded, the node untouched
        assert leader.client.get(leader.keys.catchup(node.node_id))[0] is None
    assert versions(nodes) == {"2"}
    assert {n.status().previous_release for n in nodes} == {""}


def test_the_active_rollout_is_parsed_only_when_its_record_changed() -> None:
    """Once a second the loop asks whether a 2PC is in flight; a 1000-node record is
    ~160 KB of JSON, so it is read again only when etcd says it was rewritten."""
    record = {"revision": 5, "reads": 0}

    def rollout(rid: str) -> Rollout:
        record["reads"] += 1
        r = Rollout(rid, "upgrade", "app@2", "", ["n1"], phase=Phase.PROVISIONAL)
        r.revision = record["revision"]
        return r

    def get_response(key: str, keys_only: bool = False) -> SimpleNamespace:
        assert keys_only and key == Keys("/p/").rollout("r1")
        return SimpleNamespace(kvs=[SimpleNamespace(mod_revision=record["revision"])])

    engine = SimpleNamespace(
        keys=Keys("/p/"),
        client=SimpleNamespace(get_response=get_response),
        _active_id=lambda: "r1",
        rollout=rollout,
        last_saved=None,
    )
    loop = Convergence(engine)  # type: ignore[arg-type]
    assert [loop._window_or_idle() for _ in range(3)] == [True, True, True]
    assert record["reads"] == 1
    record["revision"] = 9  # rewritten (say, turned permanent): read again, once
    assert loop._window_or_idle() and loop._window_or_idle()
    assert record["reads"] == 2
    # written by this engine: what it wrote at that revision is known without a read
    record["revision"] = 12
    engine.last_saved = ("r1", 12, Phase.PREPARING, Kind.UPGRADE)
    assert loop._window_or_idle() is False
    assert record["reads"] == 2
    # another writer's revision (a driver elsewhere): read
    record["revision"] = 13
    assert loop._window_or_idle() is True
    assert record["reads"] == 3
