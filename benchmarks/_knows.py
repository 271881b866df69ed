"""Parts of ``run.py rollback`` for issue 14 (analysis that knows).

* :func:`coverage_overhead`: the loader benchmark's request loop (guarded
  calls into 3 of 20 generated modules) after a finish of v2, with the
  changed-code counting on and off in alternating blocks; p50 per request.
* :class:`CpuHog`: processes that spin on the CPU, competing with the fleet
  (a deploy lands on a busy host: the judge must not read that as a
  regression).
* :func:`partial_release`: shop 2.0.0 plus a new ``volume_discount`` helper
  that raises on ``failure`` of its calls (:mod:`tests.quiet_release`); its
  caller falls back to the flat discount, so no request fails: only
  changed-code coverage can see it.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import sys
import tempfile
import time
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


def coverage_overhead(
    quartets: int = 150,
    per_block: int = 100,
    *,
    cap: int | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """What changed-code counting adds to a request of the loader benchmark's loop.

    Built to resolve a few per cent on a busy host: many short blocks of
    ``per_block`` requests in ABBA quartets (on, off, off, on; the next one
    off, on, on, off), so a linear drift of the host's speed cancels inside
    each quartet.  Each block is measured two ways: the thread's *CPU time*
    per request (``CLOCK_THREAD_CPUTIME_ID``: time the thread was not running
    is not counted, so preemption by other processes does not show) and the
    *p50 of the requests' wall time* (one preempted request moves a block's
    median by one rank).  Per quartet the on/off ratio of the sums; reported:
    the median over quartets with its distribution-free ``confidence``
    interval (:func:`median_ci`).

    Counting starts and stops per block, so with the agent's call cap a
    function would retire only if a block reached it; ``cap`` (default: the
    agent's) is raised to "never" unless given: this measures the per-request
    cost *while* functions are counted, the most a request pays (the agent
    retires each function after :data:`node_agent.coverage.CALLS_CAP` calls,
    after which it costs nothing).  :func:`retirement` measures how soon that is.
    """
    import bench_loader as bl  # the loader benchmark's generated app and request loop

    from node_agent import Loader

    with tempfile.TemporaryDirectory(prefix="hotfleet-cov-") as tmp:
        app = bl.App(Path(tmp) / "root", bl.PKG)
        app.write(1, pyc=False)
        app.boot()
        app.make_counters()
        try:
            loader = Loader([app.root], drain_timeout=5.0)
            loader.coverage.cap = cap if cap is not None else 10**15
            prepared = loader.prepare(bl.Builds().fresh(2))
            loader.finish(prepared)
            changed = loader.changed_code()
            request = bl.make_request(app, live=True)
            guard = loader.guard
            coverage = loader.coverage
            label = prepared.release.label
            instrumented = prepared._instrumented
            seq = 0

            def block(on: bool) -> tuple[int, int, int]:
                nonlocal seq
                if on:
                    coverage.start(label, changed, instrumented)
                else:
                    coverage.stop()
                walls = []
                c0 = _thread_cpu_ns()
                for _ in range(per_block):
                    t0 = time.perf_counter_ns()
                    with guard():
                        request(seq)
                    walls.append(time.perf_counter_ns() - t0)
                    seq += 1
                cpu = _thread_cpu_ns() - c0
                walls.sort()
                return cpu, walls[len(walls) // 2], sum(walls)

            for on in (True, False, True, False):  # warm-up: both code paths specialised
                block(on)
            cpu_ratio: list[float] = []
            p50_ratio: list[float] = []
            sides: dict[bool, dict[str, list[int]]] = {
                True: {"cpu": [], "p50": []},
                False: {"cpu": [], "p50": []},
            }
            calls = 0
            for q in range(quartets):
                order = (True, False, False, True) if q % 2 == 0 else (False, True, True, False)
                got: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}
                for on in order:
                    got[on].append(block(on))
                    if on:
                        calls += coverage.report().calls
                for on in (True, False):
                    sides[on]["cpu"] += [g[0] for g in got[on]]
                    sides[on]["p50"] += [g[1] for g in got[on]]
                cpu_ratio.append(sum(g[0] for g in got[True]) / sum(g[0] for g in got[False]))
                p50_ratio.append(sum(g[1] for g in got[True]) / sum(g[1] for g in got[False]))
            coverage.stop()
            backend = coverage.report().backend
        finally:
            app.unload()
    cpu_med, cpu_lo, cpu_hi = median_ci(cpu_ratio, confidence)
    p50_med, p50_lo, p50_hi = median_ci(p50_ratio, confidence)
    requests_on = quartets * 2 * per_block

    def pct(x: float) -> float:
        return (x - 1.0) * 100.0

    return {
        "backend": backend,
        "python": sys.version.split()[0],
        "functions_counted": len(changed),
        "quartets": quartets,
        "requests_per_block": per_block,
        "changed_calls_per_request": calls / requests_on,
        "cpu_us_per_request_on": statistics.median(sides[True]["cpu"]) / per_block / 1e3,
        "cpu_us_per_request_off": statistics.median(sides[False]["cpu"]) / per_block / 1e3,
        "p50_us_on": statistics.median(sides[True]["p50"]) / 1e3,
        "p50_us_off": statistics.median(sides[False]["p50"]) / 1e3,
        "confidence": confidence,
        # the headline: the paired p50 ratio, median over quartets, with its interval
        "overhead_p50_pct": pct(p50_med),
        "overhead_p50_ci_pct": [pct(p50_lo), pct(p50_hi)],
        "overhead_cpu_pct": pct(cpu_med),
        "overhead_cpu_ci_pct": [pct(cpu_lo), pct(cpu_hi)],
        "ns_per_counted_call_cpu": (
            (statistics.median(sides[True]["cpu"]) - statistics.median(sides[False]["cpu"]))
            / per_block
            / max(1e-9, calls / requests_on)
        ),
    }


def retirement(cap: int | None = None, poll_s: float = 0.5, limit: int = 200_000) -> dict[str, Any]:
    """With the agent's call cap: requests of the loop until every counted function retired.

    Requests run back to back while a thread reads the report every
    ``poll_s`` (as the Health RPC does: a report is what retires a function
    past the cap); returns the requests and seconds until no function of the
    loop is counted any more (functions the loop never calls stay counted
    and cost nothing).
    """
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
            prepared = loader.prepare(bl.Builds().fresh(2))
            loader.finish(prepared)
            changed = loader.changed_code()
            request = bl.make_request(app, live=True)
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
        finally:
            app.unload()
    return {
        "cap": coverage.cap,
        "functions_ran": sum(1 for f in report.functions if f.calls),
        "functions_retired": sum(1 for f in report.functions if f.calls >= coverage.cap),
        "requests_to_retire_all": done_at[0] if done_at else None,
        "seconds_to_retire_all": done_at[1] if done_at else None,
    }
