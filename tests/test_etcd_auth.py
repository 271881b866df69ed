"""etcd as an authorization boundary: a real etcd with client TLS and auth on.

One etcd per module (https with client certificates, simple tokens that expire
after a few idle seconds, so every test also exercises token renewal); each
test provisions hotfleet's users and roles (:mod:`hotfleet.etcd_auth`) for
its own prefix with the root user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from hotfleet.etcd_auth import (
    AGENT_ROLE,
    COORDINATOR_USER,
    ROOT,
    Credentials,
    add_node,
    node_user,
    provision,
    write_password_files,
)
from hotfleet.etcd_client import (
    EtcdAuthError,
    EtcdClient,
    auth_renewals,
    connect,
    is_permission_denied,
    role_permissions,
)
from hotfleet.etcd_server import EtcdServer, EtcdTLS
from hotfleet.keys import Keys
from hotfleet.pki import DevPki, issue_etcd_server, make_dev_pki
from tests.agents import RELEASES, Agents, wait_for
from tests.agents import ROOT as REPO
from tests.coordinators import Coordinators, coordctl, versions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN_TTL_S = 2  # etcd forgets an unused simple token after this long


@dataclass
class SecureEtcd:
    server: EtcdServer
    pki: DevPki
    root_password: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def connect(self, user: str | None = None, password: str | None = None) -> EtcdClient:
        return connect(self.endpoint, user=user, password=password, **self.server.client_options())

    def root(self) -> EtcdClient:
        return self.connect(ROOT, self.root_password)


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    base = tmp_path_factory.mktemp("secure-etcd")
    pki = make_dev_pki(base / "pki")
    cert, key = issue_etcd_server(base / "pki")
    tls = EtcdTLS(str(cert), str(key), str(pki.ca), str(cert), str(key))
    server = EtcdServer(base / "data", tls=tls, auth_token_ttl=TOKEN_TTL_S)
    server.start()
    try:
        client = connect(server.endpoint, **server.client_options())
        try:  # auth on, with only root and the roles of the first test's prefix
            made = provision(client, f"/hotfleet-test/{uuid.uuid4().hex}/")
        finally:
            client.close()
        yield SecureEtcd(server, pki, made.passwords[ROOT])
    finally:
        server.stop()


@dataclass
class Cluster:
    """One prefix with its users provisioned; clients are closed at teardown."""

    etcd: SecureEtcd
    prefix: str
    passwords: dict[str, str]
    clients: list[EtcdClient]

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def client(self, user: str) -> EtcdClient:
        made = self.etcd.connect(user, self.passwords[user])
        self.clients.append(made)
        return made


@pytest.fixture
def cluster(secure_etcd: SecureEtcd) -> Iterator[Cluster]:
    prefix = f"/hotfleet-test/{uuid.uuid4().hex}/"
    root = secure_etcd.root()
    made = provision(root, prefix, nodes=["n1", "n2"], enable=False)
    state = Cluster(secure_etcd, prefix, made.passwords, [root])
    try:
        yield state
    finally:
        root.delete_prefix(prefix)
        for client in state.clients:
            client.close()


def _refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert is_permission_denied(caught.value), caught.value
    return caught.value


def test_an_agent_user_writes_its_own_membership_and_nothing_else(cluster: Cluster) -> None:
    keys = cluster.keys
    coordinator = cluster.client(COORDINATOR_USER)
    n1 = cluster.client(node_user("n1"))

    # what the coordinator's user may write (and the agents then read)
    decision = json.dumps({"decision": "abort", "epoch": 7})
    coordinator.put(keys.decision("r1"), decision)
    coordinator.put(keys.release("shop", "2.0.0"), '{"label": "shop@2.0.0"}')
    coordinator.put(keys.permanent, '{"label": "shop@1.0.0"}')
    coordinator.put(keys.node("n2"), '{"node_id": "n2"}')
    before = {key: coordinator.get(key)[0] for key in (
        keys.decision("r1"), keys.release("shop", "2.0.0"), keys.permanent, keys.node("n2"),
    )}  # fmt: skip

    # an agent reads the whole prefix and writes its own key, on its own lease
    assert n1.get(keys.decision("r1"))[0] == decision.encode()
    lease = n1.lease(10)
    n1.put(keys.node("n1"), '{"node_id": "n1"}', lease=lease.id)
    assert coordinator.get(keys.node("n1"))[0] == b'{"node_id": "n1"}'

    # ... and nothing else: no decision, no release, no permanent record, no other node
    _refused(lambda: n1.put(keys.decision("r1"), json.dumps({"decision": "commit", "epoch": 7})))
    _refused(lambda: n1.put(keys.decision("r2"), "commit"))
    _refused(lambda: n1.put(keys.release("shop", "2.0.0"), '{"label": "shop@2.1.0-bad"}'))
    _refused(lambda: n1.put(keys.permanent, "{}"))
    _refused(lambda: n1.put(keys.node("n2"), '{"node_id": "n2", "forged": true}'))
    _refused(lambda: n1.put(keys.node("n10"), "{}"))  # a grant of one key, not a prefix
    _refused(lambda: n1.delete(keys.node("n2")))
    _refused(lambda: n1.delete_prefix(keys.rollouts))
    _refused(lambda: n1.put(keys.active, "r9"))
    for key, value in before.items():
        assert coordinator.get(key)[0] == value, key
    assert coordinator.get(keys.decision("r2"))[0] is None
    assert coordinator.get(keys.active)[0] is None

    # a node user of this prefix has no business in another cluster's prefix
    _refused(lambda: n1.get("/hotfleet-elsewhere/releases/permanent"))
    n1.revoke_lease(lease.id)  # write access to every key on the lease: its own only

    # the coordinator's user removes a dead node and writes anywhere in the prefix
    coordinator.delete(keys.node("n2"))
    coordinator.put(keys.active, "r1")
    root = coordinator_root(cluster)
    assert role_permissions(root, node_user("n1")) == [("readwrite", keys.node("n1"), "")]
    assert ("read", keys.prefix) in [(p, k) for p, k, _ in role_permissions(root, AGENT_ROLE)]


def coordinator_root(cluster: Cluster) -> EtcdClient:
    root = cluster.etcd.root()
    cluster.clients.append(root)
    return root


def test_a_node_added_later_gets_its_own_key_only(cluster: Cluster) -> None:
    root = coordinator_root(cluster)
    password = add_node(root, cluster.prefix, "n3")
    n3 = cluster.etcd.connect(node_user("n3"), password)
    cluster.clients.append(n3)
    n3.put(cluster.keys.node("n3"), "{}")
    _refused(lambda: n3.put(cluster.keys.node("n1"), "{}"))
    with pytest.raises(EtcdAuthError, match="invalid user ID or password"):
        cluster.etcd.connect(node_user("n3"), "wrong")


def test_a_password_never_goes_over_plain_http(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="would cross the network in the clear"):
        connect("http://127.0.0.1:1", user="u", password="pw")
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOTFLEET_ETCD_USER": "hotfleet-coordinator"}
    env.pop("HOTFLEET_ETCD_PASSWORD", None)
    daemon = [sys.executable, "-m", "coordinator.daemon", "--dev", "--etcd", "http://127.0.0.1:1"]
    run = subprocess.run(
        [*daemon, "--etcd-password-file", str(secret)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run
    assert "http://127.0.0.1:1 is not https://" in run.stderr
    assert "in the clear" in run.stderr
    # and never on the command line, where every user of the host reads it
    flag = subprocess.run(
        [*daemon, "--etcd-password", "pw"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert flag.returncode == 2 and "--etcd-password" in flag.stderr, flag


def test_a_client_outlives_its_token_and_an_etcd_restart(secure_etcd: SecureEtcd) -> None:
    prefix = f"/hotfleet-test/{uuid.uuid4().hex}/"
    root = secure_etcd.root()
    try:
        made = provision(root, prefix, enable=False)
        client = secure_etcd.connect(COORDINATOR_USER, made.passwords[COORDINATOR_USER])
        try:
            client.put(f"{prefix}a", "1")
            time.sleep(TOKEN_TTL_S + 1.5)  # idle: etcd forgets the token
            assert client.get(f"{prefix}a")[0] == b"1"
            assert auth_renewals(client) >= 1
            renewed = auth_renewals(client)
            secure_etcd.server.stop()  # simple tokens live in etcd's memory only
            secure_etcd.server.start()
            wait_for(lambda: _put(client, f"{prefix}b", "2"), timeout=15, interval=0.2)
            assert auth_renewals(client) > renewed
        finally:
            client.close()
    finally:
        root.delete_prefix(prefix)
        root.close()


def _put(client: EtcdClient, key: str, value: str) -> bool:
    try:
        client.put(key, value)
    except Exception:
        return False
    return True


def test_a_fleet_upgrades_with_etcd_auth_on(cluster: Cluster, tmp_path: Path) -> None:
    """Agent and coordinator each with their own etcd user, over TLS; the 2PC runs."""
    etcd, secrets = cluster.etcd, tmp_path / "secrets"
    files = write_password_files(Credentials(dict(cluster.passwords)), secrets)
    tls = {
        "HOTFLEET_ETCD_CA": str(etcd.pki.ca),
        "HOTFLEET_ETCD_CERT": str(etcd.pki.cert("agent")),
        "HOTFLEET_ETCD_KEY": str(etcd.pki.key("agent")),
    }

    def creds(user: str) -> dict[str, str]:
        return {
            **tls,
            "HOTFLEET_ETCD_USER": user,
            "HOTFLEET_ETCD_PASSWORD_FILE": str(files[user]),
        }

    agents = Agents(tmp_path, etcd.endpoint, cluster.prefix)
    coordinators = Coordinators(tmp_path, etcd.endpoint, cluster.prefix)
    try:
        node = agents.start("n1", env=creds(node_user("n1")))
        coordinator_env = {
            **creds(COORDINATOR_USER),
            "HOTFLEET_ETCD_CERT": str(etcd.pki.cert("coordinator")),
            "HOTFLEET_ETCD_KEY": str(etcd.pki.key("coordinator")),
        }
        daemon = coordinators.start("auth", env=coordinator_env)
        daemon.wait_leader()

        def listed() -> bool:
            rows = coordctl(daemon, "-o", "json", "nodes")
            return rows.code == 0 and [n["node_id"] for n in rows.json()["items"]] == ["n1"]

        wait_for(listed, timeout=20, interval=0.2)
        pushed = coordctl(daemon, "release", "push", str(RELEASES / "shop-2.0.0"))
        assert pushed.code == 0, pushed
        up = coordctl(
            daemon, "upgrade", "--all", "--release", "shop@2.0.0", "--wait", "--window", "0"
        )
        assert up.code == 0, up
        assert versions([node]) == {"2"}
        permanent = json.loads(coordinator_root(cluster).get(cluster.keys.permanent)[0])
        assert "2.0.0" in json.dumps(permanent)
    finally:
        agents.close()
        coordinators.close()


def test_provision_command_writes_private_password_files(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd-data") as server:
        out = tmp_path / "secrets"
        run = subprocess.run(
            [sys.executable, "-m", "hotfleet.etcd_auth", "provision", "--etcd", server.endpoint,
             "--node", "n1", "--out", str(out)],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert run.returncode == 0, run
        files = json.loads(run.stdout)
        assert set(files) == {ROOT, COORDINATOR_USER, node_user("n1")}
        for path in files.values():
            assert (Path(path).stat().st_mode & 0o777) == 0o600
        # auth is on now: without a user etcd refuses
        anonymous = connect(server.endpoint)
        try:
            with pytest.raises(grpc.RpcError, match="user name is empty"):
                anonymous.get("/hotfleet/releases/permanent")
        finally:
            anonymous.close()
