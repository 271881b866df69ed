"""Analysis that knows, on a real fleet: changed code judged on its own, paused rollouts still guarded.

Real agents serve the example shop, load generators hit them over HTTP, an
elected in-process leader samples the agents' Health RPCs (which now carry
the changed-code coverage) and judges the window.  The release under test
is shop 2.0.0 plus a new ``volume_discount`` helper that raises on every
call; ``quote`` catches it and falls back to the old discount, so no request
fails: only the changed code itself can tell the release is broken.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.model import Phase, Rollout
from coordinator.render import rollout_detail, rollouts_table
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.release import Release
from tests.agents import ROOT, AgentProcess, Agents, wait_for
from tests.fleet import Leader, Load, start_fleet, versions
from tests.test_auto_rollback import upgrade, wait_baseline

pytestmark = pytest.mark.integration

BROKEN_HELPER = '''

TIERS = {}  # the bug: the tier table is never loaded


def volume_discount(total: int) -> int:
    """New in 2.5: tiered volume discounts."""
    return total * TIERS["EUR"] // 100


def quote(sku: str, qty: int) -> dict:
    price = unit_price(sku)
    total = price * qty
    discount = 0
    if qty >= VOLUME_QTY:
        try:
            discount = volume_discount(total)
        except KeyError:  # degrade quietly to the flat discount: no request fails
            discount = total * VOLUME_DISCOUNT_PCT // 100
    return {
        "sku": sku,
        "qty": qty,
        "unit": price,
        "discount": discount,
        "total": total - discount,
        "currency": CURRENCY,
    }
'''


def partial_release(tmp_path: Path) -> Release:
    """shop 2.5.0-partial: 2.0.0 with the broken helper (a release directory like any other)."""
    root = tmp_path / "shop-2.5.0-partial"
    shutil.copytree(ROOT / "examples" / "releases" / "shop-2.0.0", root)
    toml = root / "release.toml"
    toml.write_text(toml.read_text().replace('version = "2.0.0"', 'version = "2.5.0-partial"'))
    pricing = root / "shop" / "pricing.py"
    source = pricing.read_text()
    pricing.write_text(source[: source.index("def quote(")].rstrip() + "\n" + BROKEN_HELPER)
    return Release.from_path(root)


@pytest.fixture
def fleet(
    agents: Agents, leader: Leader, tmp_path: Path
) -> Iterator[tuple[list[AgentProcess], Leader]]:
    nodes = start_fleet(agents, 3, lease_ttl=2)
    leader.engine.push_release(partial_release(tmp_path))
    yield nodes, leader


def as_json(rollout: Rollout) -> dict[str, object]:
    return json.loads(rollout.dumps())  # type: ignore[no-any-return,unused-ignore]


def test_changed_function_raising_on_most_calls_rolls_back_with_no_request_failing(
    fleet: tuple[list[AgentProcess], Leader],
) -> None:
    nodes, leader = fleet
    load = Load(nodes)  # the common path: qty 2, never reaches the helper
    bulk = Load(nodes, path="/price?sku=apple&qty=12", threads=1)  # the rare path
    try:
        wait_baseline(leader, nodes)
        done = leader.wait(upgrade(leader, "shop@2.5.0-partial", window=20).id, timeout=60)
        reports = load.stop() + bulk.stop()
    finally:
        load.close()
        bulk.close()
    assert done.phase is Phase.ROLLED_BACK, (done.phase, done.reason)
    assert "changed function shop.pricing:volume_discount raised on" in done.reason
    assert [f for r in reports for f in r["failed"]] == []  # no request ever failed
    findings = done.analysis["findings"]
    assert all(f["verdict"] != "fail" for f in findings if f["metric"] == "error_rate")
    coverage = done.analysis["changed_code"]
    assert coverage["release"] == "shop@2.5.0-partial"
    raising = {r["name"]: r for r in coverage["raising"]}
    assert (
        raising["shop.pricing:volume_discount"]["raised"]
        == raising["shop.pricing:volume_discount"]["calls"]
    )
    wait_for(lambda: versions(nodes) == {"1"}, timeout=30)  # every node back on v1
    detail = rollout_detail(as_json(done))
    assert "raised:    shop.pricing:volume_discount" in detail
    # the nodes stopped counting when they went back; the counts stay readable
    health = nodes[0].stub.Health(agent_pb2.HealthRequest(), timeout=5)
    assert not health.changed_code_active and health.changed_code_release == "shop@2.5.0-partial"
    assert "hotfleet_changed_code_active" in nodes[0].http_text("/-/metrics")


def test_paused_rollout_still_rolls_back_on_a_clear_regression(
    fleet: tuple[list[AgentProcess], Leader],
) -> None:
    nodes, leader = fleet
    load = Load(nodes)  # only the common path: the new helper never runs
    bulk: Load | None = None
    try:
        wait_baseline(leader, nodes)
        # every changed function must run before promotion: the helper never does -> pause
        started = upgrade(leader, "shop@2.5.0-partial", window=3, changed_code_min_ran=1.0)
        paused = wait_for(
            lambda: (
                (r := leader.engine.rollout(started.id)).analysis.get("action") == "pause" and r
            ),
            timeout=40,
        )
        assert paused.phase is Phase.PROVISIONAL
        assert "shop.pricing:volume_discount" in paused.analysis["changed_code"]["never_ran"]
        assert "functions ran" in paused.reason and "never ran: " in paused.reason
        assert (
            "coordctl promote" in paused.reason and "rolls it back automatically" in paused.reason
        )
        table = rollouts_table([as_json(paused)])
        assert " paused " in table and "resume: promote | rollback" in table
        detail = rollout_detail(as_json(paused))
        assert "(still sampled and judged)" in detail
        never = next(line for line in detail.splitlines() if line.startswith("  never ran:"))
        assert "shop.pricing:volume_discount" in never
        # the rare path starts being used while nobody watches: the helper raises every time
        bulk = Load(nodes, path="/price?sku=apple&qty=12", threads=1)
        done = leader.wait(started.id, timeout=60)
    finally:
        reports = load.stop() + (bulk.stop() if bulk else [])
        load.close()
        if bulk:
            bulk.close()
    assert done.phase is Phase.ROLLED_BACK, (done.phase, done.reason)
    assert "changed function shop.pricing:volume_discount raised on" in done.reason
    assert [f for r in reports for f in r["failed"]] == []
    wait_for(lambda: versions(nodes) == {"1"}, timeout=30)  # every node back on v1
