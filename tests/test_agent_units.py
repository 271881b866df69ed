"""In-process parts of the node agent: metrics, wire conversions, the library API."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc
from hotfleet.errors import HotfleetError, ModuleError, Reason
from hotfleet.release import Release
from hotfleet.signing import generate_keypair, load_private_key, sign_release
from hotfleet.wire import errors_from_proto, errors_to_proto, manifest_from_proto, release_to_proto
from node_agent import Agent
from node_agent.agent import TLSFiles
from node_agent.drain import RequestRecord
from node_agent.metrics import Metrics
from tests.agents import make_pki

RELEASES = Path(__file__).resolve().parents[1] / "examples" / "releases"


def test_histogram_counts_errors_and_prometheus_text() -> None:
    m = Metrics(bounds=(0.01, 0.1))
    m.observe(RequestRecord(0.005, 200, None))
    m.observe(RequestRecord(0.05, 503, None))
    m.observe(RequestRecord(0.5, None, RuntimeError("boom")))
    m.set_gauge("queue_depth", 3)
    s = m.snapshot()
    assert (s.requests, s.errors, s.latency_counts) == (3, 2, (1, 1, 1))
    assert s.cpu_s > 0 and s.rss_bytes > 0
    text = m.prometheus({"node": 'a"b'}, info={"current": "shop@1"})
    assert 'hotfleet_request_duration_seconds_bucket{node="a\\"b",le="0.1"} 2' in text
    assert 'hotfleet_request_duration_seconds_bucket{node="a\\"b",le="+Inf"} 3' in text
    assert 'hotfleet_app_gauge{node="a\\"b",name="queue_depth"} 3' in text
    assert 'hotfleet_agent_info{node="a\\"b",current="shop@1"} 1' in text
    with pytest.raises(ValueError):
        m.set_gauge("nan", float("nan"))


def test_uncaught_thread_exceptions_are_counted_and_hooks_chain() -> None:
    m = Metrics()
    seen: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(str(args.exc_value))
    try:
        m.install_excepthooks()
        t = threading.Thread(target=lambda: 1 / 0)
        t.start()
        t.join()
        m.uninstall_excepthooks()
        assert threading.excepthook is not previous  # our test hook is back
    finally:
        threading.excepthook = previous
    assert m.snapshot().uncaught == 1
    assert seen == ["division by zero"]


def test_manifest_round_trips_through_the_wire() -> None:
    release = Release.from_path(RELEASES / "shop-2.0.0")
    sources = {m.digest: m.source for m in release.modules}
    again = Release.from_manifest(
        manifest_from_proto(release_to_proto(release)), sources.__getitem__
    )
    assert again.digest == release.digest
    assert again.get("shop.inventory").extra == {"reorder_level": 20}  # type: ignore[union-attr]
    errors = [ModuleError("shop.pricing", Reason.BADFILE, "line 3")]
    wire = errors_to_proto(errors, node="n1")
    assert errors_from_proto(wire) == [errors[0].on_node("n1")]


def test_library_agent_refuses_insecure_without_dev(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mutual TLS"):
        Agent("n1", [tmp_path], None)


def test_library_agent_without_etcd_serves_status(tmp_path: Path) -> None:
    agent = Agent("lib", [tmp_path], None, dev=True, labels={"k": "v"})
    with agent, grpc.insecure_channel(agent.address) as channel:
        stub = agent_pb2_grpc.NodeAgentStub(channel)
        status = stub.Status(agent_pb2.StatusRequest(), timeout=5)
        assert (status.node_id, status.state, dict(status.labels)) == (
            "lib",
            "idle",
            {"k": "v"},
        )
        assert stub.Abort(agent_pb2.AbortRequest(rollout_id="x", epoch=9), timeout=5).ok
        with pytest.raises(grpc.RpcError) as info:
            stub.Abort(agent_pb2.AbortRequest(rollout_id="x", epoch=8), timeout=5)
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release-signing key pair; returns the directory holding ``k.key`` / ``k.pub``."""
    d = tmp_path_factory.mktemp("signing")
    generate_keypair(d / "k.key", d / "k.pub")
    return d


