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

Modules
-------
:mod:`.stats` (Mann-Whitney, Hodges-Lehmann, Wilson, histogram quantiles),
:mod:`.samples` (snapshots, samples, events, merging), :mod:`.verdict`
(findings, verdicts, outcomes), :mod:`.judge` (the judge) with its
per-sample bounds in :mod:`.thresholds` and its statistical tests in
:mod:`.significance`.  This package re-exports what the rest of the
coordinator uses.
"""

from coordinator.analysis.judge import Judge
from coordinator.analysis.samples import (
    DEFAULT_LATENCY_BOUNDS_S,
    ChangedCode,
    Event,
    EventKind,
    FunctionRuns,
    NodeSeries,
    Sample,
    Snapshot,
    conclusive_samples,
    merge_samples,
    samples_from_snapshots,
)
from coordinator.analysis.stats import (
    MannWhitneyResult,
    histogram_quantile,
    hodges_lehmann,
    mann_whitney_u,
    wilson_interval,
)
from coordinator.analysis.verdict import RESUMES, Finding, Outcome, Verdict, paused_record
from coordinator.policy import Action

__all__ = [
    "DEFAULT_LATENCY_BOUNDS_S",
    "RESUMES",
    "Action",
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
    "conclusive_samples",
    "histogram_quantile",
    "hodges_lehmann",
    "mann_whitney_u",
    "merge_samples",
    "paused_record",
    "samples_from_snapshots",
    "wilson_interval",
]
