"""The agent's side of the fleet protocol, as real processes against a real etcd.

* a prepared agent finishes or drops its rollout by itself when the durable
  decision appears in etcd (no Finish/Abort RPC), so it never depends on the
  coordinator that prepared it;
* the highest coordinator epoch survives a restart;
* outside dev mode (mutual TLS) only releases signed by a trusted key are
  prepared, on the Prepare RPC and on the reconcile-at-start path alike.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from coordinator.election import Election, Leadership, Session
from hotfleet._proto.hotfleet.v1 import agent_pb2, common_pb2
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from hotfleet.keys import Keys
from hotfleet.signing import DEFAULT_FLEET, generate_keypair, load_private_key, sign_release
from node_agent.agent import permanent_record
from node_agent.decision_watch import COMMIT_GRACE_S, DECISION_POLL_S
from node_agent.participant import COMMIT_SETTLE_S
from tests.agents import (
    ROOT,
    SHOP_MODULES,
    AgentProcess,
    Agents,
    decide,
    make_pki,
    publish,
    read_member,
    release,
    wait_for,
)

pytestmark = pytest.mark.integration


def version(agent: AgentProcess) -> str:
    """The single version every shop module serves (fails on a mix)."""
    versions = agent.versions()
    seen = {versions[m] for m in SHOP_MODULES}
    assert len(seen) == 1, versions
    return seen.pop()


def prepare(
    agent: AgentProcess, manifest: common_pb2.ReleaseManifest, rollout: str, epoch: int = 1
) -> agent_pb2.PrepareReply:
    return agent.stub.Prepare(
        agent_pb2.PrepareRequest(rollout_id=rollout, epoch=epoch, release=manifest), timeout=30
    )


def test_prepared_agent_acts_on_the_decision_in_etcd_by_itself(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str, leadership: Leadership
) -> None:
    epoch = leadership.epoch

    def put(rollout_id: str, decision: str) -> None:
        decide(etcd_client, etcd_prefix, leadership, rollout_id, decision)

    agent = agents.start("n-dec")
    manifest = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))

    # abort: the prepared release is dropped, nothing switches.
    assert prepare(agent, manifest, "r-abort", epoch).ok
    put("r-abort", "abort")
    wait_for(lambda: agent.status().state == "idle", timeout=5)
    assert agent.status().prepared_rollout == "" and version(agent) == "1"

    # A newer prepare supersedes an older one, whose decision then means nothing here.
    assert prepare(agent, manifest, "r-old", epoch).ok
    assert prepare(agent, manifest, "r-new", epoch).ok
    put("r-old", "commit")
    # a non-event: it must not happen within the time the decision watch would take to act
    time.sleep(2 * DECISION_POLL_S + COMMIT_GRACE_S)
    assert agent.status().prepared_rollout == "r-new" and version(agent) == "1"
    assert "dropping prepared rollout r-old" in agent.log()

    # commit: the agent finishes by itself; a late Finish RPC is a replay.
    put("r-new", "commit")
    wait_for(lambda: version(agent) == "2", timeout=5)
    status = agent.status()
    assert (status.state, status.current_release, status.prepared_rollout) == (
        "idle",
        "shop@2.0.0",
        "",
    )
    late = agent.stub.Finish(agent_pb2.FinishRequest(rollout_id="r-new", epoch=epoch), timeout=10)
    assert late.ok and late.already_finished and late.release == "shop@2.0.0"
    log = agent.log()
    assert "decision 'commit' found in etcd" in log and "finished by the node itself" in log
    assert "decision 'abort' found in etcd" in log


def test_a_commit_that_does_not_name_the_node_is_never_acted_on(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str, leadership: Leadership
) -> None:
    """A node whose yes vote was not counted (it answered after the vote was
    taken, or was left out under --allow-missing) drops what it prepared when
    the decision commits without it; it is caught up later, never by itself."""
    agent = agents.start("n-late")
    manifest = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))
    assert prepare(agent, manifest, "r-without", leadership.epoch).ok
    decide(etcd_client, etcd_prefix, leadership, "r-without", "commit", ["n-other"])
    wait_for(lambda: agent.status().prepared_rollout == "", timeout=5)
    assert agent.status().state == "idle" and version(agent) == "1"
    assert "not among the decision's participants" in agent.log()

    # the same node named in the next decision commits on it by itself
    assert prepare(agent, manifest, "r-with", leadership.epoch).ok
    decide(etcd_client, etcd_prefix, leadership, "r-with", "commit", ["n-late", "n-other"])
    wait_for(lambda: version(agent) == "2", timeout=5 + COMMIT_GRACE_S)


def test_a_commit_naming_its_instant_switches_the_node_at_it_without_a_finish_rpc(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str, leadership: Leadership
) -> None:
    """The decision watch is pushed the commit and switches at the instant it names,
    not a grace period after reading it: the fleet switches together whenever the
    coordinator's Finish reaches each node (issue 17); the Finish then replays."""
    agent = agents.start("n-instant")
    manifest = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))
    assert prepare(agent, manifest, "r-instant", leadership.epoch).ok
    commit_at = time.time() + 1.0
    decide(etcd_client, etcd_prefix, leadership, "r-instant", "commit", ["n-instant"], commit_at)
    wait_for(lambda: version(agent) == "2", timeout=5)
    late = agent.stub.Finish(
        agent_pb2.FinishRequest(rollout_id="r-instant", epoch=leadership.epoch), timeout=10
    )
    assert late.ok and late.already_finished and late.release == "shop@2.0.0"
    # at the instant (not before), and well inside the grace a commit without one waits
    assert commit_at <= late.finished_at < commit_at + COMMIT_GRACE_S / 2
    assert "decision 'commit' found in etcd" not in agent.log()


