"""A yes vote is kept or the fleet goes back (real coordinator, agents and etcd).

The release below passes every node's prepare (its code runs cleanly in the
staging process) but raises in the live process of one node at finish, as a
run-time difference between nodes would.  That node restores itself; the
rollout must not end ``permanent``: the whole fleet goes back, the rollout
ends ``rolled_back`` naming the node, the module and the detail, and
``coordctl upgrade --wait`` exits 5.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coordinator.cli import EXIT_ROLLED_BACK
from tests.agents import RELEASES, Agents, wait_for
from tests.coordinators import Coordinators, coordctl, versions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FAILS_LIVE_ON_ONE_NODE = """
import os as _os
import threading as _threading

# The staging process has one or two threads; the live agent has many.
if _os.environ.get("HF_TEST_FAIL_FINISH") and _threading.active_count() > 4:
    raise RuntimeError("this node's live process refuses the release at finish")
"""


def _release(tmp_path: Path) -> Path:
    bundle = tmp_path / "shop-2.0.1-finishfail"
    shutil.copytree(RELEASES / "shop-2.0.0", bundle)
    manifest = bundle / "release.toml"
    manifest.write_text(manifest.read_text().replace('"2.0.0"', '"2.0.1"'))
    pricing = bundle / "shop" / "pricing.py"
    pricing.write_text(pricing.read_text() + FAILS_LIVE_ON_ONE_NODE)
    return bundle


def test_a_finish_failure_on_one_node_of_three_rolls_the_fleet_back(
    tmp_path: Path, agents: Agents, coordinators: Coordinators
) -> None:
    nodes = [
        agents.start("n1", wait=False),
        agents.start("n2", wait=False, env={"HF_TEST_FAIL_FINISH": "1"}),
        agents.start("n3", wait=False),
    ]
    for node in nodes:
        node.wait_ready()
    leader = coordinators.start("a")
    leader.wait_leader()

    up = coordctl(leader, "upgrade", "--all", "--release", str(_release(tmp_path)), "--wait")
    assert up.code == EXIT_ROLLED_BACK, up
    assert versions(nodes) == {"1"}  # every node serves the old code again

    rollout = coordctl(leader, "-o", "json", "status").json()
    if rollout["kind"] == "rollback":  # status shows the latest: the rollback; read the upgrade
        rollout = coordctl(leader, "-o", "json", "status", rollout["options"]["reverts"]).json()
    assert rollout["phase"] == "rolled_back"
    assert "finish_failed" in rollout["reason"]
    assert "n2: shop.pricing: import_error" in rollout["reason"]
    assert "refuses the release at finish" in rollout["reason"]
    assert not any(n.status().prepared_rollout for n in nodes)
    wait_for(lambda: {n.status().current_release for n in nodes} <= {""}, timeout=10)
