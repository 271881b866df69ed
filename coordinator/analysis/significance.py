"""The statistical judge: did a metric shift, provably and relevantly, after the upgrade?

One-sided Mann-Whitney U of the window against the baseline (or the peers)
at ``alpha``, and a Hodges-Lehmann shift beyond the tolerance, at each of the
last ``failure_limit`` evaluations; the p99 is compared over chunks of enough
requests.  A mixin of :class:`~coordinator.analysis.judge.Judge`: it reads
``self.policy``.
"""

from __future__ import annotations

import statistics

from coordinator.analysis.samples import Sample, chunked_quantiles, conclusive_samples
from coordinator.analysis.stats import MannWhitneyResult, hodges_lehmann, mann_whitney_u
from coordinator.analysis.verdict import Finding, Outcome, fmt_value
from coordinator.policy import AnalysisPolicy

__all__ = ["SignificanceChecks"]


class SignificanceChecks:
    """Mann-Whitney and Hodges-Lehmann per metric (mixed into the judge)."""

    policy: AnalysisPolicy

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
        ref = [v for v in chunked_quantiles(ref_samples, 0.99, p.min_requests_p99) if v is not None]
        obs = [v for v in chunked_quantiles(cur_samples, 0.99, p.min_requests_p99) if v is not None]
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
            f", shift +{fmt_value(metric, shift)} > tolerance {fmt_value(metric, tol)}{rel}"
            if shift is not None and shift > tol
            else f", shift {fmt_value(metric, shift)} vs tolerance {fmt_value(metric, tol)}{rel}"
            if shift is not None
            else f" (tolerance {fmt_value(metric, tol)}{rel})"
        )
        msg = (
            f"{node} {metric} median {fmt_value(metric, obs_med)} vs {against} {fmt_value(metric, ref_med)}: "
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