def test_restarted_agent_keeps_fencing_a_deposed_leader(agents: Agents) -> None:
    first = agents.start("n-fence")
    assert first.stub.Abort(agent_pb2.AbortRequest(rollout_id="r", epoch=9), timeout=5).ok
    first.term()

    second = agents.start("n-fence", code_path=first.code_path)  # same cache dir
    assert second.status().epoch_seen == 9
    with pytest.raises(grpc.RpcError) as info:
        second.stub.Abort(agent_pb2.AbortRequest(rollout_id="r", epoch=8), timeout=5)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "lower than 9" in (info.value.details() or "")
    assert second.stub.Abort(agent_pb2.AbortRequest(rollout_id="r", epoch=10), timeout=5).ok


def test_secure_agent_prepares_only_releases_signed_by_a_trusted_key(
    agents: Agents,
    etcd_client: EtcdClient,
    etcd_prefix: str,
    tmp_path: Path,
    leadership: Leadership,
) -> None:
    pki = make_pki(tmp_path / "pki")
    generate_keypair(tmp_path / "fleet.key", tmp_path / "fleet.pub")
    generate_keypair(tmp_path / "rogue.key", tmp_path / "rogue.pub")
    fleet_key, rogue_key = (
        load_private_key(tmp_path / "fleet.key"),
        load_private_key(tmp_path / "rogue.key"),
    )
    v2 = release("shop-2.0.0")
    secure = {"dev": False, "pki": pki, "trust_keys": [tmp_path / "fleet.pub"]}

    # Reconcile at start verifies the permanent record: unsigned -> boot code stays.
    publish(etcd_client, etcd_prefix, v2)
    etcd_client.put(Keys(etcd_prefix).permanent, permanent_record(v2))
    agent = agents.start("n-sec", **secure)  # type: ignore[arg-type]
    status = agent.status()
    assert (status.state, status.current_release) == ("reconcile_failed", "")
    assert version(agent) == "1" and "unsigned" in agent.log()
    member = wait_for(lambda: read_member(etcd_client, etcd_prefix, "n-sec"))
    assert member["secure"] is True and len(member["trusted_keys"]) == 1

    unsigned = publish(etcd_client, etcd_prefix, v2)
    reply = prepare(agent, unsigned, "r-unsigned", leadership.epoch)
    assert not reply.ok
    assert [(e.node, e.module, e.reason) for e in reply.errors] == [("n-sec", "*", "unsigned")]

    for name, key in (("rogue", rogue_key), ("tampered", fleet_key)):
        bad = publish(etcd_client, etcd_prefix, v2, key=key)
        if name == "tampered":  # a signature of another release
            sig, _ = sign_release(
                release("shop-2.1.0-bad").digest, key, release=v2.label, fleet=DEFAULT_FLEET
            )
            bad.signature = bytes.fromhex(sig)
        reply = prepare(agent, bad, f"r-{name}", leadership.epoch)
        assert not reply.ok, name
        assert [(e.node, e.module, e.reason) for e in reply.errors] == [
            ("n-sec", "*", "bad_signature")
        ], name
    assert agent.status().prepared_rollout == "" and version(agent) == "1"

    signed = publish(etcd_client, etcd_prefix, v2, key=fleet_key)
    assert prepare(agent, signed, "r-signed", leadership.epoch).ok
    finish = agent_pb2.FinishRequest(rollout_id="r-signed", epoch=leadership.epoch)
    done = agent.stub.Finish(finish, timeout=30)
    assert done.ok and done.release == "shop@2.0.0" and version(agent) == "2"

    # A signed permanent record is reconciled to by a node that starts afterwards.
    sig, signer = sign_release(v2.digest, fleet_key, release=v2.label, fleet=DEFAULT_FLEET)
    etcd_client.put(Keys(etcd_prefix).permanent, permanent_record(v2, sig, signer))
    other = agents.start("n-sec2", **secure)  # type: ignore[arg-type]
    assert other.status().current_release == "shop@2.0.0" and version(other) == "2"


