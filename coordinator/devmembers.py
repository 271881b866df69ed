"""The dev cluster's members: each process's command line, and the secure set-up.

One :class:`~coordinator.devstate.Member` per process of ``coordctl dev
up``: the embedded etcd, the coordinator daemon, N node agents serving the
example shop (``node-{i}``, zones in turn, fixed HTTP ports from 8081) and
the background traffic (:mod:`coordinator.traffic`).  The agent and
coordinator command lines are :mod:`coordinator.launch`'s, as in the tests
and benchmarks; with ``--secure`` each gets its role certificate and etcd
user (:func:`secure_flags`), made by :func:`make_credentials` (a dev CA,
:mod:`hotfleet.pki`, and a release-signing key) and
:func:`provision_etcd` (:mod:`hotfleet.etcd_auth`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from coordinator.devprocess import Say, free_port, with_port
from coordinator.devstate import Cluster, DevClusterError, Member, etcd_tls
from coordinator.launch import (
    EXAMPLES,
    LOOPBACK,
    agent_command,
    coordinator_command,
    copy_code,
)
from hotfleet.protocol import AGENT_READY, COORDINATOR_READY

COORDINATOR_PORT = 7600

ETCD_PORTS = (2379, 2380)

FIRST_HTTP_PORT = 8081

ZONES = ("eu-west", "us-east", "ap-south")


def etcd_ready(endpoint: str, options: dict[str, Any]) -> Callable[[str], bool]:
    from hotfleet.etcd_client import open_client

    def check(_line: str) -> bool:
        try:
            client = open_client(endpoint, timeout=1, **options)
        except Exception:
            return False
        try:
            client.get("/hotfleet/.health")
            return True
        except Exception:
            return False
        finally:
            client.close()

    return check


def etcd_member(
    directory: Path, client_port: int, peer_port: int, *, secure: bool = False
) -> Member:
    from hotfleet.etcd_server import find_etcd_binary

    binary = find_etcd_binary()
    client_url = f"{'https' if secure else 'http'}://{LOOPBACK}:{client_port}"
    peer_url = f"http://{LOOPBACK}:{peer_port}"
    pki = directory / "pki"
    tls = (
        [
            f"--cert-file={pki / 'etcd.pem'}",
            f"--key-file={pki / 'etcd.key'}",
            f"--trusted-ca-file={pki / 'ca.pem'}",
            "--client-cert-auth",
        ]
        if secure
        else []
    )
    return Member(
        name="etcd",
        role="etcd",
        cmd=[
            binary,
            "--name=hotfleet-dev",
            f"--data-dir={directory / 'etcd-data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=hotfleet-dev={peer_url}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=50",
            "--election-timeout=250",
            "--log-outputs=stderr",
            *tls,
        ],
        log=str(directory / "logs" / "etcd.log"),
        address=client_url,
    )


def secure_flags(directory: Path, role: str, etcd_user: str) -> list[str]:
    """mTLS with ``role``'s certificate, and etcd over TLS as ``etcd_user``."""
    pki = directory / "pki"
    return [
        "--tls-cert", str(pki / f"{role}.pem"),
        "--tls-key", str(pki / f"{role}.key"),
        "--tls-ca", str(pki / "ca.pem"),
        "--etcd-ca", str(pki / "ca.pem"),
        "--etcd-cert", str(pki / f"{role}.pem"),
        "--etcd-key", str(pki / f"{role}.key"),
        "--etcd-user", etcd_user,
        "--etcd-password-file", str(directory / "secrets" / f"{etcd_user}.password"),
    ]  # fmt: skip


def coordinator_member(directory: Path, etcd: str, port: int, *, secure: bool = False) -> Member:
    from hotfleet.etcd_auth import COORDINATOR_USER

    address = f"{LOOPBACK}:{port}"
    security = secure_flags(directory, "coordinator", COORDINATOR_USER) if secure else ["--dev"]
    return Member(
        name="coordinator",
        role="coordinator",
        cmd=coordinator_command(etcd=etcd, listen=address, security=security),
        env={"HOTFLEET_DEV": "0"} if secure else {},
        log=str(directory / "logs" / "coordinator.log"),
        address=address,
        ready_line=COORDINATOR_READY,
    )


