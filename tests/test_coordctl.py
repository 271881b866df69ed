"""``coordctl`` end to end: the real CLI against real coordinator and agent processes.

Exit codes are the contract scripts rely on (``coordinator.cli.EXIT_CODES``):
0 when the asked-for outcome happened, 3 refused, 4 aborted, 6 unreachable.
"""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.cli import EXIT_ABORTED, EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE
from tests.agents import RELEASES, AgentProcess, Agents, wait_for
from tests.coordinators import CoordinatorProcess, Coordinators, coordctl, start_nodes, versions
from tests.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NO_WINDOW = ("--window", "0")  # permanent as soon as every node finished: these are 2PC tests


def by_node(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["node_id"]: r for r in rows}


def test_upgrade_status_and_reads_through_the_standby(
    agents: Agents, coordinators: Coordinators
) -> None:
    """Every command goes to the standby; mutations follow the leader, reads answer locally."""
    nodes = start_nodes(agents)
    leader = coordinators.start("a")
    leader.wait_leader()
    standby = coordinators.start("b")

    pushed = coordctl(standby, "release", "push", str(RELEASES / "shop-2.0.0"))
    assert pushed.code == EXIT_OK, pushed
    assert "pushed shop@2.0.0" in pushed.out  # content-addressed: any coordinator stores it

    # --dry-run: prepared everywhere, then aborted on purpose; nothing changed
    dry = coordctl(standby, "upgrade", "--all", "--release", "shop@2.0.0", "--dry-run")
    assert dry.code == EXIT_OK, dry
    assert "dry run" in dry.out and "nothing changed" in dry.out
    assert versions(nodes) == {"1"}
    assert all(n.status().prepared_rollout == "" for n in nodes)
    rows = coordctl(standby, "-o", "json", "nodes")
    assert rows.code == EXIT_OK, rows
    assert {r["current_release"] for r in rows.json()["items"]} <= {""}  # still the boot code

    up = coordctl(standby, "upgrade", "--all", "--release", "shop@2.0.0", "--wait", *NO_WINDOW)
    assert up.code == EXIT_OK, up
    # --wait returns once every node runs it (provisional, or already permanent: no window)
    assert "shop@2.0.0 is" in up.out and "on 3 node(s)" in up.out
    assert f"following the leader at {leader.address}" in up.err
    assert versions(nodes) == {"2"}
    # an unpack asked of the standby is the leader's to do; every node already runs it
    again = coordctl(standby, "release", "unpack", "shop@2.0.0")
    assert again.code == EXIT_OK, again
    assert "not unpacked on 3: already runs shop@2.0.0" in again.out, again

    def status() -> dict[str, Any]:
        result = coordctl(standby, "-o", "json", "status")
        assert result.code == EXIT_OK, result
        data: dict[str, Any] = result.json()
        return data

    rollout = wait_for(lambda: (r := status())["phase"] == "permanent" and r, timeout=15)
    assert rollout["decision"] == "commit"
    assert rollout["release"] == "shop@2.0.0" and rollout["leader"] == leader.address
    assert sorted(rollout["nodes"]) == ["n1", "n2", "n3"]
    for result in rollout["nodes"].values():
        assert result["vote"] == "yes" and result["finished"] and not result["errors"]

    def listed() -> dict[str, dict[str, Any]]:
        return by_node(coordctl(standby, "-o", "json", "nodes").json()["items"])

    def upgraded() -> dict[str, dict[str, Any]] | None:
        members = listed()
        return (
            members if {n["current_release"] for n in members.values()} == {"shop@2.0.0"} else None
        )

    members = wait_for(upgraded)
    assert sorted(members) == ["n1", "n2", "n3"]
    assert {n["address"] for n in members.values()} == {n.grpc_address for n in nodes}

    history = coordctl(standby, "rollouts")
    assert history.code == EXIT_OK, history
    assert rollout["id"] in history.out and "permanent" in history.out and "dry_run" in history.out
    as_json = coordctl(standby, "-o", "json", "rollouts").json()["items"]
    assert [r["phase"] for r in as_json] == ["permanent", "dry_run"]  # newest first

    # no drift while the fleet agrees
    modules = coordctl(standby, "-o", "json", "modules")
    assert modules.code == EXIT_OK, modules
    assert modules.json()["drift"] == {}

    # back to 1.0.0 on n1 only: the fleet drifts, and coordctl says where
    assert coordctl(standby, "release", "push", str(RELEASES / "shop-1.0.0")).code == EXIT_OK
    one = coordctl(
        standby,
        "upgrade",
        "--nodes",
        "n1",
        "--release",
        "shop@1.0.0",
        "--allow-downgrade",  # an older version than n1 runs: asked for explicitly
        "--wait",
        *NO_WINDOW,
    )
    assert one.code == EXIT_OK, one
    assert versions(nodes[:1]) == {"1"} and versions(nodes[1:]) == {"2"}
    drift = coordctl(standby, "-o", "json", "modules").json()["drift"]
    assert "shop.pricing" in drift
    assert sorted(sorted(group) for group in drift["shop.pricing"].values()) == [
        ["n1"],
        ["n2", "n3"],
    ]
    table = coordctl(standby, "modules")
    assert table.code == EXIT_OK, table
    assert "shop.pricing" in table.out and "n1" in table.out
    per_node = coordctl(standby, "-o", "json", "modules", "--node", "n1").json()["modules"]
    assert {r["node"] for r in per_node} == {"n1"}
    assert {r["release"] for r in per_node if r["module"].startswith("shop.")} == {"shop@1.0.0"}


