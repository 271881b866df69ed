"""Scale benchmark: the control plane driving 100 to 1000 simulated nodes.

For each N (default 100, 300, 1000): a fresh real etcd (:class:`EtcdServer`),
N simulated agents (:mod:`_simagent`: real gRPC server, fence, participant,
decision watch and membership lease per node; no code loading, a fixed
prepare time) in worker processes of ``--per-process`` nodes each, and an
in-process engine that won a real election (``_fleet.Leader``: the health
sampler runs as in a coordinator).  A one-module release ``simapp@1.0.<k>``
(a new version each run) is rolled out with ``engine.upgrade(all nodes,
window_s=0)``; one unmeasured warm-up, then ``--runs`` measured rollouts.

Per rollout:

* *e2e* = last node's ``finished_at`` - the record's ``created_at``;
  *skew* = ``rollout.commit_skew_s`` (latest - earliest finish instant);
* *coordinator CPU* = CPU time of this process (the engine, its health
  sampler; the benchmark joins the engine's driver thread, it does not poll) over the rollout, per node;
* *etcd requests / bytes*: deltas of etcd's own counters
  (``grpc_server_handled_total``, ``etcd_network_client_grpc_received_bytes_total``,
  ``..._sent_bytes_total`` from ``/metrics``) over the rollout, minus the
  fleet's idle background (membership keepalives and the sampler, measured
  over ``--idle-s`` before the runs) for the same time; raw figures are in
  the JSON;
* *largest value*: the largest value under the prefix after the rollout;
* *RSS* of this process (coordinator) and of etcd after the runs.

*node by node*: ``--baseline-sample`` nodes taken through Prepare then Finish
(commit now) in sequence over gRPC with the leader's epoch; the mean time per
node times N is what a node-by-node rollout would take.

Targets (issue 17), at N = 1000 with 10 ms prepare: e2e <= 3 s, skew <= 100 ms,
no etcd value over 256 KiB, etcd bytes (received, net) <= 2 KiB per node per
rollout, coordinator CPU <= 1 ms per node per rollout, and e2e growing at most
linearly from the smallest N to the largest (e2e(N)/e2e(N0) <= N/N0).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import _common
import _fleet
import grpc

from coordinator.election import Election, Session
from coordinator.engine import Engine, RolloutOptions, Target
from coordinator.fleet import AgentPool
from coordinator.model import Phase, Rollout
from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc
from hotfleet.etcd_client import connect
from hotfleet.etcd_server import EtcdServer
from hotfleet.keys import Keys
from hotfleet.release import Release
from hotfleet.wire import release_to_proto

SIMAGENT = Path(__file__).resolve().parent / "_simagent.py"
PLOT = _common.BENCH_DIR / "results" / "scale.png"

TARGET_E2E_S = 3.0
TARGET_SKEW_S = 0.100
TARGET_VALUE_BYTES = 256 * 1024
TARGET_BYTES_PER_NODE = 2048
TARGET_CPU_PER_NODE_S = 0.001


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", default="100,300,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--per-process", type=int, default=100, help="simulated nodes/process")
    parser.add_argument("--runs", type=int, default=3, help="measured rollouts per N")
    parser.add_argument("--prepare-ms", type=float, default=10.0)
    parser.add_argument("--fail-rate", type=float, default=0.0, help="prepare failure rate")
    # 90 s, not an agent's 10 s: a keepalive is a new gRPC stream and thread in etcd3
    # (~5 ms of CPU), and 1000 nodes packed on 2 cores renewing every 10 s spent half a
    # core on it; starved renewals then failed and retried, and sessions expired (issue 17)
    parser.add_argument(
        "--lease-ttl", type=int, default=90, help="membership lease TTL of the simulated nodes, s"
    )
    parser.add_argument("--idle-s", type=float, default=3.0, help="background measure span")
    parser.add_argument("--baseline-sample", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="100 nodes, 1 run, not recorded")
    parser.add_argument("--plot", type=Path, default=PLOT)
    _common.add_output_arguments(parser)


# ------------------------------------------------------------------ measures
def etcd_metrics(endpoint: str) -> dict[str, float]:
    """etcd's request and byte counters (and requests by method) from its /metrics."""
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {"requests": 0.0, "received": 0.0, "sent": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("grpc_server_handled_total{"):
            out["requests"] += float(value)
            method = name.split('grpc_method="', 1)[1].split('"', 1)[0]
            out[f"req:{method}"] = out.get(f"req:{method}", 0.0) + float(value)
        elif name == "etcd_network_client_grpc_received_bytes_total":
            out["received"] = float(value)
        elif name == "etcd_network_client_grpc_sent_bytes_total":
            out["sent"] = float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def largest_value(client: Any, prefix: str) -> tuple[int, str, int]:
    """(bytes, key, total bytes) of the values under ``prefix``."""
    biggest, where, total = 0, "", 0
    for value, meta in client.get_prefix(prefix):
        total += len(value)
        if len(value) > biggest:
            biggest, where = len(value), meta.key.decode()
    return biggest, where, total


def sim_release(k: int) -> Release:
    source = f'"""Simulated app, build {k}."""\n\nVERSION = "1.0.{k}"\n'
    return Release.from_sources("simapp", f"1.0.{k}", {"simapp": source}, packages=["simapp"])


# ------------------------------------------------------------------ fleet
class Workers:
    """``ceil(n / per)`` processes of simulated agents; stopped by closing their stdin."""

    def __init__(self, endpoint: str, prefix: str, n: int, args: argparse.Namespace) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.addresses: dict[str, str] = {}
        self._ready: list[threading.Event] = []
        for first in range(0, n, args.per_process):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(SIMAGENT),
                    f"--endpoint={endpoint}",
                    f"--prefix={prefix}",
                    f"--first={first}",
                    f"--count={min(args.per_process, n - first)}",
                    f"--prepare-ms={args.prepare_ms}",
                    f"--fail-rate={args.fail_rate}",
                    f"--lease-ttl={args.lease_ttl}",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            ready = threading.Event()
            threading.Thread(target=self._pump, args=(proc, ready), daemon=True).start()
            self.procs.append(proc)
            self._ready.append(ready)

    def _pump(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            parts = line.split()
            if parts[:1] == ["ready"] and len(parts) == 3:
                self.addresses[parts[1]] = parts[2]
            elif parts == ["ready-all"]:
                ready.set()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc, ready in zip(self.procs, self._ready, strict=True):
            while not ready.wait(0.2):
                if proc.poll() is not None:
                    raise RuntimeError(f"simulated agents exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("simulated agents not ready in time")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class ScaleLeader(_fleet.Leader):
    """``_fleet.Leader`` on a 15 s session: 1000 simulated nodes on 2 cores starve threads."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        self.client = connect(endpoint)
        self.keys = Keys(prefix)
        self.engine = Engine(self.client, self.keys, AgentPool(), address="bench-leader")
        self.session = Session(self.client, ttl=15)
        self.lead = Election(self.client, self.keys.election, self.session).campaign(
            "bench-leader", timeout=30
        )
        self.engine.lead(self.lead)


def baseline(leader: ScaleLeader, addresses: list[str], entry_release: Release) -> float:
    """Mean seconds per node of Prepare then Finish (commit now), node after node."""
    message = release_to_proto(entry_release)
    rid = f"baseline-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            prepared = stub.Prepare(
                agent_pb2.PrepareRequest(rollout_id=rid, epoch=leader.epoch, release=message),
                timeout=30,
            )
            if not prepared.ok:
                raise RuntimeError(f"baseline prepare refused on {address}: {prepared.errors}")
            stub.Finish(agent_pb2.FinishRequest(rollout_id=rid, epoch=leader.epoch), timeout=30)
    return (time.perf_counter() - started) / len(addresses)


def measure_n(n: int, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    prefix = "/hotfleet/"
    tmp = Path(tempfile.mkdtemp(prefix="hotfleet-scale-"))
    etcd = EtcdServer(tmp / "etcd")
    etcd.start()
    workers: Workers | None = None
    leader: ScaleLeader | None = None
    try:
        endpoint = etcd.endpoint
        t0 = time.monotonic()
        workers = Workers(endpoint, prefix, n, args)
        workers.wait_ready(120 + n * 0.2)
        leader = ScaleLeader(endpoint, prefix)
        while len(leader.engine.nodes()) < n:
            if time.monotonic() - t0 > 120 + n * 0.2:
                raise RuntimeError(f"only {len(leader.engine.nodes())} of {n} nodes registered")
            time.sleep(0.5)
        startup = time.monotonic() - t0
        say(f"N={n}: {n} nodes registered in {startup:.1f}s")
        build = 1

        def rollout() -> tuple[Rollout, float, float]:
            nonlocal build
            build += 1
            rel = sim_release(build)
            leader.engine.push_release(rel)
            cpu0, w0 = time.process_time(), time.monotonic()
            r = leader.engine.upgrade(
                rel.label, Target(all=True), RolloutOptions(window_s=0.0, timeout_s=60.0)
            )
            # Join the engine's driver of the rollout rather than poll its record: a poll
            # would add the record's size to the etcd traffic at every step.
            driver = leader.engine._driving.get(r.id)
            if driver is not None:
                driver.join(120)
            r = leader.wait(r.id, timeout=120, poll=0.1)
            return r, time.process_time() - cpu0, time.monotonic() - w0

        warm, _, _ = rollout()
        say(f"N={n}: warm-up {warm.phase.value} in {warm.duration_s:.2f}s")
        time.sleep(1.0)
        idle0, idle_t0, idle_cpu0 = etcd_metrics(endpoint), time.monotonic(), time.process_time()
        time.sleep(args.idle_s)
        idle = delta(etcd_metrics(endpoint), idle0)
        idle_span = time.monotonic() - idle_t0
        idle_cpu = (time.process_time() - idle_cpu0) / idle_span  # the sampler, mostly
        say(
            f"N={n}: idle: coordinator {idle_cpu:.2f} cores, etcd {idle['requests'] / idle_span:.0f} req/s"
        )
        runs = []
        for i in range(args.runs):
            time.sleep(1.0)  # the previous rollout's membership writes settle
            before = etcd_metrics(endpoint)
            agents0, etcd0 = _common.cpu_s(workers.pids()), _common.cpu_s([etcd.pid or 0])
            r, cpu, wall = rollout()
            agents_cpu, etcd_cpu = (
                _common.cpu_s(workers.pids()) - agents0,
                _common.cpu_s([etcd.pid or 0]) - etcd0,
            )
            after = etcd_metrics(endpoint)
            raw = delta(after, before)
            net = {
                k: raw.get(k, 0.0) - idle.get(k, 0.0) * wall / idle_span
                for k in ("requests", "received", "sent")
            }
            value, key, total = largest_value(leader.client, prefix)
            finished = [x.finished_at for x in r.nodes.values() if x.finished]
            run: dict[str, Any] = {
                "phase": r.phase.value,
                "finished": len(finished),
                "e2e_s": (max(finished) - r.created_at) if finished else float("nan"),
                "skew_s": r.commit_skew_s,
                "wall_s": wall,
                "coordinator_cpu_s": cpu,
                # where the rest of the two cores went, and where the e2e went
                "agents_cpu_s": agents_cpu,
                "etcd_cpu_s": etcd_cpu,
                "prepare_phase_s": r.decided_at - r.created_at,
                "commit_lead_s": r.commit_at - r.decided_at if r.commit_at else float("nan"),
                "etcd_raw": raw,
                "etcd_net": net,
                "largest_value": value,
                "largest_key": key,
                "prefix_bytes": total,
            }
            runs.append(run)
            say(
                f"N={n} run {i + 1}: {run['phase']} e2e {run['e2e_s'] * 1e3:.0f} ms skew "
                f"{run['skew_s'] * 1e3:.1f} ms cpu {cpu / n * 1e3:.2f} ms/node etcd "
                f"{net['requests']:.0f} req {net['received'] / n:.0f} B/node in, "
                f"{net['sent'] / n:.0f} B/node out; largest {value} B ({key}); agents "
                f"{agents_cpu / n * 1e3:.1f} ms/node, etcd {etcd_cpu / n * 1e3:.1f} ms/node CPU; "
                f"prepare phase {run['prepare_phase_s']:.2f} s, lead {run['commit_lead_s']:.2f} s"
            )
        per_node = baseline(
            leader,
            [workers.addresses[k] for k in sorted(workers.addresses)[: args.baseline_sample]],
            sim_release(build + 1),
        )
        say(f"N={n}: node by node {per_node * 1e3:.1f} ms/node -> {per_node * n:.1f} s")
        out: dict[str, Any] = {
            "nodes": n,
            "processes": len(workers.procs),
            "startup_s": startup,
            "warmup": {"phase": warm.phase.value, "duration_s": warm.duration_s},
            "idle_per_s": {k: v / idle_span for k, v in idle.items()},
            "coordinator_idle_cores": idle_cpu,
            "runs": runs,
            "coordinator_rss": rss_bytes(),
            "etcd_rss": rss_bytes(etcd.pid or 0),
            "workers_rss": sum(rss_bytes(p) for p in workers.pids()),
            "baseline_per_node_s": per_node,
            "baseline_total_s": per_node * n,
        }
        return out
    finally:
        if leader is not None:
            leader.close()
        if workers is not None:
            workers.close()
        etcd.stop()
        with contextlib.suppress(OSError):
            import shutil

            shutil.rmtree(tmp)


def judge(results: list[dict[str, Any]]) -> dict[str, bool]:
    top = max(results, key=lambda r: r["nodes"])
    low = min(results, key=lambda r: r["nodes"])
    n = top["nodes"]
    runs = top["runs"]
    ok = [r for r in runs if r["phase"] == Phase.PERMANENT.value and r["finished"] == n]

    def worst(key: str) -> float:
        return max(r[key] for r in runs) if runs else float("inf")

    e2e_low = max(r["e2e_s"] for r in low["runs"]) if low["runs"] else float("nan")
    return {
        "all_committed": len(ok) == len(runs),
        "e2e_le_3s": worst("e2e_s") <= TARGET_E2E_S,
        "skew_le_100ms": worst("skew_s") <= TARGET_SKEW_S,
        "value_le_256KiB": worst("largest_value") <= TARGET_VALUE_BYTES,
        "etcd_bytes_le_2KiB_per_node": max(r["etcd_net"]["received"] for r in runs) / n
        <= TARGET_BYTES_PER_NODE,
        "cpu_le_1ms_per_node": worst("coordinator_cpu_s") / n <= TARGET_CPU_PER_NODE_S,
        "e2e_at_most_linear": low is top or worst("e2e_s") / e2e_low <= n / low["nodes"],
    }


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["nodes"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, unit, target in (
        ("e2e_s", ax1, "rollout e2e (s)", TARGET_E2E_S),
        ("skew_s", ax2, "commit skew (ms)", TARGET_SKEW_S * 1e3),
    ):
        scale = 1e3 if key == "skew_s" else 1.0
        p50 = [_common.percentile([x[key] * scale for x in r["runs"]], 50) for r in results]
        worst = [max(x[key] * scale for x in r["runs"]) for r in results]
        ax.plot(ns, p50, "o-", label="p50")
        ax.plot(ns, worst, "s--", label="max")
        ax.axhline(target, color="red", linestyle=":", label="target at 1000")
        ax.set_xlabel("simulated nodes")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


HEADER = [
    "date (UTC)",
    "rev",
    "machine",
    "N",
    "procs",
    "runs",
    "e2e ms p50/max",
    "skew ms p50/max",
    "coord CPU ms/node",
    "etcd req/rollout",
    "etcd B/node in (out)",
    "largest value B",
    "RSS coord / etcd MiB",
    "node by node s",
    "targets",
]

PREAMBLE = (
    "`python benchmarks/run.py scale --nodes 100,300,1000`: N simulated agents "
    "(`benchmarks/_simagent.py`: real gRPC server, fence, participant, decision watch and "
    "membership lease per node, a 10 ms prepare, no code loading; 100 per process) and an "
    "in-process elected engine with its health sampler, all on this machine with one etcd "
    "3.5.1; `engine.upgrade` of a one-module release to all nodes, `window_s=0`. *e2e* = last "
    "finish - record `created_at`; *skew* = latest - earliest finish; *coord CPU* = CPU of the "
    "coordinator process over the rollout / N; *etcd* = etcd's own counters over the rollout "
    "(`grpc_server_handled_total`, client gRPC bytes received (sent)), minus the fleet's idle "
    "background (membership keepalives, sampler) for the same time; *largest value* under the "
    "prefix after the rollout; *node by node* = mean Prepare+Finish time per node over 20 "
    "nodes in sequence x N. Targets at 1000: e2e <= 3 s, skew <= 100 ms, value <= 256 KiB, "
    "<= 2 KiB/node in, <= 1 ms CPU/node, e2e at most linear in N. Plot: "
    "`benchmarks/results/scale.png`."
)


def rows(res: dict[str, Any]) -> list[list[str]]:
    out = []
    mach = res["machine"]
    for r in res["results"]:
        runs = r["runs"]
        e2e = [x["e2e_s"] for x in runs]
        skew = [x["skew_s"] for x in runs]
        pct = _common.percentile
        load = f"load {r['load_before']:.1f}→{r['load_after']:.1f}"
        out.append(
            [
                res["date"],
                res["revision"],
                f"{mach['cpu'].split()[0]} {mach['cores']} cores; {load}",
                str(r["nodes"]),
                str(r["processes"]),
                str(len(runs)),
                f"{pct(e2e, 50) * 1e3:.0f} / {max(e2e) * 1e3:.0f}",
                f"{pct(skew, 50) * 1e3:.1f} / {max(skew) * 1e3:.1f}",
                f"{max(x['coordinator_cpu_s'] for x in runs) / r['nodes'] * 1e3:.2f}",
                f"{max(x['etcd_net']['requests'] for x in runs):.0f}",
                f"{max(x['etcd_net']['received'] for x in runs) / r['nodes']:.0f} "
                f"({max(x['etcd_net']['sent'] for x in runs) / r['nodes']:.0f})",
                f"{max(x['largest_value'] for x in runs)}",
                f"{r['coordinator_rss'] / 2**20:.0f} / {r['etcd_rss'] / 2**20:.0f}",
                f"{r['baseline_total_s']:.1f}",
                ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in res["targets"].items())
                if r is res["results"][-1]
                else "",
            ]
        )
    return out


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.nodes, args.runs = "100", 1
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    date = _common.now_utc()
    say = _fleet.progress_clock()
    _common.warn_if_busy()
    results = []
    for n in sizes:
        load_before = _common.load_average()
        foreign = _common.ForeignCpu()
        r = measure_n(n, args, say)
        r["load_before"], r["load_after"] = load_before, _common.load_average()
        r["foreign_cores"] = foreign.cores()
        results.append(r)
    res = _common.result_header("scale", date)
    res.update(
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "cpu_count": os.cpu_count(),
            "results": results,
            "targets": judge(results),
        }
    )
    title = f"hotfleet scale, {res['date']} {res['revision']}, {os.cpu_count()} cores"
    try:
        plot(results, args.plot, title)
        res["plot"] = str(args.plot)
        print(f"plot: {args.plot}")
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
    _common.print_table([HEADER, *rows(res)])
    _common.save_results(args, res, date, rows, HEADER, PREAMBLE)
    return 0 if all(res["targets"].values()) else 1
