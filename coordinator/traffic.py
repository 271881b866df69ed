"""The one HTTP load generator, with its mixed-version detector.

A rollout's analysis compares each node's health during the rollback window
with the baseline before it, so a fleet nobody sends requests to is never
judged; and hotfleet's promise that *no response mixes two releases* is
checked from outside, by the responses themselves (the example shop names
the version of every module that served a request).  Everyone who needs
requests uses this module:

* ``coordctl dev up`` starts ``python -m coordinator.traffic`` next to the
  workers (paced, until SIGTERM, a count in its log every ``--report`` s);
* ``coordctl demo`` runs :class:`Traffic` in its own threads and keeps every
  :class:`Response` to measure the switch;
* the tests and the benchmarks start it as a process of its own
  (:class:`TrafficProcess`, so the load does not compete with them for the
  GIL), read its ``fail``/``version`` event lines and get a JSON summary
  when they close its stdin.

:class:`Releases` is the detector: a response is *whole* when every module
version it carries is that of one known release bundle (by default every
example release), and *mixed* otherwise.

::

    python -m coordinator.traffic --rate 40 127.0.0.1:8081 127.0.0.1:8082
    python -m coordinator.traffic --closed-loop --threads 2 --until-eof --events n1=127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.launch import EXAMPLES, ROOT, LaunchError, child_environment
from hotfleet.stopsignals import StopSignals

__all__ = [
    "MIXED",
    "READY",
    "NodeStats",
    "Releases",
    "Response",
    "Traffic",
    "TrafficEvent",
    "TrafficProcess",
    "main",
    "module_versions",
    "release_label",
    "version_key",
]

READY = "hotfleet-traffic ready"
MIXED = "mixed"  # Response.release of a response whose modules came from two releases
SKUS = ("apple", "fig", "pear")
THREADS_PER_TARGET = 2  # one slow response does not stall the node's rate
KEPT_FAILURES = 20  # failure descriptions (and mixes) kept per node in a summary


# ------------------------------------------------------------- the detector
def module_versions(bundle: Path) -> dict[str, str]:
    """``{"shop.pricing": "2", ...}``: each module's ``VERSION`` in a bundle or code tree."""
    out: dict[str, str] = {}
    for path in sorted(bundle.rglob("*.py")):
        parts = list(path.relative_to(bundle).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "VERSION" for t in node.targets)
                and isinstance(node.value, ast.Constant)
            ):
                out[".".join(parts)] = str(node.value.value)
    return out


def release_label(bundle: Path) -> str:
    """``shop@2.0.0`` from a bundle's release.toml."""
    meta = tomllib.loads((bundle / "release.toml").read_text())
    return f"{meta['name']}@{meta['version']}"


def version_key(versions: Mapping[str, Any]) -> str:
    """``shop=1,shop.app=2,...``: a response's module versions as one comparable string."""
    return ",".join(f"{m}={v}" for m, v in sorted(versions.items()))


class Releases:
    """Names the release that served a response from the module versions it carries."""

    def __init__(self, bundles: Iterable[Path]) -> None:
        self.known: list[tuple[str, dict[str, str]]] = [
            (release_label(b), module_versions(b)) for b in bundles
        ]

    @classmethod
    def examples(cls) -> Releases:
        """Every example release (``examples/releases``)."""
        root = EXAMPLES / "releases"
        return cls(sorted(p for p in root.iterdir() if (p / "release.toml").is_file()))

    def label(self, versions: Mapping[str, Any]) -> str | None:
        """The matching release, None when the response mixed releases."""
        for label, table in self.known:
            if all(table.get(m) == (None if v is None else str(v)) for m, v in versions.items()):
                return label
        return None


