"""Health analysis: is the fleet sicker after the upgrade than before it?

The pure judging core of the rollback window: no etcd, no gRPC, no clock.  The
leader feeds it what it sampled and acts on the :class:`Verdict`.

Data flow
---------
1. Every ``interval_s`` the leader calls each agent's Health RPC and turns the
   reply into a :class:`Snapshot` (cumulative counters since the worker
   started).  A :class:`NodeSeries` per node diffs consecutive snapshots into
   per-interval :class:`Sample` s (requests, errors, latency histogram delta,
   uncaught exceptions, CPU, RSS, gauges).  A counter that goes backwards, or
   uptime that shrinks, means the process restarted: that is a ``crash``
   :class:`Event`, never a negative sample.
2. Samples taken before the upgrade are the *baseline*; samples taken after
   finish are the *current* window.  For waves, the not-yet-upgraded nodes'
   samples over the same period are a second reference group (*peers*).
3. :meth:`Judge.evaluate` returns a :class:`Verdict`: FAIL, INCONCLUSIVE or
   PASS, every per-node per-metric :class:`Finding`, and a one-line reason.
   The leader calls it after every sample: FAIL at any time means roll back
   now; at the end of the window PASS means make the release permanent and
   INCONCLUSIVE means ``policy.on_inconclusive`` (pause by default).
   :meth:`Verdict.action` spells that out.

Judging rules (per node)
------------------------
* Events: crash/restart, lease lost, smoke check failed -> FAIL at once; a
  lease lost by a node that still answers Health from the same process (a
  keepalive starved on a saturated host) is INCONCLUSIVE while it lasts.
* Error rate: each sample's rate is judged by the lower bound of its Wilson
  (1 - alpha) confidence interval against min(max_error_rate, baseline rate +
  max_error_rate_increase); ``failure_limit`` consecutive breaching samples ->
  FAIL.  A sample whose point estimate is above the bound but not provably so
  neither breaches nor resets the streak; empty samples are neutral.  The same
  bound is also applied to the whole window pooled (no failure limit: the
  pooled interval already carries the evidence of many samples), which is
  what catches a bad release on a node with a trickle of traffic.
* Latency p50/p99 per sample against absolute and baseline-relative bounds,
  ``failure_limit`` consecutive breaches -> FAIL.
* Uncaught exceptions beyond what the baseline rate predicts -> FAIL.
* Gauges outside ``policy.gauges`` bounds for ``failure_limit`` samples -> FAIL.
* Statistical judge, per metric in ``policy.judge_metrics``: one-sided
  Mann-Whitney U test (window > baseline, and canary > peers for waves) at
  ``alpha``, *and* a Hodges-Lehmann shift larger than the tolerance
  (``tolerance`` x |baseline median|, at least ``min_effect[metric]``), at each
  of the last ``failure_limit`` evaluations (window prefixes) -> FAIL.
* A node PASSes only with at least ``min_samples`` conclusive samples
  (``min_requests`` requests each; consecutive thin intervals are merged
  into one, :func:`conclusive_samples`) on both sides; otherwise it is
  INCONCLUSIVE.  Too little data can FAIL a node on overwhelming evidence,
  never PASS it.
* Contention: a node whose host CPU was saturated for half the window while
  its CPU per request stayed put has its latency FAILs turned INCONCLUSIVE,
  except a p99 breach with the median unchanged, which PASSes (the tail of a
  saturated host is the scheduler's).

Latency samples for Mann-Whitney
--------------------------------
The test compares *per-interval* statistics (each sample's p50 and p99,
estimated from that interval's histogram delta by linear interpolation inside
the bucket, as Prometheus' histogram_quantile), not request-level values
rebuilt from bucket midpoints.  Reasons: requests of one node within an
interval are not independent (a GC pause or a lock slows a burst together),
so request-level tests with thousands of tied midpoint values would make
trivial shifts "significant"; per-interval values are what Kayenta compares
(one point per metric per interval); and n stays small (tens per side), so
the test is O(n log n) and Hodges-Lehmann O(n^2) is cheap in pure Python.
The cost: resolution is bounded by the histogram buckets — a shift that keeps
every request inside the same bucket is invisible to p50/p99 (the reply would
need a latency sum for ``latency_mean``; :class:`Snapshot` accepts one).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.policy import AnalysisPolicy
from hotfleet.protocol import LATENCY_BOUNDS_S

__all__ = [
    "DEFAULT_LATENCY_BOUNDS_S",
    "RESUMES",
    "ChangedCode",
    "Event",
    "EventKind",
    "Finding",
    "FunctionRuns",
    "Judge",
    "MannWhitneyResult",
    "NodeSeries",
    "Outcome",
    "Sample",
    "Snapshot",
    "Verdict",
    "histogram_quantile",
    "hodges_lehmann",
    "mann_whitney_u",
    "paused_record",
    "samples_from_snapshots",
    "wilson_interval",
]

#: The agent's histogram bounds, for synthetic samples (real ones carry their own).
DEFAULT_LATENCY_BOUNDS_S = LATENCY_BOUNDS_S

_NORMAL = statistics.NormalDist()


# ============================================================== statistics
@dataclass(frozen=True)
class MannWhitneyResult:
    """Mann-Whitney U test of ``x`` against ``y``.

    ``u1`` is x's statistic (pairs with x > y, ties count 1/2; scipy's
    convention), ``u2 = n1*n2 - u1``; ``u`` is the textbook min(u1, u2) that
    tables list.  ``method`` is ``"exact"`` or ``"asymptotic"``.
    """

    u1: float
    u2: float
    n1: int
    n2: int
    p_value: float
    alternative: str
    method: str
    z: float | None = None

    @property
    def u(self) -> float:
        return min(self.u1, self.u2)


def _midranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Average ranks (1-based) of ``values`` and the sizes of tie groups."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    ties: list[int] = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        avg = (i + j + 2) / 2.0
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


def _count_subsets_le(items: Sequence[int], m: int, limit: int) -> int:
    """Number of m-element subsets of ``items`` (non-negative ints) with sum <= limit."""
    if limit < 0:
        return 0
    dp: list[list[int]] = [[0] * (limit + 1) for _ in range(m + 1)]
    dp[0][0] = 1
    seen = 0
    for r in items:
        seen += 1
        if r > limit:
            continue
        for k in range(min(seen, m), 0, -1):
            row, prev = dp[k], dp[k - 1]
            dp[k] = row[:r] + [a + b for a, b in zip(row[r:], prev, strict=False)]
    return sum(dp[m])


def mann_whitney_u(
    x: Sequence[float],
    y: Sequence[float],
    alternative: str = "two-sided",
    method: str = "auto",
) -> MannWhitneyResult:
    """Mann-Whitney U (Wilcoxon rank-sum) test, pure Python.

    ``alternative``: ``"two-sided"``, ``"greater"`` (x tends to be larger than
    y) or ``"less"``.  ``method``:

    * ``"exact"``: the permutation distribution of x's rank sum, counted by
      dynamic programming over subsets of the pooled (doubled mid-)ranks.
      Without ties this is the classical exact null distribution of U; with
      ties it is the exact distribution conditional on the observed tie
      pattern (a permutation test), which is valid where the tie-corrected
      normal approximation is not.  Cost ~ N * min(n1, n2) * rank sum.
    * ``"asymptotic"``: normal approximation of U with the tie correction of
      the variance and a 0.5 continuity correction.
    * ``"auto"``: exact when the smaller side has fewer than 8 values and
      n1 + n2 <= 100 (cheap, and where the normal approximation is poor);
      asymptotic otherwise (both sides >= 8, where it is accurate).

    Two-sided exact p-values double the smaller tail (capped at 1), as scipy.
    """
    if alternative not in {"two-sided", "greater", "less"}:
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    if method not in {"auto", "exact", "asymptotic"}:
        raise ValueError(f"method must be auto, exact or asymptotic, got {method!r}")
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_u needs at least one value on each side")
    pooled = [float(v) for v in x] + [float(v) for v in y]
    if any(math.isnan(v) for v in pooled):
        raise ValueError("mann_whitney_u: NaN in the samples")
    ranks, ties = _midranks(pooled)
    r1 = sum(ranks[:n1])
    u1 = r1 - n1 * (n1 + 1) / 2.0
    u2 = n1 * n2 - u1
    n = n1 + n2
    if method == "auto":
        method = "exact" if min(n1, n2) < 8 and n <= 100 else "asymptotic"

    if method == "exact":
        doubled = [round(2 * r) for r in ranks]  # mid-ranks are multiples of 1/2
        total = math.comb(n, n1)
        # Tail counts over subsets of the smaller side (R1 + R2 is fixed).
        if n1 <= n2:
            m, obs2 = n1, round(2 * r1)
            lower_is_x = True
        else:
            m, obs2 = n2, sum(doubled[n1:])
            lower_is_x = False
        top = 2 * (n + 1)  # doubled rank r reflects to (n + 1 - r) -> top - 2r
        le = _count_subsets_le(doubled, m, obs2)
        ge = _count_subsets_le([top - d for d in doubled], m, m * top - obs2)
        p_le, p_ge = le / total, ge / total
        if not lower_is_x:  # small R2 <=> large R1
            p_le, p_ge = p_ge, p_le
        if alternative == "less":
            p = p_le
        elif alternative == "greater":
            p = p_ge
        else:
            p = min(1.0, 2.0 * min(p_le, p_ge))
        return MannWhitneyResult(u1, u2, n1, n2, min(1.0, p), alternative, "exact")

    mu = n1 * n2 / 2.0
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1)) if n > 1 else 0.0
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if var <= 0:  # every value tied: no evidence either way
        return MannWhitneyResult(u1, u2, n1, n2, 1.0, alternative, "asymptotic", 0.0)
    sd = math.sqrt(var)
    if alternative == "greater":
        z = (u1 - mu - 0.5) / sd
        p = 1.0 - _NORMAL.cdf(z)
    elif alternative == "less":
        z = (u1 - mu + 0.5) / sd
        p = _NORMAL.cdf(z)
    else:
        z = (abs(u1 - mu) - 0.5) / sd
        p = 2.0 * (1.0 - _NORMAL.cdf(z))
    return MannWhitneyResult(u1, u2, n1, n2, min(1.0, max(0.0, p)), alternative, "asymptotic", z)


def hodges_lehmann(x: Sequence[float], y: Sequence[float]) -> float:
    """Hodges-Lehmann estimate of the shift of x relative to y: median of x_i - y_j."""
    if not x or not y:
        raise ValueError("hodges_lehmann needs at least one value on each side")
    return statistics.median(a - b for a in x for b in y)


def wilson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Two-sided Wilson score interval of a binomial proportion."""
    if trials <= 0:
        return (0.0, 1.0)
    z = _NORMAL.inv_cdf(0.5 + confidence / 2.0)
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / trials + z2n / (4.0 * trials)) / (1.0 + z2n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """Quantile ``q`` of a bucketed histogram (Prometheus' histogram_quantile).

    ``counts`` has one more entry than ``bounds`` (the +Inf bucket).  Linear
    interpolation inside the bucket holding the rank, the first bucket
    starting at 0.  A rank in the +Inf bucket returns the highest finite bound
    (a lower bound of the truth).  ``None`` for an empty histogram.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cum = 0
    for i, c in enumerate(counts):
        if c > 0 and cum + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1]) if bounds else None
            lo = float(bounds[i - 1]) if i > 0 else 0.0
            hi = float(bounds[i])
            return lo + (hi - lo) * max(0.0, rank - cum) / c
        cum += c
    return float(bounds[-1]) if bounds else None  # pragma: no cover - rank <= total


# ================================================================ samples
@dataclass(frozen=True)
class Snapshot:
    """One Health reply: cumulative counters since the worker started.

    ``t`` is the coordinator's (monotonic) clock when the reply arrived.
    ``latency_sum_s`` is optional (not in the v1 wire format).
    """

    t: float
    requests: int
    errors: int
    latency_bounds_s: tuple[float, ...]
    latency_counts: tuple[int, ...]
    uncaught: int = 0
    gauges: Mapping[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    rss_bytes: int = 0
    uptime_s: float = 0.0
    release: str = ""
    latency_sum_s: float | None = None
    host_busy_s: float = 0.0
    host_total_s: float = 0.0
    changed: ChangedCode | None = None

    @classmethod
    def from_reply(cls, reply: Any, t: float) -> Snapshot:
        """From a ``HealthReply`` message (or anything with its attribute names)."""
        total = getattr(reply, "latency_sum_s", None)
        return cls(
            t=t,
            requests=int(reply.requests),
            errors=int(reply.errors),
            latency_bounds_s=tuple(float(b) for b in reply.latency_bounds_s),
            latency_counts=tuple(int(c) for c in reply.latency_counts),
            uncaught=int(reply.uncaught),
            gauges={str(k): float(v) for k, v in dict(reply.gauges).items()},
            cpu_s=float(reply.cpu_s),
            rss_bytes=int(reply.rss_bytes),
            uptime_s=float(reply.uptime_s),
            release=str(reply.release),
            latency_sum_s=None if total is None else float(total),
            host_busy_s=float(getattr(reply, "host_cpu_busy_s", 0.0) or 0.0),
            host_total_s=float(getattr(reply, "host_cpu_total_s", 0.0) or 0.0),
            changed=ChangedCode.from_reply(reply),
        )


@dataclass(frozen=True)
class FunctionRuns:
    """One changed function's counts on one node since the release's finish."""

    name: str  # module:qualname
    kind: str  # changed | added
    calls: int
    raised: int


@dataclass(frozen=True)
class ChangedCode:
    """A node's changed-code coverage: cumulative since the finish of ``release``."""

    release: str
    active: bool
    functions: tuple[FunctionRuns, ...] = ()

    @classmethod
    def from_reply(cls, reply: Any) -> ChangedCode | None:
        release = str(getattr(reply, "changed_code_release", "") or "")
        if not release:
            return None
        return cls(
            release,
            bool(getattr(reply, "changed_code_active", False)),
            tuple(
                FunctionRuns(str(f.name), str(f.kind), int(f.calls), int(f.raised))
                for f in getattr(reply, "changed_code", ())
            ),
        )


@dataclass(frozen=True)
class Sample:
    """What one node did during one interval (differences of two snapshots)."""

    t: float  # end of the interval (coordinator clock)
    duration_s: float
    requests: int
    errors: int
    latency_bounds_s: tuple[float, ...] = DEFAULT_LATENCY_BOUNDS_S
    latency_counts: tuple[int, ...] = ()
    uncaught: int = 0
    gauges: Mapping[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    rss_bytes: int = 0
    release: str = ""
    latency_sum_s: float | None = None
    host_busy_s: float = 0.0  # host CPU busy during the interval (all cores), seconds
    host_total_s: float = 0.0  # host CPU available during the interval (all cores), seconds

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None

    def latency_quantile(self, q: float) -> float | None:
        if not self.latency_counts:
            return None
        return histogram_quantile(q, self.latency_bounds_s, self.latency_counts)

    @property
    def latency_p50(self) -> float | None:
        return self.latency_quantile(0.5)

    @property
    def latency_p99(self) -> float | None:
        return self.latency_quantile(0.99)

    @property
    def latency_mean(self) -> float | None:
        n = sum(self.latency_counts)
        if self.latency_sum_s is None or n <= 0:
            return None
        return self.latency_sum_s / n

    @property
    def cpu_util(self) -> float | None:
        return self.cpu_s / self.duration_s if self.duration_s > 0 else None

    @property
    def host_cpu_busy(self) -> float | None:
        """Fraction of the host's CPU (all cores) busy in the interval; None if unknown."""
        return self.host_busy_s / self.host_total_s if self.host_total_s > 0 else None

    def metric(self, name: str) -> float | None:
        value = getattr(self, name)
        return None if value is None else float(value)

    def gauge(self, name: str) -> float | None:
        """An app gauge, else the process metrics ``rss_bytes`` / ``cpu_util``."""
        if name in self.gauges:
            return float(self.gauges[name])
        if name == "rss_bytes":
            return float(self.rss_bytes)
        if name == "cpu_util":
            return self.cpu_util
        return None

    @classmethod
    def from_latencies(
        cls,
        latencies_s: Iterable[float],
        *,
        errors: int = 0,
        t: float = 0.0,
        duration_s: float = 0.5,
        bounds: tuple[float, ...] = DEFAULT_LATENCY_BOUNDS_S,
        **extra: Any,
    ) -> Sample:
        """A sample from per-request latencies, bucketed as the agent does."""
        counts = [0] * (len(bounds) + 1)
        total = 0.0
        n = 0
        for d in latencies_s:
            counts[bisect.bisect_left(bounds, d)] += 1
            total += d
            n += 1
        return cls(
            t=t, duration_s=duration_s, requests=n, errors=errors, latency_bounds_s=bounds,
            latency_counts=tuple(counts), latency_sum_s=total, **extra,
        )  # fmt: skip


class EventKind(enum.StrEnum):
    CRASH = "crash"  # the worker restarted (counter reset) or died
    LEASE_LOST = "lease_lost"  # its membership lease expired
    SMOKE_FAILED = "smoke_failed"  # a smoke check failed or timed out


@dataclass(frozen=True)
class Event:
    """Something that happened to a node during the window; each is a regression."""

    node: str
    kind: EventKind
    detail: str = ""
    t: float = 0.0


def _went_backwards(prev: Snapshot, cur: Snapshot) -> str:
    for name in ("requests", "errors", "uncaught"):
        a, b = getattr(prev, name), getattr(cur, name)
        if b < a:
            return f"{name} counter went backwards {a} -> {b}"
    same_shape = prev.latency_bounds_s == cur.latency_bounds_s and len(prev.latency_counts) == len(
        cur.latency_counts
    )
    if same_shape and any(
        b < a for a, b in zip(prev.latency_counts, cur.latency_counts, strict=True)
    ):
        return "latency histogram went backwards"
    if prev.uptime_s > 0 and cur.uptime_s + 1e-6 < prev.uptime_s:
        return f"uptime went backwards {prev.uptime_s:.1f} s -> {cur.uptime_s:.1f} s"
    return ""


class NodeSeries:
    """Incremental differ of one node's snapshots into samples and crash events."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.last: Snapshot | None = None
        self.samples: list[Sample] = []
        self.events: list[Event] = []

    def add(self, snap: Snapshot) -> Sample | None:
        """Take the next snapshot; return the new sample, if one could be made."""
        prev, self.last = self.last, snap
        if prev is None:
            return None
        why = _went_backwards(prev, snap)
        if why:
            self.events.append(
                Event(self.node, EventKind.CRASH, f"{why} (the process restarted)", snap.t)
            )
            return None  # the new snapshot is the reference from now on
        if (
            prev.latency_bounds_s != snap.latency_bounds_s
            or len(prev.latency_counts) != len(snap.latency_counts)
            or snap.t <= prev.t
        ):
            return None  # cannot diff (agent changed its buckets); start again
        total: float | None = None
        if prev.latency_sum_s is not None and snap.latency_sum_s is not None:
            total = max(0.0, snap.latency_sum_s - prev.latency_sum_s)
        sample = Sample(
            t=snap.t,
            duration_s=snap.t - prev.t,
            requests=snap.requests - prev.requests,
            errors=snap.errors - prev.errors,
            latency_bounds_s=snap.latency_bounds_s,
            latency_counts=tuple(
                b - a for a, b in zip(prev.latency_counts, snap.latency_counts, strict=True)
            ),
            uncaught=snap.uncaught - prev.uncaught,
            gauges=dict(snap.gauges),
            cpu_s=max(0.0, snap.cpu_s - prev.cpu_s),
            rss_bytes=snap.rss_bytes,
            release=snap.release,
            latency_sum_s=total,
            host_busy_s=max(0.0, snap.host_busy_s - prev.host_busy_s),
            host_total_s=max(0.0, snap.host_total_s - prev.host_total_s),
        )
        self.samples.append(sample)
        return sample


def samples_from_snapshots(
    node: str, snapshots: Iterable[Snapshot]
) -> tuple[list[Sample], list[Event]]:
    """Per-interval samples of consecutive cumulative snapshots, and crash events."""
    series = NodeSeries(node)
    for snap in snapshots:
        series.add(snap)
    return series.samples, series.events


# ================================================================ verdicts
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

    def action(self, policy: AnalysisPolicy, *, window_over: bool) -> str:
        """``rollback`` | ``promote`` | ``pause`` | ``wait`` for the leader."""
        if self.overall is Outcome.FAIL:
            return "rollback"
        if not window_over:
            return "wait"
        if self.overall is Outcome.PASS:
            return "promote"
        return policy.on_inconclusive

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


# ================================================================== judge
def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if metric.startswith("latency"):
        return f"{value:.3f} s"
    if metric == "rss_bytes":
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) >= 0.001 or value == 0 else f"{value:.2e}"


def _streak(flags: Iterable[bool | None]) -> tuple[int, int]:
    """Longest run of True (None is neutral, False resets), and where it ended."""
    best = run = 0
    end = -1
    for i, flag in enumerate(flags):
        if flag is None:
            continue
        run = run + 1 if flag else 0
        if run > best:
            best, end = run, i
    return best, end


def _pool(samples: Sequence[Sample]) -> tuple[tuple[float, ...], list[int]] | None:
    """Sum of the latency histograms of samples sharing the most common bounds."""
    groups: dict[tuple[float, ...], list[int]] = {}
    for s in samples:
        if not s.latency_counts:
            continue
        acc = groups.setdefault(s.latency_bounds_s, [0] * len(s.latency_counts))
        if len(acc) != len(s.latency_counts):
            continue
        for i, c in enumerate(s.latency_counts):
            acc[i] += c
    if not groups:
        return None
    bounds, counts = max(groups.items(), key=lambda kv: sum(kv[1]))
    return bounds, counts


def merge_samples(samples: Sequence[Sample]) -> Sample:
    """Consecutive samples of one node as one longer interval (their sums; last gauges)."""
    if not samples:
        raise ValueError("merge_samples of nothing")
    if len(samples) == 1:
        return samples[0]
    last = samples[-1]
    counts = [0] * len(last.latency_counts)
    for s in samples:
        for i, c in enumerate(s.latency_counts):
            counts[i] += c
    sums = [s.latency_sum_s for s in samples]
    return Sample(
        t=last.t,
        duration_s=sum(s.duration_s for s in samples),
        requests=sum(s.requests for s in samples),
        errors=sum(s.errors for s in samples),
        latency_bounds_s=last.latency_bounds_s,
        latency_counts=tuple(counts),
        uncaught=sum(s.uncaught for s in samples),
        gauges=dict(last.gauges),
        cpu_s=sum(s.cpu_s for s in samples),
        rss_bytes=last.rss_bytes,
        release=last.release,
        latency_sum_s=None if any(v is None for v in sums) else sum(v or 0.0 for v in sums),
        host_busy_s=sum(s.host_busy_s for s in samples),
        host_total_s=sum(s.host_total_s for s in samples),
    )


def conclusive_samples(samples: Sequence[Sample], min_requests: int) -> list[Sample]:
    """One node's samples as conclusive ones: consecutive intervals merged to >= ``min_requests``.

    A sample with enough requests stands alone; thinner ones are merged with
    the next until the merged interval has ``min_requests`` (a remainder too
    thin to stand goes into the last conclusive one).  On a busy host the
    sampler's intervals and the traffic in them are uneven (a starved load
    generator sends 8 requests in one half-second and 14 in the next): judged
    per interval, half the evidence would be dropped and a node with 150
    requests in its window would be "too little traffic"; merged, the same
    requests make fewer but conclusive samples.  Samples with another
    histogram shape start a new chunk.
    """
    out: list[Sample] = []
    acc: list[Sample] = []
    for s in samples:
        if acc and (
            s.latency_bounds_s != acc[-1].latency_bounds_s
            or len(s.latency_counts) != len(acc[-1].latency_counts)
        ):
            acc = []  # cannot merge across a histogram change: the remainder is dropped
        acc.append(s)
        if sum(a.requests for a in acc) >= min_requests:
            out.append(merge_samples(acc))
            acc = []
    if acc and out and sum(a.requests for a in acc) > 0:
        last = out[-1]
        if last.latency_bounds_s == acc[-1].latency_bounds_s and len(last.latency_counts) == len(
            acc[-1].latency_counts
        ):
            out[-1] = merge_samples([last, *acc])
    return out


class Judge:
    """Judges a rollback window against a baseline (and peers), per node and metric."""

    def __init__(self, policy: AnalysisPolicy | None = None) -> None:
        self.policy = policy or AnalysisPolicy()

    # ------------------------------------------------------------- entry
    def evaluate(
        self,
        baseline: Mapping[str, Sequence[Sample]],
        current: Mapping[str, Sequence[Sample]],
        events: Iterable[Event] = (),
        peers: Mapping[str, Sequence[Sample]] | None = None,
        changed: Mapping[str, ChangedCode] | None = None,
        release: str = "",
    ) -> Verdict:
        """Judge every node of ``current`` (the upgraded nodes).

        ``baseline``: each node's samples before the upgrade.  ``events``:
        crashes, lease losses, smoke failures of the window.  ``peers``: for a
        wave, samples of the not-yet-upgraded nodes over the same period,
        pooled as a second reference group (latency is judged against them
        instead of the baseline).  ``changed``: each upgraded node's latest
        changed-code coverage; only reports of ``release`` (if given) count.
        """
        findings: list[Finding] = []
        by_node: dict[str, list[Event]] = {}
        for ev in events:
            by_node.setdefault(ev.node, []).append(ev)
        nodes = sorted(set(current) | {n for n in by_node if n not in (peers or {})})
        p = self.policy
        peer_pool: list[Sample] = [s for ss in (peers or {}).values() for s in ss]
        good_peers = [
            c for ss in (peers or {}).values() for c in conclusive_samples(ss, p.min_requests)
        ]
        for node in nodes:
            cur = list(current.get(node, ()))
            findings += self._events(node, by_node.get(node, []), cur)
            findings += self._node(node, list(baseline.get(node, ())), cur, peer_pool, good_peers)
        if not nodes:
            findings.append(
                Finding("", "samples", None, None, "data", None, None, Outcome.INCONCLUSIVE,
                        "no upgraded node has reported health samples")
            )  # fmt: skip
        coverage: dict[str, Any] | None = None
        if changed is not None:
            mine = {
                n: c
                for n, c in changed.items()
                if n in current and (not release or c.release == release)
            }
            more, coverage = self._changed_code(mine, release)
            findings += more
        verdict = self._verdict(findings)
        return dataclasses.replace(verdict, changed_code=coverage) if coverage else verdict

    def _verdict(self, findings: list[Finding]) -> Verdict:
        fails = [f for f in findings if f.verdict is Outcome.FAIL]
        if fails:
            order = {"event": 0, "threshold": 1, "threshold_window": 1, "changed_code": 1}
            first = min(fails, key=lambda f: order.get(f.test, 2))
            more = len(fails) - 1
            others = sorted({f.node for f in fails if f is not first and f.node})
            tail = (
                f" (+{more} more on {', '.join(others)})"
                if more and others
                else (f" (+{more} more)" if more else "")
            )
            return Verdict(Outcome.FAIL, first.message + tail, tuple(findings))
        unsure = [f for f in findings if f.verdict is Outcome.INCONCLUSIVE]
        if unsure:
            more = len(unsure) - 1
            tail = f" (+{more} more inconclusive)" if more else ""
            return Verdict(
                Outcome.INCONCLUSIVE, "inconclusive: " + unsure[0].message + tail, tuple(findings)
            )
        nodes = sorted({f.node for f in findings if f.node})
        samples = min((f.samples for f in findings if f.metric == "error_rate"), default=0)
        return Verdict(
            Outcome.PASS,
            f"{len(nodes)} node(s) healthy on every metric (>= {samples} samples each)",
            tuple(findings),
        )

    # ------------------------------------------------------------ events
    def _events(self, node: str, events: list[Event], cur: Sequence[Sample] = ()) -> list[Finding]:
        out = []
        for ev in events:
            if ev.kind is EventKind.CRASH and not self.policy.fail_on_crash:
                continue
            if ev.kind is EventKind.LEASE_LOST and not self.policy.fail_on_lease_loss:
                continue
            detail = f": {ev.detail}" if ev.detail else ""
            alive = self._answering(ev, cur) if ev.kind is EventKind.LEASE_LOST else ""
            if alive:
                out.append(
                    Finding(node, ev.kind.value, 1.0, 0.0, "event", None, None,
                            Outcome.INCONCLUSIVE, f"{node} {ev.kind.value}{detail}; not a failure: {alive}")
                )  # fmt: skip
                continue
            out.append(
                Finding(node, ev.kind.value, 1.0, 0.0, "event", None, None, Outcome.FAIL,
                        f"{node} {ev.kind.value}{detail}")
            )  # fmt: skip
        return out

    def _answering(self, ev: Event, cur: Sequence[Sample]) -> str:
        """Why a node whose lease expired is not down, or "".

        A lease is a proxy for "the node is alive"; a Health reply is direct
        evidence.  On a saturated host an agent's lease keepalive can miss its
        TTL while the process keeps serving (it re-registers when its session
        comes back).  A node that died stops answering Health when it dies,
        which is at least a lease TTL before its lease is found expired; so a
        node whose latest Health reply, from the same process (no crash
        event), came within ``2 x interval_s`` (1 s at least) of the moment its
        lease was found missing is alive: INCONCLUSIVE while the lease is
        away, never FAIL.  Once it stops answering, the lease loss fails it.
        """
        if not cur or ev.t <= 0:
            return ""
        fresh = max(2.0 * self.policy.interval_s, 1.0)
        age = ev.t - cur[-1].t
        if age > fresh:
            return ""
        return (
            f"it answered Health {max(0.0, age):.1f} s before (the process is up, serving "
            f"{cur[-1].requests} requests in its last sample): a lease keepalive starved, "
            "not a node down"
        )

    # -------------------------------------------------------------- node
    def _node(
        self,
        node: str,
        base: list[Sample],
        cur: list[Sample],
        peer_pool: list[Sample],
        good_peers: list[Sample] | None = None,
    ) -> list[Finding]:
        p = self.policy
        if not cur:
            return [
                Finding(node, "samples", 0.0, float(p.min_samples), "data", None, None,
                        Outcome.INCONCLUSIVE, f"{node} has no health samples since the upgrade")
            ]  # fmt: skip
        out: list[Finding] = []
        # conclusive samples: consecutive intervals merged to >= min_requests each
        good_cur = conclusive_samples(cur, p.min_requests)
        good_base = conclusive_samples(base, p.min_requests)
        enough = len(good_cur) >= p.min_samples
        base_ok = len(good_base) >= p.min_samples
        if not enough:
            total = sum(s.requests for s in cur)
            out.append(
                Finding(node, "samples", float(len(good_cur)), float(p.min_samples), "data", None, None,
                        Outcome.INCONCLUSIVE,
                        f"{node} too little traffic: {total} requests in {len(cur)} samples make "
                        f"{len(good_cur)} of the {p.min_samples} samples of >= {p.min_requests} "
                        "requests needed to pass",
                        samples=len(good_cur))
            )  # fmt: skip
        if not base_ok:
            total = sum(s.requests for s in base)
            out.append(
                Finding(node, "baseline", float(len(good_base)), float(p.min_samples), "data", None, None,
                        Outcome.INCONCLUSIVE,
                        f"{node} baseline too thin: {total} requests in {len(base)} samples make "
                        f"{len(good_base)} of the {p.min_samples} samples of >= {p.min_requests} "
                        "requests needed",
                        samples=len(good_base))
            )  # fmt: skip
        if good_peers is None:
            good_peers = conclusive_samples(peer_pool, p.min_requests)
        # Latency against the nodes still on the old release when there are
        # enough of them: same moment, same host load; the baseline is not.
        by_peers = p.latency_vs_peers and len(good_peers) >= p.min_samples
        out += self._error_rate(node, base, cur, base_ok, enough)
        if by_peers:
            out += self._latency(node, good_peers, cur, True, enough, "peers")
        else:
            out += self._latency(node, good_base, cur, base_ok, enough, "baseline")
        out += self._uncaught(node, base, cur)
        out += self._gauges(node, cur, enough)
        for metric in p.judge_metrics:
            if not (by_peers and metric.startswith("latency")):
                out.append(
                    self._compare(node, metric, good_base, good_cur, "mann_whitney", "baseline")
                )
            if peer_pool:
                out.append(
                    self._compare(
                        node, metric, good_peers, good_cur, "mann_whitney_vs_peers", "peers"
                    )
                )
        contention = self._contention(base, cur)
        if contention:
            # The tail of a saturated host is the scheduler's: with the median
            # unchanged (no p50 finding failed, threshold or Mann-Whitney) and
            # the worker doing no more work per request, a p99 breach is the
            # contention's and does not hold the release back.  A median shift
            # (a sleep, a lock: 2.3.0-slow) stays INCONCLUSIVE: never promoted
            # on this evidence, never rolled back either.
            median_ok = enough and not any(
                f.verdict is Outcome.FAIL and f.metric in ("latency_p50", "latency_mean")
                for f in out
            )
            tail_ok = "; the median did not move: the tail is the host's"
            out = [
                dataclasses.replace(
                    f,
                    verdict=Outcome.PASS
                    if median_ok and f.metric == "latency_p99"
                    else Outcome.INCONCLUSIVE,
                    message=f"{f.message}; not a failure: {contention}"
                    + (tail_ok if median_ok and f.metric == "latency_p99" else ""),
                )
                if f.verdict is Outcome.FAIL and f.metric.startswith("latency")
                else f
                for f in out
            ]
        return out

    # --------------------------------------------------------- contention
    def _contention(self, base: list[Sample], cur: list[Sample]) -> str:
        """Why this node's latency cannot be blamed on the release, or "".

        A host whose CPU was saturated for at least half of the window (the
        deploy preparing everywhere at once, a neighbour, a hypervisor) slows
        every request that waits for a core.  The release is to blame only if
        the worker itself does more work per request: its CPU seconds per
        request rose beyond ``cpu_per_request_tolerance``.  Otherwise the
        latency evidence is contention: INCONCLUSIVE, not FAIL.
        """
        p = self.policy
        if p.cpu_saturation is None:
            return ""
        busy = [b for b in (s.host_cpu_busy for s in cur) if b is not None]
        saturated = sum(1 for b in busy if b >= p.cpu_saturation)
        if not busy or saturated * 2 < len(busy):
            return ""
        base_req, cur_req = sum(s.requests for s in base), sum(s.requests for s in cur)
        if base_req <= 0 or cur_req <= 0:
            return ""
        base_cpr = sum(s.cpu_s for s in base) / base_req
        cur_cpr = sum(s.cpu_s for s in cur) / cur_req
        if cur_cpr > base_cpr * (1.0 + p.cpu_per_request_tolerance):
            return ""
        return (
            f"host CPU saturated (>= {p.cpu_saturation:.0%} busy) in {saturated} of {len(busy)} "
            f"samples (median {statistics.median(busy):.0%}) while the worker's CPU per request "
            f"stayed at {cur_cpr * 1e3:.2f} ms (baseline {base_cpr * 1e3:.2f} ms): "
            "contention, not the release"
        )

    # ------------------------------------------------------- changed code
    def _changed_code(
        self, reports: Mapping[str, ChangedCode], release: str
    ) -> tuple[list[Finding], dict[str, Any] | None]:
        """Did the release's changed functions run, and do they raise on most calls?

        Counts are pooled over the upgraded nodes per function (a function on
        5 % of the traffic is judged on the fleet's calls, not one node's
        trickle); the error ratio of the changed code itself is judged on
        the lower bound of its Wilson interval against
        ``changed_code_max_error_rate``.  The minimum-coverage knobs make a
        window that did not exercise the new code INCONCLUSIVE.
        """
        p = self.policy
        need = p.changed_code_min_ran > 0 or p.changed_code_min_calls > 0
        if not reports:
            if not need:
                return [], None
            return [
                Finding("", "changed_code", None, None, "changed_code", None, None,
                        Outcome.INCONCLUSIVE,
                        f"no upgraded node reported changed-code coverage of {release or 'the release'}")
            ], None  # fmt: skip
        totals: dict[str, list[Any]] = {}  # name -> [kind, calls, raised, {node: (calls, raised)}]
        for node, report in sorted(reports.items()):
            for f in report.functions:
                entry = totals.setdefault(f.name, [f.kind, 0, 0, {}])
                entry[1] += f.calls
                entry[2] += f.raised
                entry[3][node] = (f.calls, f.raised)
        out: list[Finding] = []
        confidence = 1.0 - p.alpha
        for name, (_kind, calls, raised, per_node) in sorted(totals.items()):
            if p.changed_code_max_error_rate is None or calls <= 0 or raised <= 0:
                continue
            lo, _ = wilson_interval(raised, calls, confidence)
            if lo <= p.changed_code_max_error_rate:
                continue
            worst = max(per_node, key=lambda n: (per_node[n][1], n))
            where = ", ".join(f"{n} {r}/{c}" for n, (c, r) in sorted(per_node.items()) if r)
            out.append(
                Finding(worst, f"changed:{name}", raised / calls, p.changed_code_max_error_rate,
                        "changed_code", None, None, Outcome.FAIL,
                        f"changed function {name} raised on {raised} of {calls} calls "
                        f"({raised / calls:.0%}; {confidence:.0%} lower bound {lo:.2f}) > bound "
                        f"{p.changed_code_max_error_rate:g} ({where})", samples=calls)
            )  # fmt: skip
        n = len(totals)
        ran = sorted(k for k, v in totals.items() if v[1] > 0)
        never = sorted(k for k, v in totals.items() if v[1] == 0)
        raising = sorted(k for k, v in totals.items() if v[2] > 0)
        calls_all = sum(v[1] for v in totals.values())
        raised_all = sum(v[2] for v in totals.values())
        summary = {
            "release": release,
            "functions": n,
            "ran": len(ran),
            "calls": calls_all,
            "raised": raised_all,
            "never_ran": never,
            "raising": [
                {"name": k, "calls": totals[k][1], "raised": totals[k][2]} for k in raising
            ],
            "nodes": sorted(reports),
        }
        share = len(ran) / n if n else 1.0
        short = []
        if share < p.changed_code_min_ran:
            short.append(f"{len(ran)} of {n} ran, policy needs {p.changed_code_min_ran:.0%}")
        if calls_all < p.changed_code_min_calls:
            short.append(f"{calls_all} calls, policy needs {p.changed_code_min_calls}")
        text = (
            f"changed code: {len(ran)} of {n} functions ran ({calls_all} calls, {raised_all} raised"
            + (f", error ratio {raised_all / calls_all:.2g}" if calls_all else "")
            + ")"
            + (
                f"; never ran: {', '.join(never[:5])}{' ...' if len(never) > 5 else ''}"
                if never
                else ""
            )
        )
        out.append(
            Finding("", "changed_code", share, p.changed_code_min_ran or None, "changed_code",
                    None, None, Outcome.INCONCLUSIVE if short else Outcome.PASS,
                    text + (f" (too little to pass: {'; '.join(short)})" if short else ""),
                    samples=calls_all)
        )  # fmt: skip
        return out, summary

    # -------------------------------------------------------- error rate
    def _error_rate(
        self, node: str, base: list[Sample], cur: list[Sample], base_ok: bool, enough: bool
    ) -> list[Finding]:
        p = self.policy
        confidence = 1.0 - p.alpha
        bound, how = p.max_error_rate, ""
        base_req = sum(s.requests for s in base)
        base_rate: float | None = None
        if base_ok and base_req > 0:
            base_rate = sum(s.errors for s in base) / base_req
            rel = base_rate + p.max_error_rate_increase
            if rel < bound:
                bound = rel
                how = f" (baseline {_fmt('error_rate', base_rate)} + {p.max_error_rate_increase:g})"

        flags: list[bool | None] = []
        for s in cur:
            if s.requests <= 0:
                flags.append(None)
                continue
            lo, _ = wilson_interval(s.errors, s.requests, confidence)
            rate = s.errors / s.requests
            flags.append(True if lo > bound else (False if rate <= bound else None))
        run, end = _streak(flags)
        if run >= p.failure_limit:
            window = cur[end - _span(flags, end, run) + 1 : end + 1]
            errs, reqs = sum(s.errors for s in window), sum(s.requests for s in window)
            rate = errs / reqs
            lo, _ = wilson_interval(errs, reqs, confidence)
            return [
                Finding(node, "error_rate", rate, bound, "threshold", lo, None, Outcome.FAIL,
                        f"{node} error_rate {rate:.3g} > bound {bound:.3g}{how} over {run} consecutive samples "
                        f"({errs} of {reqs} requests failed; {confidence:.0%} lower bound {lo:.3g})",
                        baseline=base_rate, samples=run)
            ]  # fmt: skip
        errs, reqs = sum(s.errors for s in cur), sum(s.requests for s in cur)
        if reqs > 0:
            lo, _ = wilson_interval(errs, reqs, confidence)
            if lo > bound:
                return [
                    Finding(node, "error_rate", errs / reqs, bound, "threshold_window", lo, None, Outcome.FAIL,
                            f"{node} error_rate {errs / reqs:.3g} > bound {bound:.3g}{how} over the window "
                            f"({errs} of {reqs} requests failed; {confidence:.0%} lower bound {lo:.3g})",
                            baseline=base_rate, samples=len(cur))
                ]  # fmt: skip
        overall = errs / reqs if reqs else None
        ok = enough and base_ok
        return [
            Finding(node, "error_rate", overall, bound, "threshold", None, None,
                    Outcome.PASS if ok else Outcome.INCONCLUSIVE,
                    f"{node} error_rate {_fmt('error_rate', overall)} within bound {bound:.3g}{how}"
                    + ("" if ok else " (too little data to pass)"),
                    baseline=base_rate, samples=len(cur))
        ]  # fmt: skip

    # ------------------------------------------------------------ latency
    def _latency(
        self,
        node: str,
        good_base: list[Sample],
        cur: list[Sample],
        base_ok: bool,
        enough: bool,
        against: str = "baseline",
    ) -> list[Finding]:
        p = self.policy
        pooled = _pool(good_base) if base_ok else None
        out = []
        for metric, q, absolute, ratio, min_req, floor in (
            ("latency_p50", 0.5, p.latency_p50_max_s, p.latency_p50_max_ratio, p.min_requests,
             p.latency_min_increase_s),
            ("latency_p99", 0.99, p.latency_p99_max_s, p.latency_p99_max_ratio, p.min_requests_p99,
             p.latency_p99_min_increase_s),
        ):  # fmt: skip
            base_q = histogram_quantile(q, pooled[0], pooled[1]) if pooled else None
            bounds: list[tuple[float, str]] = []
            if absolute is not None:
                bounds.append((absolute, ""))
            if ratio is not None and base_q is not None:
                rel = max(base_q * ratio, base_q + floor)
                how = (
                    f" ({against} {base_q:.3f} s x {ratio:g})"
                    if base_q * ratio >= base_q + floor
                    else f" ({against} {base_q:.3f} s + {floor:g} s)"
                )
                bounds.append((rel, how))
            if not bounds:
                continue
            bound, how = min(bounds)
            values = _chunked_quantiles(cur, q, min_req)
            flags = [None if v is None else v > bound for v in values]
            run, end = _streak(flags)
            if run >= p.failure_limit:
                seen = [v for v in values[: end + 1] if v is not None][-run:]
                worst = max(seen)
                out.append(
                    Finding(node, metric, worst, bound, "threshold", None, None, Outcome.FAIL,
                            f"{node} {metric} {worst:.3f} s > bound {bound:.3f} s{how} over {run} consecutive samples",
                            baseline=base_q, samples=run)
                )  # fmt: skip
                continue
            judged = [v for v in values if v is not None]
            last = judged[-1] if judged else None
            ok = enough and (ratio is None or base_q is not None) and bool(judged)
            out.append(
                Finding(node, metric, last, bound, "threshold", None, None,
                        Outcome.PASS if ok else Outcome.INCONCLUSIVE,
                        f"{node} {metric} {_fmt(metric, last)} within bound {bound:.3f} s{how}"
                        + ("" if ok else " (too little data to pass)"),
                        baseline=base_q, samples=len(judged))
            )  # fmt: skip
        return out

    # ----------------------------------------------------------- uncaught
    def _uncaught(self, node: str, base: list[Sample], cur: list[Sample]) -> list[Finding]:
        p = self.policy
        seen = sum(s.uncaught for s in cur)
        base_time = sum(s.duration_s for s in base)
        cur_time = sum(s.duration_s for s in cur)
        expected = sum(s.uncaught for s in base) / base_time * cur_time if base_time > 0 else 0.0
        allowed = math.ceil(expected) + p.max_uncaught
        if seen > allowed:
            return [
                Finding(node, "uncaught", float(seen), float(allowed), "threshold", None, None, Outcome.FAIL,
                        f"{node} uncaught exceptions {seen} > bound {allowed} in the window "
                        f"(baseline predicts {expected:.1f})", samples=len(cur))
            ]  # fmt: skip
        return [
            Finding(node, "uncaught", float(seen), float(allowed), "threshold", None, None, Outcome.PASS,
                    f"{node} uncaught exceptions {seen} within bound {allowed}", samples=len(cur))
        ]  # fmt: skip

    # ------------------------------------------------------------- gauges
    def _gauges(self, node: str, cur: list[Sample], enough: bool) -> list[Finding]:
        p = self.policy
        out = []
        for name, (lo, hi) in sorted(p.gauges.items()):
            values = [s.gauge(name) for s in cur]

            def outside(
                v: float | None, lo: float | None = lo, hi: float | None = hi
            ) -> bool | None:
                if v is None:
                    return None
                return (lo is not None and v < lo) or (hi is not None and v > hi)

            flags = [outside(v) for v in values]
            run, end = _streak(flags)
            span = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
            if run >= p.failure_limit:
                v = values[end]
                assert v is not None
                bound = hi if hi is not None and v > hi else lo
                out.append(
                    Finding(node, f"gauge:{name}", v, bound, "threshold", None, None, Outcome.FAIL,
                            f"{node} gauge {name} {v:g} outside bounds {span} over {run} consecutive samples",
                            samples=run)
                )  # fmt: skip
                continue
            judged = [v for v in values if v is not None]
            last = judged[-1] if judged else None
            ok = bool(judged) and enough
            why = (
                "" if ok else (" (never reported)" if not judged else " (too little data to pass)")
            )
            out.append(
                Finding(node, f"gauge:{name}", last, hi if hi is not None else lo, "threshold", None, None,
                        Outcome.PASS if ok else Outcome.INCONCLUSIVE,
                        f"{node} gauge {name} {_fmt(name, last)} within bounds {span}{why}",
                        samples=len(judged))
            )  # fmt: skip
        return out

    # ------------------------------------------------- statistical judge
    def _test(
        self, metric: str, ref: list[float], obs: list[float]
    ) -> tuple[bool, MannWhitneyResult, float | None, float]:
        p = self.policy
        res = mann_whitney_u(obs, ref, alternative="greater")
        ref_median = statistics.median(ref)
        tol = max(p.tolerance * abs(ref_median), p.effect_floor(metric))
        if res.p_value >= p.alpha:
            return False, res, None, tol
        shift = hodges_lehmann(obs, ref)
        return shift > tol, res, shift, tol

    def _compare(
        self, node: str, metric: str, ref_samples: list[Sample], cur_samples: list[Sample],
        test: str, against: str,
    ) -> Finding:  # fmt: skip
        p = self.policy
        if metric == "latency_p99":
            # a p99 of a 15-request sample is its slowest request: compare p99s of
            # consecutive samples merged to >= min_requests_p99 requests instead
            return self._compare_tail(node, metric, ref_samples, cur_samples, test, against)
        ref = [v for v in (s.metric(metric) for s in ref_samples) if v is not None]
        obs = [v for v in (s.metric(metric) for s in cur_samples) if v is not None]
        return self._compare_values(node, metric, ref, obs, test, against, p.min_samples)

    def _compare_tail(
        self, node: str, metric: str, ref_samples: list[Sample], cur_samples: list[Sample],
        test: str, against: str,
    ) -> Finding:  # fmt: skip
        """The p99 judge over chunks of >= ``min_requests_p99`` requests.

        Fewer chunks than the test needs on a node with enough traffic is a
        pass left to the p99 threshold (which judges the same chunks), not a
        pause: at 30 requests/s a 10 s window holds 6 such chunks.
        """
        p = self.policy
        ref = [
            v for v in _chunked_quantiles(ref_samples, 0.99, p.min_requests_p99) if v is not None
        ]
        obs = [
            v for v in _chunked_quantiles(cur_samples, 0.99, p.min_requests_p99) if v is not None
        ]
        enough = len(conclusive_samples(cur_samples, p.min_requests)) >= p.min_samples
        if (len(ref) < p.judge_min_samples or len(obs) < p.judge_min_samples) and enough:
            return Finding(
                node, metric, statistics.median(obs) if obs else None, None, test, None, None,
                Outcome.PASS,
                f"{node} {metric} vs {against}: {len(obs)} vs {len(ref)} chunks of >= "
                f"{p.min_requests_p99} requests, too few for Mann-Whitney; left to the p99 bound",
                samples=len(obs),
            )  # fmt: skip
        return self._compare_values(node, metric, ref, obs, test, against, p.judge_min_samples)

    def _compare_values(
        self, node: str, metric: str, ref: list[float], obs: list[float], test: str,
        against: str, pass_samples: int,
    ) -> Finding:  # fmt: skip
        p = self.policy
        if len(ref) < pass_samples or len(obs) < p.judge_min_samples:
            return Finding(
                node,
                metric,
                statistics.median(obs) if obs else None,
                None,
                test,
                None,
                None,
                Outcome.INCONCLUSIVE,
                f"{node} {metric} vs {against}: too few samples for Mann-Whitney "
                f"({len(obs)} vs {len(ref)}; need {p.judge_min_samples} and {pass_samples})",
                samples=len(obs),
            )
        failed, res, shift, tol = self._test(metric, ref, obs)
        # Consecutive failing evaluations: the test must also fail on the window
        # as it was at each of the previous failure_limit - 1 samples.
        if failed:
            for k in range(1, p.failure_limit):
                n = len(obs) - k
                if n < p.judge_min_samples or not self._test(metric, ref, obs[:n])[0]:
                    failed = False
                    break
        obs_med, ref_med = statistics.median(obs), statistics.median(ref)
        rel = (
            f" ({p.tolerance:.0%})"
            if p.tolerance * abs(ref_med) >= p.effect_floor(metric)
            else " (floor)"
        )
        shift_txt = (
            f", shift +{_fmt(metric, shift)} > tolerance {_fmt(metric, tol)}{rel}"
            if shift is not None and shift > tol
            else f", shift {_fmt(metric, shift)} vs tolerance {_fmt(metric, tol)}{rel}"
            if shift is not None
            else f" (tolerance {_fmt(metric, tol)}{rel})"
        )
        msg = (
            f"{node} {metric} median {_fmt(metric, obs_med)} vs {against} {_fmt(metric, ref_med)}: "
            f"Mann-Whitney U={res.u:.1f} p={res.p_value:.2g}{shift_txt}"
        )
        if failed:
            verdict = Outcome.FAIL
        elif len(obs) < pass_samples:
            verdict, msg = Outcome.INCONCLUSIVE, msg + " (too few samples to pass)"
        else:
            verdict = Outcome.PASS
        return Finding(
            node,
            metric,
            obs_med,
            tol,
            test,
            res.u,
            res.p_value,
            verdict,
            msg,
            baseline=ref_med,
            effect=shift,
            samples=len(obs),
        )


def _chunked_quantiles(
    samples: Sequence[Sample], q: float, min_requests: int
) -> list[float | None]:
    """Quantile ``q`` per sample, merging consecutive samples until ``min_requests``.

    One value per input sample: the merged chunk's quantile at the sample that
    completes it, ``None`` (neutral) elsewhere.  At high traffic every sample is
    its own chunk; at moderate traffic a p99 is judged over a few intervals
    instead of never (a p99 of 10 requests is their maximum).
    """
    out: list[float | None] = []
    acc: list[int] = []
    bounds: tuple[float, ...] = ()
    for s in samples:
        if not s.latency_counts or s.requests <= 0:
            out.append(None)
            continue
        if s.latency_bounds_s != bounds or len(acc) != len(s.latency_counts):
            bounds, acc = s.latency_bounds_s, [0] * len(s.latency_counts)
        acc = [a + c for a, c in zip(acc, s.latency_counts, strict=True)]
        if sum(acc) >= min_requests:
            out.append(histogram_quantile(q, bounds, acc))
            acc = [0] * len(acc)
        else:
            out.append(None)
    return out


def _span(flags: Sequence[bool | None], end: int, run: int) -> int:
    """Index distance covering the last ``run`` True flags ending at ``end``."""
    count, i = 0, end
    while i >= 0:
        if flags[i]:
            count += 1
            if count == run:
                return end - i + 1
        i -= 1
    return end + 1  # pragma: no cover
