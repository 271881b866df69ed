"""Health analysis: the statistics, the differ, the judge and the policy.

Pure functions only (no etcd, no processes): the whole file runs in seconds.
Textbook values were computed by hand (shown in the comments) and agree with
scipy.stats.mannwhitneyu's documented results.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Callable
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.analysis import (
    DEFAULT_LATENCY_BOUNDS_S,
    Event,
    EventKind,
    Judge,
    NodeSeries,
    Outcome,
    Sample,
    Snapshot,
    histogram_quantile,
    hodges_lehmann,
    mann_whitney_u,
    samples_from_snapshots,
    wilson_interval,
)
from coordinator.fleet import AgentPool
from coordinator.health import HealthSampler
from coordinator.policy import AnalysisPolicy, PolicyError

Latency = Callable[[random.Random], float]


def series(
    rng: random.Random,
    n: int,
    latency: Latency,
    *,
    per: int = 100,
    err: float = 0.0,
    gauges: dict[str, float] | None = None,
) -> list[Sample]:
    out = []
    for i in range(n):
        lat = [latency(rng) for _ in range(per)]
        errors = sum(rng.random() < err for _ in range(per))
        out.append(
            Sample.from_latencies(lat, errors=errors, t=0.5 * (i + 1), gauges=dict(gauges or {}))
        )
    return out


def fast(rng: random.Random) -> float:
    return rng.lognormvariate(math.log(0.02), 0.4)  # ~20 ms


def fleet(
    seed: int,
    nodes: tuple[str, ...] = ("n1", "n2", "n3"),
    *,
    err: float = 0.0,
    gauges: dict[str, float] | None = None,
) -> dict[str, list[Sample]]:
    rng = random.Random(seed)
    return {n: series(rng, 20, fast, err=err, gauges=gauges) for n in nodes}


# ================================================================ statistics
def test_mann_whitney_textbook_example_exact_and_asymptotic() -> None:
    # x = 19 22 16 29 24, y = 20 11 17 12 (scipy's documented example).
    # Pooled order: 11y 12y 16x 17y 19x 20y 22x 24x 29x -> R1 = 3+5+7+8+9 = 32,
    # U1 = 32 - 5*6/2 = 17, U2 = 20 - 17 = 3.
    # Exact: P(U2 <= 3) for (4, 5) = #partitions of 0..3 into <= 4 parts <= 5
    # = 1+1+2+3 = 7 of C(9,4) = 126 -> two-sided 14/126 = 0.1111.
    x, y = [19, 22, 16, 29, 24], [20, 11, 17, 12]
    res = mann_whitney_u(x, y, method="exact")
    assert (res.u1, res.u2, res.u) == (17.0, 3.0, 3.0)
    assert res.p_value == pytest.approx(14 / 126, abs=1e-12)
    assert mann_whitney_u(x, y, alternative="greater", method="exact").p_value == pytest.approx(
        7 / 126
    )
    # Asymptotic: mu = 10, sigma = sqrt(20*10/12) = 4.0825; z = (17-10-0.5)/sigma
    # = 1.59217; p = 2 * (1 - Phi(z)) = 0.1113469 (scipy: 0.11134688653314041).
    res = mann_whitney_u(x, y, method="asymptotic")
    assert res.z == pytest.approx(6.5 / math.sqrt(200 / 12))
    assert res.p_value == pytest.approx(0.11134688653314041, rel=1e-9)
    # auto picks exact here (smaller side < 8)
    assert mann_whitney_u(x, y).method == "exact"


def test_mann_whitney_exact_small_table_values() -> None:
    # Complete separation: U = 0, one-sided p = 1 / C(n1+n2, n1).
    assert mann_whitney_u([5, 6, 7], [1, 2, 3], "greater").p_value == pytest.approx(1 / 20)
    assert mann_whitney_u([1, 2, 3, 4], [5, 6, 7, 8], "less").p_value == pytest.approx(1 / 70)
    assert mann_whitney_u([1, 2, 3, 4], [5, 6, 7, 8]).p_value == pytest.approx(2 / 70)
    # Table of critical values, n1 = n2 = 8, two-sided alpha 0.05: U_crit = 13,
    # i.e. P(U <= 13) <= 0.025 < P(U <= 14).  y = 1..8; x placed so that
    # U1 = sum over x of #(y below x).
    y = [1, 2, 3, 4, 5, 6, 7, 8]
    x13 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 5.5, 8.5]  # 0*6 + 5 + 8 = 13
    x14 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 6.5, 8.5]  # 0*6 + 6 + 8 = 14
    r13 = mann_whitney_u(x13, y, "less", method="exact")
    r14 = mann_whitney_u(x14, y, "less", method="exact")
    assert (r13.u1, r14.u1) == (13.0, 14.0)
    assert r13.p_value <= 0.025 < r14.p_value


def test_mann_whitney_tie_correction_hand_computed() -> None:
    # x = 1 2 2 3, y = 2 3 4 5.  Pooled: 1 | 2 2 2 | 3 3 | 4 | 5 -> midranks
    # 1 | 3 3 3 | 5.5 5.5 | 7 | 8.  R1 = 1+3+3+5.5 = 12.5, U1 = 12.5-10 = 2.5.
    # Ties t = 3, 2: sum(t^3 - t) = 24 + 6 = 30; var = 16/12 * (9 - 30/56)
    # = 11.2857; z = (|2.5 - 8| - 0.5) / sqrt(var) = 1.48835; p = 0.13666.
    res = mann_whitney_u([1, 2, 2, 3], [2, 3, 4, 5], method="asymptotic")
    assert res.u1 == 2.5
    var = 16 / 12 * (9 - 30 / 56)
    assert res.z == pytest.approx(5 / math.sqrt(var))
    assert res.p_value == pytest.approx(0.13666, abs=5e-5)
    # All values tied: no evidence.
    assert mann_whitney_u([1, 1, 1, 1, 1, 1, 1, 1], [1] * 8).p_value == 1.0


def _brute_force(x: list[int], y: list[int]) -> tuple[Fraction, Fraction]:
    pooled = x + y
    n1 = len(x)

    def u_of(idx: tuple[int, ...]) -> float:
        xs = [pooled[i] for i in idx]
        ys = [pooled[i] for i in range(len(pooled)) if i not in idx]
        return sum((a > b) + 0.5 * (a == b) for a in xs for b in ys)

    u_obs = u_of(tuple(range(n1)))
    us = [u_of(c) for c in itertools.combinations(range(len(pooled)), n1)]
    total = len(us)
    return (
        Fraction(sum(u <= u_obs + 1e-9 for u in us), total),
        Fraction(sum(u >= u_obs - 1e-9 for u in us), total),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=6),
    st.lists(st.integers(0, 6), min_size=1, max_size=6),
)
def test_exact_distribution_matches_enumeration_even_with_ties(x: list[int], y: list[int]) -> None:
    le, ge = _brute_force(x, y)
    assert mann_whitney_u(x, y, "less", method="exact").p_value == pytest.approx(float(le))
    assert mann_whitney_u(x, y, "greater", method="exact").p_value == pytest.approx(float(ge))


def test_asymptotic_p_values_are_calibrated() -> None:
    # Same distribution, 20 vs 20, one-sided at 0.02: about 2 % rejections.
    rng = random.Random(7)
    trials = 600
    hits = 0
    for _ in range(trials):
        a = [rng.gauss(0, 1) for _ in range(20)]
        b = [rng.gauss(0, 1) for _ in range(20)]
        hits += mann_whitney_u(a, b, "greater").p_value < 0.02
    assert hits / trials <= 0.04


def test_hodges_lehmann_wilson_and_histogram_quantile() -> None:
    # differences 3-1 3-2 4-1 4-2 5-1 5-2 = 2 1 3 2 4 3 -> median 2.5
    assert hodges_lehmann([3, 4, 5], [1, 2]) == 2.5
    # 0 of 10 at 95 %: upper = z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.2775
    lo, hi = wilson_interval(0, 10, 0.95)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    # bounds 1 2 4 (+Inf); 10 in (1,2], 10 in (2,4]
    assert histogram_quantile(0.5, (1, 2, 4), (0, 10, 10, 0)) == pytest.approx(2.0)
    assert histogram_quantile(0.75, (1, 2, 4), (0, 10, 10, 0)) == pytest.approx(3.0)
    assert histogram_quantile(0.5, (1, 2, 4), (0, 0, 0, 5)) == 4.0  # +Inf: last bound
    assert histogram_quantile(0.5, (1, 2, 4), (0, 0, 0, 0)) is None


# ================================================================= samples
def snap(t: float, requests: int, errors: int = 0, uptime: float | None = None) -> Snapshot:
    counts = [0] * (len(DEFAULT_LATENCY_BOUNDS_S) + 1)
    counts[4] = requests  # all in (10 ms, 25 ms]
    return Snapshot(
        t=t,
        requests=requests,
        errors=errors,
        latency_bounds_s=DEFAULT_LATENCY_BOUNDS_S,
        latency_counts=tuple(counts),
        uptime_s=100.0 + t if uptime is None else uptime,
        release="app@2",
    )


def test_snapshots_diff_into_interval_samples() -> None:
    samples, events = samples_from_snapshots("n1", [snap(0, 100, 1), snap(0.5, 160, 4)])
    assert events == []
    (s,) = samples
    assert (s.requests, s.errors, s.duration_s) == (60, 3, 0.5)
    assert s.error_rate == pytest.approx(0.05)
    assert 0.01 < (s.latency_p50 or 0) <= 0.025


def test_snapshot_from_health_reply() -> None:
    from hotfleet._proto.hotfleet.v1 import agent_pb2

    def reply(requests: int, low: int, uptime: float) -> agent_pb2.HealthReply:
        return agent_pb2.HealthReply(
            requests=requests,
            errors=1,
            latency_bounds_s=[0.1, 1.0],
            latency_counts=[low, requests - low, 0],
            gauges={"queue": 3.0},
            uptime_s=uptime,
            release="app@2",
        )

    s = NodeSeries("n1")
    assert s.add(Snapshot.from_reply(reply(10, 5, 5.0), t=1.0)) is None
    sample = s.add(Snapshot.from_reply(reply(30, 15, 5.5), t=1.5))
    assert sample is not None
    assert (sample.requests, sample.errors, sample.latency_counts) == (20, 0, (10, 10, 0))
    assert sample.gauge("queue") == 3.0 and sample.latency_sum_s is None


def test_counter_reset_is_a_crash_and_fails_the_window() -> None:
    series_ = NodeSeries("n2")
    for i in range(10):
        series_.add(snap(0.5 * i, 100 * i))
    series_.add(snap(5.0, 7, uptime=0.4))  # restarted: counters back near zero
    series_.add(snap(5.5, 60, uptime=0.9))
    assert [e.kind for e in series_.events] == [EventKind.CRASH]
    assert "requests counter went backwards" in series_.events[0].detail
    assert all(s.requests >= 0 for s in series_.samples)
    base = fleet(1, ("n2",))
    v = Judge().evaluate(base, {"n2": series_.samples}, series_.events)
    assert v.overall is Outcome.FAIL
    assert v.reason.startswith("n2 crash: requests counter went backwards 900 -> 7")


def test_uptime_going_backwards_alone_is_a_crash() -> None:
    s = NodeSeries("n1")
    s.add(snap(0, 100, uptime=50))
    s.add(snap(0.5, 200, uptime=1))
    assert [e.kind for e in s.events] == [EventKind.CRASH]


# =================================================================== judge
def test_equal_distributions_pass() -> None:
    v = Judge().evaluate(fleet(1), fleet(2))
    assert v.overall is Outcome.PASS, v.reason
    assert set(v.nodes.values()) == {Outcome.PASS}
    assert "3 node(s) healthy" in v.reason
    assert v.action(AnalysisPolicy(), window_over=True) == "promote"
    assert v.action(AnalysisPolicy(), window_over=False) == "wait"


def test_error_rate_regression_fails_naming_node_metric_value_and_bound() -> None:
    base = fleet(3, err=0.0)
    cur = fleet(4, err=0.0)
    rng = random.Random(5)
    cur["n3"] = series(rng, 2, fast, err=0.3)  # 30 % raise; the leader sees 2 samples
    v = Judge().evaluate(base, cur)
    assert v.overall is Outcome.FAIL
    assert v.nodes == {"n1": Outcome.PASS, "n2": Outcome.PASS, "n3": Outcome.FAIL}
    (f,) = [f for f in v.failures if f.metric == "error_rate"]
    assert (f.node, f.test, f.bound) == ("n3", "threshold", pytest.approx(0.02))
    assert f.observed is not None and 0.2 < f.observed < 0.4
    assert v.reason.startswith(f"n3 error_rate {f.observed:.3g} > bound 0.02")
    assert "over 2 consecutive samples" in v.reason
    assert v.action(AnalysisPolicy(), window_over=False) == "rollback"


def test_absolute_error_bound_applies_when_baseline_is_already_bad() -> None:
    base = fleet(3, err=0.04)  # baseline 4 %: relative bound 6 % > absolute 5 %
    cur = fleet(4, err=0.04)
    cur["n1"] = series(random.Random(9), 6, fast, per=200, err=0.25)
    v = Judge().evaluate(base, cur)
    (f,) = [f for f in v.failures if f.metric == "error_rate" and f.test == "threshold"]
    assert f.node == "n1" and f.bound == 0.05


def test_single_error_in_a_small_sample_is_not_a_regression() -> None:
    base = fleet(3)
    cur = fleet(4)
    # one error in each of several 10-request samples: 10 % point estimate,
    # but not provably above the bound -> no threshold failure
    rng = random.Random(2)
    cur["n1"] = [
        Sample.from_latencies([fast(rng) for _ in range(10)], errors=1 if i % 3 == 0 else 0)
        for i in range(20)
    ]
    v = Judge().evaluate(base, cur)
    assert not [f for f in v.failures if f.test.startswith("threshold")]


def test_latency_only_regression_is_caught_by_the_statistical_judge() -> None:
    # A ~300 ms service whose new release sleeps 100 ms more: +33 % median,
    # under the 1.5x p50 bound; no request fails.  (The p99 ratio is relaxed
    # to 3x because the default buckets are 0.5 s wide above 0.5 s, which puts
    # the window's p99 estimate right at 2x.)
    policy = AnalysisPolicy.from_mapping({"latency_p99_max_ratio": 3})
    rng = random.Random(11)

    def base(r: random.Random) -> float:
        return r.uniform(0.15, 0.45)

    def slow(r: random.Random) -> float:
        return r.uniform(0.15, 0.45) + 0.1

    v = Judge(policy).evaluate(
        {"n1": series(rng, 20, base), "n2": series(rng, 20, base)},
        {"n1": series(rng, 20, slow), "n2": series(rng, 20, base)},
    )
    assert v.overall is Outcome.FAIL
    assert v.nodes["n1"] is Outcome.FAIL and v.nodes["n2"] is Outcome.PASS
    assert all(f.test == "mann_whitney" for f in v.failures)
    assert not [f for f in v.findings if f.test == "threshold" and f.verdict is not Outcome.PASS]
    f = v.failures[0]
    assert f.metric in {"latency_p50", "latency_p99"}
    assert f.p_value is not None and f.p_value < policy.alpha
    assert f.effect is not None and f.bound is not None and f.effect > f.bound
    assert "Mann-Whitney U=" in v.reason and v.reason.startswith("n1 latency_p")


def test_latency_regression_detected_early_with_few_window_samples() -> None:
    rng = random.Random(12)
    policy = AnalysisPolicy.from_mapping(
        {"latency_p50_max_ratio": "off", "latency_p99_max_ratio": "off"}
    )
    base = {"n1": series(rng, 20, fast)}
    cur = {"n1": series(rng, 5, lambda r: fast(r) + 0.1)}
    v = Judge(policy).evaluate(base, cur)
    assert v.overall is Outcome.FAIL
    assert {f.test for f in v.failures} == {"mann_whitney"}
    # 3 window samples: below judge_min_samples -> not judged yet
    v = Judge(policy).evaluate(base, {"n1": cur["n1"][:3]})
    assert v.overall is Outcome.INCONCLUSIVE


def test_same_distribution_false_failure_rate_is_low() -> None:
    # 200 seeded trials of a 3-node fleet with realistic noise (lognormal
    # latency, 1 % errors): baseline and window drawn from the same
    # distribution must PASS; the false-failure rate must stay <= 5 %.
    judge = Judge()
    fails = 0
    for trial in range(200):
        rng = random.Random(1000 + trial)

        def lat(r: random.Random) -> float:
            return r.lognormvariate(math.log(0.05), 0.6)

        base = {n: series(rng, 20, lat, per=40, err=0.01) for n in ("a", "b")}
        cur = {n: series(rng, 20, lat, per=40, err=0.01) for n in ("a", "b")}
        v = judge.evaluate(base, cur)
        assert v.overall is not Outcome.INCONCLUSIVE, v.reason
        fails += v.overall is Outcome.FAIL
    assert fails / 200 <= 0.05


def test_low_traffic_is_inconclusive_never_pass() -> None:
    rng = random.Random(3)
    base = {"n1": series(rng, 20, fast, per=3)}
    cur = {"n1": series(rng, 20, fast, per=3)}
    v = Judge().evaluate(base, cur)
    assert v.overall is Outcome.INCONCLUSIVE
    assert v.reason.startswith("inconclusive: n1 too little traffic: 60 requests in 20 samples")
    assert "make 5 of the 8 samples of >= 10 requests" in v.reason
    assert v.action(AnalysisPolicy(), window_over=True) == "pause"
    rollback = AnalysisPolicy.from_mapping({"on_inconclusive": "rollback"})
    assert v.action(rollback, window_over=True) == "rollback"
    # good window, thin baseline: still inconclusive
    v = Judge().evaluate({"n1": base["n1"]}, fleet(2, ("n1",)))
    assert v.overall is Outcome.INCONCLUSIVE and "baseline too thin" in v.reason
    # no samples at all
    v = Judge().evaluate(fleet(1, ("n1",)), {"n1": []})
    assert v.overall is Outcome.INCONCLUSIVE and "no health samples" in v.reason
    assert Judge().evaluate({}, {}).overall is Outcome.INCONCLUSIVE


def test_low_traffic_can_still_fail_on_overwhelming_evidence() -> None:
    rng = random.Random(3)
    base = {"n1": series(rng, 20, fast, per=3)}
    cur = {"n1": series(rng, 8, fast, per=3, err=1.0)}  # every request fails
    v = Judge().evaluate(base, cur)
    assert v.overall is Outcome.FAIL
    assert v.failures[0].metric == "error_rate"


def test_gauge_out_of_bounds_fails_and_missing_gauge_is_inconclusive() -> None:
    policy = AnalysisPolicy.from_mapping({"gauges": {"queue_depth": [0, 100]}})
    base = fleet(1, ("n1", "n2"), gauges={"queue_depth": 10})
    cur = fleet(2, ("n1", "n2"), gauges={"queue_depth": 10})
    assert Judge(policy).evaluate(base, cur).overall is Outcome.PASS
    cur["n2"] = series(random.Random(4), 20, fast, gauges={"queue_depth": 250})
    v = Judge(policy).evaluate(base, cur)
    assert v.overall is Outcome.FAIL
    assert v.reason.startswith("n2 gauge queue_depth 250 outside bounds [0, 100]")
    (f,) = v.failures
    assert (f.metric, f.observed, f.bound) == ("gauge:queue_depth", 250.0, 100.0)
    v = Judge(policy).evaluate(base, fleet(2, ("n1", "n2")))
    assert v.overall is Outcome.INCONCLUSIVE and "never reported" in v.reason


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (EventKind.LEASE_LOST, "n1 lease_lost"),
        (EventKind.SMOKE_FAILED, "n1 smoke_failed: /health 500"),
    ],
)
def test_events_fail_immediately(kind: EventKind, text: str) -> None:
    detail = "/health 500" if kind is EventKind.SMOKE_FAILED else ""
    v = Judge().evaluate(fleet(1), fleet(2), [Event("n1", kind, detail)])
    assert v.overall is Outcome.FAIL and v.reason.startswith(text)
    relaxed = AnalysisPolicy.from_mapping({"fail_on_lease_loss": False})
    if kind is EventKind.LEASE_LOST:
        assert (
            Judge(relaxed).evaluate(fleet(1), fleet(2), [Event("n1", kind)]).overall is Outcome.PASS
        )


def test_uncaught_exceptions_beyond_baseline_fail() -> None:
    cur = fleet(2)
    s = cur["n2"][5]
    cur["n2"][5] = Sample(
        t=s.t,
        duration_s=s.duration_s,
        requests=s.requests,
        errors=s.errors,
        latency_counts=s.latency_counts,
        uncaught=2,
    )
    v = Judge().evaluate(fleet(1), cur)
    assert v.overall is Outcome.FAIL
    assert v.reason.startswith("n2 uncaught exceptions 2 > bound 0")


def test_canary_compared_with_not_yet_upgraded_peers() -> None:
    # Baseline was taken under lighter load; now everyone is slower, the
    # canary more so.  Against its baseline alone the canary is within the
    # statistical tolerance of a fleet-wide shift too; against its peers (same
    # time, same load) it is clearly worse.
    policy = AnalysisPolicy.from_mapping(
        {"latency_p50_max_ratio": "off", "latency_p99_max_ratio": "off"}
    )
    rng = random.Random(21)
    base = {"c1": series(rng, 20, fast)}
    peers = {p: series(rng, 20, lambda r: fast(r) + 0.05) for p in ("p1", "p2", "p3")}
    good = {"c1": series(rng, 20, lambda r: fast(r) + 0.05)}
    bad = {"c1": series(rng, 20, lambda r: fast(r) + 0.15)}
    v = Judge(policy).evaluate(base, good, peers=peers)
    assert not [f for f in v.failures if f.test == "mann_whitney_vs_peers"]
    v = Judge(policy).evaluate(base, bad, peers=peers)
    assert v.overall is Outcome.FAIL
    assert any(f.test == "mann_whitney_vs_peers" and f.node == "c1" for f in v.failures)
    assert set(v.nodes) == {"c1"}  # peers are a reference, not judged


def test_verdict_json_is_complete() -> None:
    v = Judge().evaluate(fleet(1), fleet(2))
    d = v.to_json()
    assert d["overall"] == "pass" and set(d["nodes"]) == {"n1", "n2", "n3"}
    metrics = {(f["node"], f["metric"]) for f in d["findings"]}
    assert ("n1", "latency_p99") in metrics and ("n3", "error_rate") in metrics


# ================================================================== policy
def test_policy_defaults_are_fast_and_safe() -> None:
    p = AnalysisPolicy()
    assert (p.interval_s, p.alpha, p.tolerance, p.failure_limit) == (0.5, 0.02, 0.25, 2)
    assert p.on_inconclusive == "pause"
    assert p.interval_s * p.failure_limit <= 1.0  # detection budget under the 3 s target
    assert AnalysisPolicy.from_mapping(p.to_mapping()) == p


def test_policy_overrides_from_toml_and_cli() -> None:
    toml = {"interval_s": "250ms", "max_error_rate": "2%", "gauges": {"q": {"max": 5}}}
    p = AnalysisPolicy.from_mapping(toml)
    assert (p.interval_s, p.max_error_rate) == (0.25, 0.02)
    assert p.gauges == {"q": (None, 5.0)}
    cli = {"window-s": "1m", "failure-limit": "3", "judge_metrics": "latency_p50,latency_mean"}
    p2 = AnalysisPolicy.from_mapping(cli, base=p)
    assert (p2.window_s, p2.failure_limit, p2.interval_s) == (60.0, 3, 0.25)
    assert p2.judge_metrics == ("latency_p50", "latency_mean")
    p3 = AnalysisPolicy.from_mapping(
        {"min_effect": {"latency_p99": 0.05}, "fail_on_crash": "false"}
    )
    assert p3.min_effect["latency_p99"] == 0.05 and p3.min_effect["latency_p50"] == 0.005
    assert p3.fail_on_crash is False
    assert AnalysisPolicy.from_mapping(None) == AnalysisPolicy()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"max_eror_rate": 0.1},
            "unknown health policy key 'max_eror_rate' (did you mean 'max_error_rate'?)",
        ),
        ({"bogus": 1}, "unknown health policy key 'bogus'"),
        ({"interval_s": "fast"}, "interval_s: expected a duration"),
        ({"failure_limit": 1.5}, "failure_limit: expected an integer"),
        ({"failure_limit": True}, "failure_limit: expected an integer"),
        ({"fail_on_crash": 1}, "fail_on_crash: expected true or false"),
        ({"alpha": 0.7}, "alpha: must be in (0, 0.5)"),
        ({"interval_s": 0}, "interval_s: must be > 0"),
        ({"window_s": 0.1}, "window_s: must be >= interval_s"),
        ({"on_inconclusive": "promote"}, "on_inconclusive: expected one of pause, rollback"),
        ({"judge_metrics": ["latency_p95"]}, "unknown metric 'latency_p95'"),
        ({"gauges": {"q": [10, 1]}}, "gauges.q: min 10.0 > max 1.0"),
        ({"gauges": {"q": 3}}, "gauges.q: expected [min, max]"),
        ({"min_effect": {"cpu": 1}}, "min_effect: unknown metric 'cpu'"),
        ({"latency_p99_max_ratio": 0.5}, "latency_p99_max_ratio: must be >= 1 or none"),
    ],
)
def test_policy_validation_names_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError) as exc:
        AnalysisPolicy.from_mapping(overrides)
    assert message in str(exc.value)


def test_health_sampler_pauses_and_resumes_at_the_instant_it_is_given() -> None:
    """A sampling round is a burst of RPCs on every node: the leader pauses the
    sampler while a wave prepares and resumes it just after the commit instant.
    A later "resume now" does not cut that quiet short."""
    rounds: list[float] = []
    resumed = threading.Event()

    def nodes() -> list[object]:
        rounds.append(time.time())
        if len(rounds) >= 3:
            resumed.set()
        return []

    pool = AgentPool()
    sampler = HealthSampler(nodes, pool, interval_s=0.02)
    sampler.pause()
    sampler.start()
    try:
        time.sleep(0.3)
        assert rounds == []  # paused: not a single round
        resume = time.time() + 0.3
        sampler.resume_at(resume)
        sampler.resume_at(time.time())  # does not shorten the scheduled quiet
        assert resumed.wait(5), rounds
    finally:
        sampler.stop()
        pool.close()
    assert rounds[0] >= resume