# --------------------------------------------------------------- the load
@dataclass
class Response:
    """One request and what came back."""

    node: str
    start: float  # time.time()
    end: float
    status: int  # 0 = no HTTP response
    versions: dict[str, Any] | None  # None when the body named none
    release: str  # release label, MIXED, or "" when the body named no versions
    error: str = ""
    body: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    def failure(self) -> str:
        """What went wrong (``HTTP Error 500``, ``ConnectionRefusedError: ...``)."""
        return self.error or f"HTTP Error {self.status}"


@dataclass
class NodeStats:
    """What one node answered; :meth:`to_json` is its part of a summary."""

    ok: int = 0
    failed: int = 0
    http_500: int = 0
    other_failures: list[str] = field(default_factory=list)  # neither 200 nor 500
    seen: Counter[str] = field(default_factory=Counter)  # version_key -> responses
    mixed: int = 0
    mixes: list[dict[str, Any]] = field(default_factory=list)
    samples: list[list[Any]] | None = None
    last_key: str = ""

    def add(self, r: Response) -> None:
        if r.ok:
            self.ok += 1
        else:
            self.failed += 1
            if r.status == 500:
                self.http_500 += 1
            elif len(self.other_failures) < KEPT_FAILURES:
                self.other_failures.append(r.failure()[:200])
        if r.versions is not None:
            self.seen[version_key(r.versions)] += 1
            if r.release == MIXED:
                self.mixed += 1
                if len(self.mixes) < KEPT_FAILURES:
                    self.mixes.append(r.versions)
        if self.samples is not None:
            body = r.body or {}
            seen = [body.get("version"), body.get("pid"), body.get("count")]
            self.samples.append([r.start, r.end - r.start, r.status, *seen])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "failed": self.failed,
            "http_500": self.http_500,
            "other_failures": self.other_failures,
            "seen": dict(self.seen),
            "mixed": self.mixed,
            "mixes": self.mixes,
        }
        if self.samples is not None:
            out["samples"] = self.samples
        return out


