"""Real ``hotfleet-coordinator`` processes and ``coordctl`` runs for integration tests.

:class:`Coordinators` owns every daemon it starts (``python -m
coordinator.daemon --dev``) and kills whatever is still running at
:meth:`Coordinators.close`, so a failing test never leaves one behind.  Each
daemon's stderr (its log) goes to a file under the test's ``tmp_path``;
:meth:`CoordinatorProcess.log` returns the tail for assertion messages.

Fault injection is the daemon's own: ``fault="crash:before_decision"`` sets
``HOTFLEET_FAULT`` so the daemon SIGKILLs itself at that rollout step
(``before_prepare``, ``before_decision``, ``after_decision``, ``after_finish``).

:func:`coordctl` runs the real CLI as a subprocess (``python -m
coordinator.cli``) and returns ``(exit code, stdout, stderr)``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from coordinator.launch import child_environment, coordinator_command
from hotfleet._proto.hotfleet.v1 import coordinator_pb2, coordinator_pb2_grpc
from hotfleet.protocol import COORDINATOR_READY
from tests.agents import ROOT, SHOP_MODULES, AgentProcess, Agents, Pki, wait_for
from tests.processes import ManagedProcess, spawn

READY = COORDINATOR_READY
NODES = ("n1", "n2", "n3")


class CoordinatorProcess(ManagedProcess):
    """One coordinator daemon subprocess and a gRPC stub to its API."""

    def __init__(self, name: str, proc: subprocess.Popen[str], log_path: Path) -> None:
        super().__init__(proc, log_path, f"coordinator {name}")
        self.name = name
        self.address = ""
        self.pid = proc.pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the daemon prints its ready line (API serving, campaign started)."""
        fields = self.wait_ready_line(READY, timeout)
        self.address = fields["address"]
        assert int(fields["pid"]) == self.proc.pid

    @property
    def stub(self) -> coordinator_pb2_grpc.CoordinatorStub:
        return coordinator_pb2_grpc.CoordinatorStub(self.channel(self.address))

    def is_leader(self) -> bool:
        """Whether this daemon says it leads (False when it cannot be asked)."""
        if not self.alive:
            return False
        try:
            reply = self.stub.Nodes(coordinator_pb2.ListNodesRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return bool(reply.leader)

    def wait_leader(self, timeout: float = 15.0) -> None:
        try:
            wait_for(self.is_leader, timeout=timeout, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: {self.name} did not become leader:\n{self.log()}"
            ) from None

    @property
    def stopped(self) -> bool:
        """Whether the process is stopped by a signal (``pause:`` faults; Linux ``/proc``)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] in ("T", "t")

    def kill(self) -> int:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        return self.proc.wait(10)


class Coordinators:
    """Starts coordinator daemons against one etcd and prefix; kills them all at :meth:`close`."""

    def __init__(self, tmp_path: Path, endpoint: str, prefix: str) -> None:
        self.tmp_path = tmp_path
        self.endpoint = endpoint
        self.prefix = prefix
        self.procs: list[CoordinatorProcess] = []

    def start(
        self,
        name: str,
        *,
        fault: str = "",
        lease_ttl: int = 2,
        endpoint: str | None = None,
        env: dict[str, str] | None = None,
        advertise_host: str | None = None,
        listen: str = "127.0.0.1:0",
        wait: bool = True,
        tls: Pki | None = None,
    ) -> CoordinatorProcess:
        """Start ``python -m coordinator.daemon``: ``--dev``, or mutual TLS with the
        server certificate of ``tls``; ``fault`` sets ``HOTFLEET_FAULT``."""
        log_path = self.tmp_path / f"coordinator-{name}-{len(self.procs)}.log"
        security = ["--dev"]
        if tls is not None:  # the server certificate names 127.0.0.1
            security = ["--tls-cert", str(tls.client_cert), "--tls-key", str(tls.client_key)]
            security += ["--tls-ca", str(tls.ca)]
        cmd = coordinator_command(
            etcd=endpoint or self.endpoint,
            listen=listen,
            security=security,
            prefix=self.prefix,
            lease_ttl=lease_ttl,
            advertise_host=advertise_host,
        )
        full_env = child_environment(
            {**({"HOTFLEET_FAULT": fault} if fault else {}), **(env or {})}
        )
        proc = spawn(cmd, log_path, full_env, self.tmp_path)
        coordinator = CoordinatorProcess(name, proc, log_path)
        self.procs.append(coordinator)
        if wait:
            coordinator.wait_ready()
        return coordinator

    def leader(self, timeout: float = 15.0) -> CoordinatorProcess:
        """The one live daemon that says it leads (waits for an election)."""

        def find() -> CoordinatorProcess | None:
            leading = [c for c in self.procs if c.is_leader()]
            return leading[0] if len(leading) == 1 else None

        found: CoordinatorProcess = wait_for(find, timeout=timeout, interval=0.1)
        return found

    def close(self) -> None:
        for coordinator in self.procs:
            coordinator.close()


class CtlResult(NamedTuple):
    """What a ``coordctl`` run returned: unpacks as ``code, out, err``."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        try:
            return json.loads(self.out)
        except ValueError as exc:
            raise AssertionError(f"coordctl stdout is not JSON ({exc}):\n{self}") from None

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def coordctl(
    coordinator: str | CoordinatorProcess | list[CoordinatorProcess],
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    cwd: Path = ROOT,
) -> CtlResult:
    """Run ``coordctl --coordinator ADDR ARGS...`` as a subprocess; (exit code, stdout, stderr)."""
    if isinstance(coordinator, CoordinatorProcess):
        address = coordinator.address
    elif isinstance(coordinator, list):
        address = ",".join(c.address for c in coordinator)
    else:
        address = coordinator
    cmd = [sys.executable, "-m", "coordinator.cli", "--coordinator", address, *args]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=child_environment({"NO_COLOR": "1", "COLUMNS": "200", **(env or {})}),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return CtlResult(done.returncode, done.stdout, done.stderr)


def start_nodes(agents: Agents, names: tuple[str, ...] = NODES) -> list[AgentProcess]:
    """Start the agents in parallel (each boots its own interpreter), then wait for all."""
    nodes = [agents.start(name, wait=False) for name in names]
    for node in nodes:
        node.wait_ready()
    return nodes


def versions(nodes: list[AgentProcess]) -> set[str]:
    """Every shop module version served by every node (one element when the fleet agrees)."""
    return {v for n in nodes for m, v in n.versions().items() if m in SHOP_MODULES}
