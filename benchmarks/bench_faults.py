"""Fault campaign: rollouts under kills, pauses, failovers and etcd restarts, checked by invariants.

A real etcd, two coordinator daemons and N agents (the example shop), each
node under recorded HTTP load.  Every round starts one rollout through the
leader's API (a good release, a bad one that analysis must roll back, or a
broken one every node refuses) and injects one fault at a random instant
(seeded, reproducible):

* ``kill_agent`` / ``kill_agent_window``: SIGKILL an agent (early, or inside
  the rollback window), restart it a second later on the same code path;
* ``stop_agent``: SIGSTOP an agent for 1-4 s, then SIGCONT;
* ``kill_leader``: SIGKILL the leading coordinator, restart it a second later;
* ``etcd_restart``: stop etcd, start it again a second later;
* ``none``.

Then everything is healed and the invariants are checked:

1. the rollout ends in a terminal phase within ``TERMINAL_BOUND_S``;
2. every live node converges to the outcome (the new release if it ended
   permanent, the one before otherwise) within ``CONVERGE_BOUND_S`` and all
   serve the same module versions: no lost commit, no split fleet;
3. no response mixed two releases (per-response atomicity);
4. no request failed except on the node the fault hit.

``python benchmarks/run.py faults --rollouts 100 --seed 1``.  A short seeded
slice runs in CI (``tests/test_fault_campaign.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coordinator.model import Rollout  # noqa: E402
from coordinator.traffic import TrafficProcess  # noqa: E402
from hotfleet._proto.hotfleet.v1 import coordinator_pb2  # noqa: E402
from hotfleet.etcd_client import connect  # noqa: E402
from hotfleet.etcd_server import EtcdServer  # noqa: E402
from hotfleet.keys import Keys  # noqa: E402
from tests.agents import RELEASES, AgentProcess, Agents  # noqa: E402
from tests.coordinators import Coordinators, coordctl  # noqa: E402

ACCEPT_WITHIN_S = 20.0  # an upgrade refused as retryable is retried this long


FAULTS = ("none", "kill_agent", "kill_agent_window", "stop_agent", "kill_leader", "etcd_restart")
TERMINAL_BOUND_S = 60.0
CONVERGE_BOUND_S = 45.0
WINDOW_S = 3.0
PREFIX = "/hotfleet-faults/"


@dataclass
class Round:
    """One rollout of the campaign and what the checker found."""

    index: int
    release: str
    fault: str
    at_s: float
    victim: str = ""
    rollout: str = ""
    phase: str = ""
    reason: str = ""
    expected: str = ""
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)


class Campaign:
    """Owns every process of the campaign; :meth:`close` stops them all."""

    def __init__(self, workdir: Path, nodes: int, seed: int, log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.log = log
        self.etcd = EtcdServer(workdir / "etcd")
        self.etcd.start()
        self.keys = Keys(PREFIX)
        self.client = connect(self.etcd.endpoint)
        self.agents = Agents(workdir, self.etcd.endpoint, PREFIX)
        self.coordinators = Coordinators(workdir, self.etcd.endpoint, PREFIX)
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.nodes: dict[str, AgentProcess] = {}
        self.fleet_release = ""
        self.fleet_code = ""  # which example bundle's code the fleet runs

    # ---------------------------------------------------------------- setup
    def start(self) -> None:
        procs = [self.agents.start(name, wait=False) for name in self.names]
        for proc in procs:
            proc.wait_ready()
            self.nodes[proc.node_id] = proc
        for name in ("a", "b"):
            self.coordinators.start(name)
        self.coordinators.leader()
        base = self._push("shop-1.0.0", 0)
        first = self._upgrade(base, window_s=0.0)
        if self._wait_terminal(first).phase.value != "permanent":
            raise RuntimeError("the campaign's base upgrade did not become permanent")
        self.fleet_release = base
        self.fleet_code = "shop-1.0.0"

    def close(self) -> None:
        for proc in self.agents.procs:
            proc.signal(signal.SIGCONT)
        self.agents.close()
        self.coordinators.close()
        self.client.close()
        self.etcd.stop()

    # --------------------------------------------------------------- rounds
    def run(self, rollouts: int) -> list[Round]:
        rounds = []
        for i in range(rollouts):
            r = self._round(i)
            rounds.append(r)
            self.log(
                f"round {i + 1}/{rollouts}: {r.release} + {r.fault}"
                f"{f' ({r.victim})' if r.victim else ''} -> {r.phase or '?'}"
                f" in {r.seconds:.1f}s{'  VIOLATION: ' + '; '.join(r.violations) if r.violations else ''}"
            )
        return rounds

    def _push(self, bundle: str, index: int) -> str:
        """The example ``bundle`` pushed as a new version (every round is an upgrade, never a
        downgrade): ``shop@<10+index>.0.0``, with the bundle's suffix (-bad, -broken)."""
        suffix = bundle.partition("-")[2].partition("-")[2]
        version = f"{10 + index}.0.0" + (f"-{suffix}" if suffix else "")
        target = self.workdir / "bundles" / f"shop-{version}"
        if not target.exists():
            shutil.copytree(RELEASES / bundle, target)
            manifest = target / "release.toml"
            text = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', manifest.read_text())
            manifest.write_text(text)
        result = coordctl(self.coordinators.procs, "release", "push", str(target), timeout=60)
        if result.code != 0:
            raise RuntimeError(f"push {target.name}: {result}")
        return f"shop@{version}"

    def _choose_bundle(self) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            return "shop-3.0.0-broken"  # every node refuses it
        if roll < 0.35:
            return "shop-2.1.0-bad"  # analysis must roll it back
        return "shop-2.0.0" if self.fleet_code == "shop-1.0.0" else "shop-1.0.0"

    def _round(self, index: int) -> Round:
        bundle = self._choose_bundle()
        fault = self.rng.choice(FAULTS)
        at = (
            self.rng.uniform(1.0, 1.0 + WINDOW_S)
            if fault == "kill_agent_window"
            else self.rng.uniform(0.0, 1.0)
        )
        release = self._push(bundle, index + 1)
        r = Round(index, release, fault, round(at, 3))
        started = time.monotonic()
        load = TrafficProcess(
            {name: node.http_address for name, node in self.nodes.items()},
            None,
            path="/price?sku=apple&qty=2",
        )
        healed = threading.Event()
        injector = threading.Thread(target=self._inject, args=(r, healed), daemon=True)
        try:
            rid = self._upgrade(release, window_s=WINDOW_S)
        except Exception as exc:
            r.violations.append(f"the upgrade was not accepted: {exc}")
            load.stop()
            return r
        r.rollout = rid
        injector.start()
        try:
            final = self._wait_terminal(rid)
            r.phase, r.reason = final.phase.value, final.reason
        except TimeoutError as exc:
            r.violations.append(str(exc))
            r.phase = "stuck"
        injector.join()
        healed.wait()
        r.expected = release if r.phase == "permanent" else self.fleet_release
        if r.phase == "stuck":
            self._settle_stuck()
            r.expected = self._fleet_release_now() or self.fleet_release
        missing = self._converge(r.expected)
        if missing:
            r.violations.append(
                f"not converged to {r.expected} within {CONVERGE_BOUND_S:g}s: {missing}"
            )
        if r.expected != self.fleet_release:
            self.fleet_code = bundle
        self.fleet_release = r.expected
        reports = load.stop().get("nodes", {})
        for name, report in reports.items():
            if report["mixed"]:
                r.violations.append(
                    f"{name}: {report['mixed']} response(s) served by modules of two releases "
                    f"({report['mixes'][:3]})"
                )
            # the bad release's own 500s are what analysis is for; anything else is a failure
            own = report["http_500"] if "-bad" in release else 0
            if report["failed"] > own and name != r.victim:
                first = (report["other_failures"] or ["HTTP Error 500"])[0]
                r.violations.append(
                    f"{name}: {report['failed'] - own} failed request(s) on a node no fault "
                    f"hit (first: {first})"
                )
        self._settle()
        r.seconds = time.monotonic() - started
        return r

    def _settle(self) -> None:
        """Before the next round: one leader that stays the leader (a fault's after-effects,
        such as a lease that expires after an etcd restart, belong to this round)."""
        deadline = time.monotonic() + CONVERGE_BOUND_S
        previous = None
        while time.monotonic() < deadline:
            try:
                leader = self.coordinators.leader(timeout=10)
            except AssertionError:
                continue
            if leader is previous:
                return
            previous = leader
            time.sleep(1.0)

    # --------------------------------------------------------------- faults
    def _inject(self, r: Round, healed: threading.Event) -> None:
        try:
            time.sleep(r.at_s)
            if r.fault in ("kill_agent", "kill_agent_window"):
                r.victim = self.rng.choice(self.names)
                node = self.nodes[r.victim]
                node.signal(signal.SIGKILL)
                node.wait()
                time.sleep(1.0)
                self.nodes[r.victim] = self.agents.start(r.victim, code_path=node.code_path)
            elif r.fault == "stop_agent":
                r.victim = self.rng.choice(self.names)
                node = self.nodes[r.victim]
                node.signal(signal.SIGSTOP)
                time.sleep(self.rng.uniform(1.0, 4.0))
                node.signal(signal.SIGCONT)
            elif r.fault == "kill_leader":
                leader = self.coordinators.leader()
                leader.kill()
                time.sleep(1.0)
                self.coordinators.start(leader.name)
            elif r.fault == "etcd_restart":
                self.etcd.stop()
                time.sleep(1.0)
                self.etcd.start()
        finally:
            healed.set()

    # ------------------------------------------------------------- helpers
    def _upgrade(self, ref: str, window_s: float) -> str:
        options = coordinator_pb2.RolloutOptions(
            window_s=window_s,
            has_window_s=True,
            timeout_s=10.0,
            health={
                "on_inconclusive": "rollback",
                "interval_s": "250ms",
                "min_samples": "4",
                "judge_min_samples": "4",
            },
        )
        request = coordinator_pb2.UpgradeRequest(
            ref=ref, target=coordinator_pb2.Target(all=True), options=options
        )
        # "not the leader; no leader is elected right now, retry shortly" is the
        # documented retryable refusal (coordctl exits 6): an operator retries it,
        # and so does the campaign, for a bounded time (a lease still expiring
        # after the previous round's fault)
        deadline = time.monotonic() + ACCEPT_WITHIN_S
        while True:
            try:
                reply = self.coordinators.leader().stub.Upgrade(request, timeout=30)
                return str(json.loads(reply.record_json)["id"])
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _rollout(self, rid: str) -> Rollout | None:
        try:
            raw, _ = self.client.get(self.keys.rollout(rid))
        except Exception:
            return None  # etcd restarting
        return Rollout.loads(raw) if raw is not None else None

    def _wait_terminal(self, rid: str) -> Rollout:
        deadline = time.monotonic() + TERMINAL_BOUND_S
        while time.monotonic() < deadline:
            rollout = self._rollout(rid)
            if rollout is not None and rollout.phase.terminal:
                return rollout
            time.sleep(0.2)
        raise TimeoutError(f"rollout {rid} not terminal within {TERMINAL_BOUND_S:g}s")

    def _members(self) -> dict[str, dict[str, Any]]:
        out = {}
        try:
            for raw, meta in self.client.get_prefix(self.keys.nodes):
                out[meta.key.decode().rpartition("/")[2]] = json.loads(raw)
        except Exception:
            return {}
        return out

    def _converge(self, expected: str) -> dict[str, str]:
        """Wait until every node runs ``expected`` with identical versions; the ones that do not."""
        deadline = time.monotonic() + CONVERGE_BOUND_S
        wrong: dict[str, str] = {}
        while time.monotonic() < deadline:
            members = self._members()
            wrong = {
                n: str(members.get(n, {}).get("current_release", "(not registered)"))
                for n in self.names
                if members.get(n, {}).get("current_release") != expected
            }
            if not wrong:
                seen = {json.dumps(self.nodes[n].versions(), sort_keys=True) for n in self.names}
                if len(seen) == 1:
                    return {}
                wrong = {"versions": " / ".join(sorted(seen))}
            time.sleep(0.25)
        return wrong

    def _settle_stuck(self) -> None:
        """A rollout the bound gave up on: ask the leader to abort or roll back, and wait."""
        for verb in (("abort",), ("rollback",)):
            coordctl(self.coordinators.procs, *verb, timeout=60)
        time.sleep(2)

    def _fleet_release_now(self) -> str:
        releases = {m.get("current_release") for m in self._members().values()}
        return str(releases.pop()) if len(releases) == 1 else ""


