"""gunicorn workers as hotfleet participants (issue 13): real gunicorn masters on 127.0.0.1.

Two masters with 3 workers each simulate two hosts (``HOTFLEET_HOST=a`` and
``b``); ``coordctl upgrade --all`` runs under recorded load; a worker that
gunicorn replaces inside the rollback window boots the fleet's provisional
release before it serves.
"""

from __future__ import annotations

import calendar
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from hotfleet.etcd_client import EtcdClient
from tests.agents import RELEASES, AgentProcess, Agents, read_member, wait_for
from tests.coordinators import Coordinators, coordctl
from tests.fleet import Load
from tests.servers import Server, Servers, threads_of, worker_pids

pytestmark = pytest.mark.timeout(120)

EXIT_OK = 0


@pytest.fixture
def servers(
    tmp_path: Path, etcd_endpoint: str, etcd_prefix: str, agents: Agents
) -> Iterator[Servers]:
    owner = Servers(tmp_path, etcd_endpoint, etcd_prefix, agents)
    try:
        yield owner
    finally:
        owner.close()


def _load(hosts: list[Server]) -> Load:
    targets = [SimpleNamespace(http_address=h.http_address) for h in hosts]
    return Load(cast(list[AgentProcess], targets), threads=2)


def _ts(text: str) -> float:
    """A log line's ``ts`` (UTC, ms) as unix seconds."""
    whole, _, rest = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(rest or 0) / 1000


def _prepared_at(hosts: list[Server], rollout_id: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for host in hosts:
        for rec in host.log_records():
            if rec.get("message", "").startswith(f"rollout {rollout_id}: prepared"):
                out[rec["node"]] = _ts(rec["ts"])
    return out


def test_two_gunicorn_hosts_upgrade_under_load_and_a_recycled_worker_boots_the_release(
    servers: Servers,
    coordinators: Coordinators,
    etcd_client: EtcdClient,
    etcd_prefix: str,
) -> None:
    leader = coordinators.start("c")
    hosts = [servers.gunicorn("a"), servers.gunicorn("b")]
    members: dict[str, dict[str, Any]] = {}
    for host in hosts:
        members.update(host.wait_workers(etcd_client, etcd_prefix))
    leader.wait_leader()

    # one participant per worker: own id, pid, gRPC port and metrics; the host's labels
    assert sorted(members) == ["a-w0", "a-w1", "a-w2", "b-w0", "b-w1", "b-w2"]
    assert len({m["pid"] for m in members.values()}) == 6
    assert len({m["address"] for m in members.values()}) == 6
    for node_id, member in members.items():
        host, _, slot = node_id.partition("-w")
        assert member["labels"] == {"zone": f"z-{host}", "host": host, "worker": slot}
        assert member["http_address"] == next(h for h in hosts if h.host == host).http_address
    for host in hosts:
        # no agent, gRPC or etcd thread in the master: nothing threaded exists before a fork
        assert threads_of(host.proc.pid) == 1, host.log()
        assert sorted(worker_pids(host)) == sorted(members[n]["pid"] for n in host.node_ids), (
            host.log()
        )

    table = coordctl(leader, "nodes")
    assert table.code == EXIT_OK, table
    lines = table.out.splitlines()
    assert lines[0].split()[:2] == ["HOST", "NODE"], table.out
    assert [line.split()[:2] for line in lines[1:]] == [
        [n.partition("-w")[0], n] for n in sorted(members)
    ], table.out

    pushed = coordctl(leader, "release", "push", str(RELEASES / "shop-2.0.0"))
    assert pushed.code == EXIT_OK, pushed
    load = _load(hosts)
    try:
        time.sleep(1.0)
        up = coordctl(
            leader,
            "-o",
            "json",
            "upgrade",
            "--all",
            "--release",
            "shop@2.0.0",
            "--wait",
            "--window",
            "60",
        )
        assert up.code == EXIT_OK, up.out + up.err
        rollout = up.json()
        assert rollout["phase"] == "provisional", rollout
        rid = rollout["id"]

        # gunicorn recycles a worker inside the window: its successor takes the same slot
        # and node id, and boots the provisional release before its first request
        old = read_member(etcd_client, etcd_prefix, "a-w1")
        assert old is not None
        os.kill(old["pid"], signal.SIGTERM)  # graceful: it finishes its request first

        def successor() -> dict[str, Any] | None:
            m = read_member(etcd_client, etcd_prefix, "a-w1")
            return m if m and m["pid"] != old["pid"] and m["state"] == "idle" else None

        new = wait_for(successor, timeout=40, interval=0.2)
        assert new["current_release"] == "shop@2.0.0", (new, hosts[0].log())
        assert new["permanent_release"] != "shop@2.0.0"  # provisional, the window still runs
        assert threads_of(hosts[0].proc.pid) == 1
        time.sleep(1.0)  # the successor serves under the load too
    finally:
        reports = load.reports()
        load.close()

    # 0 failed requests, 0 responses mixing two releases, both releases served
    assert reports and all(r["ok"] > 0 for r in reports), reports
    assert [r for r in reports if r["failed"]] == [], reports
    assert [m for r in reports for m in r["mixes"]] == [], reports
    seen = {k for r in reports for k in r["seen"]}
    assert any("=2" in k for k in seen) and any("=1" in k for k in seen), seen

    # 2PC across both hosts: every worker prepared before any worker switched
    status = coordctl(leader, "-o", "json", "status", rid)
    assert status.code == EXIT_OK, status
    record = status.json()
    assert sorted(record["nodes"]) == sorted(members)
    finished = {n: r["finished_at"] for n, r in record["nodes"].items()}
    assert all(r["finished"] for r in record["nodes"].values()), record
    prepared = _prepared_at(hosts, rid)
    assert sorted(prepared) == sorted(members), prepared
    assert max(prepared.values()) <= min(finished.values()), (prepared, finished)

    # every worker now serves the new code; the operator ends the window
    for host in hosts:
        for _ in range(12):
            served = host.get("/versions")["versions"]
            if {v for k, v in served.items() if k != "shop"} != {"2"}:  # say why, then fail
                now = coordctl(leader, "-o", "json", "status", rid).json()
                nodes = {
                    n: (m or {}).get("current_release")
                    for n in members
                    if (m := read_member(etcd_client, etcd_prefix, n)) is not None
                }
                raise AssertionError(
                    f"{host.host} served {served}; rollout {now.get('phase')}: "
                    f"{now.get('reason')}; members' releases {nodes}\n{host.log()}"
                )
    promoted = coordctl(leader, "promote")
    assert promoted.code == EXIT_OK, promoted
