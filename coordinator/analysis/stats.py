"""The statistics of the judge: rank tests, shift estimates, proportions, histograms.

Pure functions, no policy and no samples: the one-sided Mann-Whitney U test
(exact for small samples, normal approximation with tie correction beyond),
the Hodges-Lehmann shift estimate, the Wilson interval of a proportion and
the Prometheus-style quantile of a latency histogram.  :mod:`.samples` and
the judge build on them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MannWhitneyResult",
    "histogram_quantile",
    "hodges_lehmann",
    "mann_whitney_u",
    "wilson_interval",
]

_NORMAL = statistics.NormalDist()


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
