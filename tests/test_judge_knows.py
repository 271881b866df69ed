"""The judge tells contention from regression, and judges the changed code itself.

Synthetic samples only (no processes): each case builds the evidence a real
window would give and checks the verdict, so a judge that blamed contention
on the release, or missed a broken changed function hidden under a low
overall error rate, fails here.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from coordinator.analysis import ChangedCode, FunctionRuns, Judge, Outcome, Sample
from coordinator.policy import AnalysisPolicy, PolicyError

CORES = 2.0


def node_series(
    seed: int,
    n: int = 20,
    *,
    median_s: float = 0.004,
    per: int = 40,
    busy: float = 0.4,
    cpu_per_request_s: float = 0.001,
    err: float = 0.0,
) -> list[Sample]:
    """``n`` 0.5 s samples: lognormal latencies, host CPU ``busy`` share, worker CPU."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lat = [rng.lognormvariate(math.log(median_s), 0.3) for _ in range(per)]
        errors = sum(rng.random() < err for _ in range(per))
        out.append(
            Sample.from_latencies(
                lat,
                errors=errors,
                t=0.5 * (i + 1),
                cpu_s=per * cpu_per_request_s * rng.uniform(0.9, 1.1),
                host_busy_s=0.5 * CORES * busy,
                host_total_s=0.5 * CORES,
            )
        )
    return out


def latency_failures(verdict: object) -> list[str]:
    return [f.metric for f in verdict.failures if f.metric.startswith("latency")]  # type: ignore[attr-defined]


# ============================================================== contention
def test_latency_rise_on_a_saturated_host_with_unchanged_work_is_contention() -> None:
    base = {"n1": node_series(1)}
    # 5x slower, every sample with the host pegged, same CPU per request
    cur = {"n1": node_series(2, median_s=0.02, busy=0.99)}
    v = Judge().evaluate(base, cur)
    assert latency_failures(v) == []
    assert v.overall is Outcome.INCONCLUSIVE  # never a pass on this evidence either
    excused = [f for f in v.findings if "contention, not the release" in f.message]
    assert excused and all(f.verdict is Outcome.INCONCLUSIVE for f in excused)
    assert "CPU per request" in excused[0].message


def test_same_rise_without_saturation_is_a_regression() -> None:
    base = {"n1": node_series(1)}
    cur = {"n1": node_series(2, median_s=0.02, busy=0.5)}  # e.g. a sleep or a lock
    v = Judge().evaluate(base, cur)
    assert v.overall is Outcome.FAIL and latency_failures(v)


def test_saturation_caused_by_more_work_per_request_is_not_excused() -> None:
    base = {"n1": node_series(1)}
    cur = {"n1": node_series(2, median_s=0.02, busy=0.99, cpu_per_request_s=0.004)}
    v = Judge().evaluate(base, cur)
    assert v.overall is Outcome.FAIL and latency_failures(v)
    assert not any("contention" in f.message for f in v.failures)


def test_a_short_burst_of_saturation_excuses_nothing() -> None:
    base = {"n1": node_series(1)}
    cur = node_series(2, median_s=0.02, busy=0.5)
    cur[:4] = node_series(3, n=4, median_s=0.02, busy=0.99)  # 4 of 20 samples saturated
    v = Judge().evaluate(base, {"n1": cur})
    assert v.overall is Outcome.FAIL and latency_failures(v)


def test_contention_switch_off_makes_the_rise_fail() -> None:
    policy = AnalysisPolicy.from_mapping({"cpu_saturation": "none"})
    v = Judge(policy).evaluate(
        {"n1": node_series(1)}, {"n1": node_series(2, median_s=0.02, busy=0.99)}
    )
    assert v.overall is Outcome.FAIL


