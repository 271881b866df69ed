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

import multiprocessing
import statistics
import sys
import tempfile
import threading
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


def coverage_overhead(
    blocks: int = 12, per_block: int = 3000, *, cap: int | None = None, poll_s: float = 0.5
) -> dict[str, Any]:
    """p50 request time with changed-code counting on vs off, alternating blocks.

    A thread reads the report every ``poll_s`` as the Health RPC does (which
    is what retires functions past ``cap`` calls); ``cap=None`` keeps the
    agent's default, a huge cap measures the raw per-call cost.
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
            if cap is not None:
                loader.coverage.cap = cap
            prepared = loader.prepare(bl.Builds().fresh(2))
            loader.finish(prepared)
            changed = loader.changed_code()
            request = bl.make_request(app, live=True)
            guard = loader.guard
            times: dict[bool, list[int]] = {True: [], False: []}
            seq = 0
            last: list[int] = []
            ratios: list[float] = []
            stop = threading.Event()

            def poll() -> None:
                while not stop.wait(poll_s):
                    loader.coverage.report()

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            for b in range(blocks * 2):
                on = b % 4 in (0, 3)  # ABBA: drift and warm-up hit both sides alike
                if on and not loader.coverage.active:
                    loader.coverage.start(prepared.release.label, changed, prepared._instrumented)
                elif not on:
                    loader.coverage.stop()
                out = times[on]
                block: list[int] = []
                for _ in range(per_block):
                    t0 = time.perf_counter_ns()
                    with guard():
                        request(seq)
                    block.append(time.perf_counter_ns() - t0)
                    seq += 1
                out += block
                if b % 2 == 1:  # a pair done: its p50 ratio (the host's load shifts slowly)
                    prev = statistics.median(last)
                    mine = statistics.median(block)
                    ratios.append(prev / mine if not on else mine / prev)
                last = block
            stop.set()
            poller.join(5)
            report = loader.coverage.report()
            loader.coverage.stop()
        finally:
            app.unload()
    p50_on = statistics.median(times[True]) / 1e3
    p50_off = statistics.median(times[False]) / 1e3
    calls_per_request = report.calls / max(1, per_block * blocks)
    return {
        "cap": loader.coverage.cap,
        "functions_counted": len(changed),
        "functions_retired": sum(1 for f in report.functions if f.calls >= loader.coverage.cap),
        "backend": report.backend,
        "requests_per_side": per_block * blocks,
        "changed_calls_per_request": calls_per_request,
        "p50_us_on": p50_on,
        "p50_us_off": p50_off,
        "p90_us_on": statistics.quantiles(times[True], n=10)[-1] / 1e3,
        "p90_us_off": statistics.quantiles(times[False], n=10)[-1] / 1e3,
        "overhead_p50_pct": (p50_on / p50_off - 1.0) * 100.0,
        # median over adjacent on/off pairs of (p50 on / p50 off): robust to a host
        # whose load changes during the run (other processes, thermal)
        "overhead_p50_paired_pct": (statistics.median(ratios) - 1.0) * 100.0,
        "pairs": len(ratios),
    }
