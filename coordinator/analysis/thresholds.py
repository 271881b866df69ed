"""The judge's per-sample bounds: error rate, latency percentiles, uncaught errors, gauges.

Each check compares every sample of the window against a bound (absolute, or
relative to the baseline or the peers) and fails a node after
``failure_limit`` consecutive breaches; the error rate is judged on the
lower bound of its Wilson interval, per sample and over the window pooled.
A mixin of :class:`~coordinator.analysis.judge.Judge`: it reads ``self.policy``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from coordinator.analysis.samples import Sample, chunked_quantiles, pooled_histogram
from coordinator.analysis.stats import histogram_quantile, wilson_interval
from coordinator.analysis.verdict import Finding, Outcome, fmt_value
from coordinator.policy import AnalysisPolicy

__all__ = ["ThresholdChecks"]


class ThresholdChecks:
    """Per-sample bounds, consecutive breaches (mixed into the judge)."""

    policy: AnalysisPolicy

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
                how = f" (baseline {fmt_value('error_rate', base_rate)} + {p.max_error_rate_increase:g})"

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
                    f"{node} error_rate {fmt_value('error_rate', overall)} within bound {bound:.3g}{how}"
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
        pooled = pooled_histogram(good_base) if base_ok else None
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
            values = chunked_quantiles(cur, q, min_req)
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
                        f"{node} {metric} {fmt_value(metric, last)} within bound {bound:.3f} s{how}"
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
                        f"{node} gauge {name} {fmt_value(name, last)} within bounds {span}{why}",
                        samples=len(judged))
            )  # fmt: skip
        return out


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
