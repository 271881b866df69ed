"""The coordinator's own Prometheus metrics: counted from rollout records, once, on the leader."""

from __future__ import annotations

import re
import urllib.request
from typing import Any

import pytest

from coordinator.model import Phase, Rollout
from coordinator.telemetry import CoordinatorMetrics
from tests.agents import RELEASES, Agents, wait_for
from tests.coordinators import READY, Coordinators, coordctl, start_nodes


def rollout(rid: str, kind: str, phase: Phase, **options: Any) -> Rollout:
    r = Rollout(rid, kind, "shop@2.0.0", "a" * 64, ["n1"], options=options, phase=phase)
    r.created_at, r.decided_at, r.finished_at, r.ended_at = 100.0, 100.2, 100.3, 110.3
    return r


def value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert match, f"{sample} not in:\n{text}"
    return float(match.group(1))


def test_each_ended_rollout_is_counted_once_and_history_never() -> None:
    metrics = CoordinatorMetrics()
    metrics.remember([rollout("old", "upgrade", Phase.PERMANENT)])  # before we led
    live = [
        rollout("old", "upgrade", Phase.PERMANENT),
        rollout("r1", "upgrade", Phase.ROLLED_BACK),
        rollout("r2", "rollback", Phase.PERMANENT, health={"why": "error_rate 0.3 > 0.05"}),
        rollout("r3", "rollback", Phase.PERMANENT),
        rollout("r4", "upgrade", Phase.PROVISIONAL),  # not ended: not counted yet
    ]
    metrics.observe(live)
    metrics.observe(live)  # polled again: nothing twice
    text = metrics.render()
    kinds = 'hotfleet_coordinator_rollouts_total{kind="%s",outcome="%s"}'
    assert value(text, kinds % ("upgrade", "rolled_back")) == 1
    assert value(text, kinds % ("rollback", "permanent")) == 2
    assert kinds % ("upgrade", "permanent") not in text  # "old" was history
    assert value(text, 'hotfleet_coordinator_rollbacks_total{trigger="automatic"}') == 1
    assert value(text, 'hotfleet_coordinator_rollbacks_total{trigger="operator"}') == 1
    phase = 'hotfleet_coordinator_rollout_phase_seconds_%s{phase="%s"}'
    assert value(text, phase % ("count", "prepare")) == 3
    assert value(text, phase % ("sum", "analysis")) == pytest.approx(30.0)  # 3 x 10 s windows
    bucket = 'hotfleet_coordinator_rollout_phase_seconds_bucket{phase="prepare",le="0.25"}'
    assert value(text, bucket) == 3
    assert "# TYPE hotfleet_coordinator_rollout_phase_seconds histogram" in text
    metrics.set_leader(True)
    metrics.set_leader(False)
    assert value(metrics.render(), "hotfleet_coordinator_leader_changes_total") == 2


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_daemon_serves_metrics_of_its_rollouts(
    agents: Agents, coordinators: Coordinators
) -> None:
    start_nodes(agents, ("n1",))
    daemon = coordinators.start("a", env={"HOTFLEET_METRICS_LISTEN": "127.0.0.1:0"}, wait=False)
    fields = daemon.wait_ready_line(READY, 20)
    daemon.address = fields["address"]
    url = f"http://{fields['metrics']}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(resp.read().decode())

    daemon.wait_leader()
    wait_for(lambda: value(scrape(), "hotfleet_coordinator_leader") == 1, timeout=10)
    assert value(scrape(), "hotfleet_coordinator_leader_changes_total") == 1
    up = coordctl(
        daemon, "upgrade", "--all", "--release", str(RELEASES / "shop-2.0.0"), "--wait",
        "--window", "0",
    )  # fmt: skip
    assert up.code == 0, up
    sample = 'hotfleet_coordinator_rollouts_total{kind="upgrade",outcome="permanent"}'
    wait_for(lambda: sample in scrape(), timeout=10)
    text = scrape()
    assert value(text, sample) == 1
    assert value(text, 'hotfleet_coordinator_rollout_phase_seconds_count{phase="prepare"}') == 1
