"""A real fleet for the fleet-level benchmarks, standing alone (nothing from ``tests/``).

:class:`Fleet` owns, in a private temp dir:

* one etcd (:class:`hotfleet.etcd_server.EtcdServer`);
* N ``python -m node_agent.cli --dev`` subprocesses, started in parallel, each
  serving ``shop.app:application`` from its own copy of a boot-code directory
  (the agent writes permanent releases into its code path);
* an in-process :class:`coordinator.engine.Engine` that won a real election
  (:class:`coordinator.election.Session` / :class:`~coordinator.election.Election`).

Teardown (:meth:`Fleet.close`, also on errors and Ctrl-C) stops the leader,
SIGTERMs every agent (SIGKILL after a grace period), stops etcd and removes
the temp dir.  :class:`LoadProcess` runs this file as a script (``python
benchmarks/_fleet.py load SPEC``: paced HTTP load in its own process, so
the load does not compete with the leader for the GIL) and collects its
event lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, REPO_ROOT

from coordinator.election import Election, Session
from coordinator.engine import Engine
from coordinator.fleet import AgentPool
from coordinator.health import HealthSampler
from coordinator.model import Rollout
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from hotfleet.keys import Keys

EXAMPLES = REPO_ROOT / "examples"
SHOP = EXAMPLES / "shop"
RELEASES = EXAMPLES / "releases"
SHOP_MODULES = ("shop.app", "shop.cart", "shop.inventory", "shop.pricing")
PREFIX = "/hotfleet-bench/"


def progress_clock() -> Callable[[str], None]:
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    return say


# ------------------------------------------------------------------- agents
class AgentProc:
    """One ``node-agent`` subprocess; stdout is read by a thread for the ready line."""

    def __init__(self, node_id: str, proc: subprocess.Popen[str], log_path: Path) -> None:
        self.node_id = node_id
        self.proc = proc
        self.log_path = log_path
        self.grpc_address = ""
        self.http_address = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True, name=f"pump-{node_id}").start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"agent {self.node_id} not ready in time:\n{self.log()}"
                ) from None
            if line is None:
                raise RuntimeError(
                    f"agent {self.node_id} exited with {self.proc.wait()}:\n{self.log()}"
                )
            if line.startswith("node-agent ready"):
                fields = dict(f.split("=", 1) for f in line.split()[2:])
                self.grpc_address, self.http_address = fields["grpc"], fields["http"]
                return

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def versions(self, timeout: float = 2.0) -> dict[str, str]:
        """Module versions served right now (``GET /``)."""
        with urllib.request.urlopen(f"http://{self.http_address}/", timeout=timeout) as resp:
            return dict(json.loads(resp.read())["versions"])


def version_key(versions: dict[str, Any]) -> str:
    """``app=1,cart=1,inventory=1,pricing=1``: what a node's shop modules report."""
    return ",".join(f"{m.split('.')[-1]}={versions.get(m)}" for m in SHOP_MODULES)


V1 = version_key({m: "1" for m in SHOP_MODULES})  # shop 1.0.0 (the boot code)
V2 = version_key({m: "2" for m in SHOP_MODULES})  # shop 2.0.0
V2_BAD = version_key({**{m: "2" for m in SHOP_MODULES}, "shop.pricing": "2.1"})  # 2.1.0-bad
WHOLE_RELEASES = frozenset({V1, V2, V2_BAD})  # anything else is a mix of two releases


