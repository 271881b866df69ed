"""Unit tests of the coordctl / Coordinator-service layer.

``coordctl`` (``coordinator.cli.main``) talks over real gRPC to a real
in-process :class:`coordinator.service.CoordinatorServicer`, but the servicer
wraps :class:`FakeEngine`, a small stand-in for ``coordinator.engine.Engine``
defined here: it keeps releases and rollouts in memory and moves a rollout one
step further on every read, following a script chosen by the release name
(``good``: commits and becomes permanent; ``broken``: node n2 refuses prepare;
``sick``: finishes and is rolled back).  So these tests pin the CLI and the
service mapping -- exit codes, JSON output, redirects, error rendering --
not the two-phase commit itself, which the integration tests cover against
etcd and real agent processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator import cli, cli_commands, render
from coordinator.engine import Refused, ReleaseEntry, RolloutOptions, Target
from coordinator.fleet import NodeInfo
from coordinator.model import NodeResult, Phase, Rollout, Vote
from coordinator.service import serve
from coordinator.unpack import NodeUnpack
from hotfleet.errors import ModuleError, Reason
from hotfleet.protocol import Refusal
from hotfleet.release import Release
from tests.agents import wait_for
from tests.servers import free_port

NODES = ["n1", "n2", "n3"]


class FakeEngine:
    """Behaves like the Engine API from the outside; every read of a rollout advances it."""

    def __init__(self, address: str = "", *, leader: bool = True, leader_at: str = "") -> None:
        self.address = address
        self.leader = leader
        self.leader_at = leader_at
        self.lock = threading.Lock()
        self.entries: dict[str, ReleaseEntry] = {}
        self.pushed: list[Release] = []
        self.signatures: list[tuple[str, str]] = []
        self.unpacked: list[str] = []
        self.history: list[Rollout] = []
        self.calls: list[tuple[str, Any]] = []
        self.counter = 0

    # -------------------------------------------------------------- leadership
    def is_leader(self) -> bool:
        return self.leader

    def leader_address(self) -> str:
        return self.leader_at

    def _require_leader(self) -> None:
        if not self.leader:
            raise Refused(
                Refusal.NOT_LEADER,
                f"this coordinator ({self.address}) is not the leader; the leader is {self.leader_at}",
                leader=self.leader_at,
            )

    # -------------------------------------------------------------- reads
    def nodes(self) -> list[NodeInfo]:
        return [
            NodeInfo(
                n,
                address=f"127.0.0.1:{7000 + i}",
                labels={"zone": "eu" if i < 2 else "us"},
                current_release="shop@1.0.0",
                permanent_release="shop@1.0.0",
                state="ready",
                started_at=1.0,
            )
            for i, n in enumerate(NODES)
        ]

    def fleet(self) -> list[NodeInfo]:
        return self.nodes()

    def releases(self) -> list[ReleaseEntry]:
        return list(self.entries.values())

    def release(self, ref: str) -> ReleaseEntry:
        if ref not in self.entries:
            raise Refused(Refusal.NOT_FOUND, f"release {ref} was never pushed")
        return self.entries[ref]

    def rollouts(self, limit: int = 50) -> list[Rollout]:
        return list(reversed(self.history))[:limit]

    def rollout(self, rollout_id: str | None = None) -> Rollout:
        with self.lock:
            matches = (
                [r for r in self.history if r.id == rollout_id] if rollout_id else self.history[-1:]
            )
            if not matches:
                raise Refused(Refusal.NOT_FOUND, f"no rollout {rollout_id}")
            rollout = matches[-1]
            self._advance(rollout)
            return Rollout.loads(rollout.dumps())

    def module_status(self, node: str | None = None) -> list[dict[str, Any]]:
        rows = []
        for n in NODES:
            for module, digest in (("shop.cart", "a" * 64), ("shop.pricing", "b" * 64)):
                if module == "shop.pricing" and n == "n3":
                    digest = "c" * 64  # n3 runs other code: drift
                rows.append(
                    {
                        "node": n,
                        "module": module,
                        "state": "loaded",
                        "release": "shop@1.0.0",
                        "loaded_digest": digest,
                        "disk_digest": digest,
                    }
                )
        if node and node not in NODES:
            raise Refused(Refusal.NOT_FOUND, f"node {node} is not registered")
        return [r for r in rows if not node or r["node"] == node]

    # -------------------------------------------------------------- writes
    def push_release(self, release: Release, signature: str = "", signer: str = "") -> ReleaseEntry:
        self._require_leader()
        existing = self.entries.get(release.label)
        if existing is not None and existing.digest != release.digest:
            raise Refused(
                Refusal.EXISTS, f"{release.label} was already pushed with different content"
            )
        self.pushed.append(release)
        self.signatures.append((signature, signer))
        entry = ReleaseEntry(
            release.label,
            release.name,
            release.version,
            release.digest,
            1.0,
            len(release.modules),
            bool(signature),
            release.to_manifest(),
        )
        self.entries[release.label] = entry
        return entry

    def unpack_release(self, ref: str) -> list[NodeUnpack]:
        """Every node unpacked it, one refused a module (what the CLI must show)."""
        self._require_leader()
        self.unpacked.append(ref)
        return [
            NodeUnpack(
                "n1", True, "compiled and planned into the host code cache (22 entries)", 0.04
            ),
            NodeUnpack("n2", False, "this host has it unpacked already", 0.0),
            NodeUnpack("n3", False, "the release would be refused", 0.01, ("a.b: badfile: x",)),
        ]

    def upgrade(self, ref: str, target: Target, options: RolloutOptions) -> Rollout:
        self._require_leader()
        self.calls.append(("upgrade", (ref, target, options)))
        entry = self.release(ref)
        return self._start("upgrade", entry.label, entry.digest, target, options)

    def rollback(self, target: Target, to_version: str | None, options: RolloutOptions) -> Rollout:
        self._require_leader()
        self.calls.append(("rollback", (target, to_version, options)))
        return self._start("rollback", f"shop@{to_version or '1.0.0'}", "d" * 64, target, options)

    def abort(self, rollout_id: str | None = None) -> Rollout:
        self._require_leader()
        rollout = self.rollout(rollout_id)
        if rollout.phase.terminal:
            raise Refused(
                Refusal.INVALID, f"rollout {rollout.id} already ended {rollout.phase.value}"
            )
        with self.lock:
            stored = next(r for r in self.history if r.id == rollout.id)
            stored.options["script"] = "operator_abort"
            stored.phase = Phase.ABORTING
            return Rollout.loads(stored.dumps())

    def promote(self, rollout_id: str | None = None) -> Rollout:
        self._require_leader()
        rollout = self.rollout(rollout_id)
        raise Refused(
            Refusal.INVALID, f"rollout {rollout.id} is {rollout.phase.value}, not provisional"
        )

    # -------------------------------------------------------------- the script
    def _start(
        self, kind: str, label: str, digest: str, target: Target, options: RolloutOptions
    ) -> Rollout:
        with self.lock:
            if self.history and not self.history[-1].phase.terminal:
                raise Refused(
                    Refusal.BUSY,
                    f"rollout {self.history[-1].id} is in progress; one at a time per cluster",
                )
            nodes = target.nodes or [
                n
                for n in NODES
                if not target.selector or (n != "n3") == (target.selector.get("zone") == "eu")
            ]
            if not nodes:
                raise Refused(Refusal.NO_TARGETS, "no registered node matches the target")
            self.counter += 1
            script = "dry" if options.dry_run else label.split("@")[0]
            rollout = Rollout(
                f"r{self.counter}",
                kind,
                label,
                digest,
                sorted(nodes),
                options={"dry_run": options.dry_run, "script": script},
                nodes={n: NodeResult(n) for n in nodes},
                previous={n: "shop@1.0.0" for n in nodes},
                created_at=1.0,
            )
            self.history.append(rollout)
            return Rollout.loads(rollout.dumps())

    def _advance(self, r: Rollout) -> None:
        script = r.options.get("script")
        if r.phase.terminal:
            return
        if r.phase is Phase.ABORTING:
            for n in r.nodes.values():
                n.aborted = True
            r.phase, r.reason = Phase.ABORTED, "aborted by the operator"
            r.ended_at = 2.0
            return
        pending = [n for n in r.nodes.values() if n.vote is Vote.PENDING]
        if pending:  # one vote per read: visible progress
            node = pending[0]
            if script == "broken" and node.node == "n2":
                node.vote = Vote.NO
                node.errors = [
                    ModuleError("shop.cart", Reason.BADFILE, "line 3: invalid syntax", "n2")
                ]
            else:
                node.vote, node.prepare_s = Vote.YES, 0.012
            return
        if r.phase is Phase.PREPARING:
            if any(n.vote is not Vote.YES for n in r.nodes.values()):
                r.errors = [e for n in r.nodes.values() for e in n.errors]
                for n in r.nodes.values():
                    n.aborted = True
                r.phase, r.reason = Phase.ABORTED, "n2 refused prepare: shop.cart: badfile"
            elif script == "dry":
                for n in r.nodes.values():
                    n.aborted = True
                r.phase, r.reason = Phase.DRY_RUN, "dry run: prepared everywhere"
            else:
                r.phase, r.decision = Phase.COMMITTED, "commit"
            return
        if r.phase is Phase.COMMITTED:
            for i, n in enumerate(r.nodes.values()):
                n.finished, n.finished_at, n.pause_s = True, 100.0 + i * 0.001, 0.0004
            r.phase = Phase.PROVISIONAL
            return
        if r.phase is Phase.PROVISIONAL:
            if script == "unsure":  # too little traffic to judge: paused, never ends by itself
                r.analysis = {"overall": "inconclusive", "action": "pause", "reason": "no data"}
                r.reason = "inconclusive; paused: promote with `coordctl promote`"
                return
            if script == "sick":
                r.phase, r.reason = Phase.ROLLED_BACK, "n1: error_rate 0.31 > 0.05"
            else:
                r.phase, r.reason = Phase.PERMANENT, "rollback window passed healthy"
            r.ended_at = 2.0


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def leader() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine()
    server, address = serve(engine, "127.0.0.1:0", dev=True)  # type: ignore[arg-type]
    engine.address = address
    try:
        yield engine, address
    finally:
        server.stop(grace=None)


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_commands, "POLL_INTERVAL_S", 0.005)
    for var in ("HOTFLEET_COORDINATOR", "HOTFLEET_DEV", "HOTFLEET_TLS_CERT", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)


def run(address: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--coordinator", address, *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def bundle(tmp_path: Path, name: str, version: str = "2.0.0") -> Path:
    release = Release.from_sources(
        name,
        version,
        {"shop": "", "shop.cart": "def total(items):\n    return sum(items)\n"},
        packages=["shop"],
        modules={"shop.cart": {"extra": {"factor": 10}, "depends": ["shop"]}},
    )
    return release.write_bundle(tmp_path / f"{name}-{version}")


# ------------------------------------------------------------------ tests
def test_upgrade_success_pushes_the_bundle_and_exits_0(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    engine, address = leader
    path = bundle(tmp_path, "good")
    code, out, err = run(address, "upgrade", "--all", "--release", str(path), "--wait")
    assert code == cli.EXIT_OK, out + err
    # The bundle went over the wire intact: same content digest, same bytes.
    original = Release.from_path(path)
    assert engine.pushed[0].digest == original.digest
    assert engine.pushed[0].modules == original.modules
    assert "pushed good@2.0.0" in out
    for node in NODES:
        assert f"{node}: prepare yes" in out and f"{node}: finished" in out
    assert "good@2.0.0 is current on 3 node(s)" in out
    (_, (ref, target, _options)) = engine.calls[-1]
    assert ref == "good@2.0.0" and target.all


def test_dry_run_success_exits_0_and_options_travel(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    engine, address = leader
    run(address, "release", "push", str(bundle(tmp_path, "good")))
    code, out, _ = run(
        address,
        "upgrade",
        "--selector",
        "zone=eu",
        "--release",
        "good@2.0.0",
        "--dry-run",
        "--allow-missing",
        "--timeout",
        "1500ms",
    )
    assert code == cli.EXIT_OK, out
    assert "dry run" in out
    _, (_ref, target, options) = engine.calls[-1]
    assert target.selector == {"zone": "eu"} and not target.all
    assert options.dry_run and options.allow_missing and options.timeout_s == pytest.approx(1.5)


def test_refused_prepare_aborts_with_exit_4_naming_node_module_reason(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    _, address = leader
    path = bundle(tmp_path, "broken")
    code, out, _ = run(address, "upgrade", "--nodes", "n1,n2,n3", "--release", str(path), "--wait")
    assert code == cli.EXIT_ABORTED
    assert "n2: prepare no" in out
    # The error table names node, module, reason and the detail, on one row.
    rows = [line.split() for line in out.splitlines() if "badfile" in line]
    assert ["n2", "shop.cart", "badfile", "line", "3:", "invalid", "syntax"] in rows
    assert "aborted: nothing changed" in out


def test_rolled_back_exits_5_and_status_json_is_the_complete_record(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    engine, address = leader
    path = bundle(tmp_path, "sick")
    code, out, _ = run(address, "upgrade", "--all", "--release", str(path), "--wait-permanent")
    assert code == cli.EXIT_ROLLED_BACK, out
    assert "rolled back" in out and "error_rate 0.31 > 0.05" in out
    code, out, _ = run(address, "-o", "json", "status")
    assert code == cli.EXIT_OK
    record = json.loads(out)
    assert (record.pop("schema_version"), record.pop("document")) == (1, "Rollout")
    assert Rollout.loads(json.dumps(record)).to_json() == {
        **engine.history[-1].to_json(),
        "duration_s": record["duration_s"],
    }
    assert record["phase"] == "rolled_back" and set(record["nodes"]) == set(NODES)


def test_upgrade_json_output_and_exit_code_on_abort(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    _, address = leader
    path = bundle(tmp_path, "broken")
    code, out, err = run(
        address, "upgrade", "--all", "--release", str(path), "--wait", "-o", "json"
    )
    assert code == cli.EXIT_ABORTED
    record = json.loads(out)  # one document: the push note went to stderr
    assert "pushed broken@2.0.0" in err
    assert record["phase"] == "aborted"
    assert record["errors"] == [
        {
            "node": "n2",
            "module": "shop.cart",
            "reason": "badfile",
            "detail": "line 3: invalid syntax",
        }
    ]


def test_refusals_exit_3_with_the_coordinators_message(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    _, address = leader
    code, out, err = run(address, "upgrade", "--all", "--release", "nope@1.0")
    assert code == cli.EXIT_REFUSED
    assert "release nope@1.0 was never pushed" in err and not out
    # busy: a rollout is in progress (no --wait: exit 0 once started)
    run(address, "release", "push", str(bundle(tmp_path, "good")))
    assert run(address, "upgrade", "--all", "--release", "good@2.0.0")[0] == cli.EXIT_OK
    code, out, err = run(address, "-o", "json", "upgrade", "--all", "--release", "good@2.0.0")
    assert code == cli.EXIT_REFUSED
    error = json.loads(out)["error"]
    assert error["code"] == "busy" and error["exit_code"] == 3
    assert "in progress" in error["message"] and "in progress" in err
    # exists: the same label with other content
    other = Release.from_sources("good", "2.0.0", {"shop": "X = 1\n"}, packages=["shop"])
    code, _, err = run(address, "release", "push", str(other.write_bundle(tmp_path / "other")))
    assert code == cli.EXIT_REFUSED and "already pushed with different content" in err


def test_abort_waits_for_the_aborted_outcome(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    _, address = leader
    run(address, "release", "push", str(bundle(tmp_path, "good")))
    code, out, _ = run(address, "-o", "json", "upgrade", "--all", "--release", "good@2.0.0")
    rid = json.loads(out)["id"]
    code, out, _ = run(address, "abort", rid)
    assert code == cli.EXIT_OK, out
    assert "aborted" in out
    code, _, err = run(address, "abort", rid)
    assert code == cli.EXIT_REFUSED and "already ended aborted" in err


def test_not_leader_is_followed_once(tmp_path: Path) -> None:
    leader_engine = FakeEngine()
    leader_server, leader_address = serve(leader_engine, "127.0.0.1:0", dev=True)  # type: ignore[arg-type]
    follower_engine = FakeEngine(leader=False, leader_at=leader_address)
    follower_server, follower_address = serve(follower_engine, "127.0.0.1:0", dev=True)  # type: ignore[arg-type]
    follower_engine.address = follower_address
    try:
        code, out, err = run(
            follower_address,
            "upgrade",
            "--all",
            "--release",
            str(bundle(tmp_path, "good")),
            "--wait",
        )
        assert code == cli.EXIT_OK, out + err
        assert f"following the leader at {leader_address}" in err
        assert leader_engine.pushed and not follower_engine.pushed
        # A leader that points elsewhere again is not chased in circles.
        leader_engine.leader, leader_engine.leader_at = False, follower_address
        code, _, err = run(follower_address, "-o", "json", "rollback")
        assert code == cli.EXIT_UNREACHABLE
        assert "is not the leader" in err
    finally:
        leader_server.stop(grace=None)
        follower_server.stop(grace=None)


def test_unreachable_coordinator_exits_6_with_a_hint() -> None:
    address = f"127.0.0.1:{free_port()}"
    code, out, err = run(address, "nodes")
    assert code == cli.EXIT_UNREACHABLE
    assert f"cannot reach coordinator at {address}" in err
    assert "coordctl dev up" in err and "--coordinator" in err
    assert "Traceback" not in err and not out
    code, out, _ = run(address, "-o", "json", "rollouts")
    assert code == cli.EXIT_UNREACHABLE and json.loads(out)["error"]["code"] == "unreachable"


def test_unreachable_address_is_skipped_for_the_next(leader: tuple[FakeEngine, str]) -> None:
    _, address = leader
    code, out, _ = run(f"127.0.0.1:{free_port()},{address}", "-o", "json", "nodes")
    assert code == cli.EXIT_OK
    assert [n["node_id"] for n in json.loads(out)["items"]] == NODES


def test_a_port_that_is_not_a_coordinator_is_skipped_for_the_next(
    leader: tuple[FakeEngine, str],
) -> None:
    """A dead coordinator's port taken over by another gRPC server (here: one serving
    nothing, as an agent would for the Coordinator API) is not mistaken for an error."""
    _, address = leader
    stranger = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = stranger.add_insecure_port("127.0.0.1:0")
    stranger.start()
    try:
        code, out, err = run(f"127.0.0.1:{port},{address}", "-o", "json", "nodes")
        assert code == cli.EXIT_OK, err
        assert [n["node_id"] for n in json.loads(out)["items"]] == NODES
        code, _, err = run(f"127.0.0.1:{port}", "nodes")
        assert code == cli.EXIT_UNREACHABLE and "not a hotfleet coordinator" in err
    finally:
        stranger.stop(0)


def test_read_commands_tables_and_json(leader: tuple[FakeEngine, str], tmp_path: Path) -> None:
    _, address = leader
    code, out, _ = run(address, "nodes")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NODE", "STATE", "RELEASE"]
    assert "zone=eu" in out
    code, out, _ = run(address, "release", "push", str(bundle(tmp_path, "good")), "-o", "json")
    pushed = json.loads(out)
    assert pushed["label"] == "good@2.0.0" and pushed["manifest"]["modules"]
    code, out, _ = run(address, "release", "list")
    assert "good" in out and pushed["digest"][:12] in out
    code, out, _ = run(address, "-o", "json", "release", "show", "good@2.0.0")
    unpacked = pushed.pop("unpacked")
    assert [u["node"] for u in unpacked] == ["n1", "n2", "n3"]
    assert json.loads(out) == pushed
    code, out, _ = run(address, "release", "show", "good@2.0.0")
    assert "shop.cart" in out and "shop/cart.py" in out
    code, _, err = run(address, "release", "show", "good")
    assert code == cli.EXIT_USAGE and "NAME@VERSION" in err
    code, out, _ = run(address, "rollouts")
    assert code == 0 and "no rollouts yet" in out


def test_modules_table_highlights_drift(leader: tuple[FakeEngine, str]) -> None:
    _, address = leader
    code, out, _ = run(address, "modules")
    assert code == 0
    drift_lines = [line for line in out.splitlines() if "DRIFT" in line]
    assert len(drift_lines) == 1 and "shop.pricing" in drift_lines[0]
    assert "1 module(s) run different code on different nodes: shop.pricing" in out
    code, out, _ = run(address, "-o", "json", "modules")
    data = json.loads(out)
    assert len(data["modules"]) == 6
    assert data["drift"] == {"shop.pricing": {"b" * 64: ["n1", "n2"], "c" * 64: ["n3"]}}
    code, out, _ = run(address, "modules", "--node", "n3")
    assert code == 0 and "n1" not in out and "cccccccccccc" in out
    code, _, err = run(address, "modules", "--node", "zz")
    assert code == cli.EXIT_REFUSED and "node zz is not registered" in err


def test_usage_errors_exit_2_and_help_documents_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["upgrade", "--release", "x@1"]) == cli.EXIT_USAGE  # no target
    assert cli.main(["upgrade", "--all", "--nodes", "a", "--release", "x@1"]) == cli.EXIT_USAGE
    assert cli.main(["upgrade", "--all", "--release", "no-such-path"]) == cli.EXIT_USAGE
    assert cli.main(["--coordinator", "10.1.2.3:7600", "nodes"]) == cli.EXIT_USAGE  # no TLS
    assert cli.main(["--help"]) == cli.EXIT_OK
    help_text = capsys.readouterr().out
    for code in cli.EXIT_CODES:
        assert f"  {code}  " in help_text


def test_bad_bundle_is_refused_locally_with_its_errors(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    engine, address = leader
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "release.toml").write_text('name = "shop"\n')  # no version
    code, _, err = run(address, "release", "push", str(bad))
    assert code == cli.EXIT_REFUSED
    assert "cannot read the release bundle" in err and "bad_release" in err
    assert not engine.pushed


def test_service_maps_refusals_to_status_codes_and_metadata(leader: tuple[FakeEngine, str]) -> None:
    from hotfleet._proto.hotfleet.v1 import coordinator_pb2, coordinator_pb2_grpc

    _, address = leader
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ShowRelease(coordinator_pb2.ShowReleaseRequest(ref="x@1"), timeout=5)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert ("hotfleet-refusal", "not_found") in info.value.trailing_metadata()
        with pytest.raises(grpc.RpcError) as info:
            stub.Upgrade(coordinator_pb2.UpgradeRequest(ref="x@1"), timeout=5)  # no target
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "no target" in info.value.details()


def test_push_has_the_nodes_unpack_and_says_what_each_answered(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    engine, address = leader
    code, out, err = run(address, "release", "push", str(bundle(tmp_path, "good")))
    assert code == cli.EXIT_OK, err
    assert engine.unpacked == ["good@2.0.0"]
    assert "unpacked on 1 node(s)" in out and "[n1]" in out
    assert "not unpacked on 1: this host has it unpacked already  [n2]" in out
    assert "a prepare would refuse it on n3: a.b: badfile: x" in out
    code, out, err = run(
        address, "release", "push", str(bundle(tmp_path, "other", "3.0.0")), "--no-unpack"
    )
    assert code == cli.EXIT_OK, err
    assert engine.unpacked == ["good@2.0.0"] and "unpacked" not in out
    # later (the fleet moved since the push): unpack again, by name
    code, out, err = run(address, "release", "unpack", "other@3.0.0")
    assert code == cli.EXIT_OK, err
    assert engine.unpacked == ["good@2.0.0", "other@3.0.0"]
    assert "unpacked on 1 node(s)" in out and "badfile" in out
    code, out, err = run(address, "-o", "json", "release", "unpack", "other@3.0.0")
    record = json.loads(out)
    assert record["release"] == "other@3.0.0" and len(record["unpacked"]) == 3
    code, out, err = run(address, "release", "unpack", "not-a-ref")
    assert code != cli.EXIT_OK and "NAME@VERSION" in out + err


def test_push_signs_with_sign_key(leader: tuple[FakeEngine, str], tmp_path: Path) -> None:
    from hotfleet.signing import generate_keypair, load_public_keys, verify_release

    engine, address = leader
    signer = generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    path = bundle(tmp_path, "good")
    code, out, err = run(
        address, "-o", "json", "release", "push", str(path), "--sign-key", str(tmp_path / "k.key")
    )
    assert code == cli.EXIT_OK, err
    assert json.loads(out)["signed"] is True
    assert engine.signatures[-1][1] == signer
    verify_release(
        engine.pushed[-1].digest,
        *engine.signatures[-1],
        load_public_keys([tmp_path / "k.pub"]),
        release=engine.pushed[-1].label,
        fleet="default",
    )
    code, _, err = run(address, "release", "push", str(path), "--sign-key", str(tmp_path / "nope"))
    assert code == cli.EXIT_USAGE and "cannot sign with" in err


def test_leader_that_cannot_be_reached_says_failover() -> None:
    dead = f"127.0.0.1:{free_port()}"
    follower = FakeEngine(leader=False, leader_at=dead)
    server, address = serve(follower, "127.0.0.1:0", dev=True)  # type: ignore[arg-type]
    try:
        code, _, err = run(address, "rollback")
        assert code == cli.EXIT_UNREACHABLE
        assert f"says the leader is {dead}, but it cannot be reached" in err
        assert "failover" in err
    finally:
        server.stop(grace=None)


# ------------------------------------------------------------------ kubectl habits
def test_abbreviated_or_unknown_flags_are_refused_with_that_verbs_usage() -> None:
    """``--rel`` must not silently mean ``--release``; the error names the verb's usage."""
    unknown = "unrecognized arguments"
    for argv, verb, message in (
        (["upgrade", "--all", "--rel", "shop@2.0.0"], "upgrade", "required: --release"),
        (["upgrade", "--all", "--release", "shop@2.0.0", "--dry"], "upgrade", f"{unknown}: --dry"),
        (["release", "push", "x", "--sign", "k"], "release push", f"{unknown}: --sign k"),
        (["dev", "up", "--node", "2"], "dev up", f"{unknown}: --node 2"),
        (["status", "--bogus"], "status", f"{unknown}: --bogus"),
    ):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(argv, out=out, err=err)
        assert code == cli.EXIT_USAGE, argv
        text = err.getvalue()
        assert f"usage: coordctl {verb} " in text, (argv, text)
        assert message in text, (argv, text)


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == cli.EXIT_OK
    printed = capsys.readouterr().out.strip()
    assert printed == f"coordctl {cli.version()}" and cli.version()[0].isdigit(), printed