def run_campaign(
    workdir: Path, rollouts: int, nodes: int, seed: int, log: Callable[[str], None] = print
) -> list[Round]:
    campaign = Campaign(workdir, nodes, seed, log)
    try:
        campaign.start()
        return campaign.run(rollouts)
    finally:
        campaign.close()


# ------------------------------------------------------------------ the bench
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rollouts", type=int, default=100, help="rounds (default 100)")
    parser.add_argument("--nodes", type=int, default=4, help="agents (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    import _common

    _common.add_output_arguments(parser)


def main(args: argparse.Namespace) -> int:
    import _common

    date = _common.now_utc()
    foreign = _common.ForeignCpu()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hf-faults-") as tmp:
        rounds = run_campaign(Path(tmp), args.rollouts, args.nodes, args.seed)
    violations = [v for r in rounds for v in r.violations]
    outcomes: dict[str, int] = {}
    faults: dict[str, int] = {}
    for r in rounds:
        outcomes[r.phase] = outcomes.get(r.phase, 0) + 1
        faults[r.fault] = faults.get(r.fault, 0) + 1
    res = {
        **_common.result_header("faults", date),
        "config": {"rollouts": args.rollouts, "nodes": args.nodes, "seed": args.seed},
        "outcomes": outcomes,
        "faults": faults,
        "violations": violations,
        "rounds": [r.__dict__ for r in rounds],
        "elapsed_s": time.monotonic() - started,
        "other_processes_cpu_cores": foreign.cores(),
    }
    print(
        f"\n{len(rounds)} rollouts, {len(violations)} violation(s); outcomes {outcomes}; faults {faults}"
    )
    for v in violations:
        print(f"  VIOLATION {v}")
    args.quick = False
    _common.save_results(args, res, date, lambda r: [_md_row(r)], MD_HEADER, MD_PREAMBLE)
    return 0 if not violations else 1


MD_HEADER = [
    "date (UTC)",
    "rev",
    "machine",
    "nodes",
    "seed",
    "rollouts",
    "outcomes",
    "faults",
    "violations",
    "minutes",
]
MD_PREAMBLE = (
    "`python benchmarks/run.py faults`: real etcd, two coordinators, N agents under recorded "
    "HTTP load; each round one rollout (good / bad / broken release) and one seeded fault "
    "(SIGKILL or SIGSTOP an agent, SIGKILL the leader, restart etcd) at a random instant. "
    "Invariants: terminal within 60 s; every node on the outcome within 45 s with identical "
    "versions (no lost commit, no split); no mixed response; no failed request except on the "
    "node the fault hit. Target: 0 violations in >= 100 rollouts."
)


def _md_row(res: dict[str, Any]) -> list[str]:
    m = res["machine"]
    other = res["other_processes_cpu_cores"]
    return [
        res["date"],
        res["revision"],
        f"{m['cpu']}; {m['cores']} cores; Python {m['python']}"
        + (f"; other processes used {other:.2f} cores" if other is not None else ""),
        str(res["config"]["nodes"]),
        str(res["config"]["seed"]),
        str(res["config"]["rollouts"]),
        ", ".join(f"{k} {v}" for k, v in sorted(res["outcomes"].items())),
        ", ".join(f"{k} {v}" for k, v in sorted(res["faults"].items())),
        str(len(res["violations"])),
        f"{res['elapsed_s'] / 60:.1f}",
    ]