# ------------------------------------------------------------------- leader
class Leader:
    """An :class:`Engine` that has won a real election.

    ``sampler_interval_s``: the leader's health sampler interval.  ``Engine.lead``
    builds the sampler with the policy default (``AnalysisPolicy().interval_s``)
    and keeps it for as long as it leads, so a different interval has to be
    installed before ``lead`` (done here); a rollout's ``health={"interval_s":
    ...}`` override only changes how often the window is judged.
    """

    def __init__(
        self, endpoint: str, prefix: str, *, sampler_interval_s: float | None = None
    ) -> None:
        self.client: EtcdClient = connect(endpoint)
        self.keys = Keys(prefix)
        self.engine = Engine(self.client, self.keys, AgentPool(), address="bench-leader")
        if sampler_interval_s is not None:
            self.engine.sampler = HealthSampler(
                self.engine.nodes, self.engine.agents, interval_s=sampler_interval_s
            )
            self.engine.sampler.start()
        self.session = Session(self.client, ttl=5)
        self.lead = Election(self.client, self.keys.election, self.session).campaign(
            "bench-leader", timeout=30
        )
        self.engine.lead(self.lead)

    @property
    def epoch(self) -> int:
        return int(self.lead.epoch)

    def wait(self, rollout_id: str, timeout: float = 60.0, poll: float = 0.05) -> Rollout:
        """Until the rollout reaches a terminal phase."""
        return self.wait_for(rollout_id, lambda r: r.phase.terminal, timeout, poll)

    def wait_for(
        self,
        rollout_id: str,
        done: Callable[[Rollout], bool],
        timeout: float = 60.0,
        poll: float = 0.05,
    ) -> Rollout:
        deadline = time.monotonic() + timeout
        while True:
            r = self.engine.rollout(rollout_id)
            if done(r):
                return r
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rollout {rollout_id} still {r.phase.value} after {timeout:g}s: {r.reason}"
                )
            time.sleep(poll)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()
        with contextlib.suppress(Exception):
            self.session.close()
        with contextlib.suppress(Exception):
            self.engine.agents.close()
        with contextlib.suppress(Exception):
            self.client.close()


class BareLeader:
    """A campaign won without an engine: a real leader epoch for a driver of its own.

    Agents obey only the epoch etcd names as the leader's (:mod:`hotfleet.fencing`),
    so a benchmark that drives agents itself (the node-by-node baseline) must hold
    leadership, and no engine may act meanwhile (its convergence would catch
    up the nodes the driver moves).  The engine's :class:`Leader` is closed
    first; this one campaigns on the same election prefix and wins.
    """

    def __init__(self, endpoint: str, prefix: str, name: str = "bench-direct") -> None:
        self.client: EtcdClient = connect(endpoint)
        self.keys = Keys(prefix)
        self.session = Session(self.client, ttl=5)
        self.lead = Election(self.client, self.keys.election, self.session).campaign(
            name, timeout=30
        )

    @property
    def epoch(self) -> int:
        return int(self.lead.epoch)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.close()
        with contextlib.suppress(Exception):
            self.client.close()


