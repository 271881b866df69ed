"""The coordinator's own Prometheus metrics, served at ``/metrics`` (``--metrics-listen``).

What an operator graphs and alerts on:

* ``hotfleet_coordinator_rollouts_total{kind,outcome}``: rollouts that ended
  (permanent, aborted, rolled_back, dry_run), by kind (upgrade, rollback, …);
* ``hotfleet_coordinator_rollbacks_total{trigger}``: rollbacks that went
  through, ``automatic`` (analysis or a failed finish) or ``operator``;
* ``hotfleet_coordinator_rollout_phase_seconds{phase}``: how long prepare and
  decide, finish, and the analysis window took, per ended rollout (a histogram);
* ``hotfleet_coordinator_leader`` (1 on the leader) and
  ``hotfleet_coordinator_leader_changes_total`` (this process won or lost).

Rollouts are counted from their records, the same ones ``coordctl`` reads,
by a small poller that runs only while this coordinator leads, so a fleet of
coordinators counts each rollout once (on the leader of the moment) without
touching the engine's code.  The rollouts that had already ended when it
started leading are remembered, never counted: a failover does not count
history twice.  No prometheus_client is needed (the text format is written
here), so the coordinator has no extra dependency.
"""

from __future__ import annotations

import bisect
import http.server
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from coordinator.model import Kind, Rollout

__all__ = ["PHASE_BOUNDS_S", "CoordinatorMetrics", "MetricsServer"]

log = logging.getLogger("hotfleet.coordinator.telemetry")

PHASE_BOUNDS_S: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
TERMINAL = ("permanent", "aborted", "rolled_back", "dry_run")
POLL_S = 1.0
REMEMBERED = 1000  # ended rollout ids kept to count each once (history is bounded anyway)


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str, labels: Mapping[str, str]) -> list[str]:
        """``_bucket`` (cumulative), ``_sum`` and ``_count`` samples."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            out.append(_sample(f"{name}_bucket", {**labels, "le": le}, running))
        out.append(_sample(f"{name}_sum", labels, self.total))
        out.append(_sample(f"{name}_count", labels, running))
        return out


class CoordinatorMetrics:
    """Counters fed from rollout records and leadership changes; rendered as text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rollouts: dict[tuple[str, str], int] = {}
        self.rollbacks: dict[str, int] = {}
        self.phases: dict[str, _Histogram] = {}
        self.leader = False
        self.leader_changes = 0
        self.catch_ups: dict[str, int] = {}  # outcome -> count (coordinator.convergence)
        self._seen: dict[str, None] = {}  # insertion-ordered set of ended rollout ids

    # ---------------------------------------------------------------- feeding
    def set_leader(self, leading: bool) -> None:
        with self._lock:
            if leading != self.leader:
                self.leader_changes += 1
            self.leader = leading

    def count_catch_up(self, outcome: str) -> None:
        """One node caught up by the convergence loop (``ok``) or not (``failed``)."""
        with self._lock:
            self.catch_ups[outcome] = self.catch_ups.get(outcome, 0) + 1

    def remember(self, rollouts: Sequence[Rollout]) -> None:
        """Ended rollouts that were there before: never counted."""
        with self._lock:
            for r in rollouts:
                if r.phase.value in TERMINAL:
                    self._mark(r.id)

    def observe(self, rollouts: Sequence[Rollout]) -> None:
        """Count every rollout that ended since the last call (each one once)."""
        with self._lock:
            for r in rollouts:
                if r.phase.value not in TERMINAL or r.id in self._seen:
                    continue
                self._mark(r.id)
                key = (r.kind, r.phase.value)
                self.rollouts[key] = self.rollouts.get(key, 0) + 1
                if r.kind is Kind.ROLLBACK and r.phase.value == "permanent":
                    automatic = bool((r.options.get("health") or {}).get("why"))
                    trigger = "automatic" if automatic else "operator"
                    self.rollbacks[trigger] = self.rollbacks.get(trigger, 0) + 1
                for phase, seconds in _phase_durations(r).items():
                    self.phases.setdefault(phase, _Histogram(PHASE_BOUNDS_S)).observe(seconds)

    def _mark(self, rollout_id: str) -> None:
        self._seen[rollout_id] = None
        while len(self._seen) > REMEMBERED:
            del self._seen[next(iter(self._seen))]

    # ---------------------------------------------------------------- output
    def render(self) -> str:
        """The Prometheus text exposition format (0.0.4)."""
        out: list[str] = []

        def family(
            name: str, kind: str, help_: str, samples: Iterable[tuple[dict[str, str], float]]
        ) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(_sample(name, labels, value) for labels, value in samples)

        with self._lock:
            family(
                "hotfleet_coordinator_rollouts_total",
                "counter",
                "Rollouts that ended while this coordinator led, by kind and outcome.",
                (
                    ({"kind": kind, "outcome": outcome}, n)
                    for (kind, outcome), n in sorted(self.rollouts.items())
                ),
            )
            family(
                "hotfleet_coordinator_rollbacks_total",
                "counter",
                "Fleet rollbacks that went through: automatic (analysis, failed finish) or operator.",
                (({"trigger": t}, self.rollbacks.get(t, 0)) for t in ("automatic", "operator")),
            )
            family(
                "hotfleet_coordinator_rollout_phase_seconds",
                "histogram",
                "Duration of each phase of an ended rollout: prepare (to the decision), "
                "finish (decision to every node switched), analysis (the rollback window).",
                (),
            )
            for phase, hist in sorted(self.phases.items()):
                out.extend(
                    hist.lines("hotfleet_coordinator_rollout_phase_seconds", {"phase": phase})
                )
            family(
                "hotfleet_coordinator_catch_ups_total",
                "counter",
                "Nodes the convergence loop brought to their desired release, by outcome.",
                (({"outcome": o}, self.catch_ups.get(o, 0)) for o in ("ok", "failed")),
            )
            family(
                "hotfleet_coordinator_leader",
                "gauge",
                "1 while this coordinator leads the fleet, else 0.",
                [({}, int(self.leader))],
            )
            family(
                "hotfleet_coordinator_leader_changes_total",
                "counter",
                "Times this coordinator won or lost the leadership.",
                [({}, self.leader_changes)],
            )
        return "\n".join(out) + "\n"


