"""The judge's answer: per-node per-metric findings, the verdict, what the leader does.

A :class:`Finding` is one node's outcome on one metric with its evidence; a
:class:`Verdict` is all of them with the overall :class:`Outcome` and a
one-line reason, and :meth:`Verdict.action` turns it into the
:class:`~coordinator.policy.Action` the leader takes.  What a paused rollout
records (:func:`paused_record`) is spelled here too.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.policy import Action, AnalysisPolicy

__all__ = ["RESUMES", "Action", "Finding", "Outcome", "Verdict", "fmt_value", "paused_record"]


class Outcome(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


_SEVERITY = {Outcome.FAIL: 2, Outcome.INCONCLUSIVE: 1, Outcome.PASS: 0}


@dataclass(frozen=True)
class Finding:
    """One node's verdict on one metric, with the evidence.

    ``test`` is ``event``, ``data``, ``threshold`` (per sample, consecutive),
    ``threshold_window`` (the window pooled), ``mann_whitney`` (vs baseline)
    or ``mann_whitney_vs_peers`` (vs not-yet-upgraded nodes).  For the
    statistical tests ``observed`` and ``baseline`` are medians, ``bound`` is
    the tolerance on the shift, ``effect`` the Hodges-Lehmann shift.
    """

    node: str
    metric: str
    observed: float | None
    bound: float | None
    test: str
    statistic: float | None
    p_value: float | None
    verdict: Outcome
    message: str
    baseline: float | None = None
    effect: float | None = None
    samples: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node, "metric": self.metric, "observed": self.observed,
            "bound": self.bound, "test": self.test, "statistic": self.statistic,
            "p_value": self.p_value, "verdict": self.verdict.value, "message": self.message,
            "baseline": self.baseline, "effect": self.effect, "samples": self.samples,
        }  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """The judge's answer: overall outcome, one-line reason, all findings."""

    overall: Outcome
    reason: str
    findings: tuple[Finding, ...] = ()
    #: changed-code coverage of the window (see :meth:`Judge._changed_code`)
    changed_code: Mapping[str, Any] | None = None

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict is Outcome.FAIL]

    @property
    def inconclusive(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict is Outcome.INCONCLUSIVE]

    @property
    def nodes(self) -> dict[str, Outcome]:
        """Per node: its worst finding (for waves: which canaries to roll back)."""
        out: dict[str, Outcome] = {}
        for f in self.findings:
            if f.node and _SEVERITY[f.verdict] >= _SEVERITY[out.get(f.node, Outcome.PASS)]:
                out[f.node] = f.verdict
        return out

    def action(self, policy: AnalysisPolicy, *, window_over: bool) -> Action:
        """What the leader does now: roll back, wait, promote, or ``policy.on_inconclusive``."""
        if self.overall is Outcome.FAIL:
            return Action.ROLLBACK
        if not window_over:
            return Action.WAIT
        if self.overall is Outcome.PASS:
            return Action.PROMOTE
        return Action(policy.on_inconclusive)

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall.value,
            "reason": self.reason,
            "nodes": {k: v.value for k, v in sorted(self.nodes.items())},
            "findings": [f.to_json() for f in self.findings],
            **({"changed_code": dict(self.changed_code)} if self.changed_code else {}),
        }


#: What resumes a paused rollout (shown by ``coordctl status`` and ``rollouts``).
RESUMES = (
    "`coordctl promote` makes it permanent, `coordctl rollback` takes it back; it resumes by "
    "itself if the window becomes conclusive and healthy, and a clear regression (thresholds, "
    "crashes, changed code failing) still rolls it back automatically"
)


def paused_record(verdict: Verdict, since: float) -> dict[str, Any]:
    """The ``analysis.paused`` entry of a rollout record: since when, why, what resumes it."""
    unsure = verdict.inconclusive
    return {
        "since": since,
        "reason": verdict.reason,
        "waiting_on": sorted({f"{f.node}: {f.metric}" if f.node else f.metric for f in unsure}),
        "resumes": RESUMES,
    }


def fmt_value(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if metric.startswith("latency"):
        return f"{value:.3f} s"
    if metric == "rss_bytes":
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) >= 0.001 or value == 0 else f"{value:.2e}"
