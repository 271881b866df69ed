"""Authority: who may drive the fleet, and which epoch is obeyed.

Forged callers against real processes over real mutual TLS: every
certificate here is signed by the fleet's own CA, so the handshake succeeds
and only the role in the certificate (``hotfleet://role/<role>``) or etcd's
word on the leader's epoch stands between the caller and a code reload.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE
from coordinator.election import Election, Leadership, Session
from hotfleet import decisions
from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from hotfleet.keys import Keys
from hotfleet.signing import generate_keypair, load_private_key
from hotfleet.tls import Role
from node_agent.agent import permanent_record
from tests.agents import (
    RELEASES,
    AgentProcess,
    Agents,
    Pki,
    decide,
    make_pki,
    publish,
    release,
    wait_for,
)
from tests.coordinators import CoordinatorProcess, Coordinators, coordctl, versions

pytestmark = pytest.mark.integration

MAX_EPOCH = 2**64 - 1


def _secure_agent(agents: Agents, pki: Pki, tmp_path: Path, name: str) -> AgentProcess:
    pub = tmp_path / "keys" / "fleet.pub"
    if not pub.exists():
        generate_keypair(tmp_path / "keys" / "fleet.key", pub)
    return agents.start(name, dev=False, pki=pki, trust_keys=[pub])


def _agent_calls(epoch: int) -> dict[str, Callable[[agent_pb2_grpc.NodeAgentStub], Any]]:
    """Every mutating RPC of the agent API, as a caller would send it."""
    return {
        "Prepare": lambda s: s.Prepare(
            agent_pb2.PrepareRequest(rollout_id="forged", epoch=epoch), timeout=5
        ),
        "Unpack": lambda s: s.Unpack(agent_pb2.PrepareRequest(epoch=epoch), timeout=5),
        "Finish": lambda s: s.Finish(
            agent_pb2.FinishRequest(rollout_id="forged", epoch=epoch), timeout=5
        ),
        "Abort": lambda s: s.Abort(
            agent_pb2.AbortRequest(rollout_id="forged", epoch=epoch), timeout=5
        ),
        "Rollback": lambda s: s.Rollback(
            agent_pb2.RollbackRequest(rollout_id="forged", epoch=epoch), timeout=5
        ),
        "MakePermanent": lambda s: s.MakePermanent(
            agent_pb2.MakePermanentRequest(epoch=epoch), timeout=5
        ),
    }


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code = info.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


def test_only_coordinator_certificates_drive_an_agent(
    agents: Agents, tmp_path: Path, leadership: Leadership
) -> None:
    pki = make_pki(tmp_path / "pki")
    node = _secure_agent(agents, pki, tmp_path, "n-roles")
    for role in (Role.AGENT, Role.OPERATOR, Role.READER):
        with grpc.secure_channel(node.grpc_address, pki.credentials(role)) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            for name, call in _agent_calls(leadership.epoch).items():
                with pytest.raises(grpc.RpcError) as info:
                    call(stub)
                assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED, (role, name)
                details = info.value.details() or ""
                assert f"/hotfleet.v1.NodeAgent/{name}" in details and role.value in details
            if role is Role.AGENT:  # a worker's certificate does not even read its peers
                denied = _code(lambda s=stub: s.Status(agent_pb2.StatusRequest(), timeout=5))
                assert denied is grpc.StatusCode.PERMISSION_DENIED
            else:
                assert stub.Status(agent_pb2.StatusRequest(), timeout=5).node_id == "n-roles"
    # nothing was staged, nothing fenced by the refused callers
    status = node.status()
    assert status.prepared_rollout == "" and status.epoch_seen == 0
    # the coordinator's certificate is obeyed (with the epoch etcd says leads)
    assert node.stub.Abort(
        agent_pb2.AbortRequest(rollout_id="r", epoch=leadership.epoch), timeout=5
    ).ok

    # a coordinator certificate from another CA: no handshake at all
    rogue = make_pki(tmp_path / "rogue")
    with grpc.secure_channel(node.grpc_address, rogue.credentials(Role.COORDINATOR)) as channel:
        stub = agent_pb2_grpc.NodeAgentStub(channel)
        assert _code(lambda: stub.Status(agent_pb2.StatusRequest(), timeout=5)) is (
            grpc.StatusCode.UNAVAILABLE
        )


def test_only_operators_drive_the_coordinator_api(
    agents: Agents, coordinators: Coordinators, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    _secure_agent(agents, pki, tmp_path, "n-api")
    daemon = coordinators.start("roles", tls=pki)
    operator, reader = pki.tls_args(Role.OPERATOR), pki.tls_args(Role.READER)

    def listed(args: list[str]) -> bool:
        out = coordctl(daemon, *args, "-o", "json", "nodes")
        return out.code == EXIT_OK and [n["node_id"] for n in out.json()["items"]] == ["n-api"]

    wait_for(lambda: listed(operator), timeout=20, interval=0.2)
    assert listed(reader)  # readers read

    push = ("release", "push", str(RELEASES / "shop-2.0.0"))
    upgrade = ("upgrade", "--all", "--release", "shop@2.0.0", "--window", "0")
    # an agent's or the coordinator's own certificate, or a reader's: refused, named
    others = (("rollback",), ("promote",), ("abort",))  # a reader is refused earlier by these:
    for role in (Role.AGENT, Role.COORDINATOR, Role.READER):  # there is no rollout to act on
        for verb in (push, upgrade, *(others if role is not Role.READER else ())):
            out = coordctl(daemon, *pki.tls_args(role), *verb)
            assert out.code == EXIT_REFUSED, (role, verb, out)
            assert "PermissionDenied" not in out.err and "operator" in out.err, out
            assert f"({role.value})" in out.err, out
    for role in (Role.AGENT, Role.COORDINATOR):
        out = coordctl(daemon, *pki.tls_args(role), "nodes")
        assert out.code == EXIT_REFUSED and "reader" in out.err, (role, out)
    # nothing was pushed or started by them
    releases = coordctl(daemon, *operator, "-o", "json", "release", "list")
    assert releases.code == EXIT_OK and "2.0.0" not in releases.out, releases
    # an operator certificate of another CA never gets a handshake
    rogue = make_pki(tmp_path / "rogue")
    forged = coordctl(daemon, *rogue.tls_args(Role.OPERATOR)[:4], "--tls-ca", str(pki.ca), *push)
    assert forged.code == EXIT_UNREACHABLE, forged
    # the operator is obeyed
    assert coordctl(daemon, *operator, *push).code == EXIT_OK


def test_an_epoch_is_obeyed_only_if_etcd_says_it_leads(
    agents: Agents, etcd_client: EtcdClient, tmp_path: Path, leadership: Leadership
) -> None:
    pki = make_pki(tmp_path / "pki")
    node = _secure_agent(agents, pki, tmp_path, "n-fence")
    refusals: dict[str, str] = {}
    for epoch in (MAX_EPOCH, leadership.epoch + 1, leadership.epoch - 1):
        for name, call in _agent_calls(epoch).items():
            with pytest.raises(grpc.RpcError) as info:
                call(node.stub)
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION, (epoch, name)
            refusals[f"{name}@{epoch}"] = info.value.details() or ""
    assert f"current leader's epoch {leadership.epoch} in etcd" in refusals[f"Abort@{MAX_EPOCH}"]
    assert "lower than" in refusals[f"Abort@{leadership.epoch - 1}"]
    # the huge epoch poisoned nothing: not in memory, not on disk, not after a restart
    assert node.status().epoch_seen == 0
    assert node.stub.Abort(
        agent_pb2.AbortRequest(rollout_id="r", epoch=leadership.epoch), timeout=5
    ).ok
    assert node.status().epoch_seen == leadership.epoch
    node.close()
    again = _secure_agent(agents, pki, tmp_path, "n-fence")
    assert again.status().epoch_seen == leadership.epoch
    assert again.stub.Abort(
        agent_pb2.AbortRequest(rollout_id="r2", epoch=leadership.epoch), timeout=5
    ).ok

    # the leader's key goes (its lease expired): its epoch is refused as soon as etcd says so
    etcd_client.delete(leadership.key)

    def refused() -> bool:
        try:
            again.stub.Abort(
                agent_pb2.AbortRequest(rollout_id="r3", epoch=leadership.epoch), timeout=5
            )
        except grpc.RpcError as exc:
            return "no coordinator leads" in (exc.details() or "")
        return False

    wait_for(refused, timeout=10, interval=0.2)


def _secure_cluster(
    agents: Agents, coordinators: Coordinators, tmp_path: Path, node_id: str
) -> tuple[Pki, AgentProcess, CoordinatorProcess, list[str]]:
    """One secure agent, one coordinator over mutual TLS, operator arguments for coordctl."""
    pki = make_pki(tmp_path / "pki")
    node = _secure_agent(agents, pki, tmp_path, node_id)
    daemon = coordinators.start("auth", tls=pki)
    operator = pki.tls_args(Role.OPERATOR)

    def registered() -> bool:
        out = coordctl(daemon, *operator, "-o", "json", "nodes")
        return out.code == EXIT_OK and len(out.json()["items"]) == 1

    wait_for(registered, timeout=20, interval=0.2)
    key = str(tmp_path / "keys" / "fleet.key")
    for name in ("shop-2.0.0", "shop-2.1.0-bad"):
        pushed = coordctl(
            daemon, *operator, "release", "push", str(RELEASES / name), "--sign-key", key
        )
        assert pushed.code == EXIT_OK, pushed
    return pki, node, daemon, operator


def test_a_swapped_store_entry_is_refused_and_an_old_release_is_no_upgrade(
    agents: Agents,
    coordinators: Coordinators,
    etcd_client: EtcdClient,
    etcd_prefix: str,
    tmp_path: Path,
) -> None:
    _, node, daemon, operator = _secure_cluster(agents, coordinators, tmp_path, "n-store")
    keys = Keys(etcd_prefix)
    genuine, _ = etcd_client.get(keys.release("shop", "2.0.0"))
    swapped, _ = etcd_client.get(keys.release("shop", "2.1.0-bad"))
    assert genuine is not None and swapped is not None

    # etcd write access: the 2.0.0 entry now holds the (validly signed) 2.1.0-bad
    etcd_client.put(keys.release("shop", "2.0.0"), swapped)
    up = ("upgrade", "--all", "--wait", "--window", "0", "--release")
    refused = coordctl(daemon, *operator, *up, "shop@2.0.0")
    assert refused.code == EXIT_REFUSED, refused
    assert "store entry for shop@2.0.0 is not shop@2.0.0" in refused.err, refused
    assert "2.1.0-bad" in refused.err, refused
    assert (
        node.status().current_release == ""
        and not coordctl(daemon, *operator, "-o", "json", "rollouts").json()["items"]
    )
    etcd_client.put(keys.release("shop", "2.0.0"), genuine)

    # the fleet moves to 2.1.0-bad; the older 2.0.0 is validly signed but no upgrade
    assert coordctl(daemon, *operator, *up, "shop@2.1.0-bad").code == EXIT_OK
    assert node.status().current_release == "shop@2.1.0-bad"
    replay = coordctl(daemon, *operator, *up, "shop@2.0.0")
    assert replay.code == EXIT_REFUSED, replay
    assert "older than what the fleet runs" in replay.err and "n-store" in replay.err, replay
    assert node.status().current_release == "shop@2.1.0-bad"

    # asked for explicitly, it goes ahead and the rollout says it was asked for
    down = coordctl(daemon, *operator, *up, "shop@2.0.0", "--allow-downgrade")
    assert down.code == EXIT_OK, down
    assert node.status().current_release == "shop@2.0.0"
    records = [
        json.loads(raw)
        for raw, meta in etcd_client.get_prefix(keys.rollouts)
        if not meta.key.decode().endswith("/decision")
    ]
    flags = {r["release"]: r["options"].get("allow_downgrade") for r in records}
    assert flags == {"shop@2.1.0-bad": False, "shop@2.0.0": True}, flags


def test_a_forged_permanent_record_is_not_believed(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    keys = Keys(etcd_prefix)
    v2 = release("shop-2.0.0")
    publish(etcd_client, etcd_prefix, v2)
    empty = {"name": "shop", "version": "9.9.9", "modules": []}
    forged = {
        "empty": {"release": "shop@9.9.9", "digest": "0" * 64, "manifest": empty},
        "unsigned": json.loads(permanent_record(v2)),
    }
    for name, record in forged.items():
        etcd_client.put(keys.permanent, json.dumps(record))
        node = _secure_agent(agents, pki, tmp_path, f"n-{name}")
        status = node.status()
        assert (status.current_release, status.permanent_release) == ("", ""), name
        assert status.state == "reconcile_failed", (name, status.state)
        assert versions([node]) == {"1"}, name


def test_a_decision_record_carries_its_commit_instant() -> None:
    """The instant every participant switches at travels in the record; one that is no
    instant makes the record forged (a node would otherwise schedule its switch on it)."""
    raw = decisions.encode(decisions.COMMIT, 7, ["n2", "n1"], 1764569085.1234567)
    parsed = decisions.parse(raw.encode())
    assert (parsed.decision, parsed.epoch, parsed.participants) == ("commit", 7, ("n1", "n2"))
    assert parsed.commit_at == 1764569085.123457
    assert decisions.parse(decisions.encode(decisions.ABORT, 7).encode()).commit_at == 0.0
    for bad in ('"soon"', "-1", "true"):
        with pytest.raises(decisions.ForgedDecision, match="not an instant"):
            decisions.parse(f'{{"decision":"commit","epoch":7,"commit_at":{bad}}}'.encode())


def test_a_decision_no_leader_wrote_is_not_acted_on(
    agents: Agents,
    etcd_client: EtcdClient,
    etcd_prefix: str,
    tmp_path: Path,
    leadership: Leadership,
) -> None:
    pki = make_pki(tmp_path / "pki")
    node = _secure_agent(agents, pki, tmp_path, "n-decide")
    key = load_private_key(tmp_path / "keys" / "fleet.key")
    manifest = publish(etcd_client, etcd_prefix, release("shop-2.0.0"), key=key)
    prepare = agent_pb2.PrepareRequest(rollout_id="r-x", epoch=leadership.epoch, release=manifest)
    assert node.stub.Prepare(prepare, timeout=30).ok
    decision_key = Keys(etcd_prefix).decision("r-x")
    forged = {
        "no epoch": b"commit",
        "an epoch that never led": decisions.encode("commit", leadership.epoch + 1000).encode(),
        "an older epoch": decisions.encode("commit", leadership.epoch - 1).encode(),
    }

    def refusals() -> int:
        return node.log().count("not acting on the decision record")

    for what, value in forged.items():
        before = refusals()
        etcd_client.put(decision_key, value)
        wait_for(lambda n=before: refusals() > n, timeout=10)
        assert node.status().prepared_rollout == "r-x", what
    assert versions([node]) == {"1"}
    assert "claims epoch" in node.log() and "is not a decision record" in node.log()
    # the leader's own decision, fenced and with its epoch, is acted on
    etcd_client.delete(decision_key)
    decide(etcd_client, etcd_prefix, leadership, "r-x", "abort")
    wait_for(lambda: node.status().prepared_rollout == "", timeout=10)
    assert versions([node]) == {"1"}


def test_a_leader_does_not_commit_on_a_decision_it_did_not_write(
    agents: Agents, coordinators: Coordinators, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    """The finding: a forged ``commit`` made a --dry-run rollout switch a node."""
    node = agents.start("n-dry")
    daemon = coordinators.start("paused", fault="pause:before_decision", lease_ttl=30)
    daemon.wait_leader()
    wait_for(lambda: coordctl(daemon, "-o", "json", "nodes").json()["items"], timeout=20)
    assert coordctl(daemon, "release", "push", str(RELEASES / "shop-2.0.0")).code == EXIT_OK
    results: list[Any] = []
    run = threading.Thread(
        target=lambda: results.append(
            coordctl(daemon, "upgrade", "--all", "--release", "shop@2.0.0", "--dry-run")
        )
    )
    run.start()
    try:
        wait_for(lambda: daemon.stopped, timeout=30)  # prepared, about to decide
        active, _ = etcd_client.get(Keys(etcd_prefix).active)
        assert active is not None
        rid = active.decode()
        etcd_client.put(Keys(etcd_prefix).decision(rid), b"commit")
    finally:
        daemon.signal(signal.SIGCONT)
        run.join(90)
    (dry,) = results
    assert dry.code == EXIT_OK and "dry_run" in dry.out + dry.err, dry
    assert versions([node]) == {"1"} and node.status().prepared_rollout == ""
    # no leader's commit stands for this rollout (whether the leader met the forged
    # record and replaced it, or the forged write came in after its abort)
    raw, meta = etcd_client.get(Keys(etcd_prefix).decision(rid))
    assert raw is not None
    try:
        stands = decisions.verify(etcd_client, Keys(etcd_prefix), raw, int(meta.mod_revision))
    except decisions.ForgedDecision:
        return
    assert stands.decision == "abort", raw


def test_with_etcd_down_only_the_last_verified_leader_is_obeyed(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    prefix = "/authority-outage/"
    fleet = Agents(tmp_path, etcd_server.endpoint, prefix)
    client = connect(etcd_server.endpoint)
    try:
        pki = make_pki(tmp_path / "pki")
        node = _secure_agent(fleet, pki, tmp_path, "n-outage")
        with Session(client, ttl=30) as session:
            lead = Election(client, Keys(prefix).election, session).campaign("t", timeout=10)

            def abort(epoch: int) -> Any:
                request = agent_pb2.AbortRequest(rollout_id="r", epoch=epoch)
                return node.stub.Abort(request, timeout=10)

            assert abort(lead.epoch).ok  # verified against etcd, remembered
            etcd_server.kill()
            assert abort(lead.epoch).ok  # the leader etcd confirmed keeps being obeyed
            for claim in (lead.epoch + 1, MAX_EPOCH):
                with pytest.raises(grpc.RpcError) as info:
                    abort(claim)
                assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                assert f"cannot verify epoch {claim} against etcd" in (info.value.details() or "")
            assert node.status().epoch_seen == lead.epoch
            etcd_server.start()
    finally:
        fleet.close()
        client.close()
