"""The local etcd used by dev mode and the tests, and connecting to etcd."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import etcd3.exceptions
import pytest

from hotfleet.etcd_client import EtcdConnectError, EtcdEndpoint, connect, parse_endpoints
from hotfleet.etcd_server import (
    BINARY_ENV,
    EtcdServer,
    EtcdStartError,
    EtcdUnavailable,
    find_etcd_binary,
)

pytestmark = pytest.mark.integration


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_start_serve_stop_leaves_no_process(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "data")
    with pytest.raises(RuntimeError, match="start"):
        _ = server.endpoint
    with server:
        pid = server.pid
        assert pid is not None
        client = connect(server.endpoint)
        try:
            client.put("/k", b"v")
            assert client.get("/k")[0] == b"v"
        finally:
            client.close()
    assert server.pid is None
    assert process_gone(pid)
    server.stop()  # idempotent
    server.kill()


def test_kill_then_restart_on_same_ports_keeps_data(etcd_server: EtcdServer) -> None:
    endpoint = etcd_server.endpoint
    client = connect(endpoint, timeout=2)
    try:
        client.put("/survives", b"yes")
        pid = etcd_server.pid
        assert pid is not None
        etcd_server.kill()
        assert process_gone(pid)
        assert etcd_server.pid is None
        # A dead etcd is an etcd error the caller can retry, not a ValueError.
        with pytest.raises(etcd3.exceptions.Etcd3Exception):
            client.get("/survives")
        etcd_server.start()
        assert etcd_server.endpoint == endpoint
        assert etcd_server.pid not in (None, pid)
        # The same client object recovers once etcd is back.
        assert client.get("/survives")[0] == b"yes"
    finally:
        client.close()


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-etcd"
    monkeypatch.setenv(BINARY_ENV, str(missing))
    with pytest.raises(EtcdUnavailable, match=BINARY_ENV) as info:
        find_etcd_binary()
    assert str(missing) in str(info.value)
    assert "--etcd" in str(info.value)
    server = EtcdServer(tmp_path / "data")
    with pytest.raises(EtcdUnavailable):
        server.start()
    assert server.pid is None


def test_etcd_dying_at_startup_reports_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'fake etcd: cannot start' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(BINARY_ENV, str(fake))
    server = EtcdServer(tmp_path / "data")
    with pytest.raises(EtcdStartError, match="code 3") as info:
        server.start(timeout=5)
    assert "fake etcd: cannot start" in str(info.value)
    assert server.pid is None


def test_parse_endpoints() -> None:
    assert parse_endpoints("http://10.0.0.1:2380") == [EtcdEndpoint("10.0.0.1", 2380, False)]
    assert parse_endpoints(" etcd-a , https://etcd-b:1 ") == [
        EtcdEndpoint("etcd-a", 2379, False),
        EtcdEndpoint("etcd-b", 1, True),
    ]
    assert parse_endpoints("http://[::1]:5")[0].netloc == "[::1]:5"
    for bad in ("", "ftp://x:1", "http://x:1/path", "http://x:notaport"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_connect_names_the_unreachable_endpoint() -> None:
    with pytest.raises(EtcdConnectError, match=r"http://127\.0\.0\.1:1\b"):
        connect("http://127.0.0.1:1", timeout=1)


def test_connect_uses_the_first_reachable_endpoint(etcd_endpoint: str) -> None:
    client = connect(f"http://127.0.0.1:1,{etcd_endpoint}", timeout=2)
    try:
        assert client.status().version
    finally:
        client.close()
