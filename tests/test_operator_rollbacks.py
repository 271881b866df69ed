"""What an operator types after a rollout: ``rollback`` (again), ``rollback --to``, named nodes.

A real leader engine with a real etcd election drives real ``node-agent``
processes (the fixtures of :mod:`tests.fleet`); every rollout ends in a
permanent phase because these tests are about which release a rollback picks
and what is refused up front, not about the analysis window.
"""

from __future__ import annotations

import pytest

from coordinator.engine import Refused, Target
from coordinator.model import Phase
from tests.agents import Agents, release
from tests.fleet import Leader, opts, start_fleet, versions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_rollback_after_a_rollback_goes_one_release_further_back(
    agents: Agents, leader: Leader
) -> None:
    """1.0.0 -> 2.0.0 -> 2.3.0; rollback lands on 2.0.0, a second rollback on 1.0.0."""
    nodes = start_fleet(agents, 2)
    for name in ("shop-1.0.0", "shop-2.0.0", "shop-2.3.0-slow"):
        leader.engine.push_release(release(name))
    for ref in ("shop@1.0.0", "shop@2.0.0", "shop@2.3.0-slow"):
        done = leader.wait(leader.engine.upgrade(ref, Target(all=True), opts()).id)
        assert done.phase is Phase.PERMANENT, done.reason
    first = leader.wait(leader.engine.rollback(Target(), None, opts()).id)
    assert (first.phase, first.release) == (Phase.PERMANENT, "shop@2.0.0"), first.reason
    # before: "nothing to roll back: no upgrade has finished in this cluster"
    second = leader.wait(leader.engine.rollback(Target(), None, opts()).id)
    assert (second.phase, second.release) == (Phase.PERMANENT, "shop@1.0.0"), second.reason
    assert versions(nodes) == {"1"}
    # 1.0.0 replaced boot code that was never a release: nothing further to go back to
    with pytest.raises(Refused, match="unversioned boot code"):
        leader.engine.rollback(Target(), None, opts())


def test_rollback_to_accepts_name_at_version_and_version(agents: Agents, leader: Leader) -> None:
    nodes = start_fleet(agents, 2)
    for name in ("shop-1.0.0", "shop-2.0.0"):
        leader.engine.push_release(release(name))
    up = leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts()).id)
    assert up.phase is Phase.PERMANENT, up.reason
    # before: looked up shop@shop@1.0.0 and refused it as never pushed
    back = leader.wait(leader.engine.rollback(Target(), "shop@1.0.0", opts()).id)
    assert (back.phase, back.release) == (Phase.PERMANENT, "shop@1.0.0"), back.reason
    assert versions(nodes) == {"1"}
    again = leader.wait(leader.engine.rollback(Target(), "2.0.0", opts()).id)
    assert (again.phase, again.release) == (Phase.PERMANENT, "shop@2.0.0"), again.reason
    with pytest.raises(Refused, match=r"shop@9\.9\.9"):
        leader.engine.rollback(Target(), "shop@9.9.9", opts())


def test_an_unknown_named_node_is_refused_before_anything_starts(
    agents: Agents, leader: Leader
) -> None:
    nodes = start_fleet(agents, 2)
    leader.engine.push_release(release("shop-2.0.0"))
    with pytest.raises(Refused) as refused:
        leader.engine.upgrade("shop@2.0.0", Target(nodes=["n1", "node-9"]), opts())
    assert refused.value.code == "no_targets"
    assert "node-9" in str(refused.value) and "registered: n1, n2" in str(refused.value)
    assert leader.engine.rollouts() == []  # nothing recorded, nobody prepared
    assert versions(nodes) == {"1"}
    # --allow-missing: go ahead with the nodes that are there
    done = leader.wait(
        leader.engine.upgrade(
            "shop@2.0.0", Target(nodes=["n1", "node-9"]), opts(allow_missing=True)
        ).id
    )
    assert done.phase is Phase.PERMANENT, done.reason
    assert versions(nodes[:1]) == {"2"} and versions(nodes[1:]) == {"1"}
