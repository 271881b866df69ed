"""Parts of ``run.py rollback`` for issue 14 (analysis that knows).

* :func:`coverage_overhead`: the loader benchmark's request loop (guarded
  calls into 3 of 20 generated modules) after a finish of v2, with the
  changed-code counting on and off in alternating segments (a counting
  session each, exact then sampled); p50 per request.
* :class:`CpuHog`: processes that spin on the CPU, competing with the fleet
  (a deploy lands on a busy host: the judge must not read that as a
  regression).
* :func:`partial_release`: shop 2.0.0 plus a new ``volume_discount`` helper
  that raises on ``failure`` of its calls (:mod:`tests.quiet_release`); its
  caller falls back to the flat discount, so no request fails: only
  changed-code coverage can see it.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hotfleet.release import Release


def partial_release(version: str, failure: float) -> Release:
    """shop ``version``: 2.0.0 with a changed path whose new helper raises on ``failure``."""
    root = str(Path(__file__).resolve().parent.parent)  # the checkout: tests/ is a package
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.quiet_release import quiet_release

    return quiet_release(Path(tempfile.mkdtemp(prefix="hotfleet-bench-")), version, failure)


def _spin(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 31 + 7) & 0xFFFF


class CpuHog:
    """``n`` processes burning CPU until :meth:`stop` (each wants a whole core)."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self.procs = [ctx.Process(target=_spin, args=(self._stop,), daemon=True) for _ in range(n)]
        for p in self.procs:
            p.start()

    def stop(self) -> None:
        self._stop.set()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Median of ``values`` and its distribution-free ``confidence`` interval.

    The interval is the pair of order statistics (k-th smallest, k-th largest)
    that the binomial(n, 1/2) distribution of "values below the median" puts
    around it: no assumption on the shape of the values (sign-test interval).
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci of nothing")
    med = statistics.median(xs)
    tail = (1.0 - confidence) / 2.0
    # largest k with P(Binomial(n, 1/2) < k) <= tail: [x_(k), x_(n-k+1)] covers >= confidence
    k, cum = 0, 0.0
    while k < n:
        nxt = cum + math.comb(n, k) / 2.0**n
        if nxt > tail:
            break
        cum, k = nxt, k + 1
    if k == 0:
        return med, xs[0], xs[-1]
    return med, xs[k - 1], xs[n - k]


def _thread_cpu_ns() -> int:
    return time.thread_time_ns()


def _quartet_ratio(on: list[int], off: list[int]) -> float:
    return statistics.median(on) / statistics.median(off)


@contextlib.contextmanager
def _switched_loop(cap: int | None, exact: int | None) -> Iterator[tuple[Any, Any, Any]]:
    """The loader benchmark's app, v1 booted and a fresh v2 finished: (loader, prepared, request)."""
    import bench_loader as bl

    from node_agent import Loader

    with tempfile.TemporaryDirectory(prefix="hotfleet-cov-") as tmp:
        app = bl.App(Path(tmp) / "root", bl.PKG)
        app.write(1, pyc=False)
        app.boot()
        app.make_counters()
        try:
            loader = Loader([app.root], drain_timeout=5.0)
            if cap is not None:
                loader.coverage.cap = cap
            if exact is not None:
                loader.coverage.exact = exact
            prepared = loader.prepare(bl.Builds().fresh(2))
            loader.finish(prepared)
            yield loader, prepared, bl.make_request(app, live=True)
        finally:
            app.unload()