def test_latency_judged_against_peers_of_the_same_moment() -> None:
    """A wave: the whole host got slower (peers too); the canary is like its peers -> no failure."""
    base = {"c1": node_series(1)}
    peers = {p: node_series(10 + i, median_s=0.012, busy=0.6) for i, p in enumerate(("p1", "p2"))}
    same = {"c1": node_series(2, median_s=0.012, busy=0.6)}
    v = Judge().evaluate(base, same, peers=peers)
    assert latency_failures(v) == [] and v.overall is Outcome.PASS
    assert any("peers" in f.message for f in v.findings if f.metric == "latency_p50")
    worse = {"c1": node_series(3, median_s=0.04, busy=0.6)}
    v = Judge().evaluate(base, worse, peers=peers)
    assert v.overall is Outcome.FAIL and latency_failures(v)


def test_tail_judged_on_chunks_with_a_minimum_sample() -> None:
    """15-request samples: a per-sample p99 is the slowest request; chunks of >= 50 are judged."""
    rng = random.Random(5)

    def thin(seed: int, slow_every: int) -> list[Sample]:
        r = random.Random(seed)
        out = []
        for i in range(20):
            lat = [r.lognormvariate(math.log(0.002), 0.3) for _ in range(15)]
            if i % slow_every == 0:
                lat[0] = 0.03  # one scheduling hiccup now and then
            out.append(Sample.from_latencies(lat, t=0.5 * (i + 1), cpu_s=0.015))
        return out

    base = {"n1": thin(rng.randrange(1000), 5)}
    cur = {"n1": thin(rng.randrange(1000), 2)}  # more hiccups, same service
    v = Judge().evaluate(base, cur)
    p99 = [f for f in v.findings if f.metric == "latency_p99" and f.test == "mann_whitney"]
    assert p99 and p99[0].verdict is not Outcome.FAIL
    assert "chunks" in p99[0].message or p99[0].samples <= 6


# ============================================================ changed code
def changed(node: str, *functions: tuple[str, int, int], release: str = "shop@2") -> ChangedCode:
    return ChangedCode(
        release, True, tuple(FunctionRuns(n, "changed", c, r) for n, c, r in functions)
    )


def test_changed_function_raising_on_most_calls_fails_under_a_low_error_rate() -> None:
    base = {n: node_series(i) for i, n in enumerate(("n1", "n2", "n3"))}
    cur = {n: node_series(10 + i, err=0.01) for i, n in enumerate(("n1", "n2", "n3"))}
    cov = {
        "n1": changed("n1", ("shop.pricing:quote", 8, 4), ("shop.cart:add", 300, 0)),
        "n2": changed("n2", ("shop.pricing:quote", 6, 3), ("shop.cart:add", 280, 0)),
        "n3": changed("n3", ("shop.pricing:quote", 7, 4), ("shop.cart:add", 310, 0)),
    }
    v = Judge().evaluate(base, cur, changed=cov, release="shop@2")
    assert v.overall is Outcome.FAIL
    fail = v.failures[0]
    assert fail.metric == "changed:shop.pricing:quote" and fail.test == "changed_code"
    assert "raised on 11 of 21 calls" in v.reason and "n1 4/8" in v.reason
    assert not [f for f in v.failures if f.metric == "error_rate"]  # the app rate hid it
    assert v.changed_code is not None and v.changed_code["raising"][0]["raised"] == 11


def test_occasional_raise_of_changed_code_is_not_a_regression() -> None:
    base = {"n1": node_series(1)}
    cur = {"n1": node_series(2)}
    cov = {"n1": changed("n1", ("m:f", 40, 3))}
    v = Judge().evaluate(base, cur, changed=cov, release="shop@2")
    assert v.overall is Outcome.PASS
    assert v.changed_code is not None and v.changed_code["raising"] == [
        {"name": "m:f", "calls": 40, "raised": 3}
    ]


