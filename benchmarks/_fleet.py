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
the temp dir.  The agents are launched by :mod:`coordinator.launch` and the
load is :mod:`coordinator.traffic` (:class:`LoadProcess`: paced HTTP load in
its own process, so the load does not compete with the leader for the GIL),
as in the tests and the dev cluster.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import REPO_ROOT

from coordinator.election import Election, Session
from coordinator.engine import Engine
from coordinator.fleet import AgentPool
from coordinator.health import HealthSampler
from coordinator.launch import (
    ChildProcess,
    agent_command,
    child_environment,
    copy_code,
    spawn,
    stop_all,
)
from coordinator.model import Rollout
from coordinator.traffic import TrafficEvent, TrafficProcess, version_key
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from hotfleet.keys import Keys
from hotfleet.protocol import AGENT_READY

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
class AgentProc(ChildProcess):
    """One ``node-agent`` subprocess (:class:`coordinator.launch.ChildProcess`)."""

    def __init__(self, node_id: str, proc: subprocess.Popen[str], log_path: Path) -> None:
        super().__init__(proc, log_path, f"agent {node_id}")
        self.node_id = node_id
        self.grpc_address = ""
        self.http_address = ""

    def wait_ready(self, deadline: float) -> None:
        fields = self.wait_ready_line(AGENT_READY, max(0.0, deadline - time.monotonic()))
        self.grpc_address, self.http_address = fields["grpc"], fields["http"]

    def versions(self, timeout: float = 2.0) -> dict[str, str]:
        """Module versions served right now (``GET /``)."""
        with urllib.request.urlopen(f"http://{self.http_address}/", timeout=timeout) as resp:
            return dict(json.loads(resp.read())["versions"])


def _shop(**versions: str) -> str:
    """The version key (:func:`coordinator.traffic.version_key`) of shop 1 with ``versions``."""
    return version_key({"shop": "1", **dict.fromkeys(SHOP_MODULES, "1"), **versions})


V1 = _shop()  # shop 1.0.0 (the boot code)
V2 = _shop(**dict.fromkeys(SHOP_MODULES, "2"))  # shop 2.0.0
V2_BAD = _shop(**{**dict.fromkeys(SHOP_MODULES, "2"), "shop.pricing": "2.1"})  # 2.1.0-bad


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
        code = copy_code(self.boot_code, self.tmp / f"code-{node_id}")
        log_path = self.tmp / f"{node_id}.log"
        cmd = agent_command(
            node_id,
            code_path=code,
            etcd=self.endpoint,
            cache_dir=self.tmp / f"cache-{node_id}",
            prefix=PREFIX,
            lease_ttl=self.lease_ttl,
        )
        proc = spawn(cmd, log_path, child_environment(dev=True), self.tmp)
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
        stop_all(self.agents)  # graceful: each agent revokes its lease
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
LoadEvent = TrafficEvent


class LoadProcess(TrafficProcess):
    """Paced HTTP load on some nodes from a process of its own, one thread per node.

    :class:`coordinator.traffic.TrafficProcess` with the benchmarks' defaults:
    :meth:`events` are its ``fail``/``version`` lines; :meth:`stop` returns
    ``{"elapsed_s", "requests", "nodes": {node: {"ok", "failed", "http_500",
    "other_failures", "mixed", ...}}}``, each node with ``samples`` (``[sent_at,
    latency_s, status, version, pid, count]`` per request) when ``record``.
    """

    def __init__(
        self,
        targets: Sequence[tuple[str, str]],
        rate: float,
        path: str = "/price?sku=apple&qty=2",
        *,
        record: bool = False,
    ) -> None:
        super().__init__(dict(targets), rate, threads=1, path=path, record=record)


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
