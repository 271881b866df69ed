"""Analysis that knows, on a real fleet: changed code judged on its own, paused rollouts still guarded.

Real agents serve the example shop, load generators hit them over HTTP, an
elected in-process leader samples the agents' Health RPCs (which now carry
the changed-code coverage) and judges the window.  The release under test
(:mod:`tests.quiet_release`) is shop 2.0.0 plus a new ``volume_discount``
helper that raises on every call; its caller falls back to the old
discount, so no request fails: only the changed code itself can tell the
release is broken.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.model import Phase, Rollout
from coordinator.render import rollout_detail, rollouts_table
from hotfleet._proto.hotfleet.v1 import agent_pb2
from tests.agents import AgentProcess, Agents, wait_for
from tests.fleet import Leader, Load, start_fleet
from tests.quiet_release import quiet_release
from tests.test_auto_rollback import upgrade, wait_baseline

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(
    agents: Agents, leader: Leader, tmp_path: Path
) -> Iterator[tuple[list[AgentProcess], Leader]]:
    nodes = start_fleet(agents, 3, lease_ttl=2)
    # every bulk order's new helper raises; quote falls back quietly
    leader.engine.push_release(quiet_release(tmp_path, "2.5.0-partial", failure=1.0))
    yield nodes, leader


#: this file is about the changed code: latency is left out of the judge, so a
#: host loaded by other tests cannot end a window before the code under test ran
NO_LATENCY = {
    "judge_metrics": ["error_rate"],
    "latency_p50_max_ratio": "off",
    "latency_p99_max_ratio": "off",
}


def assert_rolled_back_everywhere(leader: Leader, done: Rollout, nodes: list[AgentProcess]) -> None:
    """The automatic rollback rollout reverted ``done`` on every node and ended permanent.

    Checked on the rollback's own record rather than on what the nodes serve
    afterwards: the leader's desired-state loop may catch nodes up again
    meanwhile, which is its business, not the judge's.
    """
    back = wait_for(
        lambda: next(
            (
                r
                for r in leader.engine.rollouts(limit=10)
                if r.kind == "rollback" and r.options.get("reverts") == done.id and r.phase.terminal
            ),
            None,
        ),
        timeout=30,
    )
    assert back.phase is Phase.PERMANENT, (back.phase, back.reason)
    assert sorted(n.node for n in back.nodes.values() if n.finished) == sorted(
        n.node_id for n in nodes
    )


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
        done = leader.wait(
            upgrade(leader, "shop@2.5.0-partial", window=20, **NO_LATENCY).id, timeout=60
        )
        reports = load.reports() + bulk.reports()
    finally:
        load.close()
        bulk.close()
    assert done.phase is Phase.ROLLED_BACK, (done.phase, done.reason)
    assert "changed function shop.pricing:volume_discount raised on" in done.reason
    assert [r["other_failures"] for r in reports if r["failed"]] == []  # none failed
    findings = done.analysis["findings"]
    assert all(f["verdict"] != "fail" for f in findings if f["metric"] == "error_rate")
    coverage = done.analysis["changed_code"]
    assert coverage["release"] == "shop@2.5.0-partial"
    raising = {r["name"]: r for r in coverage["raising"]}
    helper_seen = raising["shop.pricing:volume_discount"]
    if "shop.pricing:volume_discount" in coverage["calls_estimated"]:  # sampled: see below
        assert helper_seen["raised"] >= 0.5 * helper_seen["calls"], coverage
    else:
        assert helper_seen["raised"] == helper_seen["calls"], coverage
    assert_rolled_back_everywhere(leader, done, nodes)
    detail = rollout_detail(as_json(done))
    assert "raised:    shop.pricing:volume_discount" in detail
    # the agents report the counts over Health and Prometheus (active or not, the
    # counts of the last provisional release stay readable)
    health = nodes[0].stub.Health(agent_pb2.HealthRequest(), timeout=5)
    assert health.changed_code_release == "shop@2.5.0-partial"
    helper = next(f for f in health.changed_code if f.name == "shop.pricing:volume_discount")
    # (a call in flight is counted as a call before it raises).  Past its first exact calls
    # a function's calls are sampled (``calls_estimated``): a ratio estimate, unbiased for
    # steady traffic, which one request thread on a loaded host is not (CI: 200 estimated
    # for 177 that all raised); raised is always exact
    assert helper.kind == "added" and helper.calls > 0 and helper.raised > 0
    floor = 0.5 if helper.calls_estimated else 0.9
    assert helper.raised >= floor * helper.calls, helper
    metrics = nodes[0].http_text("/-/metrics")
    assert (
        'hotfleet_changed_code_raised_total{node="n1",function="shop.pricing:volume_discount"'
        in metrics
    )


def test_paused_rollout_still_rolls_back_on_a_clear_regression(
    fleet: tuple[list[AgentProcess], Leader],
) -> None:
    nodes, leader = fleet
    load = Load(nodes)  # only the common path: the new helper never runs
    bulk: Load | None = None
    try:
        wait_baseline(leader, nodes)
        # every changed function must run before promotion: the helper never does -> pause
        started = upgrade(
            leader, "shop@2.5.0-partial", window=3, changed_code_min_ran=1.0, **NO_LATENCY
        )
        paused = wait_for(
            lambda: (
                (r := leader.engine.rollout(started.id)).analysis.get("action") == "pause" and r
            ),
            timeout=40,
        )
        assert paused.phase is Phase.PROVISIONAL
        assert "shop.pricing:volume_discount" in paused.analysis["changed_code"]["never_ran"]
        unexercised = [f for f in paused.analysis["findings"] if f["metric"] == "changed_code"]
        assert unexercised[0]["verdict"] == "inconclusive"
        assert "too little to pass" in unexercised[0]["message"]
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
        reports = load.reports() + (bulk.reports() if bulk else [])
        load.close()
        if bulk:
            bulk.close()
    assert done.phase is Phase.ROLLED_BACK, (done.phase, done.reason)
    assert "changed function shop.pricing:volume_discount raised on" in done.reason
    assert [r["other_failures"] for r in reports if r["failed"]] == []
    assert_rolled_back_everywhere(leader, done, nodes)