def agent_member(
    directory: Path, index: int, etcd: str, http_port: int, *, secure: bool = False
) -> Member:
    from hotfleet.etcd_auth import node_user

    name = f"node-{index}"
    security = ["--dev"]
    if secure:
        security = secure_flags(directory, "agent", node_user(name))
        security += ["--trust-key", str(directory / "keys" / "release-signing.pub")]
    zone = ZONES[(index - 1) % len(ZONES)]
    node_dir = directory / "nodes" / name
    http = f"{LOOPBACK}:{http_port}"
    return Member(
        name=name,
        role="agent",
        cmd=agent_command(
            name,
            code_path=node_dir / "code",
            etcd=etcd,
            cache_dir=node_dir / "cache",
            security=security,
            http=http,
            labels=f"zone={zone}",
        ),
        log=str(directory / "logs" / f"{name}.log"),
        http=http,
        labels={"zone": zone},
        # The example shop reads its zone's tax table from SHOP_ZONE (see
        # examples/README.md: shop-2.2.0-nodecfg fails on ap-south only).
        env={"SHOP_ZONE": zone, **({"HOTFLEET_DEV": "0"} if secure else {})},
        ready_line=AGENT_READY,
    )


DEFAULT_TRAFFIC_RATE = 40.0  # requests/s to each node: 20 per 0.5 s health sample

# How long `dev up` lets the traffic run before it returns: the first rollout's
# analysis needs a baseline of 8 health samples (0.5 s each) with >= 10
# requests, taken before the upgrade; 6 s gives 12, with room for a busy host.
TRAFFIC_WARMUP_S = 6.0


def traffic_member(directory: Path, agents: Sequence[Member], rate: float) -> Member:
    """Background requests to every node (:mod:`coordinator.traffic`) so analysis has data."""
    from coordinator.traffic import READY

    return Member(
        name="traffic",
        role="traffic",
        cmd=[
            sys.executable,
            "-m",
            "coordinator.traffic",
            "--rate",
            f"{rate:g}",
            *[a.http for a in agents],
        ],
        log=str(directory / "logs" / "traffic.log"),
        ready_line=READY,
    )


def copy_member_code(member: Member) -> None:
    """An agent's private copy of the example shop (its ``--code-path``; kept if there)."""
    target = Path(member.cmd[member.cmd.index("--code-path") + 1])
    if target.exists():
        return
    source = EXAMPLES / "shop"
    if not (source / "shop" / "app.py").is_file():
        raise DevClusterError(
            f"the example service is not at {source}: reinstall hotfleet (the wheel ships it "
            "as package data; a checkout has it in examples/)"
        )
    copy_code(source, target)


def _replace_cmd_value(member: Member, flag: str, value: str) -> None:
    member.cmd[member.cmd.index(flag) + 1] = value


def traffic_rate(member: Member) -> str:
    rate = member.cmd[member.cmd.index("--rate") + 1] if "--rate" in member.cmd else "?"
    return f"GET /price, {rate}/s to each node"


def move_port(member: Member, taken: set[int]) -> None:
    if member.role == "coordinator":
        port = free_port(avoid=taken)
        taken.add(port)
        member.address = with_port(member.address, port)
        _replace_cmd_value(member, "--listen", member.address)
    elif member.role == "agent":
        port = free_port(avoid=taken)
        taken.add(port)
        member.http = with_port(member.http, port)
        _replace_cmd_value(member, "--http", member.http)
    elif member.role == "etcd":
        client, peer = free_port(avoid=taken), 0
        taken.add(client)
        peer = free_port(avoid=taken)
        taken.add(peer)
        fresh = etcd_member(
            Path(member.log).parents[1], client, peer, secure=member.address.startswith("https:")
        )
        member.cmd, member.address = fresh.cmd, fresh.address


def make_credentials(cluster: Cluster, say: Say) -> None:
    """DIR/pki (CA, role and etcd certificates) and DIR/keys (release signing)."""
    from hotfleet.pki import issue_etcd_server, make_dev_pki
    from hotfleet.signing import generate_keypair

    make_dev_pki(cluster.pki)
    issue_etcd_server(cluster.pki)
    generate_keypair(cluster.sign_key, cluster.sign_key.with_suffix(".pub"))
    say.step(f"pki          dev CA and role certificates in {relative(str(cluster.pki))}")


def provision_etcd(cluster: Cluster, nodes: int, say: Say) -> None:
    """Least-privilege etcd users for the coordinator and each node; auth on."""
    from hotfleet.etcd_auth import provision, write_password_files
    from hotfleet.etcd_client import connect

    client = connect(cluster.etcd, timeout=5, **etcd_tls(cluster.pki))
    try:
        made = provision(client, cluster.prefix, nodes=[f"node-{i}" for i in range(1, nodes + 1)])
    finally:
        client.close()
    write_password_files(made, cluster.secrets)
    say.step(
        f"etcd         auth on: {len(made.passwords)} users, passwords (0600) in "
        f"{relative(str(cluster.secrets))}"
    )


def relative(path: str) -> str:
    """``path`` relative to the working directory when below it, else absolute."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
