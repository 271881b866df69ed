"""The node agent as a real process: gRPC, etcd membership, the example service.

Every agent is a ``python -m node_agent.cli`` subprocess serving a private
copy of ``examples/shop`` over real HTTP, driven over real gRPC, registered in
a real etcd, and stopped with real signals.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from coordinator.traffic import version_key
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from node_agent.agent import permanent_record
from tests.agents import (
    ROOT,
    SHOP_MODULES,
    Agents,
    node_key,
    publish,
    read_member,
    release,
    wait_for,
)
from tests.fleet import Load

pytestmark = pytest.mark.integration


def one_version(versions: dict[str, str]) -> str:
    """The single version every shop module reports (fails on a mix)."""
    seen = {versions[m] for m in SHOP_MODULES}
    assert len(seen) == 1, versions
    return seen.pop()


def prepare(agent, manifest, rollout: str, epoch: int = 1, **kw) -> agent_pb2.PrepareReply:  # type: ignore[no-untyped-def]
    return agent.stub.Prepare(
        agent_pb2.PrepareRequest(rollout_id=rollout, epoch=epoch, release=manifest, **kw),
        timeout=30,
    )


def finish(agent, rollout: str, epoch: int = 1) -> agent_pb2.FinishReply:  # type: ignore[no-untyped-def]
    return agent.stub.Finish(agent_pb2.FinishRequest(rollout_id=rollout, epoch=epoch), timeout=30)


def test_registers_and_deregisters_at_once_on_sigterm(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    agent = agents.start("n1", labels="zone=eu-west,tier=web")
    member = wait_for(lambda: read_member(etcd_client, etcd_prefix, "n1"))
    assert member["address"] == agent.grpc_address
    assert member["http_address"] == agent.http_address
    assert member["labels"] == {"zone": "eu-west", "tier": "web"}
    assert member["state"] == "idle"
    assert member["pid"] == agent.proc.pid
    assert member["secure"] is False
    _, lease = etcd_client.get(node_key(etcd_prefix, "n1"))
    assert lease.lease_id != 0  # on a lease, so it dies with the process

    status = agent.status()
    assert (status.node_id, status.state, dict(status.labels)) == (
        "n1",
        "idle",
        {"zone": "eu-west", "tier": "web"},
    )
    code, body = agent.http("/price?sku=pear&qty=2")
    assert code == 200 and body["total"] == 150 and one_version(body["versions"]) == "1"
    metrics = agent.http_text("/-/metrics")
    assert 'hotfleet_requests_total{node="n1"} 1' in metrics
    assert 'hotfleet_request_duration_seconds_bucket{node="n1",le="+Inf"} 1' in metrics
    assert "process_resident_memory_bytes" in metrics
    health = agent.stub.Health(agent_pb2.HealthRequest(), timeout=5)
    assert health.requests == 1 and health.errors == 0 and health.rss_bytes > 0
    assert len(health.latency_counts) == len(health.latency_bounds_s) + 1

    started = time.monotonic()
    agent.term()
    assert read_member(etcd_client, etcd_prefix, "n1") is None  # revoked, not expired
    assert time.monotonic() - started < 5


def test_sigkilled_agent_disappears_when_its_lease_expires(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    agent = agents.start("n-kill", lease_ttl=2)
    wait_for(lambda: read_member(etcd_client, etcd_prefix, "n-kill"))
    agent.signal(signal.SIGKILL)
    agent.wait()
    killed = time.monotonic()
    wait_for(lambda: read_member(etcd_client, etcd_prefix, "n-kill") is None, timeout=10)
    assert time.monotonic() - killed < 8


def test_lower_epoch_is_refused(agents: Agents, etcd_client: EtcdClient, etcd_prefix: str) -> None:
    agent = agents.start("n-epoch")
    reply = agent.stub.Abort(agent_pb2.AbortRequest(rollout_id="r", epoch=5), timeout=5)
    assert reply.ok and reply.epoch_seen == 5
    manifest = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))
    for call in (
        lambda: prepare(agent, manifest, "old", epoch=4),
        lambda: finish(agent, "old", epoch=4),
        lambda: agent.stub.Abort(agent_pb2.AbortRequest(rollout_id="old", epoch=3), timeout=5),
        lambda: agent.stub.Rollback(
            agent_pb2.RollbackRequest(rollout_id="old", epoch=1), timeout=5
        ),
        lambda: agent.stub.MakePermanent(agent_pb2.MakePermanentRequest(epoch=2), timeout=5),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "epoch" in (info.value.details() or "")
    assert one_version(agent.versions()) == "1"  # nothing was staged or switched
    assert agent.status().epoch_seen == 5 and agent.status().prepared_rollout == ""
    assert prepare(agent, manifest, "new", epoch=6).ok  # a newer leader is obeyed
    assert agent.status().epoch_seen == 6
    member = wait_for(
        lambda: (
            (m := read_member(etcd_client, etcd_prefix, "n-epoch"))
            and m["state"] == "prepared"
            and m
        )
    )
    assert member["epoch_seen"] == 6 and member["prepared_rollout"] == "new"


def test_upgrade_and_rollback_over_grpc_change_what_http_serves(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    agent = agents.start("n-up")
    assert agent.http("/checkout", {"lines": [{"sku": "fig", "qty": 3}]})[0] == 200
    _, stock = agent.http("/stock")
    assert stock["stock"]["fig"] == 7 and one_version(stock["versions"]) == "1"
    manifest = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))

    # Prepare + Abort: nothing visible changes.
    assert prepare(agent, manifest, "aborted").ok
    assert agent.stub.Abort(agent_pb2.AbortRequest(rollout_id="aborted", epoch=1)).dropped
    assert one_version(agent.versions()) == "1" and agent.status().state == "idle"

    # Prepare stages without switching; Finish switches every module at once.
    reply = prepare(agent, manifest, "r-up")
    assert reply.ok, reply.errors
    assert {c.module for c in reply.changes if c.kind == "updated"} >= set(SHOP_MODULES)
    assert one_version(agent.versions()) == "1"
    assert agent.status().state == "prepared" and agent.status().prepared_rollout == "r-up"
    done = finish(agent, "r-up")
    assert done.ok and done.release == "shop@2.0.0" and not done.already_finished
    replay = finish(agent, "r-up")  # idempotent
    assert replay.ok and replay.already_finished

    _, stock = agent.http("/stock")
    assert one_version(stock["versions"]) == "2"
    assert stock["items"]["fig"] == {"on_hand": 7, "reserved": 0}  # state migrated
    assert stock["reorder_level"] == 20  # from release.toml `extra`
    assert agent.http("/price?sku=apple&qty=10")[1]["discount"] == 50
    assert agent.http("/stock/low")[0] == 200
    status = agent.status()
    assert (status.current_release, status.state) == ("shop@2.0.0", "idle")
    modules = agent.stub.ModuleStatus(agent_pb2.ModuleStatusRequest(modules=["shop.pricing"]))
    assert [(m.module, m.state, m.release) for m in modules.modules] == [
        ("shop.pricing", "modified", "shop@2.0.0")
    ]
    member = wait_for(
        lambda: (
            (m := read_member(etcd_client, etcd_prefix, "n-up"))
            and m["current_release"] == "shop@2.0.0"
            and m
        )
    )
    assert member["state"] == "idle"

    agent.http("/checkout", {"lines": [{"sku": "fig", "qty": 2}]})
    back = agent.stub.Rollback(
        agent_pb2.RollbackRequest(rollout_id="rb", epoch=1, expected_release=""), timeout=30
    )
    assert back.ok, back.errors
    _, stock = agent.http("/stock")
    assert one_version(stock["versions"]) == "1"
    assert stock["stock"]["fig"] == 7  # down-migrated: 5 on hand + 2 reserved
    assert agent.http("/stock/low")[0] == 404
    assert agent.stub.Rollback(agent_pb2.RollbackRequest(rollout_id="rb", epoch=1)).ok  # replay
    again = agent.stub.Rollback(agent_pb2.RollbackRequest(rollout_id="rb2", epoch=1))
    assert not again.ok and again.errors[0].node == "n-up"  # nothing left to roll back to


def test_broken_and_node_specific_releases_are_refused_per_module(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    ap = agents.start("n-ap", env={"SHOP_ZONE": "ap-south"})
    eu = agents.start("n-eu", env={"SHOP_ZONE": "eu-west"})
    broken = publish(etcd_client, etcd_prefix, release("shop-3.0.0-broken"))
    reply = prepare(ap, broken, "r-broken")
    assert not reply.ok
    assert [(e.node, e.module, e.reason) for e in reply.errors] == [
        ("n-ap", "shop.pricing", "badfile")
    ]
    assert "line" in reply.errors[0].detail
    assert agent_state(ap) == ("idle", "")
    assert one_version(ap.versions()) == "1"
    assert not finish(ap, "r-broken").ok  # nothing prepared: finish refuses

    nodecfg = publish(etcd_client, etcd_prefix, release("shop-2.2.0-nodecfg"))
    refused = prepare(ap, nodecfg, "r-zone")
    assert not refused.ok
    assert ("n-ap", "shop.tax", "import_error") in {
        (e.node, e.module, e.reason) for e in refused.errors
    }
    assert "ap-south" in next(e.detail for e in refused.errors if e.module == "shop.tax")
    assert prepare(eu, nodecfg, "r-zone").ok  # only one node's configuration fails
    assert eu.stub.Abort(agent_pb2.AbortRequest(rollout_id="r-zone", epoch=1)).dropped
    assert one_version(ap.versions()) == "1" and one_version(eu.versions()) == "1"

    # The bad release loads fine and then fails a fraction of requests: Health sees it.
    bad = publish(etcd_client, etcd_prefix, release("shop-2.1.0-bad"))
    assert prepare(eu, bad, "r-bad").ok and finish(eu, "r-bad").ok
    before = eu.stub.Health(agent_pb2.HealthRequest())
    codes = [eu.http("/price?sku=apple")[0] for _ in range(60)]
    after = eu.stub.Health(agent_pb2.HealthRequest())
    assert 0 < codes.count(500) < 60 and set(codes) == {200, 500}
    assert after.errors - before.errors == codes.count(500)
    assert after.requests - before.requests == 60
    assert after.release == "shop@2.1.0-bad"


def agent_state(agent) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    status = agent.status()
    return status.state, status.current_release


def test_restart_reconciles_to_the_permanent_release(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    v2 = release("shop-2.0.0")
    publish(etcd_client, etcd_prefix, v2)
    etcd_client.put(f"{etcd_prefix}releases/permanent", permanent_record(v2))

    first = agents.start("n-rec")  # boots v1 from disk, reconciles before registering
    assert agent_state(first) == ("idle", "shop@2.0.0")
    assert first.status().permanent_release == "shop@2.0.0"
    assert one_version(first.versions()) == "2"
    member = read_member(etcd_client, etcd_prefix, "n-rec")
    assert member is not None and member["current_release"] == "shop@2.0.0"
    assert 'VERSION = "2"' in (first.code_path / "shop" / "pricing.py").read_text()
    first.term()

    second = agents.start("n-rec", code_path=first.code_path)  # boot code is v2 now
    assert agent_state(second) == ("idle", "shop@2.0.0")
    assert one_version(second.versions()) == "2"
    assert "reconciling" not in second.log()


def test_upgrade_and_rollback_under_load_fail_no_request(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    agent = agents.start("n-load")
    manifest = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))
    load = Load([agent], path="/stock", threads=6)
    try:

        def served(more: int) -> None:
            """Until ``more`` requests went through on the current code (no fixed sleep)."""
            now = agent.stub.Health(agent_pb2.HealthRequest()).requests
            wait_for(
                lambda: agent.stub.Health(agent_pb2.HealthRequest()).requests >= now + more,
                timeout=20,
            )

        served(20)
        assert prepare(agent, manifest, "r-load").ok
        assert finish(agent, "r-load").ok
        served(20)
        assert agent.stub.Rollback(agent_pb2.RollbackRequest(rollout_id="rb", epoch=1)).ok
        served(20)
        [result] = load.reports()
    finally:
        load.close()
    assert result["failed"] == 0 and result["mixed"] == 0, result
    v1 = version_key({"shop": "1", **{m: "1" for m in SHOP_MODULES}})
    v2 = version_key({"shop": "1", **{m: "2" for m in SHOP_MODULES}})
    assert set(result["seen"]) == {v1, v2}, result["seen"]
    assert result["ok"] > 100
    health = agent.stub.Health(agent_pb2.HealthRequest())
    assert health.errors == 0 and health.requests >= result["ok"]


def test_etcd_outage_keeps_serving_then_reregisters(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    prefix = "/outage/"
    fleet = Agents(tmp_path, etcd_server.endpoint, prefix)
    client = connect(etcd_server.endpoint)
    try:
        agent = fleet.start("n-etcd", lease_ttl=2)
        wait_for(lambda: read_member(client, prefix, "n-etcd"))
        etcd_server.kill()
        wait_for(lambda: agent.status().state == "etcd_unreachable", timeout=10)
        for _ in range(5):
            assert agent.http("/stock")[0] == 200  # the worker keeps serving
        metrics = agent.http_text("/-/metrics")
        assert 'hotfleet_etcd_connected{node="n-etcd"} 0' in metrics

        etcd_server.start()
        wait_for(lambda: agent.status().state == "idle", timeout=15)
        member = wait_for(lambda: read_member(client, prefix, "n-etcd"), timeout=10)
        assert member["address"] == agent.grpc_address
        # a non-event (the new lease is kept alive) only shows over a stretch
        # of time: longer than the TTL
        time.sleep(2.5)
        assert read_member(client, prefix, "n-etcd") is not None
        assert "etcd unreachable" in agent.log() and "re-registered" in agent.log()
    finally:
        fleet.close()
        client.close()


def test_refuses_to_start_without_tls_or_dev(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.cli",
            "--node-id",
            "x",
            "--code-path",
            str(ROOT / "examples" / "shop"),
            "--app",
            "shop.app:application",
            "--etcd",
            "http://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert proc.returncode == 2
    assert "mutual TLS" in proc.stderr and "--dev" in proc.stderr
