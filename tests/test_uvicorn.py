"""ASGI apps as hotfleet participants (issue 13): real ``uvicorn --workers 2`` and gunicorn's
uvicorn worker class on 127.0.0.1, one host each.

The app (tests/asgi_app) starts a background task from its lifespan under
``asupervise``, serves a websocket and a long stream.  An upgrade and a
rollback each restart the task on the code they switch to; an open stream
holds the deploy no longer than the drain timeout, which the worker reports.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from hotfleet.etcd_client import EtcdClient
from tests.agents import Agents, wait_for
from tests.coordinators import Coordinators, coordctl
from tests.servers import Server, Servers

pytestmark = pytest.mark.timeout(120)

APP_DIR = Path(__file__).resolve().parent / "asgi_app"
EXIT_OK = 0


@pytest.fixture
def servers(
    tmp_path: Path, etcd_endpoint: str, etcd_prefix: str, agents: Agents
) -> Iterator[Servers]:
    owner = Servers(tmp_path, etcd_endpoint, etcd_prefix, agents)
    try:
        yield owner
    finally:
        owner.close()


def _code(tmp_path: Path, host: str) -> Path:
    target = tmp_path / f"asgi-code-{host}"
    shutil.copytree(APP_DIR / "boot", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _ticks(server: Server, pids: int, within_s: float = 15.0) -> dict[int, dict[str, Any]]:
    """``/tick`` of every worker (requests until ``pids`` distinct workers answered).

    The workers share one listening socket and the kernel picks who accepts:
    on a busy host the same idle worker won 40 sequential requests in a row
    (CI, 3.12), so this asks in concurrent pairs until each answered, for up
    to ``within_s``.
    """
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + within_s
    # requests in pairs: while one worker handles the first, the other accepts the second
    with ThreadPoolExecutor(max_workers=pids) as pool:
        while len(seen) < pids and time.monotonic() < deadline:
            for body in pool.map(lambda _: server.get("/tick"), range(pids)):
                seen[body["pid"]] = body
            if len(seen) < pids:
                time.sleep(0.005)
    assert len(seen) >= pids, seen
    return seen


def _read_ticks(server: Server) -> list[dict[str, Any]]:
    return list(_ticks(server, 2).values())


def test_asgi_under_uvicorn_workers_and_gunicorn_uvicorn_worker_upgrade_and_rollback(
    servers: Servers,
    coordinators: Coordinators,
    etcd_client: EtcdClient,
    etcd_prefix: str,
    tmp_path: Path,
) -> None:
    leader = coordinators.start("c")
    uv = servers.uvicorn("u", "asgishop.app:app", workers=2, code=_code(tmp_path, "u"))
    gu = servers.gunicorn(
        "g",
        "asgishop.app:app",
        workers=2,
        worker_class="uvicorn.workers.UvicornWorker",
        code=_code(tmp_path, "g"),
    )
    hosts = [uv, gu]
    members: dict[str, dict[str, Any]] = {}
    for host in hosts:
        members.update(host.wait_workers(etcd_client, etcd_prefix))
    leader.wait_leader()
    assert sorted(members) == ["g-w0", "g-w1", "u-w0", "u-w1"]
    assert {m["labels"]["host"] for m in members.values()} == {"g", "u"}

    def ticking(version: str) -> bool:
        bodies = [b for h in hosts for b in _read_ticks(h)]
        return all(b["version"] == version and b["TICKS"]["version"] == version for b in bodies)

    for host in hosts:  # the app's /-/metrics is answered by the agent
        with urllib.request.urlopen(f"http://{host.http_address}/-/metrics", timeout=5) as r:
            assert b"hotfleet_requests_total" in r.read()
    wait_for(lambda: ticking("1"), timeout=10)
    starts_before = {b["pid"]: b["TICKS"]["starts"] for h in hosts for b in _read_ticks(h)}

    # a websocket opened before the upgrade, and a stream that outlasts the drain timeout (2 s)
    opened = ExitStack()
    ws = opened.enter_context(ws_connect(f"ws://{uv.http_address}/ws", open_timeout=5))
    ws.send("before")
    assert json.loads(ws.recv(timeout=5)) == {"echo": "before", "version": "1"}
    streamed: list[bytes] = []

    def stream() -> None:
        with urllib.request.urlopen(f"http://{gu.http_address}/stream?s=12", timeout=30) as r:
            streamed.append(r.read())

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        pushed = coordctl(leader, "release", "push", str(APP_DIR / "releases" / "asgishop-2.0.0"))
        assert pushed.code == EXIT_OK, pushed
        time.sleep(0.5)
        started = time.monotonic()
        up = coordctl(
            leader,
            "-o",
            "json",
            "upgrade",
            "--all",
            "--release",
            "asgishop@2.0.0",
            "--wait",
            "--window",
            "60",
        )
        took = time.monotonic() - started
        assert up.code == EXIT_OK, up.out + up.err
        assert up.json()["phase"] == "provisional"
        assert took < 10, took  # the 12 s stream did not hold the deploy
        assert streamer.is_alive()  # ... and was not cut either

        # the supervised lifespan task runs the new code on every worker, restarted once
        wait_for(lambda: ticking("2"), timeout=10)
        for host in hosts:
            for body in _read_ticks(host):
                assert body["TICKS"]["starts"] == starts_before[body["pid"]] + 1, body
        # the open websocket still works, on the module's current state; a new one too
        ws.send("during")
        assert json.loads(ws.recv(timeout=5)) == {"echo": "during", "version": "2"}
        with ws_connect(f"ws://{uv.http_address}/ws", open_timeout=5) as fresh:
            fresh.send("new")
            assert json.loads(fresh.recv(timeout=5))["version"] == "2"

        back = coordctl(leader, "-o", "json", "rollback", "--wait")
        assert back.code == EXIT_OK, back.out + back.err
        wait_for(lambda: ticking("1"), timeout=10)
        for host in hosts:
            for body in _read_ticks(host):
                assert body["TICKS"]["starts"] == starts_before[body["pid"]] + 2, body
        ws.send("after")
        assert json.loads(ws.recv(timeout=5)) == {"echo": "after", "version": "1"}
    finally:
        opened.close()
        streamer.join(20)
    # the stream ran to its end on the code it started with, and the drain timeout was said
    assert streamed and streamed[0] == b"1" * 120, streamed
    drained = [
        r["message"] for r in gu.log_records() if r.get("message", "").startswith("drain timed out")
    ]
    assert drained and "still in flight" in drained[0], gu.log()
