"""The fleet-wide two-phase commit, driven by a real leader engine.

The engine runs in the test process with a real etcd election; every node is
a real ``node-agent`` subprocess serving the example shop over HTTP.  Crashes
are real SIGKILLs.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import grpc
import pytest

from coordinator.engine import Refused, Target
from coordinator.model import Phase, Rollout, Vote
from hotfleet import Reason
from hotfleet._proto.hotfleet.v1 import agent_pb2
from tests.agents import Agents, release, wait_for
from tests.fleet import Leader, opts, start_fleet, versions

pytestmark = pytest.mark.integration


def test_upgrade_all_commits_everywhere_and_becomes_permanent(
    agents: Agents, leader: Leader
) -> None:
    nodes = start_fleet(agents, 3)
    leader.engine.push_release(release("shop-2.0.0"))
    started = leader.engine.upgrade("shop@2.0.0", Target(all=True), opts())
    assert started.phase is Phase.PREPARING
    done = leader.wait(started.id)
    assert done.phase is Phase.PERMANENT, done.reason
    assert {n.vote for n in done.nodes.values()} == {Vote.YES} and all(
        n.finished for n in done.nodes.values()
    )
    assert versions(nodes) == {"2"}
    assert done.commit_skew_s < 1.0
    raw, _ = leader.client.get(leader.keys.permanent)
    assert raw is not None and b"shop@2.0.0" in raw
    assert leader.client.get(leader.keys.active)[0] is None  # the cluster is free again


def test_one_node_refusing_aborts_everywhere(agents: Agents, leader: Leader) -> None:
    nodes = [
        agents.start("n1"),
        agents.start("n2", env={"SHOP_ZONE": "ap-south"}),
        agents.start("n3"),
    ]
    leader.engine.push_release(release("shop-2.2.0-nodecfg"))
    done = leader.wait(leader.engine.upgrade("shop@2.2.0-nodecfg", Target(all=True), opts()).id)
    assert done.phase is Phase.ABORTED and done.decision == "abort"
    assert versions(nodes) == {"1"}  # nobody changed
    (culprit,) = {e.node for e in done.errors}
    assert culprit == "n2"
    assert any(e.module == "shop.tax" and e.reason is Reason.IMPORT_ERROR for e in done.errors)
    assert "n2: shop.tax: import_error" in done.reason
    assert all(n.aborted for n in done.nodes.values() if n.vote is Vote.YES)
    for n in nodes:
        assert n.status().prepared_rollout == ""


def test_node_killed_before_prepare_aborts_unless_allowed(agents: Agents, leader: Leader) -> None:
    nodes = start_fleet(agents, 3, lease_ttl=10)
    nodes[2].signal(signal.SIGKILL)  # its membership key outlives it for the lease TTL
    nodes[2].wait()
    leader.engine.push_release(release("shop-2.0.0"))
    done = leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts(timeout_s=5)).id)
    assert done.phase is Phase.ABORTED
    assert done.nodes["n3"].vote is Vote.UNREACHABLE and "n3: unreachable at prepare" in done.reason
    # a node that did not answer says so: nothing is wrong with the release
    assert {e.reason for e in done.errors if e.node == "n3"} == {Reason.UNREACHABLE}
    assert versions(nodes[:2]) == {"1"}
    allowed = leader.wait(
        leader.engine.upgrade(
            "shop@2.0.0", Target(all=True), opts(timeout_s=5, allow_missing=True)
        ).id
    )
    assert allowed.phase is Phase.PERMANENT, allowed.reason
    assert versions(nodes[:2]) == {"2"}
    # the node comes back and reconciles to the permanent release before it is ready
    back = agents.start("n3", code_path=nodes[2].code_path)
    assert versions([back]) == {"2"}


def test_node_killed_after_voting_rolls_the_whole_fleet_back(
    agents: Agents, leader: Leader
) -> None:
    """A yes vote that is never kept (the node died before its finish) is no commit.

    The rollout must not end permanent with one node on the old code: the
    nodes that switched go back, and the dead one boots the old release.
    """
    nodes = start_fleet(agents, 3)
    leader.engine.push_release(release("shop-2.0.0"))

    def kill_n2(_rollout: Rollout) -> None:
        nodes[1].signal(signal.SIGKILL)
        nodes[1].wait()

    leader.engine.hooks["after_decision"] = kill_n2
    done = leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts(timeout_s=3)).id)
    assert done.decision == "commit" and done.phase is Phase.ROLLED_BACK, done.reason
    assert not done.nodes["n2"].finished
    assert "finish_failed: n2" in done.reason
    assert versions([nodes[0], nodes[2]]) == {"1"}
    back = agents.start("n2", code_path=nodes[1].code_path)
    assert versions([back]) == {"1"}  # one consistent outcome after all


def test_dry_run_prepares_everywhere_then_aborts(agents: Agents, leader: Leader) -> None:
    nodes = start_fleet(agents, 2)
    leader.engine.push_release(release("shop-2.0.0"))
    done = leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts(dry_run=True)).id)
    assert done.phase is Phase.DRY_RUN and {n.vote for n in done.nodes.values()} == {Vote.YES}
    assert versions(nodes) == {"1"}


def test_one_rollout_at_a_time_and_clear_refusals(agents: Agents, leader: Leader) -> None:
    start_fleet(agents, 1)
    with pytest.raises(Refused) as info:
        leader.engine.upgrade("shop@9.9.9", Target(all=True), opts())
    assert info.value.code == "not_found" and "coordctl release push" in str(info.value)
    leader.engine.push_release(release("shop-2.0.0"))
    with pytest.raises(Refused) as info:
        leader.engine.upgrade("shop@2.0.0", Target(selector={"zone": "mars"}), opts())
    assert info.value.code == "no_targets"
    gate = threading.Event()  # holds the first rollout before prepare until we have checked
    leader.engine.hooks["before_prepare"] = lambda _r: gate.wait(30)
    first = leader.engine.upgrade("shop@2.0.0", Target(all=True), opts())
    try:
        with pytest.raises(Refused) as info:
            leader.engine.upgrade("shop@2.0.0", Target(all=True), opts())
    finally:
        gate.set()
    assert info.value.code == "busy" and first.id in str(info.value)
    assert leader.wait(first.id).phase is Phase.PERMANENT


def test_rollback_from_memory_restores_every_node(agents: Agents, leader: Leader) -> None:
    nodes = start_fleet(agents, 2)
    leader.engine.push_release(release("shop-1.0.0"))
    leader.engine.push_release(release("shop-2.0.0"))
    started = leader.engine.upgrade("shop@2.0.0", Target(all=True), opts(window_s=60))
    provisional = wait_for(
        lambda: (r := leader.engine.rollout(started.id)).phase is Phase.PROVISIONAL and r, 30
    )
    assert versions(nodes) == {"2"}
    back = leader.wait(leader.engine.rollback(Target(), None, opts()).id)
    assert back.kind == "rollback" and back.phase is Phase.PERMANENT, back.reason
    assert versions(nodes) == {"1"}
    assert leader.engine.rollout(provisional.id).phase is Phase.ROLLED_BACK


def test_deposed_leader_is_fenced(agents: Agents, etcd_endpoint: str, etcd_prefix: str) -> None:
    nodes = start_fleet(agents, 2)
    old = Leader(etcd_endpoint, etcd_prefix, "leader-old")
    old_epoch = old.lead.epoch
    old.session.close()  # its lease is gone: a successor can win
    new = Leader(etcd_endpoint, etcd_prefix, "leader-new")
    try:
        assert new.lead.epoch > old_epoch
        new.engine.push_release(release("shop-2.0.0"))
        done = new.wait(new.engine.upgrade("shop@2.0.0", Target(all=True), opts()).id)
        assert done.phase is Phase.PERMANENT
        # the deposed leader's late RPC is refused by every agent
        with pytest.raises(grpc.RpcError) as info:
            nodes[0].stub.Abort(
                agent_pb2.AbortRequest(rollout_id=done.id, epoch=old_epoch), timeout=5
            )
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        # and its fenced writes to etcd do not land
        assert not old.lead.guarded_txn([old.client.transactions.put(old.keys.active, "stale")])
        assert new.client.get(new.keys.active)[0] is None
    finally:
        new.close()
        old.close()


def test_etcd_restart_mid_rollout_ends_in_one_outcome(agents: Agents, tmp_path: Path) -> None:
    from hotfleet.etcd_server import EtcdServer

    with EtcdServer(tmp_path / "etcd") as etcd:
        fleet = Agents(tmp_path / "f", etcd.endpoint, "/hf-restart/")
        (tmp_path / "f").mkdir()
        try:
            nodes = [fleet.start(f"n{i}") for i in (1, 2)]
            lead = Leader(etcd.endpoint, "/hf-restart/")
            try:
                lead.engine.push_release(release("shop-2.0.0"))

                def bounce(_r: Rollout) -> None:
                    etcd.kill()
                    etcd.start()

                lead.engine.hooks["before_decision"] = bounce
                started = lead.engine.upgrade("shop@2.0.0", Target(all=True), opts())
                done = lead.wait(started.id, timeout=60)
                assert done.phase in {Phase.PERMANENT, Phase.ABORTED}
                expected = "2" if done.phase is Phase.PERMANENT else "1"
                wait_for(lambda: versions(nodes) == {expected}, timeout=20)
            finally:
                lead.close()
        finally:
            fleet.close()


def test_rollback_after_permanent_goes_through_the_pushed_release(
    agents: Agents, leader: Leader
) -> None:
    nodes = start_fleet(agents, 2)
    for name in ("shop-1.0.0", "shop-2.0.0"):
        leader.engine.push_release(release(name))
    assert (
        leader.wait(leader.engine.upgrade("shop@1.0.0", Target(all=True), opts()).id).phase
        is Phase.PERMANENT
    )
    up = leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts()).id)
    assert up.phase is Phase.PERMANENT and versions(nodes) == {"2"}
    back = leader.wait(leader.engine.rollback(Target(), None, opts()).id)
    assert (
        back.phase is Phase.PERMANENT
        and back.release == "shop@1.0.0"
        and not back.options["from_memory"]
    )
    assert versions(nodes) == {"1"}
    # the rollback turned permanent and the upgrade it reverted turned rolled back in one
    # transaction (CI read between them when they were two writes): one etcd revision
    reverted = leader.engine.rollout(up.id)
    assert reverted.phase is Phase.ROLLED_BACK
    assert reverted.revision == leader.engine.rollout(back.id).revision
    raw, _ = leader.client.get(leader.keys.permanent)
    assert raw is not None and b"shop@1.0.0" in raw


SLOW_INIT = """
import os
import time

