"""The commit lead is learned from how ready the fleet's nodes were at each instant.

Unit tests hold :class:`coordinator.commitlead.CommitLead` to its arithmetic;
the integration tests run real agents under a real leader: every node reports
how long before the instant it was ready, the next wave's lead follows from
those reports, and a node paused through the whole lead (SIGSTOP) is reported
late, which lengthens the next lead at once while the commit itself holds.
"""

from __future__ import annotations

import logging
import signal
import time

import pytest

from coordinator.commitlead import HEADROOM, MAX_SCALE, MIN_SCALE, WINDOW, CommitLead, default_lead
from coordinator.engine import Target
from coordinator.model import Phase, Rollout
from tests.agents import Agents, release
from tests.fleet import Leader, opts, start_fleet, versions


# ------------------------------------------------------------------- unit
def test_before_any_wave_the_lead_is_the_default() -> None:
    assert CommitLead().lead(3) == default_lead(3) == pytest.approx(0.05 + 3 * 0.0008)


def test_a_fleet_ready_early_gets_a_shorter_lead_with_headroom() -> None:
    lead = CommitLead()
    d = default_lead(10)
    assert lead.observe(10, d, [0.8 * d, 0.7 * d, 0.75 * d]) == pytest.approx(0.3 * d)
    assert lead.lead(10) == pytest.approx(d * 0.3 * HEADROOM)
    assert lead.lead(100) == pytest.approx(default_lead(100) * 0.3 * HEADROOM)  # scales by size


def test_a_late_node_lengthens_the_next_lead_at_once_and_for_the_window() -> None:
    lead = CommitLead()
    d = default_lead(3)
    for _ in range(3):
        lead.observe(3, d, [0.9 * d])  # quick waves: the lead shrinks to its floor
    assert lead.scale() == MIN_SCALE
    lead.observe(3, lead.lead(3), [-0.2])  # ready 200 ms after the instant
    needed = MIN_SCALE * d + 0.2
    assert lead.lead(3) == pytest.approx(min(MAX_SCALE, needed / d * HEADROOM) * d)
    for _ in range(WINDOW - 1):
        lead.observe(3, lead.lead(3), [0.9 * lead.lead(3)])
    assert lead.scale() > MIN_SCALE  # the late wave is still in the window
    lead.observe(3, lead.lead(3), [0.9 * lead.lead(3)])
    assert lead.scale() < 1.0  # and forgotten once it left it


def test_the_lead_is_bounded_and_learns_nothing_without_reports() -> None:
    lead = CommitLead()
    assert lead.observe(3, default_lead(3), []) is None and lead.scale() == 1.0
    lead.observe(3, default_lead(3), [-60.0])  # a node a minute late
    assert lead.scale() == MAX_SCALE
    assert lead.lead(3) == pytest.approx(MAX_SCALE * default_lead(3))


# ------------------------------------------------------------ integration
def _ahead(done: Rollout) -> list[float]:
    values = [n.armed_ahead_s for n in done.nodes.values()]
    assert all(v is not None for v in values), done.dumps()
    return [v for v in values if v is not None]


@pytest.mark.integration
def test_every_node_reports_its_readiness_and_the_next_lead_follows(
    agents: Agents, leader: Leader
) -> None:
    nodes = start_fleet(agents, 3)
    for bundle in ("shop-2.0.0", "shop-1.0.0"):  # up, then back down: two waves
        leader.engine.push_release(release(bundle))
    first = leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts()).id)
    assert first.phase is Phase.PERMANENT, first.reason
    assert first.commit_lead_s == pytest.approx(default_lead(3))
    ahead = _ahead(first)
    # ready before the instant (or, on a host busy enough, a little after it)
    assert all(-first.commit_lead_s < a < first.commit_lead_s for a in ahead), ahead
    needed = first.commit_lead_s - min(ahead)
    expected = default_lead(3) * min(MAX_SCALE, max(MIN_SCALE, needed / default_lead(3) * HEADROOM))
    # (the record keeps the reports to the microsecond)
    assert leader.engine.commit_lead.lead(3) == pytest.approx(expected, abs=1e-5)
    second = leader.wait(
        leader.engine.upgrade("shop@1.0.0", Target(all=True), opts(allow_downgrade=True)).id
    )
    assert second.phase is Phase.PERMANENT, second.reason
    assert second.commit_lead_s == pytest.approx(expected, abs=1e-5)  # what was learned
    assert versions(nodes) == {"1"} and len(_ahead(second)) == 3
    assert second.commit_skew_s < max(second.commit_lead_s, 0.05)


@pytest.mark.integration
def test_a_node_paused_through_the_lead_is_late_and_the_next_lead_is_longer(
    agents: Agents, leader: Leader, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = start_fleet(agents, 3)
    leader.engine.push_release(release("shop-2.0.0"))

    def pause_n2(_rollout: Rollout) -> None:
        nodes[1].signal(signal.SIGSTOP)  # through the whole lead (~52 ms) and then some
        time.sleep(0.3)
        nodes[1].signal(signal.SIGCONT)

    leader.engine.hooks["after_decision"] = pause_n2
    before = leader.engine.commit_lead.lead(3)
    with caplog.at_level(logging.WARNING, logger="hotfleet.coordinator"):
        done = leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts()).id)
    assert done.phase is Phase.PERMANENT, done.reason  # late, yet the commit holds
    assert versions(nodes) == {"2"}
    late = done.nodes["n2"].armed_ahead_s
    assert late is not None and late < -0.1, done.dumps()  # stopped ~0.25 s past the instant
    assert all(
        n.armed_ahead_s is not None and n.armed_ahead_s > late + 0.1
        for k, n in done.nodes.items()
        if k != "n2"  # the others were not stopped: far less late, if at all
    )
    assert leader.engine.commit_lead.lead(3) > before + 0.1
    assert any(
        "commit lead" in r.getMessage() and "too short" in r.getMessage() for r in caplog.records
    )