def test_json_and_yaml_documents_carry_a_schema_version(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    _, address = leader
    code, out, _ = run(address, "-o", "json", "nodes")
    nodes = json.loads(out)
    assert (nodes["schema_version"], nodes["document"]) == (1, "NodeList")
    assert [n["node_id"] for n in nodes["items"]] == NODES
    code, out, _ = run(address, "upgrade", "--all", "--release", str(bundle(tmp_path, "good")))
    assert code == cli.EXIT_OK, out
    status = json.loads(run(address, "status", "-o", "json")[1])
    assert (status["schema_version"], status["document"], status["kind"]) == (
        1,
        "Rollout",
        "upgrade",  # the record's own kind is untouched
    )
    code, out, err = run(address, "-o", "json", "status", "nope")
    assert code == cli.EXIT_REFUSED
    error = json.loads(out)
    assert (error["schema_version"], error["document"]) == (1, "Error")
    assert error["error"]["code"] == "not_found" and "nope" in err
    code, out, _ = run(address, "-o", "yaml", "nodes")
    assert code == cli.EXIT_OK
    lines = out.splitlines()
    assert "schema_version: 1" in lines and 'document: "NodeList"' in lines, out
    assert '  - address: "127.0.0.1:7000"' in lines and '    node_id: "n1"' in lines, out
    assert "    labels:" in lines and '      zone: "eu"' in lines, out


def test_wide_no_headers_and_label_selector(leader: tuple[FakeEngine, str]) -> None:
    engine, address = leader
    code, out, _ = run(address, "nodes", "-o", "wide")
    assert code == cli.EXIT_OK and out.splitlines()[0].split()[7:10] == ["HTTP", "PID", "EPOCH"]
    code, out, _ = run(address, "nodes", "--no-headers")
    assert [line.split()[0] for line in out.splitlines()] == NODES
    code, out, _ = run(address, "nodes", "-l", "zone=eu", "--no-headers")
    assert [line.split()[0] for line in out.splitlines()] == ["n1", "n2"]
    code, out, _ = run(address, "rollouts", "--no-headers")
    assert code == cli.EXIT_OK and out == ""  # no "no rollouts yet" sentence for a script
    code, out, _ = run(address, "upgrade", "-l", "zone=us", "--release", "x@1")
    assert code == cli.EXIT_REFUSED  # never pushed; the selector still travelled
    _, (_, target, _) = engine.calls[-1]
    assert target.selector == {"zone": "us"}


def test_a_missing_bundle_path_is_the_same_usage_error_everywhere(tmp_path: Path) -> None:
    missing = str(tmp_path / "shop-9.9.9")
    answers = []
    for argv in (
        ["upgrade", "--all", "--release", missing],
        ["release", "push", missing],
        ["upgrade", "--all", "--release", "releases/shop@2.0.0.tar.gz"],
    ):
        out, err = io.StringIO(), io.StringIO()
        answers.append((cli.main(argv, out=out, err=err), err.getvalue()))
    assert [code for code, _ in answers] == [cli.EXIT_USAGE] * 3
    assert all("no release bundle at" in text for _, text in answers), answers


def test_a_closed_pipe_is_not_an_error(leader: tuple[FakeEngine, str], tmp_path: Path) -> None:
    """``coordctl rollouts | head -1``: the reader went away; exit 0, nothing on stderr."""
    engine, address = leader
    for i in range(3):
        engine.history.append(
            Rollout(f"r-old-{i}", "upgrade", "good@2.0.0", "a" * 64, NODES, phase=Phase.ABORTED)
        )
    read, write = os.pipe()
    os.close(read)  # the reader is gone before coordctl writes a byte
    try:
        done = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", "--coordinator", address, "rollouts"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert done.returncode == cli.EXIT_OK, done.stderr
    assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_paused_analysis_ends_the_wait_with_exit_7(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    """An inconclusive window pauses the rollout; --wait-permanent and --watch say so and return."""
    _, address = leader
    code, out, _ = run(
        address,
        "upgrade",
        "--all",
        "--release",
        str(bundle(tmp_path, "unsure")),
        "--wait-permanent",
    )
    assert code == cli.EXIT_PAUSED, out
    assert "paused" in out and "coordctl promote" in out
    code, out, _ = run(address, "status", "--watch")
    assert code == cli.EXIT_PAUSED and "paused" in out, out


def test_status_watch_waits_for_the_first_rollout(
    leader: tuple[FakeEngine, str], tmp_path: Path
) -> None:
    engine, address = leader
    out, err = io.StringIO(), io.StringIO()
    codes: list[int] = []
    watcher = threading.Thread(
        target=lambda: codes.append(
            cli.main(["--coordinator", address, "status", "--watch"], out=out, err=err)
        )
    )
    watcher.start()
    try:
        wait_for(lambda: "waiting for the next one" in out.getvalue(), timeout=20)
        assert not codes  # no rollout: it waits instead of failing
        engine.push_release(Release.from_path(bundle(tmp_path, "good")))
        engine.upgrade("good@2.0.0", Target(all=True), RolloutOptions())
    finally:
        watcher.join(timeout=30)
    assert codes == [cli.EXIT_OK], (out.getvalue(), err.getvalue())
    assert "good@2.0.0 is permanent" in out.getvalue()
    # --next skips the newest (ended) rollout; --wait-timeout bounds the wait
    code, _, err_text = run(address, "status", "--watch", "--next", "--wait-timeout", "300ms")
    assert code == cli.EXIT_UNREACHABLE and "no new rollout started within" in err_text


def test_commit_skew_is_per_wave_not_the_gap_between_waves() -> None:
    rollout = Rollout("r1", "upgrade", "shop@2.0.0", "a" * 64, ["n1", "n2", "n3", "n4"])
    instants = {"n1": (0, 100.000), "n2": (0, 100.002), "n3": (1, 130.0), "n4": (1, 130.005)}
    for node, (wave, at) in instants.items():
        rollout.nodes[node] = NodeResult(node, wave=wave, finished=True, finished_at=at)
    rollout.waves = 2
    assert rollout.commit_skew_s == pytest.approx(0.005)  # the worst wave, not 30 s
    text = render.rollout_detail(rollout.to_json())
    assert "commit skew per wave: 1: 2.0ms, 2: 5.0ms" in text, text


def test_status_says_the_commit_lead_and_the_slowest_node() -> None:
    rollout = Rollout("r1", "upgrade", "shop@2.0.0", "a" * 64, ["n1", "n2"])
    rollout.commit_lead_s = 0.052
    rollout.nodes["n1"] = NodeResult("n1", finished=True, finished_at=1.0, armed_ahead_s=0.04)
    rollout.nodes["n2"] = NodeResult("n2", finished=True, finished_at=1.2, armed_ahead_s=-0.25)
    text = render.rollout_detail(Rollout.loads(rollout.dumps()).to_json())
    assert "commit lead: 52.0ms (slowest: n2, ready 250.0ms after the instant)" in text, text


def test_completion_scripts_complete_verbs_flags_and_choices(tmp_path: Path) -> None:
    """The bash script, run by bash: verbs, sub-verbs, a verb's flags, a flag's choices."""
    script = tmp_path / "coordctl.bash"
    out = io.StringIO()
    assert cli.main(["completion", "bash"], out=out) == cli.EXIT_OK
    script.write_text(out.getvalue())

    def complete(line: str) -> set[str]:
        words = line.split(" ")
        probe = (
            f"source {script}\n"
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            "_coordctl_complete; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
        )
        done = subprocess.run(
            ["bash", "--norc", "-c", probe], capture_output=True, text=True, check=True
        )
        return set(done.stdout.split())

    assert complete("coordctl upg") == {"upgrade"}
    assert complete("coordctl release p") == {"push"}
    assert {"--release", "--dry-run", "--selector", "-l"} <= complete("coordctl upgrade -")
    assert "--rel" not in complete("coordctl upgrade --re")
    assert complete("coordctl nodes -o ") == {"table", "wide", "json", "yaml"}
    assert complete("coordctl -o j") == {"json"}
    assert complete("coordctl dev u") == {"up"}
    for shell in ("zsh", "fish"):
        out = io.StringIO()
        assert cli.main(["completion", shell], out=out) == cli.EXIT_OK
        assert "upgrade" in out.getvalue() and "--dry-run" in out.getvalue().replace(
            "-l dry-run", "--dry-run"
        )


def test_watch_progress_shows_wave_countdown_and_pause() -> None:
    base: dict[str, Any] = {
        "id": "r1",
        "kind": "upgrade",
        "release": "shop@2.0.0",
        "targets": NODES,
        "waves": 2,
        "wave": 0,
        "phase": "provisional",
        "nodes": {n: {"vote": "yes", "finished": n == "n1"} for n in NODES},
        "analysis": {"overall": "pass", "action": "wait", "elapsed_s": 3.5, "window_s": 10.0},
    }
    assert "wave 1 of 2" in render.summary(base) and "analysis: 6.50s left" in render.summary(base)
    out = io.StringIO()
    progress = render.Progress(out, style=render.PLAIN)
    progress.update(base)
    progress.update({**base, "wave": 1})
    paused = {"overall": "inconclusive", "action": "pause", "reason": "no data"}
    progress.update({**base, "wave": 1, "analysis": paused})
    text = out.getvalue()
    assert "wave 2 of 2" in text and "paused: waiting for `coordctl promote`" in text, text
    assert "paused" in render.summary({**base, "analysis": paused})
