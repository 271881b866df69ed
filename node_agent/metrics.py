"""Health counters of one worker process, for the Health RPC and Prometheus.

Everything is cumulative since the process started (the coordinator diffs
snapshots, so a lost reply loses nothing).  Sources:

* requests through the drain middleware (:meth:`Metrics.observe` is its
  observer): count, errors (an exception escaped, or a 5xx status) and a
  latency histogram with fixed bucket bounds;
* the process: CPU time (``resource``), resident set size (``/proc``);
* uncaught exceptions, counted by chained ``sys.excepthook`` and
  ``threading.excepthook`` (the previous hooks still run);
* gauges the application sets with :meth:`Metrics.set_gauge`.

The Prometheus text exposition format is written by hand: it is a few lines
and saves every worker a dependency.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from hotfleet.protocol import LATENCY_BOUNDS_S
from node_agent.drain import RequestRecord

__all__ = [
    "LATENCY_BOUNDS_S",
    "HealthSnapshot",
    "HostCpu",
    "Metrics",
    "PrometheusCollector",
    "host_cpu",
    "process_cpu_s",
    "process_rss_bytes",
]


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

log = logging.getLogger(__name__)

# Every thread hotfleet starts is named with this prefix: its crash is ours.
OWN_THREAD_PREFIX = "hotfleet-"


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        # Not Linux: the peak is the best the stdlib offers (KiB on Linux, bytes on macOS).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class HostCpu:
    """Cumulative CPU seconds of the whole host (every core) since boot."""

    busy_s: float = 0.0  # not idle and not waiting for I/O; steal included
    total_s: float = 0.0
    steal_s: float = 0.0


def host_cpu() -> HostCpu:
    """The host's CPU counters from ``/proc/stat`` (zeros where there is none).

    The process's own CPU says how much work the worker did; only the host's
    says whether the worker had to wait for a core (other workers preparing,
    a noisy neighbour, a hypervisor stealing), which is what separates
    contention from a slower release when latency rises.
    """
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return HostCpu()
    if len(fields) < 5 or fields[0] != b"cpu":
        return HostCpu()
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    ticks += [0] * (8 - len(ticks))
    total = sum(ticks)  # guest time is already inside user
    idle = ticks[3] + ticks[4]
    return HostCpu((total - idle) / _CLK_TCK, total / _CLK_TCK, ticks[7] / _CLK_TCK)


@dataclass(frozen=True)
class HealthSnapshot:
    requests: int
    errors: int
    latency_bounds_s: tuple[float, ...]
    latency_counts: tuple[int, ...]  # one more than the bounds: the last is +Inf
    latency_sum_s: float
    cpu_s: float
    rss_bytes: int
    uncaught: int
    gauges: Mapping[str, float] = field(default_factory=dict)
    uptime_s: float = 0.0
    host: HostCpu = field(default_factory=HostCpu)


class Metrics:
    """Thread-safe counters; one instance per agent."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_S) -> None:
        if list(bounds) != sorted(bounds):
            raise ValueError("latency bounds must ascend")
        self.bounds = tuple(bounds)
        self._lock = threading.Lock()
        self._requests = 0
        self._errors = 0
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._uncaught = 0
        self.internal_errors = 0  # crashes of hotfleet's own threads (bugs, not the app's)
        self._gauges: dict[str, float] = {}
        self._started = time.monotonic()
        self._hooks: tuple[Any, Any, Any, Any] | None = None

    # -------------------------------------------------------------- sources
    def observe(self, record: RequestRecord) -> None:
        """Drain middleware observer: one finished request."""
        failed = record.error is not None or (record.status is not None and record.status >= 500)
        index = bisect.bisect_left(self.bounds, record.duration_s)
        with self._lock:
            self._requests += 1
            self._errors += failed
            self._counts[index] += 1
            self._sum += record.duration_s

    def set_gauge(self, name: str, value: float) -> None:
        value = float(value)
        if not name or not math.isfinite(value):
            raise ValueError(f"gauge {name!r} needs a name and a finite value, got {value!r}")
        with self._lock:
            self._gauges[name] = value

    def count_uncaught(self) -> None:
        with self._lock:
            self._uncaught += 1

    def count_internal_error(self) -> None:
        with self._lock:
            self.internal_errors += 1

    def install_excepthooks(self) -> None:
        """Count exceptions that escape every handler; the previous hooks still run."""
        if self._hooks is not None:
            return
        prev_sys, prev_thread = sys.excepthook, threading.excepthook

        def sys_hook(
            kind: type[BaseException], value: BaseException, tb: TracebackType | None
        ) -> None:
            self.count_uncaught()
            prev_sys(kind, value, tb)

        def thread_hook(args: threading.ExceptHookArgs) -> None:
            if issubclass(args.exc_type, SystemExit):
                pass
            elif args.thread is not None and args.thread.name.startswith(OWN_THREAD_PREFIX):
                # hotfleet's own thread crashed: a bug of ours, logged as one and
                # counted apart, never an app error that could fail the judge
                self.count_internal_error()
                log.error(
                    "hotfleet bug: thread %s crashed (%s: %s); please report it",
                    args.thread.name,
                    args.exc_type.__name__,
                    args.exc_value,
                )
            else:
                self.count_uncaught()
            prev_thread(args)

        sys.excepthook, threading.excepthook = sys_hook, thread_hook
        self._hooks = (prev_sys, prev_thread, sys_hook, thread_hook)

    def uninstall_excepthooks(self) -> None:
        """Restore the previous hooks, unless someone chained on top of ours since."""
        if self._hooks is None:
            return
        prev_sys, prev_thread, mine_sys, mine_thread = self._hooks
        if sys.excepthook is mine_sys:
            sys.excepthook = prev_sys
        if threading.excepthook is mine_thread:
            threading.excepthook = prev_thread
        self._hooks = None

    # --------------------------------------------------------------- output
    def snapshot(self) -> HealthSnapshot:
        with self._lock:
            return HealthSnapshot(
                requests=self._requests,
                errors=self._errors,
                latency_bounds_s=self.bounds,
                latency_counts=tuple(self._counts),
                latency_sum_s=self._sum,
                cpu_s=process_cpu_s(),
                rss_bytes=process_rss_bytes(),
                uncaught=self._uncaught,
                gauges=dict(self._gauges),
                uptime_s=time.monotonic() - self._started,
                host=host_cpu(),
            )

    def prometheus(
        self,
        labels: Mapping[str, str],
        info: Mapping[str, str] | None = None,
        extra: Callable[[], Mapping[str, float]] | None = None,
    ) -> str:
        """The text exposition format (version 0.0.4).

        ``labels`` go on every sample (e.g. ``node``); ``info`` becomes one
        ``hotfleet_agent_info`` sample; ``extra`` adds plain gauges by name.
        """
        s = self.snapshot()
        base = _labels(labels)
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for suffix, lbl, value in samples:
                out.append(f"{name}{suffix}{lbl} {_num(value)}")

        metric(
            "hotfleet_requests_total",
            "counter",
            "Requests through the drain guard.",
            [("", base, s.requests)],
        )
        metric(
            "hotfleet_request_errors_total",
            "counter",
            "Guarded requests that raised or answered 5xx.",
            [("", base, s.errors)],
        )
        buckets: list[tuple[str, str, float]] = []
        running = 0
        for bound, count in zip((*s.latency_bounds_s, math.inf), s.latency_counts, strict=True):
            running += count
            le = "+Inf" if math.isinf(bound) else repr(bound)
            buckets.append(("_bucket", _labels({**labels, "le": le}), running))
        buckets += [("_sum", base, s.latency_sum_s), ("_count", base, s.requests)]
        metric(
            "hotfleet_request_duration_seconds",
            "histogram",
            "Latency of guarded requests, including any wait at a held gate.",
            buckets,
        )
        metric(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of the worker.",
            [("", base, s.cpu_s)],
        )
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident set size of the worker.",
            [("", base, s.rss_bytes)],
        )
        metric(
            "hotfleet_uncaught_exceptions_total",
            "counter",
            "Exceptions that escaped every handler.",
            [("", base, s.uncaught)],
        )
        metric(
            "hotfleet_internal_errors_total",
            "counter",
            "Crashes of hotfleet's own threads (bugs in hotfleet, not the app).",
            [("", base, self.internal_errors)],
        )
        metric(
            "hotfleet_host_cpu_seconds_total",
            "counter",
            "CPU seconds of the whole host (all cores, /proc/stat) by state: busy (steal included), total, steal.",
            [
                ("", _labels({**labels, "state": k}), v)
                for k, v in (
                    ("busy", s.host.busy_s),
                    ("total", s.host.total_s),
                    ("steal", s.host.steal_s),
                )
            ],
        )
        metric(
            "hotfleet_uptime_seconds",
            "gauge",
            "Seconds since the agent started.",
            [("", base, s.uptime_s)],
        )
        if s.gauges:
            metric(
                "hotfleet_app_gauge",
                "gauge",
                "Application-defined gauges (agent.set_gauge).",
                [("", _labels({**labels, "name": k}), v) for k, v in sorted(s.gauges.items())],
            )
        for name, value in sorted((extra() if extra else {}).items()):
            metric(name, "gauge", name.replace("_", " ") + ".", [("", base, value)])
        if info is not None:
            metric(
                "hotfleet_agent_info",
                "gauge",
                "Releases and state of the node (value is always 1).",
                [("", _labels({**labels, **info}), 1)],
            )
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return repr(float(value))