# -------------------------------------------------------------------- fleet
@dataclass
class Fleet:
    """etcd + N agents + an elected leader in a temp dir; use as a context manager."""

    nodes: int
    boot_code: Path = SHOP  # a directory holding the package ``shop``
    lease_ttl: int = 3
    sampler_interval_s: float | None = None
    progress: Callable[[str], None] = print
    startup_timeout_s: float = 300.0
    tmp: Path = field(init=False)
    etcd: EtcdServer | None = field(init=False, default=None)
    agents: list[AgentProc] = field(init=False, default_factory=list)
    leader: Leader | None = field(init=False, default=None)
    direct_leader: BareLeader | None = field(init=False, default=None)
    startup_s: float = field(init=False, default=0.0)
    registered_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="hotfleet-bench-fleet-"))

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        assert self.etcd is not None
        return self.etcd.endpoint

    def start(self) -> None:
        self.etcd = EtcdServer(self.tmp / "etcd")
        self.etcd.start()
        self.progress(f"etcd at {self.etcd.endpoint}; starting {self.nodes} agents in parallel")
        t0 = time.perf_counter()
        self.agents = [self._spawn(f"n{i:03d}") for i in range(1, self.nodes + 1)]
        deadline = time.monotonic() + self.startup_timeout_s
        for a in self.agents:
            a.wait_ready(deadline)
        self.startup_s = time.perf_counter() - t0
        self.leader = Leader(self.endpoint, PREFIX, sampler_interval_s=self.sampler_interval_s)
        # every agent registered (its membership key written) and seen by the leader
        while len(self.leader.engine.nodes()) < self.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(self.leader.engine.nodes())} of {self.nodes} agents registered"
                )
            time.sleep(0.05)
        self.registered_s = time.perf_counter() - t0
        self.progress(
            f"{self.nodes} agents ready in {self.startup_s:.1f} s (all registered "
            f"{self.registered_s:.1f} s); leader epoch {self.leader.epoch}"
        )

    def _spawn(self, node_id: str) -> AgentProc:
        code = self.tmp / f"code-{node_id}"
        shutil.copytree(self.boot_code, code, ignore=shutil.ignore_patterns("__pycache__"))
        log_path = self.tmp / f"{node_id}.log"
        cmd = [
            sys.executable,
            "-m",
            "node_agent.cli",
            "--dev",
            "--node-id",
            node_id,
            "--code-path",
            str(code),
            "--app",
            "shop.app:application",
            "--http",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            self.endpoint,
            "--prefix",
            PREFIX,
            "--lease-ttl",
            str(self.lease_ttl),
            "--cache-dir",
            str(self.tmp / f"cache-{node_id}"),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOTFLEET_DEV": "1",
        }
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env=env,
                cwd=self.tmp,
            )
        return AgentProc(node_id, proc, log_path)

    def versions(self) -> dict[str, str]:
        """node -> shop version it serves (``error`` when it does not answer)."""
        out = {}
        for a in self.agents:
            try:
                out[a.node_id] = version_key(a.versions())
            except (OSError, ValueError, KeyError):
                out[a.node_id] = "error"
        return out

    def take_leadership(self) -> int:
        """The engine steps down and a :class:`BareLeader` takes over; its epoch."""
        if self.leader is not None:
            self.leader.close()
            self.leader = None
        if self.direct_leader is None:
            self.direct_leader = BareLeader(self.endpoint, PREFIX)
        return self.direct_leader.epoch

    def close(self) -> None:
        if self.leader is not None:
            self.leader.close()
            self.leader = None
        if self.direct_leader is not None:
            self.direct_leader.close()
            self.direct_leader = None
        for a in self.agents:  # graceful: each agent revokes its lease
            if a.proc.poll() is None:
                with contextlib.suppress(OSError):
                    a.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for a in self.agents:
            try:
                a.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
            if a.proc.stdout is not None:
                with contextlib.suppress(OSError):
                    a.proc.stdout.close()
        self.agents = []
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------- boot code
def write_shop_tree(dst: Path, sources: dict[str, str], base: Path) -> Path:
    """Copy ``base`` (a dir holding ``shop/``) to ``dst`` and write ``sources`` over it.

    ``sources`` maps module names (``shop.g00``) to source text.
    """
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("__pycache__", "release.toml"))
    for name, text in sources.items():
        path = dst.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return dst


# --------------------------------------------------------------------- load
@dataclass
class LoadEvent:
    t: float
    kind: str  # "fail" | "version"
    node: str
    detail: str