def coverage_overhead(
    quartets: int = 30,
    per_block: int = 100,
    *,
    cap: int | None = None,
    confidence: float = 0.95,
    periods: int = 2,
    exact: int | None = None,
) -> dict[str, Any]:
    """What changed-code counting adds to a request of the loader benchmark's loop.

    Counting is exact for each function's first calls, then sampled (the
    agent's :class:`node_agent.coverage.Coverage`: quiet twins, and bursts of
    counting ``BURST_S`` of every ``FOLD_S``), so a counting session is
    measured as the agent runs it, from its start: ABBA quartets of
    *segments* (on, off, off, on; the next one off, on, on, off), an on
    segment being a fresh session (``coverage.start`` ... ``stop``) of
    ``FOLD_S`` + ``periods`` whole fold periods, an off segment as long.
    Each segment is cut in blocks of ``per_block`` requests; per request its
    wall time, per block the thread's *CPU time* (``CLOCK_THREAD_CPUTIME_ID``:
    preemption by other processes does not count).  Reported, each as the
    median over quartets of the paired on/off ratio with its distribution-free
    ``confidence`` interval (:func:`median_ci`):

    * ``overhead_p50_pct`` (the headline) and ``overhead_cpu_pct``: the
      *steady state while counted*: the requests after the session's first
      fold (every call-hot function sampled from then on; bursts included in
      proportion), against the off segments' requests from the same offset;
      this is what a request pays for as long as counting goes on
      (uncapped);
    * ``exact_phase_p50_pct``: the requests before the first fold, every call
      counted (what the exact phase costs, for at most ``FOLD_S``);
    * ``session_p50_pct``: the whole on segment against the whole off one.

    ``cap`` (default: the agent's) is raised to "never" unless given, so no
    function retires during the measure (the agent retires each function after
    :data:`node_agent.coverage.CALLS_CAP` calls, after which it costs nothing;
    :func:`retirement` measures how soon that is).  ``exact=0`` counts every
    call (no sampling: the cost before sampling, for comparison).
    """

    from node_agent.coverage import FOLD_S

    settle_s = FOLD_S * 1.25  # past the first fold (and its burst) of a session
    segment_s = settle_s + periods * FOLD_S

    with _switched_loop(cap if cap is not None else 10**15, exact) as (loader, prepared, request):
        changed = loader.changed_code()
        guard = loader.guard
        coverage = loader.coverage
        label = prepared.release.label
        instrumented = prepared._instrumented
        seq = 0
        calls = 0
        requests_on = 0
        estimated = False

        def segment(on: bool) -> dict[str, tuple[list[int], list[int]]]:
            """(request walls, block CPU per request) before and after ``settle_s``."""
            nonlocal seq, calls, requests_on, estimated
            coverage.stop()
            if on:
                coverage.start(label, changed, instrumented)
            parts: dict[str, tuple[list[int], list[int]]] = {
                "early": ([], []),
                "steady": ([], []),
            }
            t_start = time.perf_counter()
            n = 0
            while True:
                elapsed = time.perf_counter() - t_start
                if elapsed >= segment_s:
                    break
                walls, cpus = parts["early" if elapsed < settle_s else "steady"]
                c0 = _thread_cpu_ns()
                for _ in range(per_block):
                    t0 = time.perf_counter_ns()
                    with guard():
                        request(seq)
                    walls.append(time.perf_counter_ns() - t0)
                    seq += 1
                cpus.append((_thread_cpu_ns() - c0) // per_block)
                n += per_block
            if on:
                report = coverage.report()
                calls += report.calls
                estimated = estimated or report.estimated
                requests_on += n
                coverage.stop()
            return parts

        for on in (True, False):  # warm-up: both code paths specialised
            segment(on)
        keys = ("steady", "early", "session")
        p50_ratio: dict[str, list[float]] = {k: [] for k in keys}
        cpu_ratio: dict[str, list[float]] = {k: [] for k in keys}
        p50s: dict[bool, list[float]] = {True: [], False: []}
        cpus: dict[bool, list[float]] = {True: [], False: []}
        for q in range(quartets):
            order = (True, False, False, True) if q % 2 == 0 else (False, True, True, False)
            got: dict[bool, dict[str, tuple[list[int], list[int]]]] = {
                side: {k: ([], []) for k in keys} for side in (True, False)
            }
            for on in order:
                parts = segment(on)
                for k in ("early", "steady"):
                    for dst in (got[on][k], got[on]["session"]):
                        dst[0].extend(parts[k][0])
                        dst[1].extend(parts[k][1])
            for k in keys:
                (won, con), (woff, coff) = got[True][k], got[False][k]
                if won and woff:
                    p50_ratio[k].append(_quartet_ratio(won, woff))
                    cpu_ratio[k].append(statistics.fmean(con) / statistics.fmean(coff))
            for side in (True, False):
                p50s[side].append(statistics.median(got[side]["steady"][0]))
                cpus[side].append(statistics.fmean(got[side]["steady"][1]))
        coverage.stop()
        backend = coverage.report().backend

    def pct(x: float) -> float:
        return (x - 1.0) * 100.0

    def summary(ratios: list[float]) -> tuple[float, list[float]]:
        med, lo, hi = median_ci(ratios, confidence)
        return pct(med), [pct(lo), pct(hi)]

    p50_steady, p50_steady_ci = summary(p50_ratio["steady"])
    cpu_steady, cpu_steady_ci = summary(cpu_ratio["steady"])
    p50_early, p50_early_ci = summary(p50_ratio["early"])
    p50_session, p50_session_ci = summary(p50_ratio["session"])
    per_request = calls / max(1, requests_on)
    cpu_on, cpu_off = statistics.median(cpus[True]), statistics.median(cpus[False])
    return {
        "backend": backend,
        "python": sys.version.split()[0],
        "functions_counted": len(changed),
        "exact_calls": coverage.exact,
        "quartets": quartets,
        "requests_per_block": per_block,
        "segment_s": segment_s,
        "settle_s": settle_s,
        # calls of changed functions per request (estimated past each function's exact calls)
        "changed_calls_per_request": per_request,
        "calls_estimated": estimated,
        "cpu_us_per_request_on": cpu_on / 1e3,
        "cpu_us_per_request_off": cpu_off / 1e3,
        "p50_us_on": statistics.median(p50s[True]) / 1e3,
        "p50_us_off": statistics.median(p50s[False]) / 1e3,
        "confidence": confidence,
        # the headline: steady state while counted, paired p50 ratio, median over quartets
        "overhead_p50_pct": p50_steady,
        "overhead_p50_ci_pct": p50_steady_ci,
        "overhead_cpu_pct": cpu_steady,
        "overhead_cpu_ci_pct": cpu_steady_ci,
        # every call counted: the first fold period of a session
        "exact_phase_p50_pct": p50_early,
        "exact_phase_p50_ci_pct": p50_early_ci,
        # a whole session of FOLD_S + periods x FOLD_S
        "session_p50_pct": p50_session,
        "session_p50_ci_pct": p50_session_ci,
        "ns_per_changed_call_cpu": (cpu_on - cpu_off) / max(1e-9, per_request),
    }


def retirement(cap: int | None = None, poll_s: float = 0.5, limit: int = 200_000) -> dict[str, Any]:
    """With the agent's call cap: requests of the loop until every counted function retired.

    Requests run back to back while the report is read every ``poll_s`` (as
    the Health RPC does; the agent's fold thread retires a function past the
    cap within ``FOLD_S`` anyway); returns the requests and seconds until no function of the
    loop is counted any more (functions the loop never calls stay counted
    and cost nothing).
    """

    with _switched_loop(cap, None) as (loader, prepared, request):
        changed = loader.changed_code()
        guard = loader.guard
        coverage = loader.coverage
        coverage.start(prepared.release.label, changed, prepared._instrumented)
        t0 = time.monotonic()
        next_poll = t0 + poll_s
        seq = 0
        done_at: tuple[int, float] | None = None
        while seq < limit:
            with guard():
                request(seq)
            seq += 1
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + poll_s
                report = coverage.report()
                live = [f for f in report.functions if 0 < f.calls < coverage.cap]
                if not live:
                    done_at = (seq, now - t0)
                    break
        report = coverage.report()
        coverage.stop()
    return {
        "cap": coverage.cap,
        "functions_ran": sum(1 for f in report.functions if f.calls),
        "functions_retired": sum(1 for f in report.functions if f.calls >= coverage.cap),
        "requests_to_retire_all": done_at[0] if done_at else None,
        "seconds_to_retire_all": done_at[1] if done_at else None,
    }