def test_mutual_tls_refuses_clients_without_a_certificate(
    tmp_path: Path, signing_key: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = TLSFiles(str(pki.agent_cert), str(pki.agent_key), str(pki.ca))
    with Agent("secure", [tmp_path], None, tls=tls, trusted_keys=[signing_key / "k.pub"]) as agent:
        with grpc.secure_channel(agent.address, pki.client_credentials()) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            assert stub.Status(agent_pb2.StatusRequest(), timeout=5).node_id == "secure"
        anonymous = grpc.ssl_channel_credentials(pki.ca.read_bytes())
        with grpc.secure_channel(agent.address, anonymous) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Status(agent_pb2.StatusRequest(), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(agent.address) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.Status(agent_pb2.StatusRequest(), timeout=2)


def test_library_agent_refuses_to_run_without_a_trusted_key_outside_dev(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = TLSFiles(str(pki.agent_cert), str(pki.agent_key), str(pki.ca))
    with pytest.raises(ValueError, match="trusted release-signing key"):
        Agent("n1", [tmp_path], None, tls=tls)


def test_highest_epoch_survives_a_new_agent_on_the_same_cache_dir(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = Agent("n-ep", [tmp_path], None, dev=True, cache_dir=cache)
    assert first.epoch_seen == 0
    assert first.fence(7) is None and first.fence(3) is not None
    assert first.epoch_path.parent == cache and first.epoch_path.is_file()
    again = Agent("n-ep", [tmp_path], None, dev=True, cache_dir=cache)
    assert again.epoch_seen == 7
    refusal = again.fence(6)
    assert refusal is not None and "lower than 7" in refusal
    other_cluster = Agent("n-ep", [tmp_path], None, dev=True, cache_dir=cache, prefix="/other/")
    other_node = Agent("n-other", [tmp_path], None, dev=True, cache_dir=cache)
    assert other_cluster.epoch_seen == 0 and other_node.epoch_seen == 0
    again.epoch_path.write_text("{not json")
    assert Agent("n-ep", [tmp_path], None, dev=True, cache_dir=cache).epoch_seen == 0


def test_signature_policy_in_and_outside_dev_mode(tmp_path: Path, signing_key: Path) -> None:
    digest = Release.from_path(RELEASES / "shop-2.0.0").digest
    signature, signer = sign_release(
        digest, load_private_key(signing_key / "k.key"), release="shop@2.0.0", fleet="default"
    )
    pub = signing_key / "k.pub"
    pki = make_pki(tmp_path / "pki")
    tls = TLSFiles(str(pki.agent_cert), str(pki.agent_key), str(pki.ca))

    def refusal(agent: Agent, sig: str, who: str) -> list[Reason]:
        with pytest.raises(HotfleetError) as info:
            agent.check_signature(digest, sig, who, "shop@2.0.0")
        return [e.reason for e in info.value.errors]

    dev_blind = Agent("d1", [tmp_path], None, dev=True)
    dev_blind.check_signature(digest, "", "", "shop@2.0.0")  # unsigned accepted in dev
    dev_blind.check_signature(digest, "00" * 64, signer, "x")  # no keys: cannot verify

    dev_keys = Agent("d2", [tmp_path], None, dev=True, trusted_keys=[pub])
    dev_keys.check_signature(digest, "", "", "shop@2.0.0")
    dev_keys.check_signature(digest, signature, signer, "shop@2.0.0")
    assert refusal(dev_keys, "00" * 64, signer) == [Reason.BAD_SIGNATURE]

    secure = Agent("s1", [tmp_path], None, tls=tls, trusted_keys=[pub])
    secure.check_signature(digest, signature, signer, "shop@2.0.0")
    assert refusal(secure, "", "") == [Reason.UNSIGNED]
    assert refusal(secure, signature, "0123456789abcdef") == [Reason.BAD_SIGNATURE]
    # the signature names shop@2.0.0 in fleet "default": nothing else
    with pytest.raises(HotfleetError):
        secure.check_signature(digest, signature, signer, "shop@2.5.0")
    other_fleet = Agent("s2", [tmp_path], None, tls=tls, trusted_keys=[pub], fleet="prod")
    with pytest.raises(HotfleetError):
        other_fleet.check_signature(digest, signature, signer, "shop@2.0.0")


def test_a_crash_in_hotfleets_own_thread_is_a_bug_not_an_app_error() -> None:
    """The judge must not fail a release because a hotfleet thread crashed."""
    from node_agent.metrics import Metrics

    metrics = Metrics()
    metrics.install_excepthooks()
    try:

        def boom() -> None:
            raise RuntimeError("bug")

        for name in ("hotfleet-membership x", "app-worker"):
            t = threading.Thread(target=boom, name=name)
            t.start()
            t.join()
    finally:
        metrics.uninstall_excepthooks()
    assert metrics.snapshot().uncaught == 1  # the app's thread only
    assert metrics.internal_errors == 1
    assert "hotfleet_internal_errors_total" in metrics.prometheus({"node": "n"})