def test_estimated_calls_are_judged_and_labelled_as_estimates() -> None:
    """Sampled functions report estimated calls (exact raises): judged the same, said so."""
    from coordinator.render_analysis import analysis_extras

    base = {"n1": node_series(1)}
    cur = {"n1": node_series(2)}
    runs = (
        FunctionRuns("m:hot", "changed", 4000, 2100, estimated=True),
        FunctionRuns("m:cold", "changed", 3, 0),
    )
    v = Judge().evaluate(
        base, cur, changed={"n1": ChangedCode("shop@2", True, runs)}, release="shop@2"
    )
    assert v.overall is Outcome.FAIL and v.failures[0].metric == "changed:m:hot"
    assert "raised on 2100 of ~4000 calls" in v.reason
    assert v.changed_code is not None and v.changed_code["calls_estimated"] == ["m:hot"]
    lines = "\n".join(analysis_extras(v.to_json()))
    assert "~4003 calls" in lines and "calls estimated" in lines and "m:hot" in lines
    exact = (FunctionRuns("m:hot", "changed", 4000, 0), FunctionRuns("m:cold", "changed", 3, 0))
    v = Judge().evaluate(
        base, cur, changed={"n1": ChangedCode("shop@2", True, exact)}, release="shop@2"
    )
    assert v.changed_code is not None and v.changed_code["calls_estimated"] == []
    assert "~" not in v.reason


def test_coverage_of_another_release_is_ignored() -> None:
    cov = {"n1": changed("n1", ("m:f", 40, 40), release="shop@1")}
    v = Judge().evaluate(
        {"n1": node_series(1)}, {"n1": node_series(2)}, changed=cov, release="shop@2"
    )
    assert v.overall is Outcome.PASS and v.changed_code is None


def test_minimum_coverage_makes_an_unexercised_release_inconclusive() -> None:
    policy = AnalysisPolicy.from_mapping(
        {"changed_code_min_ran": "100%", "changed_code_min_calls": 5}
    )
    cov = {"n1": changed("n1", ("m:used", 30, 0), ("m:never", 0, 0))}
    v = Judge(policy).evaluate(
        {"n1": node_series(1)}, {"n1": node_series(2)}, changed=cov, release="shop@2"
    )
    assert v.overall is Outcome.INCONCLUSIVE
    assert "1 of 2 functions ran" in v.reason and "m:never" in v.reason
    assert v.changed_code is not None and v.changed_code["never_ran"] == ["m:never"]
    cov = {"n1": changed("n1", ("m:used", 30, 0), ("m:never", 1, 0))}
    v = Judge(policy).evaluate(
        {"n1": node_series(1)}, {"n1": node_series(2)}, changed=cov, release="shop@2"
    )
    assert v.overall is Outcome.PASS
    # required, but no node reported any coverage: inconclusive, never a silent pass
    v = Judge(policy).evaluate(
        {"n1": node_series(1)}, {"n1": node_series(2)}, changed={}, release="shop@2"
    )
    assert v.overall is Outcome.INCONCLUSIVE and "no upgraded node reported" in v.reason


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"changed_code_max_error_rate": 2}, "changed_code_max_error_rate"),
        ({"changed_code_min_ran": "150%"}, "changed_code_min_ran"),
        ({"changed_code_min_calls": -1}, "changed_code_min_calls"),
        ({"cpu_saturation": 0}, "cpu_saturation"),
        ({"latency_vs_peers": "maybe"}, "latency_vs_peers"),
    ],
)
def test_new_knobs_are_validated_naming_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        AnalysisPolicy.from_mapping(overrides)


def test_new_knobs_parse_from_toml_and_cli_spellings() -> None:
    p = AnalysisPolicy.from_mapping(
        {
            "changed-code-max-error-rate": "35%",
            "cpu_saturation": "none",
            "changed_code_min_calls": "10",
        }
    )
    assert p.changed_code_max_error_rate == pytest.approx(0.35)
    assert p.cpu_saturation is None and p.changed_code_min_calls == 10
    assert AnalysisPolicy.from_mapping(p.to_mapping()) == p


