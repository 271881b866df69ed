"""``coordctl dev up --secure``: one command, nothing insecure, and coordctl just works.

Real processes, as a user runs them; whatever the test started is stopped at
the end even when it fails (see tests/test_devcluster.py).
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator import devcluster
from hotfleet.etcd_auth import COORDINATOR_USER, node_user
from hotfleet.etcd_client import connect, is_permission_denied
from hotfleet.keys import Keys
from tests.test_devcluster import coordctl, processes_mentioning, pytest_linux, stop_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SHOP_2 = str(devcluster.EXAMPLES / "releases" / "shop-2.0.0")


@pytest.fixture
def dev_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "dev"
    try:
        yield directory
    finally:
        stop_cluster(directory)


@pytest_linux
def test_dev_up_secure_gives_a_cluster_with_nothing_insecure(dev_dir: Path) -> None:
    env = {"HOTFLEET_DEV_DIR": str(dev_dir)}
    up = coordctl("dev", "up", "--secure", "--nodes", "1", "--no-traffic", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "etcd         auth on" in up.stdout and "coordinator  leads" in up.stdout

    state = json.loads((dev_dir / "cluster.json").read_text())
    assert state["secure"] is True and state["etcd"].startswith("https://")
    members = {m["name"]: m for m in state["members"]}
    for name in ("coordinator", "node-1"):
        assert "--dev" not in members[name]["cmd"], members[name]["cmd"]
        assert "--etcd-password-file" in members[name]["cmd"]
        assert not any("password" in arg and "=" in arg for arg in members[name]["cmd"])
    for secret in (dev_dir / "secrets").iterdir():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret

    # coordctl finds the operator certificate and the signing key through cluster.json
    nodes = coordctl("-o", "json", "nodes", env=env)
    assert nodes.returncode == 0, nodes.stdout + nodes.stderr
    assert [n["node_id"] for n in json.loads(nodes.stdout)["items"]] == ["node-1"]
    pki = dev_dir / "pki"
    agent_cert = ["--tls-cert", str(pki / "agent.pem"), "--tls-key", str(pki / "agent.key")]
    as_agent = coordctl(*agent_cert, "nodes", env=env)
    assert as_agent.returncode != 0 and "roles (agent)" in as_agent.stderr, as_agent

    upgrade = coordctl("upgrade", "--all", "--release", SHOP_2, "--wait", "--window", "0", env=env)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert "finished" in upgrade.stdout and "shop@2.0.0 is" in upgrade.stdout, upgrade.stdout

    # etcd: TLS without a user is refused; a node's user cannot write a decision
    cluster = devcluster.load(dev_dir)
    assert cluster is not None
    tls = {k: v for k, v in cluster.etcd_options().items() if k not in ("user", "password")}
    anonymous = connect(cluster.etcd, **tls)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            anonymous.get(Keys(cluster.prefix).permanent)
        assert is_permission_denied(caught.value)
    finally:
        anonymous.close()
    password = (dev_dir / "secrets" / f"{node_user('node-1')}.password").read_text().strip()
    node = connect(cluster.etcd, user=node_user("node-1"), password=password, **tls)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            node.put(Keys(cluster.prefix).decision("forged"), "commit")
        assert is_permission_denied(caught.value)
    finally:
        node.close()
    assert (dev_dir / "secrets" / f"{COORDINATOR_USER}.password").is_file()

    down = coordctl("dev", "down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert processes_mentioning(str(dev_dir)) == []
    for gone in ("secrets", "pki", "keys", "etcd-data", "cluster.json"):
        assert not (dev_dir / gone).exists(), gone