def test_refusals_and_aborts_name_node_module_and_reason(
    agents: Agents, coordinators: Coordinators
) -> None:
    nodes: list[AgentProcess] = [
        agents.start("n1", wait=False),
        agents.start("n2", wait=False, env={"SHOP_ZONE": "ap-south"}),
        agents.start("n3", wait=False),
    ]
    for node in nodes:
        node.wait_ready()
    leader = coordinators.start("a")
    leader.wait_leader()

    # a release that does not compile: every node refuses in prepare, nothing changes
    broken = coordctl(
        leader,
        "upgrade",
        "--release",
        str(RELEASES / "shop-3.0.0-broken"),
        "--all",
        "--wait",
        *NO_WINDOW,
    )
    assert broken.code == EXIT_ABORTED, broken
    text = broken.out + broken.err
    for word in ("n1", "n2", "n3", "shop.pricing", "badfile", "aborted"):
        assert word in text, (word, broken)
    assert versions(nodes) == {"1"}

    # a module broken only in one node's configuration: all or nothing
    cfg = coordctl(
        leader,
        "-o",
        "json",
        "upgrade",
        "--release",
        str(RELEASES / "shop-2.2.0-nodecfg"),
        "--all",
        "--wait",
        *NO_WINDOW,
    )
    assert cfg.code == EXIT_ABORTED, cfg
    rollout = cfg.json()
    assert rollout["phase"] == "aborted" and rollout["decision"] == "abort"
    assert {e["node"] for e in rollout["errors"]} == {"n2"}  # the only culprit
    assert ("shop.tax", "import_error") in {(e["module"], e["reason"]) for e in rollout["errors"]}
    assert "n2: shop.tax: import_error" in rollout["reason"]
    assert {n: r["vote"] for n, r in rollout["nodes"].items()} == {
        "n1": "yes",
        "n2": "no",
        "n3": "yes",
    }
    human = coordctl(leader, "status", rollout["id"])
    assert human.code == EXIT_OK and "n2" in human.out and "shop.tax" in human.out, human
    assert versions(nodes) == {"1"}
    assert all(n.status().prepared_rollout == "" for n in nodes)

    # one rollout at a time: a provisional rollout holds the cluster
    assert coordctl(leader, "release", "push", str(RELEASES / "shop-2.0.0")).code == EXIT_OK
    first = coordctl(
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
    assert first.code == EXIT_OK, first
    held = first.json()
    assert held["phase"] == "provisional"
    busy = coordctl(leader, "-o", "json", "upgrade", "--all", "--release", "shop@2.0.0")
    assert busy.code == EXIT_REFUSED, busy
    error = busy.json()["error"]
    assert error["code"] == "busy" and held["id"] in error["message"]
    assert held["id"] in busy.err and "one rollout at a time" in busy.err

    # unknown release: refused up front, with the way out
    missing = coordctl(leader, "upgrade", "--all", "--release", "shop@9.9.9")
    assert missing.code == EXIT_REFUSED and "coordctl release push" in missing.err, missing


def test_unreachable_coordinator_is_exit_6_with_a_hint() -> None:
    address = f"127.0.0.1:{free_port()}"
    result = coordctl(address, "nodes")
    assert result.code == EXIT_UNREACHABLE, result
    assert f"cannot reach coordinator at {address}" in result.err
    assert "--coordinator" in result.err and "HOTFLEET_COORDINATOR" in result.err
    as_json = coordctl(address, "-o", "json", "rollouts")
    assert as_json.code == EXIT_UNREACHABLE
    error = as_json.json()["error"]
    assert error["code"] == "unreachable" and error["exit_code"] == EXIT_UNREACHABLE


def test_coordctl_finds_the_leader_among_several_addresses(
    agents: Agents, coordinators: Coordinators
) -> None:
    """A dead address is skipped; a standby's not_leader answer is followed to the leader."""
    start_nodes(agents, ("n1",))
    leader = coordinators.start("a")
    leader.wait_leader()
    standby: CoordinatorProcess = coordinators.start("b")
    dead = f"127.0.0.1:{free_port()}"
    assert coordctl(standby, "release", "push", str(RELEASES / "shop-2.0.0")).code == EXIT_OK
    dry = coordctl(
        f"{dead},{standby.address}", "upgrade", "--all", "--release", "shop@2.0.0", "--dry-run"
    )
    assert dry.code == EXIT_OK, dry
    assert f"following the leader at {leader.address}" in dry.err
    # the leader goes away for good: the standby takes over and answers itself
    leader.term()
    standby.wait_leader()
    up = coordctl(standby, "upgrade", "--all", "--release", "shop@2.0.0", "--wait", *NO_WINDOW)
    assert up.code == EXIT_OK, up
    assert "following the leader" not in up.err
