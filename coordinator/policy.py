"""The health analysis policy: every knob of the rollback window, with defaults.

One :class:`AnalysisPolicy` governs one rollout.  It starts from the defaults
below, then takes the release's ``[health]`` table (``release.toml``), then the
operator's ``coordctl upgrade`` flags, each through :meth:`AnalysisPolicy.from_mapping`,
which rejects unknown keys and wrong types with a message naming the key (a
typo in a health policy must fail the rollout before it starts, never be
silently ignored — Argo's "missing template leaves the rollout stuck" lesson).

Defaults aim at *fast and safe*: a release that breaks requests is rolled back
within about a second of the damage being provable, while a good release under
normal noise is not rolled back (the false-rollback target is zero).  Why each
default is what it is, is written next to it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "JUDGE_METRICS",
    "Action",
    "AnalysisPolicy",
    "PolicyError",
]

#: Metrics the statistical judge knows; all are "higher is worse".
#: ``latency_mean`` needs a latency sum in the health reply (absent from the
#: wire format today), so it is not judged by default.
JUDGE_METRICS: tuple[str, ...] = ("error_rate", "latency_p50", "latency_p99", "latency_mean")


class Action(enum.StrEnum):
    """What the leader does after a verdict (recorded as the window's ``analysis.action``)."""

    WAIT = "wait"  # the window goes on: sample and judge again
    PROMOTE = "promote"  # the window passed: make the release permanent
    ROLLBACK = "rollback"  # a regression (or an inconclusive end, if asked): take it back
    PAUSE = "pause"  # inconclusive: wait for the operator, still sampled and judged


_INCONCLUSIVE_ACTIONS = (Action.PAUSE, Action.ROLLBACK)


class PolicyError(ValueError):
    """A health policy key or value is wrong; the message names the key."""


def _default_min_effect() -> dict[str, float]:
    return {"error_rate": 0.01, "latency_p50": 0.005, "latency_p99": 0.010, "latency_mean": 0.005}


@dataclass(frozen=True)
class AnalysisPolicy:
    """How the leader samples and judges health during a rollout."""

    # ---------------------------------------------------------------- timing
    #: Seconds between two health samples of a node.  0.5 s: with
    #: ``failure_limit`` 2 a provable regression is seen ~1 s after it starts,
    #: which leaves room in the 3 s first-bad-request-to-rolled-back budget
    #: (Flagger's default is 60 s x threshold).  The Health RPC is a few
    #: counters, so 2 calls/s/node is cheap.
    interval_s: float = 0.5
    #: Rollback window: how long a release stays provisional.  10 s = 20
    #: samples at 0.5 s, enough for the statistical judge (>= 8 per side) while
    #: keeping a fleet upgrade short; raise it for low-traffic services.
    window_s: float = 10.0
    #: Baseline sampled before the upgrade.  Same length as the window so both
    #: sides of the Mann-Whitney test have comparable sizes.
    baseline_s: float = 10.0

    # ------------------------------------------------------------- data needs
    #: Requests a sample needs to count as conclusive.  A sample with fewer
    #: requests cannot show a node healthy (its rate and percentiles are noise);
    #: it can still show it sick (see the confidence bound on error rates).
    min_requests: int = 10
    #: Requests a sample needs before its p99 is judged against a bound: a p99
    #: of 10 requests is their maximum.  50 means >= 0.5 requests expected
    #: above the true p99, the least that makes the estimate mean something.
    min_requests_p99: int = 50
    #: Conclusive samples each side (baseline and window) needs before a node can
    #: PASS.  8 is where the Mann-Whitney normal approximation is sound; fewer
    #: is INCONCLUSIVE, never a silent pass (Argo #4479, Kayenta's mustHaveData).
    #: Consecutive intervals with fewer than ``min_requests`` are merged into
    #: one conclusive sample, not dropped: on a busy host the traffic per
    #: interval is uneven, and 150 requests in a window are evidence however
    #: the sampler happened to slice them.
    min_samples: int = 8
    #: Conclusive window samples before the statistical judge may FAIL a node.
    #: With 4 vs a 20-sample baseline the exact test reaches p = 1e-4, so a
    #: clear shift is provable after 2 s; PASS still waits for ``min_samples``.
    judge_min_samples: int = 4

    # ------------------------------------------------------------ thresholds
    #: Absolute ceiling on a node's error rate.  Judged on the lower bound of
    #: the (1 - alpha) Wilson confidence interval of the rate, not the point
    #: estimate: 1 error in 10 requests (0.10, lower bound 0.005) is not proof,
    #: 3 in 10 (lower bound 0.10) is.  This is what lets a low-traffic node fail
    #: fast on overwhelming evidence without false rollbacks on one error.
    max_error_rate: float = 0.05
    #: Allowed increase over the node's baseline error rate (absolute, in
    #: rate units): the effective bound is min(max_error_rate, baseline + this).
    #: 0.02 catches 0 % -> 3 % regressions that the 5 % ceiling would miss.
    max_error_rate_increase: float = 0.02
    #: Absolute latency bounds in seconds; off by default (app-specific).
    latency_p50_max_s: float | None = None
    latency_p99_max_s: float | None = None
    #: Relative latency bounds: sample percentile vs the baseline's percentile.
    #: Loose on purpose (1.5x median, 2x tail): thresholds catch gross breakage
    #: at once; subtler shifts are the statistical judge's job, which knows the
    #: noise.  ``None`` disables.
    latency_p50_max_ratio: float | None = 1.5
    latency_p99_max_ratio: float | None = 2.0
    #: Floor of the relative latency bounds, seconds: a 2 ms baseline doubling
    #: to 4 ms is jitter, not a regression.  25 ms is one histogram bucket
    #: width in the low range.
    latency_min_increase_s: float = 0.025
    #: The same floor for the tail: a p99 over a few dozen requests is their
    #: slowest one, and on a busy host one 35 ms request next to a 5 ms
    #: baseline is scheduling noise (it caused 3 false rollbacks in 20 good
    #: upgrades on a loaded 2-core benchmark host at 25 ms).  A gross tail
    #: regression still trips it; subtler ones are the judge's.
    latency_p99_min_increase_s: float = 0.1

    # ------------------------------------------------------ statistical judge
    #: Significance of the one-sided Mann-Whitney U test (window > baseline)
    #: and confidence (1 - alpha) of the error-rate bounds.  0.02 = Kayenta's
    #: 98 % confidence.
    alpha: float = 0.02
    #: A significant shift also has to be *relevant*: the Hodges-Lehmann shift
    #: estimate must exceed tolerance x |baseline median| (Kayenta: 0.25) ...
    tolerance: float = 0.25
    #: ... and an absolute floor per metric, so that a baseline median of 0
    #: (e.g. no errors) does not make any shift relevant.
    min_effect: Mapping[str, float] = field(default_factory=_default_min_effect)
    #: Metrics the statistical judge compares, each higher-is-worse.
    judge_metrics: tuple[str, ...] = ("error_rate", "latency_p50", "latency_p99")

    # ------------------------------------------------------------- decisions
    #: Consecutive breaching samples (or consecutive failing judge evaluations)
    #: that make a regression.  2: one sample can be a burst or a GC pause; two
    #: in a row at 0.5 s is a regression, detected in ~1 s.
    failure_limit: int = 2
    #: What an INCONCLUSIVE window ends in: "pause" (wait for the operator's
    #: promote/rollback; Argo's inconclusive -> paused) or "rollback".  Never pass.
    on_inconclusive: Action = Action.PAUSE
    #: Application gauge bounds, name -> (min, max); either side may be None.
    #: The names ``rss_bytes`` and ``cpu_util`` (CPU seconds per second) refer
    #: to the process metrics when the app has no gauge of that name.
    gauges: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    #: A worker that restarts (a counter went backwards) during the window is a
    #: regression: it came back on the permanent release, and crashed first.
    fail_on_crash: bool = True
    #: A node whose membership lease expires during the window is a regression.
    fail_on_lease_loss: bool = True
    #: Uncaught exceptions (thread/loop crashes) a node may have in the window
    #: beyond what its baseline rate predicts.  0: a new crashing thread fails.
    max_uncaught: int = 0
    #: Seconds every smoke check may take on a node; a timeout is a failure.
    smoke_timeout_s: float = 5.0

    # ------------------------------------------------------- changed code
    #: Bound on the share of a changed (or added) function's calls that raise,
    #: pooled over the upgraded nodes and judged on the lower bound of its
    #: (1 - alpha) Wilson interval, so 3 raising calls of 3 already prove it
    #: and 1 of 10 never does.  0.2: a function failing half its calls is a
    #: regression even when it serves 5 % of requests and the app's overall
    #: error rate stays under its own bound; code that raises as control flow
    #: on purpose (validators) sets this higher or ``none``.
    changed_code_max_error_rate: float | None = 0.2
    #: Share of the changed functions that must have run at least once (on
    #: any upgraded node) before the window may pass; below it the window is
    #: INCONCLUSIVE (pause), never a silent pass.  0: not required.
    changed_code_min_ran: float = 0.0
    #: Calls of changed code (all functions, all nodes) the window needs to pass.
    changed_code_min_calls: int = 0

    # ---------------------------------------------------------- contention
    #: Judge latency against the nodes still on the old release (waves), when
    #: they have ``min_samples`` conclusive samples, instead of the baseline:
    #: they share the host's contention of the same moment, the baseline does not.
    latency_vs_peers: bool = True
    #: Host CPU busy share (all cores, steal included) at or above which a
    #: sample counts as saturated.  A node saturated in at least half of the
    #: window while its own CPU per request stayed within
    #: ``cpu_per_request_tolerance`` of the baseline was slowed down by others
    #: (the deploy, a neighbour), not by the release: its latency findings are
    #: INCONCLUSIVE, never FAIL.  ``none`` disables.
    cpu_saturation: float | None = 0.9
    #: Relative rise of the worker's CPU seconds per request that marks the
    #: release itself as doing more work (a CPU regression is never excused).
    cpu_per_request_tolerance: float = 0.5

    def __post_init__(self) -> None:
        _check(self)

    # -------------------------------------------------------------- overrides
    @classmethod
    def from_mapping(
        cls, overrides: Mapping[str, Any] | None, base: AnalysisPolicy | None = None
    ) -> AnalysisPolicy:
        """``base`` (default: the defaults) with ``overrides`` applied and validated.

        Keys are field names; ``-`` is accepted for ``_`` (CLI spelling).  Values
        may be TOML/JSON types or strings as typed on a command line: durations
        (``*_s`` keys) as ``"500ms"``, ``"10s"``, ``"2m"``; rates as ``"5%"``.
        ``None`` or an empty mapping returns ``base`` unchanged.
        """
        policy = base if base is not None else cls()
        if not overrides:
            return policy
        if not isinstance(overrides, Mapping):
            raise PolicyError(f"health policy must be a table of key = value, got {overrides!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for raw_key, raw in overrides.items():
            key = str(raw_key).replace("-", "_")
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PolicyError(f"unknown health policy key {raw_key!r}{hint}")
            changes[key] = _PARSERS[key](key, raw, getattr(policy, key))
        try:
            return dataclasses.replace(policy, **changes)
        except PolicyError:
            raise
        except (TypeError, ValueError) as exc:  # pragma: no cover - the parsers cover types
            raise PolicyError(str(exc)) from exc

    def to_mapping(self) -> dict[str, Any]:
        """JSON-able form (for the rollout record); ``from_mapping`` reads it back."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def effect_floor(self, metric: str) -> float:
        return float(self.min_effect.get(metric, 0.0))


# ---------------------------------------------------------------- validation
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# Parsers of a number typed as text: each returns None when the text is not one.
def _plain_text(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _rate_text(text: str) -> float | None:
    """A rate: ``0.05`` or ``5%``."""
    if text.endswith("%"):
        try:
            return float(text[:-1]) / 100.0
        except ValueError:
            return None
    return _plain_text(text)


def _duration_text(text: str) -> float | None:
    """Seconds: ``0.5``, ``500ms``, ``10s``, ``2m``, ``1h``."""
    m = _DURATION.match(text)
    return float(m.group(1)) * _UNIT[m.group(2)] if m else None


def _number(
    key: str, raw: Any, text: Callable[[str], float | None] = _plain_text, what: str = "a number"
) -> float:
    if isinstance(raw, bool):
        raise PolicyError(f"health policy {key}: expected a number, got {raw!r}")
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        value = text(raw.strip())
        if value is not None:
            return value
    raise PolicyError(f"health policy {key}: expected {what}, got {raw!r}")


_DURATION_WHAT = "a duration (e.g. 0.5, '500ms', '10s')"


def _integer(key: str, raw: Any) -> int:
    if isinstance(raw, bool):
        raise PolicyError(f"health policy {key}: expected an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw.strip())
    raise PolicyError(f"health policy {key}: expected an integer, got {raw!r}")


def _boolean(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in {"true", "false", "yes", "no", "1", "0"}:
        return raw.strip().lower() in {"true", "yes", "1"}
    raise PolicyError(f"health policy {key}: expected true or false, got {raw!r}")


def _bound_pair(key: str, name: str, raw: Any) -> tuple[float | None, float | None]:
    where = f"health policy {key}.{name}"
    if isinstance(raw, Mapping):
        extra = set(raw) - {"min", "max"}
        if extra:
            raise PolicyError(f"{where}: unknown key(s) {sorted(extra)}; use min and max")
        lo_raw, hi_raw = raw.get("min"), raw.get("max")
    elif isinstance(raw, list | tuple) and len(raw) == 2:
        lo_raw, hi_raw = raw
    else:
        raise PolicyError(f"{where}: expected [min, max] or {{min = .., max = ..}}, got {raw!r}")
    # a gauge named ``*_s`` holds seconds: its bounds may be written as durations
    text, what = (
        (_duration_text, _DURATION_WHAT) if name.endswith("_s") else (_plain_text, "a number")
    )
    lo = None if lo_raw is None else _number(f"{key}.{name}", lo_raw, text, what)
    hi = None if hi_raw is None else _number(f"{key}.{name}", hi_raw, text, what)
    if lo is None and hi is None:
        raise PolicyError(f"{where}: needs a min or a max")
    if lo is not None and hi is not None and lo > hi:
        raise PolicyError(f"{where}: min {lo} > max {hi}")
    return (lo, hi)


# ------------------------------------------------------- a parser per field
# Each takes (key, raw value, current value) and returns the field's new value.
_Parser = Callable[[str, Any, Any], Any]


def _plain_number(key: str, raw: Any, _current: Any) -> float:
    return _number(key, raw)


def _rate(key: str, raw: Any, _current: Any) -> float:
    return _number(key, raw, _rate_text)


def _duration(key: str, raw: Any, _current: Any) -> float:
    return _number(key, raw, _duration_text, _DURATION_WHAT)


def _count(key: str, raw: Any, _current: Any) -> int:
    return _integer(key, raw)


def _flag(key: str, raw: Any, _current: Any) -> bool:
    return _boolean(key, raw)


def _optional(parse: _Parser) -> _Parser:
    """``parse``, or None for ``none``, ``off``, an empty string or false (the check is off)."""

    def parse_optional(key: str, raw: Any, current: Any) -> Any:
        if (
            raw is None
            or raw is False
            or (isinstance(raw, str) and raw.strip().lower() in {"none", "off", ""})
        ):
            return None
        return parse(key, raw, current)

    return parse_optional


def _gauges(key: str, raw: Any, _current: Any) -> dict[str, tuple[float | None, float | None]]:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"health policy gauges: expected a table name = [min, max], got {raw!r}")
    return {str(n): _bound_pair(key, str(n), v) for n, v in raw.items()}


def _min_effect(_key: str, raw: Any, current: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"health policy min_effect: expected a table metric = value, got {raw!r}")
    merged = dict(current)
    for metric, v in raw.items():
        if metric not in JUDGE_METRICS:
            raise PolicyError(
                f"health policy min_effect: unknown metric {metric!r}; known: {', '.join(JUDGE_METRICS)}"
            )
        merged[str(metric)] = _number(f"min_effect.{metric}", v)
    return merged


def _judge_metrics(_key: str, raw: Any, _current: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise PolicyError(
            f"health policy judge_metrics: expected a list of metric names, got {raw!r}"
        )
    names = tuple(str(m).strip() for m in items if str(m).strip())
    for m in names:
        if m not in JUDGE_METRICS:
            raise PolicyError(
                f"health policy judge_metrics: unknown metric {m!r}; known: {', '.join(JUDGE_METRICS)}"
            )
    return names


def _inconclusive_action(_key: str, raw: Any, _current: Any) -> Action:
    if raw not in _INCONCLUSIVE_ACTIONS:
        raise PolicyError(
            f"health policy on_inconclusive: expected one of {', '.join(_INCONCLUSIVE_ACTIONS)}, got {raw!r}"
        )
    return Action(raw)


_PARSERS: dict[str, _Parser] = {
    "interval_s": _duration,
    "window_s": _duration,
    "baseline_s": _duration,
    "min_requests": _count,
    "min_requests_p99": _count,
    "min_samples": _count,
    "judge_min_samples": _count,
    "max_error_rate": _rate,
    "max_error_rate_increase": _rate,
    "latency_p50_max_s": _optional(_duration),
    "latency_p99_max_s": _optional(_duration),
    "latency_p50_max_ratio": _optional(_plain_number),
    "latency_p99_max_ratio": _optional(_plain_number),
    "latency_min_increase_s": _duration,
    "latency_p99_min_increase_s": _duration,
    "alpha": _rate,
    "tolerance": _rate,
    "min_effect": _min_effect,
    "judge_metrics": _judge_metrics,
    "failure_limit": _count,
    "on_inconclusive": _inconclusive_action,
    "gauges": _gauges,
    "fail_on_crash": _flag,
    "fail_on_lease_loss": _flag,
    "max_uncaught": _count,
    "smoke_timeout_s": _duration,
    "changed_code_max_error_rate": _optional(_rate),
    "changed_code_min_ran": _rate,
    "changed_code_min_calls": _count,
    "latency_vs_peers": _flag,
    "cpu_saturation": _optional(_rate),
    "cpu_per_request_tolerance": _rate,
}
if set(_PARSERS) != {f.name for f in dataclasses.fields(AnalysisPolicy)}:  # pragma: no cover
    raise AssertionError("every AnalysisPolicy field needs exactly one parser in _PARSERS")


def _check(p: AnalysisPolicy) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise PolicyError(f"health policy {key}: {what}, got {getattr(p, key)!r}")

    def finite(x: float) -> bool:
        return isinstance(x, int | float) and math.isfinite(x)

    for key in ("interval_s", "window_s", "smoke_timeout_s"):
        need(finite(getattr(p, key)) and getattr(p, key) > 0, key, "must be > 0 seconds")
    need(finite(p.baseline_s) and p.baseline_s >= 0, "baseline_s", "must be >= 0 seconds")
    need(p.window_s >= p.interval_s, "window_s", f"must be >= interval_s ({p.interval_s})")
    for key in (
        "min_requests",
        "min_requests_p99",
        "min_samples",
        "judge_min_samples",
        "failure_limit",
    ):
        need(getattr(p, key) >= 1, key, "must be >= 1")
    need(p.changed_code_min_calls >= 0, "changed_code_min_calls", "must be >= 0")
    need(
        finite(p.changed_code_min_ran) and 0 <= p.changed_code_min_ran <= 1,
        "changed_code_min_ran",
        "must be in [0, 1]",
    )
    for key in ("changed_code_max_error_rate", "cpu_saturation"):
        v = getattr(p, key)
        need(v is None or (finite(v) and 0 < v <= 1), key, "must be in (0, 1] or none")
    need(
        finite(p.cpu_per_request_tolerance) and p.cpu_per_request_tolerance >= 0,
        "cpu_per_request_tolerance",
        "must be >= 0",
    )
    need(p.max_uncaught >= 0, "max_uncaught", "must be >= 0")
    need(
        p.judge_min_samples <= p.min_samples,
        "judge_min_samples",
        f"must be <= min_samples ({p.min_samples})",
    )
    need(0 < p.max_error_rate <= 1, "max_error_rate", "must be in (0, 1]")
    need(0 <= p.max_error_rate_increase <= 1, "max_error_rate_increase", "must be in [0, 1]")
    need(0 < p.alpha < 0.5, "alpha", "must be in (0, 0.5)")
    need(finite(p.tolerance) and p.tolerance >= 0, "tolerance", "must be >= 0")
    for key in ("latency_min_increase_s", "latency_p99_min_increase_s"):
        v = getattr(p, key)
        need(finite(v) and v >= 0, key, "must be >= 0")
    for key in ("latency_p50_max_s", "latency_p99_max_s"):
        v = getattr(p, key)
        need(v is None or (finite(v) and v > 0), key, "must be > 0 seconds or none")
    for key in ("latency_p50_max_ratio", "latency_p99_max_ratio"):
        v = getattr(p, key)
        need(v is None or (finite(v) and v >= 1), key, "must be >= 1 or none")
    need(
        p.on_inconclusive in _INCONCLUSIVE_ACTIONS,
        "on_inconclusive",
        f"must be one of {tuple(a.value for a in _INCONCLUSIVE_ACTIONS)}",
    )
    for m in p.judge_metrics:
        need(m in JUDGE_METRICS, "judge_metrics", f"unknown metric {m!r}")
    for m, v in p.min_effect.items():
        need(m in JUDGE_METRICS and finite(v) and v >= 0, "min_effect", f"bad entry {m!r} = {v!r}")
