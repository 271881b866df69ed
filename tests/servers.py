"""Real gunicorn and uvicorn servers whose workers are hotfleet participants, for tests.

:class:`Servers` owns every server it starts (a gunicorn master with its
workers, or a uvicorn supervisor with its workers) and stops them at
:meth:`Servers.close`: SIGTERM to the master, then SIGKILL to the whole
process group if anything is left, so no worker outlives a test.
Each host serves its own copy of the boot code (``Agents.code_copy``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.launch import stop_group
from hotfleet.etcd_client import EtcdClient
from hotfleet.etcd_server import free_ports
from tests.agents import ROOT, Agents, read_member, wait_for


@functools.cache
def _gunicorn_flags() -> tuple[str, ...]:
    """gunicorn >= 25 serves a control socket from a master thread (shared path): not here."""
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, check=False
    ).stdout
    return ("--no-control-socket",) if "--no-control-socket" in out else ()


def free_port() -> int:
    """A port free on 127.0.0.1 right now (see :func:`hotfleet.etcd_server.free_ports`)."""
    return free_ports("127.0.0.1", 1)[0]


@dataclass
class Server:
    """One server (a master and its workers) simulating one host of the fleet."""

    host: str
    workers: int
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    code: Path
    node_ids: list[str] = field(default_factory=list)

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 5.0) -> Any:
        with urllib.request.urlopen(f"http://{self.http_address}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def log(self, tail: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines of the workers (HOTFLEET_LOG_FORMAT=json)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def members(self, client: EtcdClient, prefix: str) -> dict[str, dict[str, Any] | None]:
        return {n: read_member(client, prefix, n) for n in self.node_ids}

    def wait_workers(
        self, client: EtcdClient, prefix: str, timeout: float = 45.0
    ) -> dict[str, dict[str, Any]]:
        """Every worker registered and idle; their membership records."""

        def ready() -> dict[str, dict[str, Any]] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.host} exited {self.proc.returncode}:\n{self.log()}")
            members = self.members(client, prefix)
            if all(m is not None and m.get("state") == "idle" for m in members.values()):
                return {k: v for k, v in members.items() if v is not None}
            return None

        try:
            found: dict[str, dict[str, Any]] = wait_for(ready, timeout=timeout, interval=0.2)
        except AssertionError:
            raise AssertionError(f"{self.host}: workers not ready\n{self.log()}") from None
        return found

    def stop(self) -> None:
        stop_group(self.proc)  # the master, then what is left of its workers


class Servers:
    """Starts servers against one etcd and prefix; stops them all at :meth:`close`."""

    def __init__(self, tmp_path: Path, endpoint: str, prefix: str, agents: Agents) -> None:
        self.tmp_path = tmp_path
        self.endpoint = endpoint
        self.prefix = prefix
        self.agents = agents  # for its boot-code copies
        self.servers: list[Server] = []

    def env(self, host: str, code: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("HOTFLEET_")
        }  # nothing from the developer's shell
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(code), str(ROOT)]),
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                "HOTFLEET_DEV": "1",
                "HOTFLEET_ETCD": self.endpoint,
                "HOTFLEET_PREFIX": self.prefix,
                "HOTFLEET_CODE_PATH": str(code),
                "HOTFLEET_HOST": host,
                "HOTFLEET_LABELS": f"zone=z-{host}",
                "HOTFLEET_CACHE_DIR": str(self.tmp_path / f"cache-{host}"),
                "HOTFLEET_SLOT_DIR": str(self.tmp_path / f"slots-{host}"),
                "HOTFLEET_LOG_LEVEL": "INFO",
                "HOTFLEET_LOG_FORMAT": "json",
                "HOTFLEET_DRAIN_TIMEOUT": "2",
            }
        )
        env.update(extra or {})
        return env

    def _spawn(
        self, host: str, workers: int, cmd: list[str], code: Path, port: int, env: dict[str, str]
    ) -> Server:
        log_path = self.tmp_path / f"{host}-{len(self.servers)}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=code,
                start_new_session=True,  # its own process group: close() reaches every worker
            )
        server = Server(host, workers, port, proc, log_path, code)
        server.node_ids = [f"{host}-w{slot}" for slot in range(workers)]
        self.servers.append(server)
        return server

    def gunicorn(
        self,
        host: str,
        app: str = "shop.app:application",
        workers: int = 3,
        *,
        worker_class: str = "sync",
        code: Path | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        """``gunicorn -c python:node_agent.gunicorn`` with ``workers`` workers, as host ``host``."""
        code = code or self.agents.code_copy(host)
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:node_agent.gunicorn",
            "-w",
            str(workers),
            "-k",
            worker_class,
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
            *_gunicorn_flags(),
            *(extra_args or []),
            app,
        ]
        return self._spawn(host, workers, cmd, code, port, self.env(host, code, env))

    def uvicorn(
        self,
        host: str,
        app: str,
        workers: int = 2,
        *,
        code: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        """``uvicorn --workers N`` serving ``app`` (wrapped by ``node_agent.asgi.hotfleet_app``)."""
        code = code or self.agents.code_copy(host)
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--workers",
            str(workers),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ws",
            "websockets",
            "--log-level",
            "warning",
            app,
        ]
        return self._spawn(host, workers, cmd, code, port, self.env(host, code, env))

    def close(self) -> None:
        for server in self.servers:
            server.stop()


def worker_pids(server: Server) -> list[int]:
    """The master's live children (its workers)."""
    try:
        text = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def wait_pid_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        if "State:\tZ" in status:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {timeout}s")
