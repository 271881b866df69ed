"""In-process parts of the node agent: metrics, wire conversions, the library API."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc
from hotfleet.errors import ModuleError, Reason
from hotfleet.release import Release
from hotfleet.wire import errors_from_proto, errors_to_proto, manifest_from_proto, release_to_proto
from node_agent import Agent
from node_agent.agent import TLSFiles
from node_agent.drain import RequestRecord
from node_agent.metrics import Metrics

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


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path: Path) -> None:
    def cert(name: str, cn: str, ext: str = "") -> None:
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=tmp_path)  # fmt: skip
        extra = ["-extfile", "ext.cnf"] if ext else []
        if ext:
            (tmp_path / "ext.cnf").write_text(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", *extra, cwd=tmp_path)  # fmt: skip

    _openssl("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=fleet-ca",
             "-days", "1", "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    cert("agent", "agent", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    cert("coord", "coordinator")
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    tls = TLSFiles(
        str(tmp_path / "agent.pem"), str(tmp_path / "agent.key"), str(tmp_path / "ca.pem")
    )
    with Agent("secure", [tmp_path], None, tls=tls) as agent:
        good = grpc.ssl_channel_credentials(read("ca.pem"), read("coord.key"), read("coord.pem"))
        with grpc.secure_channel(agent.address, good) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            assert stub.Status(agent_pb2.StatusRequest(), timeout=5).node_id == "secure"
        anonymous = grpc.ssl_channel_credentials(read("ca.pem"))
        with grpc.secure_channel(agent.address, anonymous) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Status(agent_pb2.StatusRequest(), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(agent.address) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.Status(agent_pb2.StatusRequest(), timeout=2)