def test_node_agent_cli_refuses_to_start_without_a_trusted_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    proc = subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "--node-id", "x",
         "--code-path", str(ROOT / "examples" / "shop"), "--app", "shop.app:application",
         "--etcd", "http://127.0.0.1:1", "--tls-cert", str(pki.agent_cert),
         "--tls-key", str(pki.agent_key), "--tls-ca", str(pki.ca)],
        capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "trusted release-signing key" in proc.stderr and "--trust-key" in proc.stderr


def test_decision_poll_rides_out_an_etcd_outage(tmp_path: Path, etcd_server: EtcdServer) -> None:
    prefix = "/decision-outage/"
    fleet = Agents(tmp_path, etcd_server.endpoint, prefix)
    client = connect(etcd_server.endpoint)
    try:
        agent = fleet.start("n-out")
        manifest = publish(client, prefix, release("shop-2.0.0"))
        assert prepare(agent, manifest, "r-out").ok
        etcd_server.kill()
        wait_for(lambda: "cannot read decision" in agent.log(), timeout=10)
        etcd_server.start()
        with Session(client, ttl=10) as session:
            lead = Election(client, Keys(prefix).election, session).campaign("t", timeout=10)
            decide(client, prefix, lead, "r-out", "commit")
            wait_for(lambda: version(agent) == "2", timeout=15)
        assert "decision key readable again" in agent.log()
    finally:
        fleet.close()
        client.close()


def test_scheduled_commit_switches_at_its_instant_and_acknowledges_after_settling(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    """A Finish carrying ``commit_at`` switches no earlier than that instant and
    reports it; the reply itself waits ``COMMIT_SETTLE_S`` past the instant, so
    that on a host packing many agents the acknowledgements do not take CPU
    from nodes still switching."""
    agent = agents.start("n-sched")
    manifest = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))
    assert prepare(agent, manifest, "r-sched").ok
    commit_at = time.time() + 1.0
    replies: list[agent_pb2.FinishReply] = []
    caller = threading.Thread(
        target=lambda: replies.append(
            agent.stub.Finish(
                agent_pb2.FinishRequest(rollout_id="r-sched", epoch=1, commit_at=commit_at),
                timeout=10,
            )
        )
    )
    caller.start()
    # Until the instant, the node serves the old release: every reading taken
    # wholly before commit_at must say "1" (readings that straddle it prove
    # nothing and are not counted), whatever the machine's speed.
    before_instant = []
    while (start := time.time()) < commit_at - 0.05:
        seen = version(agent)
        if time.time() < commit_at:
            before_instant.append(seen)
        if start > commit_at - 0.3:
            break
    assert before_instant and set(before_instant) == {"1"}, before_instant
    caller.join(10)
    acknowledged = time.time()
    (reply,) = replies
    assert reply.ok and version(agent) == "2"
    assert commit_at <= reply.finished_at < acknowledged
    assert acknowledged >= commit_at + COMMIT_SETTLE_S


def test_a_committed_release_is_prepared_again_from_the_cache_while_etcd_is_down(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    """Sources are cached once a release is committed (not in prepare, and never
    for an aborted one): with etcd gone, the committed release can be prepared
    again (a retry, a rollback to it); one never committed is refused, naming
    the module whose source is not cached, without a retry per module."""
    prefix = "/cache-outage/"
    fleet = Agents(tmp_path, etcd_server.endpoint, prefix)
    client = connect(etcd_server.endpoint)
    try:
        agent = fleet.start("n-cache")
        good = publish(client, prefix, release("shop-2.0.0"))
        aborted = publish(client, prefix, release("shop-2.1.0-bad"))
        assert prepare(agent, aborted, "r-aborted").ok
        assert agent.stub.Abort(agent_pb2.AbortRequest(rollout_id="r-aborted", epoch=1)).ok
        assert prepare(agent, good, "r-good").ok
        done = agent.stub.Finish(agent_pb2.FinishRequest(rollout_id="r-good", epoch=1), timeout=30)
        assert done.ok and version(agent) == "2"

        etcd_server.kill()
        again = prepare(agent, good, "r-again")
        assert again.ok, again.errors
        refused = prepare(agent, aborted, "r-uncached")
        assert not refused.ok
        assert {e.module for e in refused.errors} == {"shop.pricing"}, (
            refused.errors
        )  # the rest: cached
        assert all("cannot fetch source" in e.detail for e in refused.errors), refused.errors
        assert version(agent) == "2"
    finally:
        fleet.close()
        client.close()