# ===================================================== starved load, busy host
def test_thin_intervals_are_merged_not_dropped() -> None:
    # a starved load generator: 7 requests per 0.5 s interval, 140 in the window;
    # judged per interval none would count (min_requests 10) and the window paused
    base = {"n1": node_series(1, per=7)}
    cur = {"n1": node_series(2, per=7)}
    v = Judge().evaluate(base, cur)
    assert v.overall is Outcome.PASS, v.reason
    # the same trickle still shows a latency regression ...
    slow = {"n1": node_series(3, per=7, median_s=0.02, busy=0.5)}
    v = Judge().evaluate(base, slow)
    assert v.overall is Outcome.FAIL and latency_failures(v), v.reason
    # ... and a release failing 40 % of its requests
    bad = {"n1": node_series(4, per=7, err=0.4)}
    v = Judge().evaluate(base, bad)
    assert v.overall is Outcome.FAIL and v.failures[0].metric == "error_rate", v.reason


def test_truly_too_little_traffic_still_pauses() -> None:
    base = {"n1": node_series(1, per=2)}  # 40 requests in 10 s: 4 merged samples of 10
    cur = {"n1": node_series(2, per=2)}
    v = Judge().evaluate(base, cur)
    assert v.overall is Outcome.INCONCLUSIVE and "too little traffic" in v.reason


def test_conclusive_samples_keep_every_request() -> None:
    from coordinator.analysis import conclusive_samples

    samples = node_series(1, n=10, per=4)  # 40 requests
    merged = conclusive_samples(samples, 10)
    assert [s.requests for s in merged] == [12, 12, 16]  # the last 4 join the last chunk
    assert sum(sum(s.latency_counts) for s in merged) == 40
    assert math.isclose(sum(s.duration_s for s in merged), 5.0)
    assert conclusive_samples(node_series(1, n=2, per=40), 10) == node_series(1, n=2, per=40)


def test_lease_lost_while_answering_health_is_not_a_node_down() -> None:
    from coordinator.analysis import Event, EventKind

    base, cur = {"n1": node_series(1)}, {"n1": node_series(2)}
    last = cur["n1"][-1].t
    starved = Event("n1", EventKind.LEASE_LOST, "its membership lease expired", last + 0.4)
    v = Judge().evaluate(base, cur, [starved])
    assert v.overall is Outcome.INCONCLUSIVE, v.reason  # never a pass while it is away
    assert "keepalive starved" in v.reason
    # a node that stopped answering (it died a lease TTL before) is down
    dead = Event("n1", EventKind.LEASE_LOST, "its membership lease expired", last + 3.5)
    v = Judge().evaluate(base, cur, [dead])
    assert v.overall is Outcome.FAIL and v.failures[0].metric == "lease_lost"
    # no samples at all: no evidence it is alive
    v = Judge().evaluate(base, {"n1": []}, [dead])
    assert v.overall is Outcome.FAIL


def test_tail_only_spike_on_a_saturated_host_passes_a_median_shift_does_not() -> None:
    base = {"n1": node_series(1, busy=0.95)}
    rng = random.Random(9)
    cur = []
    for s in node_series(2, busy=0.99):
        # the same median, and 3 of 40 requests stuck behind the CPU hogs for 0.3-0.5 s
        lat = [rng.lognormvariate(math.log(0.004), 0.3) for _ in range(37)]
        lat += [rng.uniform(0.3, 0.5) for _ in range(3)]
        cur.append(
            Sample.from_latencies(lat, t=s.t, cpu_s=s.cpu_s, host_busy_s=s.host_busy_s,
                                  host_total_s=s.host_total_s)
        )  # fmt: skip
    v = Judge().evaluate(base, {"n1": cur})
    assert v.overall is Outcome.PASS, v.reason
    tail = [
        f for f in v.findings if f.metric == "latency_p99" and "tail is the host's" in f.message
    ]
    assert tail
    # without saturation the same tail is a regression
    calm = [dataclasses.replace(s, host_busy_s=0.4 * s.host_total_s) for s in cur]
    assert Judge().evaluate(base, {"n1": calm}).overall is Outcome.FAIL
    # a median shift on the saturated host stays inconclusive (a sleep: 2.3.0-slow)
    slow = {"n1": node_series(3, median_s=0.084, busy=0.99)}
    v = Judge().evaluate(base, slow)
    assert v.overall is Outcome.INCONCLUSIVE, v.reason
