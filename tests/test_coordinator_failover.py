"""Coordinator failover with real processes: two daemons, three agents, one etcd.

Every party is a real process: coordinators are ``python -m
coordinator.daemon`` (lease TTL 2 s, so a dead leader is replaced in ~2 s),
nodes are ``node-agent`` processes serving the example shop, and rollouts are
started with the real ``coordctl``.  Crashes are the daemon's own fault
injection (``HOTFLEET_FAULT=crash:<step>`` SIGKILLs it at that step;
``pause:<step>`` SIGSTOPs it there, a stand-in for a GC pause or partition).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import etcd3
import grpc
import pytest

from coordinator.daemon import advertised_address
from coordinator.engine import Target
from coordinator.model import Phase, Rollout, Vote
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.decisions import parse
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from hotfleet.keys import Keys
from tests.agents import RELEASES, Agents, release, wait_for
from tests.coordinators import CoordinatorProcess, Coordinators, coordctl, start_nodes, versions
from tests.fleet import Leader, opts


def decision_of(raw: bytes | None) -> str:
    """What a decision record says (its epoch is checked by agents and leaders)."""
    assert raw is not None, "no decision recorded"
    return parse(raw).decision


pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def leader_and_standby(
    coordinators: Coordinators, *, fault: str = "", endpoint: str | None = None
) -> tuple[CoordinatorProcess, CoordinatorProcess]:
    """Start ``a`` (with ``fault``) and let it win, then the standby ``b``."""
    a = coordinators.start("a", fault=fault, endpoint=endpoint)
    a.wait_leader()
    b = coordinators.start("b", endpoint=endpoint)
    assert not b.is_leader()
    return a, b


def record(client: EtcdClient, prefix: str, rollout_id: str) -> Rollout:
    raw, _ = client.get(Keys(prefix).rollout(rollout_id))
    assert raw is not None, f"no rollout record {rollout_id}"
    return Rollout.loads(raw)


def ended(client: EtcdClient, prefix: str, rollout_id: str, timeout: float = 30) -> Rollout:
    """Poll the rollout record until its phase is terminal."""
    done: Rollout = wait_for(
        lambda: (r := record(client, prefix, rollout_id)).phase.terminal and r, timeout, 0.1
    )
    return done


def start_upgrade(
    leader: CoordinatorProcess, client: EtcdClient, prefix: str, ref: str = "shop@2.0.0"
) -> str:
    """``coordctl release push`` + ``coordctl upgrade --all`` (no wait); the rollout id.

    A leader armed to die before prepare may die before its reply leaves: the
    id is then the one rollout recorded under the prefix.
    """
    pushed = coordctl(leader, "release", "push", str(RELEASES / "shop-2.0.0"))
    assert pushed.code == 0, pushed
    started = coordctl(leader, "-o", "json", "upgrade", "--all", "--release", ref, "--window", "0")
    if started.code == 0:
        data = started.json()
        assert data["phase"] == "preparing"
        return str(data["id"])
    assert started.code == 6 and "before_prepare" in leader.log(), started
    keys = Keys(prefix)
    (rid,) = {
        meta.key.decode()[len(keys.rollouts) :].split("/")[0]
        for _, meta in client.get_prefix(keys.rollouts)
    }
    return rid


@pytest.mark.parametrize("point", ["before_prepare", "before_decision"])
def test_leader_killed_before_decision_new_leader_presumes_abort(
    agents: Agents,
    coordinators: Coordinators,
    etcd_client: EtcdClient,
    etcd_prefix: str,
    point: str,
) -> None:
    nodes = start_nodes(agents)
    a, b = leader_and_standby(coordinators, fault=f"crash:{point}")
    rid = start_upgrade(a, etcd_client, etcd_prefix)
    assert a.wait() == -signal.SIGKILL, a.log()  # died undecided
    b.wait_leader()
    done = ended(etcd_client, etcd_prefix, rid)
    assert done.phase is Phase.ABORTED and done.decision == "abort", done.reason
    assert "presumed abort" in done.reason
    # the abort is the new leader's presumption, not a refusal: nobody voted no
    votes = {n.vote for n in done.nodes.values()}
    assert votes == ({Vote.YES} if point == "before_decision" else {Vote.PENDING})
    assert decision_of(etcd_client.get(Keys(etcd_prefix).decision(rid))[0]) == "abort"
    assert versions(nodes) == {"1"}
    wait_for(lambda: all(n.status().prepared_rollout == "" for n in nodes), timeout=10)
    assert etcd_client.get(Keys(etcd_prefix).active)[0] is None  # the cluster is free again
    # and the new leader takes work: a fresh upgrade through it commits
    again = coordctl(b, "upgrade", "--all", "--release", "shop@2.0.0", "--window", "0", "--wait")
    assert again.code == 0, again
    assert versions(nodes) == {"2"}


def test_leader_stopped_mid_prepare_exits_at_once_and_the_next_one_presumes_abort(
    agents: Agents,
    coordinators: Coordinators,
    etcd_client: EtcdClient,
    etcd_prefix: str,
    tmp_path: Path,
) -> None:
    """SIGTERM while a node prepares for a minute: the leader leaves at once, as a crash would
    leave the rollout (it writes nothing more: its RPCs cancelled on the way out must not read
    as refusals), and the next leader ends the rollout by presumed abort."""
    spin = tmp_path / "spin"  # a release whose import never ends: prepare runs to its deadline
    (spin / "shop").mkdir(parents=True)
    (spin / "release.toml").write_text('name = "shop"\nversion = "9.9.9"\n')
    (spin / "shop" / "spin.py").write_text("while True:\n    pass\n")
    nodes = start_nodes(agents, ("n1",))
    a = coordinators.start("a")  # alone: no successor's abort reaches the node meanwhile
    a.wait_leader()
    started = coordctl(
        a, "-o", "json", "upgrade", "--all", "--release", str(spin), "--timeout", "60"
    )
    assert started.code == 0, started
    rid = str(started.json()["id"])
    wait_for(lambda: nodes[0].status().state == "preparing", timeout=20)
    stopping = time.monotonic()
    a.term()  # exit 0, or the log
    assert time.monotonic() - stopping < 5, a.log()
    b = coordinators.start("b")
    b.wait_leader()
    done = ended(etcd_client, etcd_prefix, rid)
    assert done.phase is Phase.ABORTED and "presumed abort" in done.reason, done.reason
    assert {n.vote for n in done.nodes.values()} == {Vote.PENDING}  # no vote invented
    wait_for(lambda: nodes[0].status().state == "idle", timeout=20)
    assert versions(nodes) == {"1"}


@pytest.mark.parametrize("point", ["after_decision", "after_finish"])
def test_leader_killed_after_decision_new_leader_completes(
    agents: Agents,
    coordinators: Coordinators,
    etcd_client: EtcdClient,
    etcd_prefix: str,
    point: str,
) -> None:
    nodes = start_nodes(agents)
    a, b = leader_and_standby(coordinators, fault=f"crash:{point}")
    rid = start_upgrade(a, etcd_client, etcd_prefix)
    assert a.wait() == -signal.SIGKILL, a.log()
    assert decision_of(etcd_client.get(Keys(etcd_prefix).decision(rid))[0]) == "commit"
    b.wait_leader()
    done = ended(etcd_client, etcd_prefix, rid)
    assert done.phase is Phase.PERMANENT and done.decision == "commit", done.reason
    assert done.leader == a.address and done.epoch > 0
    assert versions(nodes) == {"2"}
    raw, _ = etcd_client.get(Keys(etcd_prefix).permanent)
    assert raw is not None and b"shop@2.0.0" in raw
    assert all(n.status().prepared_rollout == "" for n in nodes)
    status = coordctl(b, "-o", "json", "status", rid)
    assert status.code == 0 and status.json()["phase"] == "permanent", status


def test_deposed_leader_resumes_and_is_fenced(
    agents: Agents, coordinators: Coordinators, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    """A leader frozen after the decision wakes up deposed: agents and etcd refuse it."""
    nodes = start_nodes(agents)
    a, b = leader_and_standby(coordinators, fault="pause:after_decision")
    rid = start_upgrade(a, etcd_client, etcd_prefix)
    old_epoch = record(etcd_client, etcd_prefix, rid).epoch  # written by a, with a's epoch
    assert old_epoch > 0
    wait_for(lambda: a.stopped, timeout=15)
    b.wait_leader()  # a's lease expired while it was frozen
    done = ended(etcd_client, etcd_prefix, rid)
    assert done.phase is Phase.PERMANENT and done.epoch > old_epoch, done.reason
    assert versions(nodes) == {"2"}
    assert {n.status().epoch_seen for n in nodes} == {done.epoch}

    a.signal(signal.SIGCONT)  # the deposed leader carries on where it stopped
    wait_for(lambda: "no longer the leader" in a.log(), timeout=15)
    assert a.alive and not a.is_leader()
    after = record(etcd_client, etcd_prefix, rid)
    assert after.phase is Phase.PERMANENT and after.epoch == done.epoch  # its write was fenced
    assert versions(nodes) == {"2"} and {n.status().epoch_seen for n in nodes} == {done.epoch}
    # and any late RPC carrying its epoch is refused by every agent
    for node in nodes:
        for call, request in (
            (node.stub.Abort, agent_pb2.AbortRequest(rollout_id=rid, epoch=old_epoch)),
            (node.stub.Prepare, agent_pb2.PrepareRequest(rollout_id="late", epoch=old_epoch)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=5)
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "lower than" in (info.value.details() or "")
    # a coordctl pointed at the deposed one is sent to the real leader
    redirected = coordctl(a, "-o", "json", "abort", "--no-wait")
    assert redirected.code == 3 and b.address in redirected.err, redirected


def test_etcd_restart_mid_rollout_ends_in_one_outcome(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    """etcd killed at the commit point and restarted: all v2 + permanent, or all v1 + aborted."""
    prefix = "/hf-etcd-restart/"
    agents = Agents(tmp_path, etcd_server.endpoint, prefix)
    coordinators = Coordinators(tmp_path, etcd_server.endpoint, prefix)
    client = connect(etcd_server.endpoint)
    try:
        nodes = start_nodes(agents)
        a, b = leader_and_standby(coordinators, fault="pause:before_decision")
        rid = start_upgrade(a, client, prefix)
        wait_for(lambda: a.stopped, timeout=15)  # frozen at the commit point
        assert "fault injection: SIGSTOP at before_decision" in a.log()
        etcd_server.kill()  # every node is prepared and nothing is decided
        a.signal(signal.SIGCONT)  # the leader carries on against a dead etcd
        # it runs into the dead etcd (retries, keepalive failures) before etcd is back
        wait_for(lambda: a.log().partition("SIGSTOP at before_decision\n")[2].strip(), 15)
        etcd_server.start()
        done = ended(client, prefix, rid, timeout=60)
        assert done.phase in {Phase.PERMANENT, Phase.ABORTED}, done
        expected = "2" if done.phase is Phase.PERMANENT else "1"
        wait_for(lambda: versions(nodes) == {expected}, timeout=20)
        wait_for(lambda: all(n.status().prepared_rollout == "" for n in nodes), timeout=20)
        decision, _ = client.get(Keys(prefix).decision(rid))
        assert decision_of(decision) == ("commit" if expected == "2" else "abort")
        assert client.get(Keys(prefix).active)[0] is None
        # the control plane survived too: whoever leads now, the other takes over from it
        leader = coordinators.leader()
        survivor = b if leader is a else a
        leader.kill()
        survivor.wait_leader(timeout=20)
    finally:
        coordinators.close()
        agents.close()
        client.close()


def test_advertised_address_defaults() -> None:
    assert advertised_address("127.0.0.1:7600") == "127.0.0.1:7600"
    assert advertised_address("0.0.0.0:7600") == "127.0.0.1:7600"
    assert advertised_address("[::]:7600") == "127.0.0.1:7600"
    assert advertised_address("0.0.0.0:7600", "coord-1.internal") == "coord-1.internal:7600"
    assert advertised_address("0.0.0.0:7600", "fd00::1") == "[fd00::1]:7600"


def test_redirects_name_the_advertised_address(coordinators: Coordinators) -> None:
    """The election key holds the advertised address: that is where coordctl is sent."""
    a = coordinators.start("a", listen="0.0.0.0:0")  # wildcard: advertised as 127.0.0.1
    assert a.address.startswith("127.0.0.1:")
    a.wait_leader()
    b = coordinators.start("b", advertise_host="localhost")
    assert b.address.startswith("localhost:")
    refused = coordctl(b, "upgrade", "--all", "--release", "shop@9.9.9")
    assert refused.code == 3 and f"following the leader at {a.address}" in refused.err, refused
    a.term()  # resigns: b leads at once
    b.wait_leader()
    c = coordinators.start("c")
    refused = coordctl(c, "upgrade", "--all", "--release", "shop@9.9.9")
    assert refused.code == 3 and f"following the leader at {b.address}" in refused.err, refused


def test_etcd_blip_while_finishing_does_not_strand_the_rollout(
    agents: Agents, leader: Leader
) -> None:
    """In-process leader: one failed etcd read of a node's address during finish."""
    nodes = start_nodes(agents, ("n1", "n2"))
    leader.engine.push_release(release("shop-2.0.0"))
    client = leader.engine.client
    real_get = client.get
    blips = [etcd3.exceptions.ConnectionFailedError()]

    def flaky_get(key: str, *args: Any, **kwargs: Any) -> Any:
        if key.startswith(leader.keys.nodes) and blips:
            raise blips.pop()
        return real_get(key, *args, **kwargs)

    def blip(_rollout: object) -> None:
        client.get = flaky_get  # one read fails, the next ones work again

    leader.engine.hooks["after_decision"] = blip
    try:
        started = leader.engine.upgrade("shop@2.0.0", Target(all=True), opts())
        done = leader.wait(started.id, timeout=8)
    finally:
        client.get = real_get
    assert done.phase is Phase.PERMANENT, done.reason
    assert versions(nodes) == {"2"}
