"""Real ``node-agent`` processes for integration tests.

:class:`Agents` owns every process it starts (and their gRPC channels) and
kills whatever is still running at cleanup, so a failing test never leaves a
worker behind.  Each agent serves a private copy of ``examples/shop`` (the
agent writes permanent releases into its code path).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.election import Leadership
from coordinator.launch import EXAMPLES, agent_command, child_environment, copy_code
from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from hotfleet.decisions import encode
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.pki import DevPki, make_dev_pki
from hotfleet.protocol import AGENT_READY
from hotfleet.release import Release
from hotfleet.signing import DEFAULT_FLEET, sign_release
from hotfleet.store import ContentStore, EtcdBlobBackend
from hotfleet.tls import Role
from hotfleet.wire import release_to_proto
from tests.processes import ManagedProcess, spawn

ROOT = Path(__file__).resolve().parents[1]
RELEASES = EXAMPLES / "releases"
SHOP_MODULES = ("shop.app", "shop.cart", "shop.inventory", "shop.pricing")


def release(name: str) -> Release:
    """One of the example releases, e.g. ``release("shop-2.0.0")``."""
    return Release.from_path(RELEASES / name)


def publish(
    client: EtcdClient, prefix: str, rel: Release, key: Ed25519PrivateKey | None = None
) -> common_pb2.ReleaseManifest:
    """Put a release's sources in the cluster's content store; its wire manifest.

    With ``key`` the manifest carries an ed25519 signature over the release digest.
    """
    store = ContentStore(EtcdBlobBackend(client, Keys(prefix).blobs))
    for module in rel.modules:
        store.put(module.source)
    manifest = release_to_proto(rel)
    if key is not None:
        signature, signer = sign_release(rel.digest, key, release=rel.label, fleet=DEFAULT_FLEET)
        manifest.signature, manifest.signer = bytes.fromhex(signature), signer
    return manifest


def decide(
    client: EtcdClient,
    prefix: str,
    lead: Leadership,
    rollout_id: str,
    decision: str,
    participants: list[str] | None = None,
    commit_at: float = 0.0,
) -> None:
    """Write a rollout's decision as the coordinator leading with ``lead`` does.

    Fenced by the leader key and carrying its epoch (:mod:`hotfleet.decisions`):
    the only kind of decision record agents act on.
    """
    value = encode(decision, lead.epoch, participants, commit_at)
    put = client.transactions.put(Keys(prefix).decision(rollout_id), value)
    assert lead.guarded_txn([put]), f"{lead} no longer leads"


@dataclass(frozen=True)
class Pki:
    """A throwaway CA (:func:`hotfleet.pki.make_dev_pki`) and one certificate per role.

    ``client_*`` is the coordinator's certificate (its server certificate
    towards coordctl and its client certificate towards agents, SAN
    127.0.0.1 and localhost); ``agent_*``, ``operator_*`` and ``reader_*``
    are the other roles.
    """

    dev: DevPki

    @property
    def ca(self) -> Path:
        return self.dev.ca

    @property
    def agent_cert(self) -> Path:
        return self.dev.cert(Role.AGENT)

    @property
    def agent_key(self) -> Path:
        return self.dev.key(Role.AGENT)

    @property
    def client_cert(self) -> Path:
        return self.dev.cert(Role.COORDINATOR)

    @property
    def client_key(self) -> Path:
        return self.dev.key(Role.COORDINATOR)

    def tls_args(self, role: Role) -> list[str]:
        """``--tls-cert/--tls-key/--tls-ca`` for a command-line client of ``role``."""
        return [
            *("--tls-cert", str(self.dev.cert(role)), "--tls-key", str(self.dev.key(role))),
            *("--tls-ca", str(self.ca)),
        ]

    def credentials(self, role: Role) -> grpc.ChannelCredentials:
        """Client credentials presenting the certificate of ``role``."""
        return self.dev.files(role).credentials()

    def client_credentials(self) -> grpc.ChannelCredentials:
        """What the coordinator presents to agents."""
        return self.credentials(Role.COORDINATOR)


def make_pki(directory: Path) -> Pki:
    """A new CA and role certificates in ``directory`` (servers: 127.0.0.1, localhost)."""
    return Pki(make_dev_pki(directory))


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


class AgentProcess(ManagedProcess):
    """One ``python -m node_agent.cli`` subprocess and a gRPC stub to it."""

    def __init__(
        self,
        proc: subprocess.Popen[str],
        log_path: Path,
        code_path: Path,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(proc, log_path, "agent")
        self.code_path = code_path
        self.credentials = credentials
        self.grpc_address = ""
        self.http_address = ""
        self.node_id = ""

    def wait_ready(self, timeout: float = 20.0) -> None:
        fields = self.wait_ready_line(AGENT_READY, timeout)
        self.grpc_address, self.http_address = fields["grpc"], fields["http"]
        self.node_id = fields["node"]

    @property
    def stub(self) -> agent_pb2_grpc.NodeAgentStub:
        return agent_pb2_grpc.NodeAgentStub(self.channel(self.grpc_address, self.credentials))

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


class Agents:
    """Starts agents against one etcd and prefix; kills them all at :meth:`close`."""

    def __init__(self, tmp_path: Path, endpoint: str, prefix: str) -> None:
        self.tmp_path = tmp_path
        self.endpoint = endpoint
        self.prefix = prefix
        self.procs: list[AgentProcess] = []

    def code_copy(self, name: str) -> Path:
        """A fresh copy of the boot code (examples/shop) for one node."""
        return copy_code(EXAMPLES / "shop", self.tmp_path / f"code-{name}")

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
        dev: bool = True,
        pki: Pki | None = None,
        trust_keys: list[Path] | None = None,
    ) -> AgentProcess:
        """Start an agent (``--dev`` unless ``dev=False``, which wants ``pki`` and keys)."""
        code = code_path or self.code_copy(node_id)
        log_path = self.tmp_path / f"{node_id}-{len(self.procs)}.log"
        security = ["--dev"] if dev else []
        if pki is not None:
            security += ["--tls-cert", str(pki.agent_cert), "--tls-key", str(pki.agent_key)]
            security += ["--tls-ca", str(pki.ca)]
        for key in trust_keys or ():
            security += ["--trust-key", str(key)]
        cmd = agent_command(
            node_id,
            code_path=code,
            etcd=endpoint or self.endpoint,
            cache_dir=self.tmp_path / f"cache-{node_id}",
            security=security,
            prefix=self.prefix,
            lease_ttl=lease_ttl,
            labels=labels,
        )
        full_env = child_environment(env, dev=dev)
        proc = spawn(cmd, log_path, full_env, self.tmp_path)
        credentials = pki.client_credentials() if pki is not None else None
        agent = AgentProcess(proc, log_path, code, credentials)
        self.procs.append(agent)
        if wait:
            agent.wait_ready()
        return agent

    def close(self) -> None:
        for agent in self.procs:
            agent.close()


def node_key(prefix: str, node_id: str) -> str:
    return Keys(prefix).node(node_id)


def read_member(client: EtcdClient, prefix: str, node_id: str) -> dict[str, Any] | None:
    raw, _ = client.get(node_key(prefix, node_id))
    return None if raw is None else json.loads(raw)
