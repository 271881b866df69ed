"""Real ``node-agent`` processes for integration tests.

:class:`Agents` owns every process it starts (and their gRPC channels) and
kills whatever is still running at cleanup, so a failing test never leaves a
worker behind.  Each agent serves a private copy of ``examples/shop`` (the
agent writes permanent releases into its code path).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from hotfleet.etcd_client import EtcdClient
from hotfleet.release import Release
from hotfleet.store import ContentStore, EtcdBlobBackend
from hotfleet.wire import release_to_proto

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RELEASES = EXAMPLES / "releases"
SHOP_MODULES = ("shop.app", "shop.cart", "shop.inventory", "shop.pricing")


def release(name: str) -> Release:
    """One of the example releases, e.g. ``release("shop-2.0.0")``."""
    return Release.from_path(RELEASES / name)


def publish(client: EtcdClient, prefix: str, rel: Release) -> common_pb2.ReleaseManifest:
    """Put a release's sources in the cluster's content store; its wire manifest."""
    store = ContentStore(EtcdBlobBackend(client, f"{prefix}blobs/"))
    for module in rel.modules:
        store.put(module.source)
    return release_to_proto(rel)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; return it, or fail with the last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")


class AgentProcess:
    """One ``python -m node_agent.cli`` subprocess and a gRPC stub to it."""

    def __init__(self, proc: subprocess.Popen[str], log_path: Path, code_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.code_path = code_path
        self.grpc_address = ""
        self.http_address = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._channel: grpc.Channel | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"agent not ready in {timeout}s:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"agent exited with {self.proc.wait()}:\n{self.log()}")
            if line.startswith("node-agent ready"):
                fields = dict(f.split("=", 1) for f in line.split()[2:])
                self.grpc_address, self.http_address = fields["grpc"], fields["http"]
                return

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""

    @property
    def stub(self) -> agent_pb2_grpc.NodeAgentStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.grpc_address)
        return agent_pb2_grpc.NodeAgentStub(self._channel)

    def status(self) -> agent_pb2.StatusReply:
        return self.stub.Status(agent_pb2.StatusRequest(), timeout=5)

    def http(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.http_address}{path}", data=data)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, {"raw": raw.decode(errors="replace")}

    def http_text(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.http_address}{path}", timeout=10) as resp:
            return resp.read().decode()

    def versions(self) -> dict[str, str]:
        return self.http("/versions")[1]["versions"]

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Agents:
    """Starts agents against one etcd and prefix; kills them all at :meth:`close`."""

    def __init__(self, tmp_path: Path, endpoint: str, prefix: str) -> None:
        self.tmp_path = tmp_path
        self.endpoint = endpoint
        self.prefix = prefix
        self.procs: list[AgentProcess] = []

    def code_copy(self, name: str) -> Path:
        """A fresh copy of the boot code (examples/shop) for one node."""
        target = self.tmp_path / f"code-{name}"
        if not target.exists():
            shutil.copytree(EXAMPLES / "shop", target, ignore=shutil.ignore_patterns("__pycache__"))
        return target

    def start(
        self,
        node_id: str,
        *,
        code_path: Path | None = None,
        lease_ttl: int = 10,
        env: dict[str, str] | None = None,
        labels: str = "",
        wait: bool = True,
        endpoint: str | None = None,
    ) -> AgentProcess:
        code = code_path or self.code_copy(node_id)
        log_path = self.tmp_path / f"{node_id}-{len(self.procs)}.log"
        cmd = [
            sys.executable,
            "-m",
            "node_agent.cli",
            "--node-id",
            node_id,
            "--code-path",
            str(code),
            "--app",
            "shop.app:application",
            "--http",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            endpoint or self.endpoint,
            "--prefix",
            self.prefix,
            "--lease-ttl",
            str(lease_ttl),
            "--cache-dir",
            str(self.tmp_path / f"cache-{node_id}"),
            "--dev",
        ]
        if labels:
            cmd += ["--labels", labels]
        full_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            **(env or {}),
        }
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env=full_env,
                cwd=self.tmp_path,
            )
        agent = AgentProcess(proc, log_path, code)
        self.procs.append(agent)
        if wait:
            agent.wait_ready()
        return agent

    def close(self) -> None:
        for agent in self.procs:
            agent.close()


def node_key(prefix: str, node_id: str) -> str:
    return f"{prefix}nodes/{node_id}"


def read_member(client: EtcdClient, prefix: str, node_id: str) -> dict[str, Any] | None:
    raw, _ = client.get(node_key(prefix, node_id))
    return None if raw is None else json.loads(raw)