class LoadProcess:
    """``python benchmarks/_fleet.py load SPEC``: paced HTTP load on some nodes.

    It prints one line per failed request and one per change of the version
    a node serves (as seen in the responses); :meth:`events` returns them.
    """

    def __init__(
        self,
        targets: Sequence[tuple[str, str]],
        rate: float,
        path: str = "/price?sku=apple&qty=2",
        *,
        record: bool = False,
    ) -> None:
        spec = json.dumps({"targets": list(targets), "rate": rate, "path": path, "record": record})
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "_fleet.py"), "load", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        self._lock = threading.Lock()
        self._events: list[LoadEvent] = []
        self.summary: dict[str, Any] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True, name="load-reader")
        self._thread.start()
        if not self._ready.wait(30):
            self.close()
            raise RuntimeError("load generator did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.rstrip("\n").split(" ", 3)
            if parts[0] == "started":
                self._ready.set()
            elif parts[0] in ("fail", "version") and len(parts) == 4:
                with self._lock:
                    self._events.append(LoadEvent(float(parts[1]), parts[0], parts[2], parts[3]))
            elif parts[0] == "summary":
                self.summary = json.loads(line.split(" ", 1)[1])

    def events(self, since: float = 0.0) -> list[LoadEvent]:
        with self._lock:
            return [e for e in self._events if e.t >= since]

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(5)
        return self.summary

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


def start_load(
    agents: Iterable[AgentProc], rate_per_node: float, processes: int
) -> list[LoadProcess]:
    targets = [(a.node_id, a.http_address) for a in agents]
    groups = [targets[i::processes] for i in range(max(1, processes))]
    out: list[LoadProcess] = []
    try:
        for g in groups:
            if g:
                out.append(LoadProcess(g, rate_per_node))
    except BaseException:
        for p in out:
            p.close()
        raise
    return out


# ------------------------------------------------------- the load process
def _load_main(spec_json: str) -> int:
    """One thread per target node, each paced at ``rate`` requests/s (new connection each).

    Prints ``started``, then ``fail <t> <node> <detail>`` per failed request and
    ``version <t> <node> <key>`` whenever the versions a node answers with
    change; after stdin closes, ``summary <json>``.  ``t`` is ``time.time()``
    when the response (or error) arrived.  With ``record`` in the spec, each
    node's summary also holds ``samples``: ``[sent_at, latency_s, status,
    version, pid, count]`` per request (status 0 for a connection error;
    version, pid and count from the body's ``version``/``pid``/``count``).
    """
    import http.client

    spec = json.loads(spec_json)
    rate = float(spec["rate"])
    path = spec["path"]
    record = bool(spec.get("record"))
    stop = threading.Event()
    out_lock = threading.Lock()
    stats: dict[str, dict[str, Any]] = {}

    def emit(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def worker(node: str, address: str, offset: float) -> None:
        host, _, port = address.rpartition(":")
        st = stats[node] = {"ok": 0, "failed": 0, "http_500": 0, "other_failures": [], "mixed": 0}
        samples: list[list[Any]] = []
        if record:
            st["samples"] = samples
        period = 1.0 / rate
        last_key = ""
        next_at = time.monotonic() + offset
        while not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            next_at = max(next_at + period, time.monotonic() - period)  # no catch-up bursts
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            sent = time.time()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                st["failed"] += 1
                st["other_failures"].append(f"{type(exc).__name__}: {exc}"[:200])
                emit(f"fail {time.time():.6f} {node} {type(exc).__name__}")
                if record:
                    samples.append([sent, time.time() - sent, 0, None, None, None])
                continue
            finally:
                conn.close()
            now = time.time()
            if record:
                try:
                    doc = json.loads(body)
                    seen = [doc.get("version"), doc.get("pid"), doc.get("count")]
                except (ValueError, AttributeError):
                    seen = [None, None, None]
                samples.append([sent, now - sent, status, *seen])
            if status != 200:
                st["failed"] += 1
                if status == 500:
                    st["http_500"] += 1
                else:
                    st["other_failures"].append(f"HTTP {status}")
                emit(f"fail {now:.6f} {node} {status}")
                continue
            try:
                versions = json.loads(body)["versions"]
            except (ValueError, KeyError):
                st["failed"] += 1
                st["other_failures"].append("unreadable body")
                continue
            st["ok"] += 1
            key = version_key(versions)
            if key not in WHOLE_RELEASES:
                st["mixed"] += 1
            if key != last_key:
                last_key = key
                emit(f"version {now:.6f} {node} {key}")

    targets = spec["targets"]
    threads = [
        threading.Thread(
            target=worker, args=(node, addr, i / max(1, len(targets)) / rate), daemon=True
        )
        for i, (node, addr) in enumerate(targets)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    emit("started")
    sys.stdin.read()  # until the benchmark closes our stdin
    stop.set()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - started
    for st in stats.values():
        st["other_failures"] = st["other_failures"][:20]
    total = sum(st["ok"] + st["failed"] for st in stats.values())
    emit("summary " + json.dumps({"elapsed_s": elapsed, "requests": total, "nodes": stats}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "load":
        sys.exit(_load_main(sys.argv[2]))
    sys.exit("usage: python benchmarks/_fleet.py load SPEC_JSON (started by the benchmarks)")