# marks that this node is inside prepare (the staged module body runs there), then takes a while
_mark = os.environ.get("HF_PREPARE_MARK")
if _mark:
    open(_mark, "w").close()
time.sleep(float(os.environ.get("HF_PREPARE_DELAY", "0")))
"""


def test_node_killed_during_prepare_aborts_everywhere(
    agents: Agents, leader: Leader, tmp_path: Path
) -> None:
    from hotfleet.release import Release

    base = release("shop-2.0.0")
    sources = {ms.name: ms.source for ms in base.modules}
    tables = {ms.name: {"extra": ms.extra} for ms in base.modules if ms.extra is not None}
    slow = Release.from_sources(
        "shop",
        "2.0.1-slowinit",
        {**sources, "shop.slowinit": SLOW_INIT},
        packages=["shop"],
        modules=tables,
    )
    mark = tmp_path / "n2-preparing"
    nodes = [
        agents.start("n1"),
        agents.start("n2", env={"HF_PREPARE_MARK": str(mark), "HF_PREPARE_DELAY": "30"}),
        agents.start("n3"),
    ]
    leader.engine.push_release(slow)
    started = leader.engine.upgrade("shop@2.0.1-slowinit", Target(all=True), opts(timeout_s=20))
    wait_for(mark.exists, timeout=20)  # n2 is executing the release's code inside prepare
    nodes[1].signal(signal.SIGKILL)
    nodes[1].wait()
    done = leader.wait(started.id, timeout=40)
    assert done.phase is Phase.ABORTED and done.nodes["n2"].vote is Vote.UNREACHABLE
    assert "n2: unreachable at prepare" in done.reason
    assert versions([nodes[0], nodes[2]]) == {"1"}
    assert all(n.status().prepared_rollout == "" for n in (nodes[0], nodes[2]))
