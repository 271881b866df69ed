"""A short, seeded slice of the fault campaign (``python benchmarks/run.py faults``).

Real etcd, two coordinators, three agents under recorded load; each round a
rollout and one fault (SIGKILL/SIGSTOP an agent, SIGKILL the leader, restart
etcd) at a seeded random instant.  The invariants (terminal in bounded time,
every node converged to the outcome with identical versions, no mixed
response, no failed request off the faulted node) must hold every round.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.agents import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_faults import run_campaign

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_seeded_fault_slice_breaks_no_invariant(tmp_path: Path) -> None:
    rounds = run_campaign(tmp_path, rollouts=5, nodes=3, seed=11, log=lambda _line: None)
    assert len(rounds) == 5
    faults = {r.fault for r in rounds}
    assert faults - {"none"}, "the slice injected no fault at all"
    violations = [
        f"round {r.index} ({r.release} + {r.fault}): {v}" for r in rounds for v in r.violations
    ]
    assert not violations, "\n".join(violations)
