"""What the leader knows about the fleet's health: continuous samples and smoke checks.

The leader samples every registered node's Health RPC at a fixed interval
for as long as it leads and keeps a few minutes of history, so a baseline is
already there when an upgrade starts (no warm-up wait before prepare), and
the rollback window is judged on the very same series.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from coordinator.analysis import (
    ChangedCode,
    Event,
    EventKind,
    Sample,
    Snapshot,
    samples_from_snapshots,
)
from coordinator.fleet import NodeInfo
from coordinator.transport import Transport
from hotfleet import transient
from hotfleet._proto.hotfleet.v1 import agent_pb2

log = logging.getLogger("hotfleet.coordinator")

_PAUSE_POLL_S = 0.02  # how soon a paused sampler notices it may resume
# Health RPCs per second the sampler makes at most: a round of a large fleet is spread
# over more time (1000 nodes: a round every 10 s instead of 2000 RPCs a second, which
# would cost the coordinator most of a core and every node a wake-up twice a second).
MAX_HEALTH_RPCS_PER_S = 100.0


class HealthSampler:
    """Owns one thread that polls every node's Health RPC; :meth:`stop` ends it."""

    def __init__(
        self,
        nodes: Callable[[], list[NodeInfo]],
        agents: Transport,
        *,
        interval_s: float = 0.5,
        keep_s: float = 300.0,
    ) -> None:
        self._nodes = nodes
        self._agents = agents
        self.interval_s = interval_s
        self._keep = max(4, int(keep_s / interval_s))
        self._lock = threading.Lock()
        self._history: dict[str, deque[Snapshot]] = {}
        self._members: dict[str, tuple[float, NodeInfo]] = {}  # last time seen registered
        self._recycled: dict[
            str, int
        ] = {}  # node -> pid of the process that replaced one on purpose
        self._stop = threading.Event()
        self._quiet_until = 0.0  # unix time before which no new round starts
        self._fleet_size = 0  # nodes in the last round: paces the next one
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="hotfleet-health")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="hotfleet-health-sampler", daemon=True
            )
            self._thread.start()

    def signal_stop(self) -> None:
        """Ask the sampler to end (its etcd retries give up at once); :meth:`stop` waits for it."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def pause(self) -> None:
        """Start no round until :meth:`resume_at`.

        A round is a burst of RPCs and CPU on every node; while a rollout
        prepares and commits, its samples would be used for nothing (the
        baseline ends when the rollout starts, the window begins after the
        commit) and would only slow the fleet down.
        """
        with self._lock:
            self._quiet_until = math.inf

    def resume_at(self, when: float) -> None:
        """Start rounds again from unix time ``when`` (now or in the past: at once).

        A resumption already scheduled later stands: the commit instant's
        quiet is not cut short by the caller's own "resume now" that follows.
        """
        with self._lock:
            self._quiet_until = (
                when if math.isinf(self._quiet_until) else max(self._quiet_until, when)
            )

    def _run(self) -> None:
        with transient.cancelled_by(self._stop):
            self._sample_until_stopped()

    def _sample_until_stopped(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                quiet = self._quiet_until - time.time()
            if quiet > 0:
                self._stop.wait(min(quiet, _PAUSE_POLL_S))
                next_at = time.monotonic()
                continue
            try:
                self.sample_once()
            except Exception as exc:  # keep sampling whatever happened, but say what
                if transient.from_etcd(exc):
                    log.debug("health sampling: etcd unreachable: %s", exc)
                else:
                    log.exception("health sampling failed (a bug: the judge sees no data)")
            next_at += max(self.interval_s, self._fleet_size / MAX_HEALTH_RPCS_PER_S)
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def sample_once(self) -> None:
        nodes = self._nodes()
        self._fleet_size = len(nodes)
        now = time.time()
        with self._lock:
            for n in nodes:
                self._note_recycle(n)
                self._members[n.node_id] = (now, n)

        def one(n: NodeInfo) -> tuple[str, Snapshot | None]:
            if self._quiet_until > time.time():
                return n.node_id, None  # paused mid-round: a 2PC started, leave the fleet be
            try:
                reply = self._agents.stub(n.address).Health(
                    agent_pb2.HealthRequest(), timeout=max(0.2, self.interval_s)
                )
            except grpc.RpcError:
                return n.node_id, None
            return n.node_id, Snapshot.from_reply(reply, time.time())

        for node, snap in self._pool.map(one, nodes):
            if snap is not None:
                with self._lock:
                    self._history.setdefault(node, deque(maxlen=self._keep)).append(snap)

    def _note_recycle(self, n: NodeInfo) -> None:
        """A new process behind a node whose last record said ``stopping`` (lock held).

        A worker its server recycled on purpose (gunicorn's ``max_requests``, a
        graceful reload of one worker) announces ``stopping`` before it exits,
        and its successor takes the same node id.  That is no crash: its
        counters start a fresh series (never compared with the old process's)
        and :meth:`lost` does not report it.
        """
        seen = self._members.get(n.node_id)
        if seen is None or not (seen[1].pid and n.pid) or seen[1].pid == n.pid:
            return
        # the successor says so itself, or we saw the old process say "stopping"
        # (sampling rounds can miss that record: it lives for well under a second)
        if seen[1].state != "stopping" and n.replaces != seen[1].pid:
            return
        self._history.pop(n.node_id, None)
        self._recycled[n.node_id] = n.pid
        log.info(
            "node %s: its worker was recycled (pid %d -> %d); a fresh series of samples",
            n.node_id,
            seen[1].pid,
            n.pid,
        )

    def samples(
        self, nodes: Sequence[str], since: float, until: float | None = None
    ) -> tuple[dict[str, list[Sample]], list[Event]]:
        """Per node, the samples made of snapshots taken in ``[since, until]``, and crash events."""
        out: dict[str, list[Sample]] = {}
        events: list[Event] = []
        with self._lock:
            history = {
                n: [
                    s
                    for s in self._history.get(n, ())
                    if s.t >= since and (until is None or s.t <= until)
                ]
                for n in nodes
            }
        for node, snaps in history.items():
            out[node], evs = samples_from_snapshots(node, snaps)
            events.extend(evs)
        return out, events

    def changed_code(self, nodes: Sequence[str], since: float) -> dict[str, ChangedCode]:
        """Per node, its latest changed-code coverage reported at or after ``since``.

        The agents' counts are cumulative since their finish, so the newest
        report is the whole window; no differencing needed.
        """
        out: dict[str, ChangedCode] = {}
        with self._lock:
            for node in nodes:
                history = self._history.get(node)
                if history:
                    last = history[-1]
                    if last.t >= since and last.changed is not None:
                        out[node] = last.changed
        return out

    def lost(
        self, nodes: Sequence[str], since: float, current: Mapping[str, NodeInfo]
    ) -> list[Event]:
        """Nodes registered after ``since`` whose membership vanished or whose process changed."""
        events = []
        with self._lock:
            members = dict(self._members)
        for node in nodes:
            seen = members.get(node)
            if seen is None or seen[0] < since:
                continue
            now = current.get(node)
            if now is None:
                events.append(
                    Event(
                        node,
                        EventKind.LEASE_LOST,
                        "its membership lease expired (the node is down)",
                        time.time(),
                    )
                )
            elif (
                seen[1].pid
                and now.pid
                and now.pid != seen[1].pid
                and self._recycled.get(node) != now.pid
                and seen[1].state != "stopping"  # recycled on purpose: see _note_recycle
                and now.replaces != seen[1].pid
            ):
                events.append(
                    Event(
                        node,
                        EventKind.CRASH,
                        f"the worker restarted (pid {seen[1].pid} -> {now.pid}) and came back on its permanent release",
                        time.time(),
                    )
                )
        return events


def run_smoke_checks(
    checks: Sequence[Mapping[str, Any]], nodes: Sequence[NodeInfo], timeout_s: float
) -> list[Event]:
    """Run every smoke check of the release on every node, in parallel; failures are events.

    A check is ``{name, path, status = 200, contains = ""}``: an HTTP GET of
    ``path`` on the node's service must answer ``status`` and, if given,
    contain ``contains``.
    """
    jobs = [(c, n) for c in checks for n in nodes if n.http_address]
    if not jobs:
        return []

    def one(job: tuple[Mapping[str, Any], NodeInfo]) -> Event | None:
        check, node = job
        name = check.get("name") or check.get("path", "/")
        url = f"http://{node.http_address}{check.get('path', '/')}"
        want = int(check.get("status", 200))
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                status, body = resp.status, resp.read(1 << 20).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, ""
        except (OSError, ValueError) as exc:
            return Event(
                node.node_id,
                EventKind.SMOKE_FAILED,
                f"smoke check {name!r}: {url} failed: {exc}",
                time.time(),
            )
        if status != want:
            return Event(
                node.node_id,
                EventKind.SMOKE_FAILED,
                f"smoke check {name!r}: {url} answered {status}, expected {want}",
                time.time(),
            )
        contains = check.get("contains")
        if contains and contains not in body:
            return Event(
                node.node_id,
                EventKind.SMOKE_FAILED,
                f"smoke check {name!r}: {url} does not contain {json.dumps(contains)}",
                time.time(),
            )
        return None

    with ThreadPoolExecutor(
        max_workers=min(32, len(jobs)), thread_name_prefix="hotfleet-smoke"
    ) as pool:
        return [e for e in pool.map(one, jobs) if e is not None]