def _targets(targets: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``{name: host:port}``; a bare address names itself."""
    if isinstance(targets, Mapping):
        return dict(targets)
    return {t.split("=", 1)[0] if "=" in t else t: t.split("=", 1)[-1] for t in targets}


class Traffic:
    """Request threads, ``threads`` per target, each with its own connection per request.

    Paced at ``rate`` requests per second to each target (spread over its
    threads; a slow node gets no burst afterwards), or a closed loop with
    ``pause_s`` between requests when ``rate`` is None.  ``path`` is fixed, or
    by default ``/price`` over the SKUs and quantities the shop prices.
    ``keep`` keeps every :class:`Response`; ``on_event`` gets a ``fail <t>
    <node> <detail>`` line per failed request and ``version <t> <node>
    <key>`` whenever the versions a node answers with change.
    """

    def __init__(
        self,
        targets: Sequence[str] | Mapping[str, str],
        rate: float | None = 40.0,
        *,
        threads: int = THREADS_PER_TARGET,
        pause_s: float = 0.0,
        path: str | None = None,
        releases: Releases | None = None,
        keep: bool = False,
        record: bool = False,
        on_event: Callable[[str], None] | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.named = _targets(targets)
        self.targets = list(self.named.values())
        self.rate = rate
        self.threads = threads
        self.pause_s = pause_s
        self.path = path
        self.releases = releases if releases is not None else Releases.examples()
        self.keep = keep
        self.on_event = on_event
        self.timeout_s = timeout_s
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.records: list[Response] = []
        self.stats = {name: NodeStats(samples=[] if record else None) for name in self.named}
        self.started = 0.0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.started = time.monotonic()
        count = len(self.named)
        for i, (name, address) in enumerate(self.named.items()):
            for index in range(self.threads):
                thread = threading.Thread(
                    target=self._run,
                    args=(name, address, index, (index + i / count) / (self.rate or 1.0)),
                    name=f"traffic-{name}-{index}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def join(self, timeout: float = 15.0) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _path(self, n: int) -> str:
        if self.path is not None:
            return self.path
        return f"/price?sku={SKUS[n % len(SKUS)]}&qty={1 + n % 12}"

    def _run(self, name: str, address: str, index: int, offset: float) -> None:
        interval = self.threads / self.rate if self.rate else 0.0
        due = time.monotonic() + (offset if self.rate else 0.0)
        n = index
        if self.rate and self.stop.wait(max(0.0, due - time.monotonic())):
            return
        while not self.stop.is_set():
            self._record(self.request(name, address, self._path(n)))
            n += self.threads
            if self.rate:
                due = max(due + interval, time.monotonic())  # paced, not a closed loop
                self.stop.wait(max(0.0, due - time.monotonic()))
            elif self.pause_s:
                self.stop.wait(self.pause_s)

    def request(self, name: str, address: str, path: str) -> Response:
        """``GET path`` on a new connection; what came back, whatever it was."""
        host, _, port = address.rpartition(":")
        start = time.time()
        conn = http.client.HTTPConnection(host, int(port), timeout=self.timeout_s)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return Response(name, start, time.time(), 0, None, "", f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
        end = time.time()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return Response(name, start, end, status, None, "")
        versions = body.get("versions")
        if not isinstance(versions, dict):
            return Response(name, start, end, status, None, "", body=body)
        release = self.releases.label(versions) or MIXED
        return Response(name, start, end, status, versions, release, body=body)

    def _record(self, r: Response) -> None:
        events = []
        with self._lock:
            stats = self.stats[r.node]
            stats.add(r)
            if self.keep:
                self.records.append(r)
            if not r.ok:
                detail = str(r.status) if r.status else r.error.split(":", 1)[0]
                events.append(f"fail {r.end:.6f} {r.node} {detail}")
            if r.versions is not None and r.ok:
                key = version_key(r.versions)
                if key != stats.last_key:
                    stats.last_key = key
                    events.append(f"version {r.end:.6f} {r.node} {key}")
        if self.on_event is not None:
            for line in events:
                self.on_event(line)

    def counts(self) -> tuple[int, int]:
        """Good and failed responses so far, over every target."""
        with self._lock:
            return (
                sum(s.ok for s in self.stats.values()),
                sum(s.failed for s in self.stats.values()),
            )

    def snapshot(self) -> list[Response]:
        """Every response so far (with ``keep``)."""
        with self._lock:
            return list(self.records)

    def since(self, t: float) -> list[Response]:
        return [r for r in self.snapshot() if r.start >= t]

    def summary(self) -> dict[str, Any]:
        """``{"elapsed_s", "requests", "nodes": {name: NodeStats.to_json()}}``."""
        with self._lock:
            nodes = {name: s.to_json() for name, s in self.stats.items()}
        return {
            "elapsed_s": time.monotonic() - self.started if self.started else 0.0,
            "requests": sum(n["ok"] + n["failed"] for n in nodes.values()),
            "nodes": nodes,
        }


# ----------------------------------------------------- as a process of its own
@dataclass(frozen=True)
class TrafficEvent:
    t: float  # time.time() when the response (or the error) arrived
    kind: str  # "fail" | "version"
    node: str
    detail: str  # the HTTP status or exception name; the version key


class TrafficProcess:
    """``python -m coordinator.traffic --until-eof --events``: load from another process.

    ``targets`` maps a node's name to its ``host:port``.  :meth:`events` are
    the process's event lines so far; :meth:`stop` closes its stdin and
    returns its summary (see :meth:`Traffic.summary`).
    """

    def __init__(
        self,
        targets: Mapping[str, str],
        rate: float | None = None,
        *,
        threads: int = THREADS_PER_TARGET,
        pause_s: float = 0.0,
        path: str | None = None,
        record: bool = False,
        start_timeout_s: float = 30.0,
    ) -> None:
        cmd = [sys.executable, "-m", "coordinator.traffic", "--until-eof", "--events"]
        cmd += ["--threads", str(threads), "--pause", f"{pause_s:g}", "--report", "0"]
        cmd += ["--closed-loop"] if rate is None else ["--rate", f"{rate:g}"]
        cmd += ["--path", path] if path is not None else []
        cmd += ["--record"] if record else []
        cmd += [f"{name}={address}" for name, address in targets.items()]
        self.names = list(targets)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_environment(),
            cwd=ROOT,
        )
        self._lock = threading.Lock()
        self._events: list[TrafficEvent] = []
        self.summary: dict[str, Any] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True, name="traffic-reader")
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            self.close()
            raise LaunchError("the traffic process did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                parts = line.rstrip("\n").split(" ", 3)
                if line.startswith(READY):
                    self._ready.set()
                elif parts[0] in ("fail", "version") and len(parts) == 4:
                    with self._lock:
                        self._events.append(
                            TrafficEvent(float(parts[1]), parts[0], parts[2], parts[3])
                        )
                elif parts[0] == "summary":
                    self.summary = json.loads(line.split(" ", 1)[1])
        self._ready.set()  # exited: the constructor stops waiting

    def events(self, since: float = 0.0) -> list[TrafficEvent]:
        with self._lock:
            return [e for e in self._events if e.t >= since]

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop the load; the summary (``{}`` when the process died without one)."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(5)
        return self.summary

    def reports(self) -> list[dict[str, Any]]:
        """:meth:`stop`, then each target's part of the summary, in ``targets`` order."""
        nodes = self.stop().get("nodes", {})
        return [nodes[name] for name in self.names if name in nodes]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# ------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator.traffic",
        description="Requests to every target until SIGTERM (or stdin's end with --until-eof).",
        allow_abbrev=False,
    )
    parser.add_argument("targets", nargs="+", metavar="[NAME=]HOST:PORT")
    parser.add_argument(
        "--rate", type=float, default=40.0, help="requests per second to each target"
    )
    parser.add_argument(
        "--closed-loop", action="store_true", help="no pacing: each thread sends the next at once"
    )
    parser.add_argument("--threads", type=int, default=THREADS_PER_TARGET, help="per target")
    parser.add_argument(
        "--pause", type=float, default=0.0, metavar="S", help="closed loop: S between requests"
    )
    parser.add_argument("--path", help="the path to GET (default: /price over the SKUs)")
    parser.add_argument(
        "--report", type=float, default=30.0, metavar="S", help="log the counts every S s (0: no)"
    )
    parser.add_argument("--until-eof", action="store_true", help="also stop when stdin ends")
    parser.add_argument("--events", action="store_true", help="print fail/version event lines")
    parser.add_argument("--record", action="store_true", help="every request in the summary")
    args = parser.parse_args(argv)
    out_lock = threading.Lock()

    def emit(line: str) -> None:
        with out_lock:
            print(line, flush=True)

    try:
        traffic = Traffic(
            args.targets,
            None if args.closed_loop else args.rate,
            threads=args.threads,
            pause_s=args.pause,
            path=args.path,
            record=args.record,
            on_event=emit if args.events else None,
        )
    except ValueError as exc:
        parser.error(str(exc))
    stops = StopSignals()
    if args.until_eof:

        def until_eof() -> None:
            sys.stdin.read()  # until our parent closes our stdin
            traffic.stop.set()

        threading.Thread(target=until_eof, daemon=True, name="eof").start()
    traffic.start()
    rate = "closed-loop" if args.closed_loop else f"{args.rate:g}"
    emit(f"{READY} targets={len(traffic.targets)} rate={rate}")
    while not stops.wait(args.report or None, until=traffic.stop):
        ok, failed = traffic.counts()
        emit(f"traffic: {ok} ok, {failed} failed so far")
    traffic.stop.set()
    traffic.join()
    ok, failed = traffic.counts()
    emit(f"traffic stopped: {ok} ok, {failed} failed")
    emit("summary " + json.dumps(traffic.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
