"""What the judge judges: Health replies turned into per-interval samples and events.

A :class:`Snapshot` is one Health reply (cumulative counters since the worker
started); a :class:`NodeSeries` diffs a node's consecutive snapshots into
:class:`Sample` s, and a counter that goes backwards into a ``crash``
:class:`Event`.  Thin consecutive samples are merged into conclusive ones
(:func:`conclusive_samples`), and latency histograms are pooled or chunked
for the thresholds and the statistical tests.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.analysis.stats import histogram_quantile
from hotfleet.protocol import LATENCY_BOUNDS_S

__all__ = [
    "DEFAULT_LATENCY_BOUNDS_S",
    "ChangedCode",
    "Event",
    "EventKind",
    "FunctionRuns",
    "NodeSeries",
    "Sample",
    "Snapshot",
    "chunked_quantiles",
    "conclusive_samples",
    "merge_samples",
    "pooled_histogram",
    "samples_from_snapshots",
]

#: The agent's histogram bounds, for synthetic samples (real ones carry their own).
DEFAULT_LATENCY_BOUNDS_S = LATENCY_BOUNDS_S


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
    calls: int  # an estimate when ``estimated`` (sampled past the first exact calls)
    raised: int  # always exact
    estimated: bool = False


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
                FunctionRuns(
                    str(f.name),
                    str(f.kind),
                    int(f.calls),
                    int(f.raised),
                    bool(getattr(f, "calls_estimated", False)),
                )
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


def pooled_histogram(samples: Sequence[Sample]) -> tuple[tuple[float, ...], list[int]] | None:
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


def chunked_quantiles(samples: Sequence[Sample], q: float, min_requests: int) -> list[float | None]:
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
