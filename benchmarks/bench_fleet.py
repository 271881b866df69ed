"""Fleet benchmark: a 20-module release made current on N agent processes by the leader's 2PC.

For each N (default 10 and 50), a real fleet (``_fleet.Fleet``): etcd, N
``node-agent`` subprocesses started in parallel (start-up time reported),
and an in-process engine that won a real election.  The boot code is the
example shop plus 16 generated modules (``shop.g00`` .. ``shop.g15``,
imported by ``shop.app``); releases v1 (the boot code) and v2 (shop 2.0.0 +
the 16 modules changed) each touch the same 20 modules.

* **2PC** (the product): ``engine.upgrade(<release>, all nodes,
  window_s=0)`` alternately to v2 and back to v1, each measured run a new
  build no node has seen (same code plus a comment: every node fetches,
  parses, compiles and plans it from scratch, as in a real deploy; pushed
  off the clock, as ``coordctl release push``, which has the nodes unpack
  it: one agent of the host compiles and plans it into the host code cache
  before the rollout, for both sides; ``--no-unpack``: the rollout's
  prepares do it); from the rollout record,
  *end to end* = finish instant of the last node - the record's
  ``created_at``, and *commit skew* = ``rollout.commit_skew_s`` (latest -
  earliest finish instant).  One round trip v2 → v1 of the plain releases
  runs first, unmeasured (first prepare of the processes, first
  connections), and is reported apart.
* **Baseline** (no 2PC), after the 2PC runs, same fleet, new builds too:
  node by node in sequence, ``Prepare`` then ``Finish`` over gRPC
  (``agent_pb2`` stubs; agents obey only the epoch etcd names as the
  leader's, so the engine steps down and a bare campaign on the same
  election takes over and drives them with its epoch: no engine acts
  meanwhile, which is why it runs last); total = last finish - first
  prepare sent, skew = last node's finish - first node's finish.  Each
  release is made permanent on every node afterwards, off the clock, as the
  leader does.

Targets (issue 4): N = 50 end to end < 3 s; skew < 50 ms and >= 10x smaller
than the baseline's (p50 against p50).  The e2e and skew targets are judged
on the worst measured run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common
import _fleet
import grpc

from coordinator.engine import RolloutOptions, Target
from coordinator.model import Phase, Rollout
from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc
from hotfleet.release import Release
from hotfleet.wire import release_to_proto

N_GENERATED = 16
SHOP_CHANGED = ("shop.app", "shop.cart", "shop.inventory", "shop.pricing")
TARGET_E2E_S = 3.0
TARGET_E2E_NODES = 50
TARGET_SKEW_S = 0.050
TARGET_RATIO = 10.0


# ------------------------------------------------------------------ workload
def _gen(i: int) -> str:
    return f"g{i:02d}"


def generated_source(i: int, v: int) -> str:
    """Module ``shop.g{i}`` at version ``v``: constants, 12 functions, 2 classes."""
    bump = 2 if v == 2 else 1
    deps = sorted({j for j in (i - 1, i // 2) if 0 <= j < i})
    out = [
        f'"""Generated module {i:02d} of the hotfleet fleet benchmark (v{v})."""',
        "",
    ]
    out += [f"from shop import {_gen(j)}" for j in deps]
    out += [
        "",
        f'VERSION = "{v}"',
        f"LIMIT = {10 + i + (100 if v == 2 and i % 4 == 0 else 0)}",
        f"SCALE = {i % 7 + 2}",
        "",
        "",
    ]
    for n in range(12):
        out.append(f"def f_{n}(x):")
        if n % 3 == 0:
            out.append(f"    return sum(x * k + {n} for k in range(3)) + LIMIT % {n + 2} + {bump}")
        else:
            out.append(f"    return x * {n + 1} + SCALE - {i} + {bump if n % 2 else 1}")
        out += ["", ""]
    calls = " + ".join(f"f_{n}(x)" for n in range(12))
    out += ["def work(x):", f"    total = {calls}"]
    out += [f"    total += {_gen(j)}.f_0(x)" for j in deps]
    out += ["    return total", "", ""]
    out += [
        f"class Model{i:02d}:",
        "    def __init__(self, n):",
        "        self.n = n",
        "        self.values = [n, n + 1, n + 2]",
        "",
        "    def total(self):",
        f"        return sum(v * SCALE for v in self.values) + {bump}",
        "",
        "    def kind(self):",
        f'        return "v{v}"',
        "",
        "",
        f"class Special{i:02d}(Model{i:02d}):",
        "    def total(self):",
        f"        return super().total() * {bump + 1}",
        "",
        "",
        f"DEFAULT = Model{i:02d}(LIMIT)",
    ]
    return "\n".join(out) + "\n"


IMPORT_LINE = (
    "\n# the fleet benchmark's 16 generated modules, loaded at boot\n"
    "from shop import " + ", ".join(_gen(i) for i in range(N_GENERATED)) + "  # noqa: E402, F401\n"
)


def _shop_sources(root: Path) -> dict[str, str]:
    return {m: (root / (m.replace(".", "/") + ".py")).read_text() for m in SHOP_CHANGED}


def build_workload(work: Path) -> tuple[Path, Release, Release]:
    """The boot-code directory (v1) and the v1 and v2 releases, 20 modules each."""
    gens = {
        v: {f"shop.{_gen(i)}": generated_source(i, v) for i in range(N_GENERATED)} for v in (1, 2)
    }
    v1 = _shop_sources(_fleet.SHOP)
    v1["shop.app"] += IMPORT_LINE
    v2 = _shop_sources(_fleet.RELEASES / "shop-2.0.0")
    v2["shop.app"] += IMPORT_LINE
    boot = _fleet.write_shop_tree(work / "boot", {**v1, **gens[1]}, _fleet.SHOP)
    rel1 = Release.from_sources("shop", "1.0.0-m20", {**v1, **gens[1]})
    rel2 = Release.from_sources(
        "shop",
        "2.0.0-m20",
        {**v2, **gens[2]},
        modules={"shop.inventory": {"extra": {"reorder_level": 20}}},  # as shop-2.0.0
    )
    src1 = {m.name: m.source for m in rel1.modules}
    changed = [m.name for m in rel2.modules if src1.get(m.name) != m.source]
    assert len(rel1.modules) == len(rel2.modules) == len(changed) == 20, changed
    return boot, rel1, rel2


_RUN = os.urandom(6).hex()


def new_build(release: Release, build: int) -> Release:
    """``release`` as a build no node has seen: the same code plus a comment, so
    every node fetches, parses, compiles and plans it from scratch."""
    # unique per run: the host code cache (node_agent._codecache) outlives a run
    sources = {m.name: m.source.decode() + f"# build {build} {_RUN}\n" for m in release.modules}
    modules = {m.name: {"extra": m.extra} for m in release.modules if m.extra is not None}
    return Release.from_sources(
        release.name, f"{release.version}.b{build}", sources, modules=modules or None
    )


IDLE_SAMPLE_S = 3.0


# ------------------------------------------------------------------- the 2PC
def run_2pc(fleet: _fleet.Fleet, label: str, concurrency: int | None) -> dict[str, Any]:
    leader = fleet.leader
    assert leader is not None
    # the runs alternate v2 <-> v1: every other one is a downgrade, asked for
    opts = RolloutOptions(window_s=0.0, timeout_s=60.0, allow_downgrade=True)
    if concurrency:
        opts.concurrency = concurrency
    agents = [a.proc.pid for a in fleet.agents]
    etcd = [fleet.etcd.pid or 0] if fleet.etcd is not None else []
    cpu0 = (_common.cpu_s(agents, children=True), _common.cpu_s(etcd), time.process_time())
    t_call = time.time()
    started = leader.engine.upgrade(label, Target(all=True), opts)
    t_returned = time.time()
    done = leader.wait(started.id, timeout=180, poll=0.05)
    out = rollout_timings(done, t_call, t_returned, fleet.nodes)
    # where the CPU went, from the call until the record says permanent: the agents
    # (with their staging processes), etcd, and this process (the leader's engine)
    out["agents_cpu_s"] = _common.cpu_s(agents, children=True) - cpu0[0]
    out["etcd_cpu_s"] = _common.cpu_s(etcd) - cpu0[1]
    out["coordinator_cpu_s"] = time.process_time() - cpu0[2]
    return out


def rollout_timings(r: Rollout, t_call: float, t_returned: float, nodes: int) -> dict[str, Any]:
    finished = [n for n in r.nodes.values() if n.finished]
    if r.phase is not Phase.PERMANENT or len(finished) != nodes:
        raise RuntimeError(
            f"rollout {r.id} ended {r.phase.value} with {len(finished)}/{nodes} nodes "
            f"finished: {r.reason}"
        )
    times = sorted(n.finished_at for n in finished)
    if os.environ.get("HF_FLEET_DEBUG"):  # each node's switch, ms after the first one's
        print("switch offsets ms:", " ".join(f"{(t - times[0]) * 1e3:.0f}" for t in times))
    return {
        "id": r.id,
        "release": r.release,
        "e2e_s": times[-1] - r.created_at,
        "e2e_from_call_s": times[-1] - t_call,
        "upgrade_call_s": t_returned - t_call,
        "skew_s": r.commit_skew_s,
        "prepare_phase_s": r.decided_at - r.created_at,
        "finish_phase_s": times[-1] - r.decided_at,
        "first_finish_after_decision_s": times[0] - r.decided_at,
        "prepare_node_max_s": max(n.prepare_s for n in finished),
        "finish_pause_max_ms": max(n.pause_s for n in finished) * 1e3,
        "permanent_after_s": (r.ended_at - r.created_at) if r.ended_at else None,
    }


# ------------------------------------------------------------------ baseline
class Direct:
    """gRPC stubs straight to every agent, driven without the coordinator."""

    def __init__(self, agents: list[_fleet.AgentProc], epoch: int) -> None:
        self.agents = agents
        self.epoch = epoch
        self.channels = [grpc.insecure_channel(a.grpc_address) for a in agents]
        self.stubs = [agent_pb2_grpc.NodeAgentStub(c) for c in self.channels]
        for stub in self.stubs:  # connect now, off the clock (the leader's pool is warm too)
            stub.Status(agent_pb2.StatusRequest(), timeout=10)

    def sequential(self, release: Release, rollout_id: str) -> dict[str, Any]:
        message = release_to_proto(release)
        finishes: list[float] = []
        prepares: list[float] = []
        t0 = time.time()
        for agent, stub in zip(self.agents, self.stubs, strict=True):
            p0 = time.perf_counter()
            reply = stub.Prepare(
                agent_pb2.PrepareRequest(rollout_id=rollout_id, epoch=self.epoch, release=message),
                timeout=60,
            )
            prepares.append(time.perf_counter() - p0)
            if not reply.ok:
                raise RuntimeError(f"{agent.node_id} refused {release.label}: {reply.errors}")
            fin = stub.Finish(
                agent_pb2.FinishRequest(rollout_id=rollout_id, epoch=self.epoch), timeout=60
            )
            finishes.append(time.time())
            if not fin.ok:
                raise RuntimeError(
                    f"{agent.node_id} failed to finish {release.label}: {fin.errors}"
                )
        result = {
            "release": release.label,
            "total_s": finishes[-1] - t0,
            "skew_s": finishes[-1] - finishes[0],
            "prepare_node_p50_s": _common.percentile(prepares, 50),
            "prepare_node_max_s": max(prepares),
        }
        # off the clock: make it permanent everywhere, as the leader does after its window
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(
                pool.map(
                    lambda stub: stub.MakePermanent(
                        agent_pb2.MakePermanentRequest(
                            rollout_id=rollout_id, epoch=self.epoch, release=release.label
                        ),
                        timeout=60,
                    ),
                    self.stubs,
                )
            )
        return result

    def close(self) -> None:
        for c in self.channels:
            c.close()


# ---------------------------------------------------------------------- run
def check_versions(fleet: _fleet.Fleet, want: str) -> None:
    seen = fleet.versions()
    wrong = {n: v for n, v in seen.items() if v != want}
    if wrong:
        raise RuntimeError(f"nodes not serving {want}: {wrong}")


def run_n(
    n: int,
    boot: Path,
    releases: tuple[Release, Release],
    runs: int,
    baseline_runs: int,
    concurrency: int | None,
    lease_ttl: int,
    say: Any,
    unpack: bool = True,
) -> dict[str, Any]:
    rel1, rel2 = releases
    keys = {rel1.label: _fleet.V1, rel2.label: _fleet.V2}
    out: dict[str, Any] = {"nodes": n}
    load_start = _common.load_average()
    unpacked: list[dict[str, Any]] = []
    with _fleet.Fleet(n, boot_code=boot, lease_ttl=lease_ttl, progress=say) as fleet:
        leader = fleet.leader
        assert leader is not None

        def push(rel: Release) -> None:
            """Off the clock, as `coordctl release push` (which has the nodes unpack it)."""
            leader.engine.push_release(rel)
            if unpack:
                t0 = time.perf_counter()
                answers = leader.engine.unpack_release(rel.label)
                unpacked.append(
                    {
                        "release": rel.label,
                        "wall_s": time.perf_counter() - t0,
                        "done": sum(a.done for a in answers),
                        "answers": sorted({a.detail.split(" (")[0] for a in answers}),
                    }
                )

        out["startup_s"] = fleet.startup_s
        out["registered_s"] = fleet.registered_s
        for rel in (rel1, rel2):
            push(rel)
        check_versions(fleet, _fleet.V1)
        order = [rel2.label, rel1.label]  # v2 first: the boot code is v1
        cold = []
        for label in order:  # warm-up round trip, reported apart
            cold.append(run_2pc(fleet, label, concurrency))
            check_versions(fleet, keys[label])
        say(
            f"N={n} warm-up: e2e {cold[0]['e2e_s'] * 1e3:.0f} / {cold[1]['e2e_s'] * 1e3:.0f} ms, "
            f"skew {cold[0]['skew_s'] * 1e3:.1f} / {cold[1]['skew_s'] * 1e3:.1f} ms"
        )
        # what the idle fleet costs (membership leases, watches, gRPC), to read the
        # rollouts' CPU against: per node, over the e2e of a rollout
        pids = [a.proc.pid for a in fleet.agents]
        idle0, t0 = _common.cpu_s(pids, children=True), time.perf_counter()
        time.sleep(IDLE_SAMPLE_S)
        out["agents_idle_cpu_s_per_s"] = (_common.cpu_s(pids, children=True) - idle0) / (
            time.perf_counter() - t0
        )
        say(
            f"N={n} idle: the agents use {out['agents_idle_cpu_s_per_s'] / n * 1e3:.1f} "
            "ms of CPU per node per second"
        )
        measured = []
        for k in range(runs):
            rel = new_build((rel2, rel1)[k % 2], k)  # never seen by any node, as in a deploy
            push(rel)
            res = run_2pc(fleet, rel.label, concurrency)
            check_versions(fleet, keys[(rel2, rel1)[k % 2].label])
            measured.append(res)
            say(
                f"N={n} 2PC run {k + 1}/{runs} -> {rel.label}: e2e {res['e2e_s'] * 1e3:.0f} ms, "
                f"skew {res['skew_s'] * 1e3:.1f} ms; CPU ms/node: agents "
                f"{res['agents_cpu_s'] / n * 1e3:.0f}, etcd {res['etcd_cpu_s'] / n * 1e3:.1f}, "
                f"coordinator {res['coordinator_cpu_s'] / n * 1e3:.1f}"
            )
        pushed = []
        current = (rel2, rel1)[(runs - 1) % 2].label if runs else order[1]
        for k in range(baseline_runs):  # pushed while the engine leads; driven after
            plain = rel2 if current == rel1.label else rel1
            pushed.append((plain, new_build(plain, 1000 + k)))
            push(pushed[-1][1])
            current = plain.label
        epoch = fleet.take_leadership()
        say(f"N={n} baseline driven by a bare leader, epoch {epoch}")
        direct = Direct(fleet.agents, epoch)
        base = []
        try:
            for k, (plain, rel) in enumerate(pushed):
                res = direct.sequential(rel, f"bench-sequential-{k}")
                check_versions(fleet, keys[plain.label])
                base.append(res)
                say(
                    f"N={n} baseline run {k + 1}/{baseline_runs} -> {rel.label}: total "
                    f"{res['total_s'] * 1e3:.0f} ms, skew {res['skew_s'] * 1e3:.0f} ms"
                )
        finally:
            direct.close()
    out["load_average"] = {"start": load_start, "end": _common.load_average()}
    out["unpacked"] = unpacked
    out["warmup"] = cold
    out["runs"] = measured
    out["baseline_runs"] = base

    def stat(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
        return _common.summary([r[key] for r in rows if r.get(key) is not None])

    out["e2e_s"] = stat(measured, "e2e_s")
    out["e2e_from_call_s"] = stat(measured, "e2e_from_call_s")
    out["skew_s"] = stat(measured, "skew_s")
    out["prepare_phase_s"] = stat(measured, "prepare_phase_s")
    out["finish_phase_s"] = stat(measured, "finish_phase_s")
    out["prepare_node_max_s"] = stat(measured, "prepare_node_max_s")
    for key in ("agents_cpu_s", "etcd_cpu_s", "coordinator_cpu_s"):
        out[key] = stat(measured, key)
    out["baseline_total_s"] = stat(base, "total_s")
    out["baseline_skew_s"] = stat(base, "skew_s")
    skew_p50 = out["skew_s"]["p50"]
    out["skew_ratio_p50"] = (out["baseline_skew_s"]["p50"] / skew_p50) if skew_p50 else None
    out["targets"] = {
        "e2e_max_under_3s": (out["e2e_s"]["max"] < TARGET_E2E_S) if measured else None,
        "skew_max_under_50ms": (out["skew_s"]["max"] < TARGET_SKEW_S) if measured else None,
        "skew_10x_smaller": (
            (out["skew_ratio_p50"] or 0.0) >= TARGET_RATIO if measured and base else None
        ),
    }
    return out


# -------------------------------------------------------------------- report
def _ms(d: dict[str, float], key: str, digits: int = 0) -> str:
    v = d.get(key)
    return "n/a" if v is None or v != v else f"{v * 1e3:.{digits}f}"


def _pm(d: dict[str, float], digits: int = 0) -> str:
    return f"{_ms(d, 'p50', digits)} / {_ms(d, 'max', digits)}"


def _ok(v: bool | None) -> str:
    return "n/a" if v is None else ("PASS" if v else "FAIL")


def print_report(res: dict[str, Any]) -> None:
    rows = [
        [
            "N",
            "start-up s",
            "e2e ms p50/max",
            "skew ms p50/max",
            "prepare ph. p50",
            "finish ph. p50",
            "baseline total ms p50/max",
            "baseline skew ms p50/max",
            "skew ratio p50",
        ]
    ]
    for r in res["fleets"]:
        ratio = r["skew_ratio_p50"]
        rows.append(
            [
                str(r["nodes"]),
                f"{r['startup_s']:.1f}",
                _pm(r["e2e_s"]),
                _pm(r["skew_s"], 1),
                _ms(r["prepare_phase_s"], "p50"),
                _ms(r["finish_phase_s"], "p50"),
                _pm(r["baseline_total_s"]),
                _pm(r["baseline_skew_s"]),
                "n/a" if ratio is None else f"{ratio:.0f}x",
            ]
        )
    cfg = res["config"]
    print(
        f"{cfg['runs']} 2PC runs (after 1 warm-up round trip) and {cfg['baseline_runs']} "
        f"sequential runs per N; release of {cfg['modules']} modules, all changed"
    )
    _common.print_table(rows)
    print()
    for r in res["fleets"]:
        t = r["targets"]
        e2e_note = (
            "" if r["nodes"] >= TARGET_E2E_NODES else f" (target is for N={TARGET_E2E_NODES})"
        )
        w = r["warmup"]
        print(
            f"N={r['nodes']}: e2e max {_ms(r['e2e_s'], 'max')} ms < {TARGET_E2E_S:g} s: "
            f"{_ok(t['e2e_max_under_3s'])}{e2e_note}; skew max {_ms(r['skew_s'], 'max', 1)} ms "
            f"< {TARGET_SKEW_S * 1e3:.0f} ms: {_ok(t['skew_max_under_50ms'])}; baseline skew / "
            f"2PC skew (p50) >= {TARGET_RATIO:.0f}x: {_ok(t['skew_10x_smaller'])}; warm-up "
            f"(cold) e2e {w[0]['e2e_s'] * 1e3:.0f}/{w[1]['e2e_s'] * 1e3:.0f} ms"
        )


MD_HEADER = [
    "date (UTC)",
    "rev",
    "machine",
    "N",
    "start-up s",
    "runs",
    "e2e ms p50/max",
    "skew ms p50/max",
    "baseline total ms p50/max",
    "baseline skew ms p50/max",
    "ratio p50",
    "targets",
]
MD_PREAMBLE = (
    "`python benchmarks/run.py fleet`: N `node-agent` processes (started in parallel: "
    "*start-up* = first spawn → all ready) and an elected in-process leader; a 20-module "
    "release (shop + 16 generated modules, all changed) applied with `engine.upgrade` "
    "(2PC, `window_s=0`), alternating v2 ↔ v1, each measured run a new build no node has "
    "seen (fetched, parsed, compiled and planned from scratch, as in a deploy). *e2e* = last "
    "node's finish - rollout `created_at`; *skew* = latest - earliest finish instant. "
    "*baseline* = new builds applied node by node (Prepare then Finish over gRPC, in sequence): total, "
    "and last - first finish. Targets: N=50 e2e < 3 s; skew < 50 ms (worst run) and ≥ 10x "
    "below the baseline's (p50)."
)


def markdown_rows(res: dict[str, Any]) -> list[list[str]]:
    m = res["machine"]
    rows = []
    for r in res["fleets"]:
        ratio = r["skew_ratio_p50"]
        rows.append(
            [
                res["date"],
                res["revision"],
                f"{m['platform']}; {m['cpu']}; {m['cores']} cores; load "
                f"{r['load_average']['start']:.1f}→{r['load_average']['end']:.1f}",
                str(r["nodes"]),
                f"{r['startup_s']:.1f}",
                f"{len(r['runs'])} + {len(r['baseline_runs'])}",
                _pm(r["e2e_s"]),
                _pm(r["skew_s"], 1),
                _pm(r["baseline_total_s"]),
                _pm(r["baseline_skew_s"]),
                "n/a" if ratio is None else f"{ratio:.0f}x",
                ", ".join(f"{k} {_ok(v).lower()}" for k, v in r["targets"].items()),
            ]
        )
    return rows


# ---------------------------------------------------------------------- main
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nodes",
        default=None,
        help="comma-separated fleet sizes (default 10,50; 3 with --quick)",
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="measured 2PC rollouts per N (default 6; 2 quick)"
    )
    parser.add_argument(
        "--baseline-runs",
        type=int,
        default=None,
        help="sequential baseline runs per N (default 4; 2 quick)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="RolloutOptions.concurrency (default: the engine's default)",
    )
    parser.add_argument("--lease-ttl", type=int, default=3, help="agent lease TTL, s (default 3)")
    parser.add_argument(
        "--no-unpack",
        dest="unpack",
        action="store_false",
        help="push releases without having the nodes unpack them (both sides of the comparison)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N=3, 2 runs, kept out of RESULTS.md"
    )
    _common.add_output_arguments(parser)


def main(args: argparse.Namespace) -> int:
    say = _fleet.progress_clock()
    started = time.perf_counter()
    date = _common.now_utc()
    sizes = [int(x) for x in (args.nodes or ("3" if args.quick else "10,50")).split(",") if x]
    runs = args.runs if args.runs is not None else (2 if args.quick else 6)
    base_runs = args.baseline_runs if args.baseline_runs is not None else (2 if args.quick else 4)
    if not sizes or min(sizes) < 2 or runs < 1 or base_runs < 1:
        raise SystemExit("--nodes must be sizes >= 2; --runs and --baseline-runs >= 1")
    load_before = _common.warn_if_busy()
    fleets = []
    with tempfile.TemporaryDirectory(prefix="hotfleet-bench-release-") as tmp:
        boot, rel1, rel2 = build_workload(Path(tmp))
        say(
            f"release: {len(rel2.modules)} modules, all changed between {rel1.label} and {rel2.label}"
        )
        for n in sizes:
            fleets.append(
                run_n(
                    n,
                    boot,
                    (rel1, rel2),
                    runs,
                    base_runs,
                    args.concurrency,
                    args.lease_ttl,
                    say,
                    unpack=args.unpack,
                )
            )
    res = {
        **_common.result_header("fleet", date),
        "config": {
            "nodes": sizes,
            "runs": runs,
            "baseline_runs": base_runs,
            "modules": len(rel2.modules),
            "concurrency": args.concurrency or RolloutOptions().concurrency,
            "lease_ttl_s": args.lease_ttl,
            "quick": bool(args.quick),
            "unpack": bool(args.unpack),
        },
        "fleets": fleets,
        "load_average": {"start": load_before, "end": _common.warn_if_busy()},
        "elapsed_s": time.perf_counter() - started,
    }
    print()
    print_report(res)
    _common.save_results(args, res, date, markdown_rows, MD_HEADER, MD_PREAMBLE)
    print(f"elapsed {time.perf_counter() - started:.0f} s")
    return 0