class PrometheusCollector:
    """The agent's metrics inside an application's own ``prometheus_client`` registry.

    An app that already exposes ``/metrics`` with ``prometheus_client`` wants
    one scrape target, not a second one at the agent's ``/-/metrics``::

        from prometheus_client import REGISTRY
        from node_agent.metrics import PrometheusCollector

        REGISTRY.register(PrometheusCollector(agent.metrics, {"node": agent.node_id}))

    Each scrape reads one consistent snapshot.  The worker's CPU and memory
    are ``hotfleet_worker_*`` here, never ``process_*``: the registry's own
    ``ProcessCollector`` owns those names and a duplicate would be refused at
    registration.  ``prometheus_client`` is optional (``pip install
    'hotfleet[prometheus]'``); without it constructing this says so.
    """

    def __init__(self, metrics: Metrics, labels: Mapping[str, str] | None = None) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "PrometheusCollector needs prometheus_client: pip install 'hotfleet[prometheus]' "
                "(or read the agent's own text at /-/metrics)"
            ) from exc
        self.metrics = metrics
        self.labels = dict(labels or {})

    def collect(self) -> Any:
        """One family per metric, with HELP and the right type (prometheus_client API)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.metrics.snapshot()
        names, values = list(self.labels), list(self.labels.values())

        def counter(name: str, help_: str, value: float) -> Any:
            family = CounterMetricFamily(name, help_, labels=names)
            family.add_metric(values, value)
            return family

        def gauge(name: str, help_: str, value: float) -> Any:
            family = GaugeMetricFamily(name, help_, labels=names)
            family.add_metric(values, value)
            return family

        yield counter("hotfleet_requests", "Requests through the drain guard.", s.requests)
        yield counter(
            "hotfleet_request_errors", "Guarded requests that raised or answered 5xx.", s.errors
        )
        histogram = HistogramMetricFamily(
            "hotfleet_request_duration_seconds",
            "Latency of guarded requests, including any wait at a held gate.",
            labels=names,
        )
        buckets, running = [], 0
        for bound, count in zip((*s.latency_bounds_s, math.inf), s.latency_counts, strict=True):
            running += count
            buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), running))
        histogram.add_metric(values, buckets, sum_value=s.latency_sum_s)
        yield histogram
        yield counter(
            "hotfleet_uncaught_exceptions", "Exceptions that escaped every handler.", s.uncaught
        )
        yield counter(
            "hotfleet_internal_errors",
            "Crashes of hotfleet's own threads (bugs in hotfleet, not the app).",
            self.metrics.internal_errors,
        )
        yield counter(
            "hotfleet_worker_cpu_seconds", "User and system CPU time of the worker.", s.cpu_s
        )
        yield gauge(
            "hotfleet_worker_resident_memory_bytes", "Resident set size of the worker.", s.rss_bytes
        )
        yield gauge("hotfleet_uptime_seconds", "Seconds since the agent started.", s.uptime_s)
        if s.gauges:
            app = GaugeMetricFamily(
                "hotfleet_app_gauge",
                "Application-defined gauges (agent.set_gauge).",
                labels=[*names, "name"],
            )
            for key, value in sorted(s.gauges.items()):
                app.add_metric([*values, key], value)
            yield app