def _phase_durations(r: Rollout) -> dict[str, float]:
    """Seconds per phase from the record's own timestamps (0 = the phase never happened)."""
    out: dict[str, float] = {}
    if r.decided_at and r.created_at:
        out["prepare"] = r.decided_at - r.created_at
    if r.finished_at and r.decided_at:
        out["finish"] = r.finished_at - r.decided_at
    if r.ended_at and r.finished_at and r.phase.value in ("permanent", "rolled_back"):
        out["analysis"] = r.ended_at - r.finished_at
    return {k: max(0.0, v) for k, v in out.items()}


def _sample(name: str, labels: Mapping[str, str], value: float) -> str:
    text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    number = str(int(value)) if float(value).is_integer() else repr(float(value))
    return f"{name}{{{text}}} {number}" if text else f"{name} {number}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsServer:
    """Serves ``/metrics`` and polls the engine for ended rollouts while it leads."""

    def __init__(
        self,
        listen: str,
        is_leader: Callable[[], bool],
        rollouts: Callable[[], Sequence[Rollout]],
        metrics: CoordinatorMetrics | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.metrics = metrics or CoordinatorMetrics()
        self._is_leader = is_leader
        self._rollouts = rollouts
        self._poll_s = poll_s
        self._stop = threading.Event()
        host, _, port = listen.rpartition(":")
        metrics_ = self.metrics

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = metrics_.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics %s " + format, self.address_string(), *args)

        self._server = http.server.ThreadingHTTPServer(
            (host.strip("[]") or "127.0.0.1", int(port)), Handler
        )
        self._server.daemon_threads = True
        self.address = f"{host or '127.0.0.1'}:{self._server.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True),
            threading.Thread(target=self._poll, name="metrics-poll", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(5)

    def _poll(self) -> None:
        leading = False
        while not self._stop.wait(self._poll_s):
            try:
                now = self._is_leader()
                if now and not leading:
                    self.metrics.remember(self._rollouts())  # history: never counted
                self.metrics.set_leader(now)
                leading = now
                if now:
                    self.metrics.observe(self._rollouts())
            except Exception as exc:  # etcd away: try again at the next tick
                log.debug("metrics poll: %s", exc)
