"""Least-privilege etcd users and roles for one hotfleet cluster (one key prefix).

etcd grants a role a key or a key range, not a pattern, so "an agent writes
only its own membership key" needs one grant per node:

=========================== ===================================================
``hotfleet-agent``          read the whole prefix (releases, blobs, decisions,
                            the leader key the agent checks epochs against)
``hotfleet-node-<id>``      readwrite exactly ``<prefix>nodes/<id>`` (one key)
``hotfleet-coordinator``    readwrite the whole prefix (election, rollouts and
                            their decisions, ``active``, releases, blobs,
                            ``desired/``, ``catchups/``, dead ``nodes/``)
``root``                    etcd's administrator: provisioning only, never
                            given to a hotfleet process
=========================== ===================================================

Users: ``hotfleet-coordinator`` (role ``hotfleet-coordinator``) and, per
node, ``hotfleet-node-<id>`` (roles ``hotfleet-agent`` and
``hotfleet-node-<id>``).  So a node's credentials cannot write a decision, a
release, the permanent record or another node's membership, and a stolen
node password is worth one node.  The user names are not certificate
common names on purpose: with ``--client-cert-auth`` etcd takes a client
certificate's CN as the user when a request carries no token, and the fleet's
role certificates have CNs ``agent``/``coordinator``/``operator``/``reader``,
which name no etcd user.

::

    python -m hotfleet.etcd_auth provision --etcd https://127.0.0.1:2379 \\
        --etcd-ca ca.pem --etcd-cert root.pem --etcd-key root.key \\
        --node n1 --node n2 --out DIR      # DIR/<user>.password, mode 0600

writes one password file per user (and ``root.password``) and enables auth.
Run it once per cluster (with ``--node`` for nodes added later, as root).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hotfleet.etcd_client import (
    READ,
    READWRITE,
    EtcdClient,
    add_role,
    connect,
    enable_auth,
    grant,
    set_user,
)
from hotfleet.keys import DEFAULT_PREFIX, Keys

__all__ = [
    "AGENT_ROLE",
    "COORDINATOR_ROLE",
    "COORDINATOR_USER",
    "ROOT",
    "Credentials",
    "add_node",
    "node_user",
    "provision",
    "write_password_files",
]

AGENT_ROLE = "hotfleet-agent"
COORDINATOR_ROLE = "hotfleet-coordinator"
COORDINATOR_USER = "hotfleet-coordinator"
ROOT = "root"


def node_user(node_id: str) -> str:
    """The etcd user (and the name of the one-key role) of node ``node_id``."""
    return f"hotfleet-node-{node_id}"


def _password() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class Credentials:
    """Users and passwords :func:`provision` created (``{user: password}``)."""

    passwords: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # never the passwords
        return f"Credentials(users={sorted(self.passwords)})"


def add_node(client: EtcdClient, prefix: str, node_id: str, password: str | None = None) -> str:
    """Create (or reset) node ``node_id``'s user and its one-key role; its password."""
    if not node_id or "/" in node_id:
        raise ValueError(f"node id {node_id!r}: empty or contains '/'")
    user = node_user(node_id)
    password = password or _password()
    add_role(client, AGENT_ROLE)
    grant(client, AGENT_ROLE, Keys(prefix).prefix, READ, prefix=True)
    add_role(client, user)
    grant(client, user, Keys(prefix).node(node_id), READWRITE)
    set_user(client, user, password, [AGENT_ROLE, user])
    return password


def provision(
    client: EtcdClient,
    prefix: str = DEFAULT_PREFIX,
    *,
    nodes: Sequence[str] = (),
    root_password: str | None = None,
    enable: bool = True,
) -> Credentials:
    """Create hotfleet's roles and users for ``prefix`` (see the module docstring).

    ``client`` must be allowed to administer users: etcd with auth still off,
    or a root client.  With ``enable`` a ``root`` user (``root_password``, or a
    new random one, returned under ``root``) is created and auth turned on.
    """
    prefix = Keys(prefix).prefix
    made = Credentials()
    add_role(client, COORDINATOR_ROLE)
    grant(client, COORDINATOR_ROLE, prefix, READWRITE, prefix=True)
    made.passwords[COORDINATOR_USER] = _password()
    set_user(client, COORDINATOR_USER, made.passwords[COORDINATOR_USER], [COORDINATOR_ROLE])
    for node_id in nodes:
        made.passwords[node_user(node_id)] = add_node(client, prefix, node_id)
    if enable:
        add_role(client, ROOT)
        made.passwords[ROOT] = root_password or _password()
        set_user(client, ROOT, made.passwords[ROOT], [ROOT])
        enable_auth(client)
    return made


def write_password_files(credentials: Credentials, directory: Path) -> dict[str, Path]:
    """``DIR/<user>.password`` for each user, mode 0600 (never over an existing file)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for user, password in credentials.passwords.items():
        path = directory / f"{user}.password"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        written[user] = path
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hotfleet.etcd_auth",
        description="Create hotfleet's least-privilege etcd users and roles, enable auth.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provision", help="roles, users (passwords into DIR), auth enable")
    p.add_argument("--etcd", required=True, metavar="URL[,URL...]")
    p.add_argument("--etcd-ca")
    p.add_argument("--etcd-cert")
    p.add_argument("--etcd-key")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.add_argument("--node", action="append", default=[], metavar="ID", help="repeatable")
    p.add_argument("--out", required=True, metavar="DIR", help="password files go here (0600)")
    p.add_argument(
        "--no-enable", action="store_true", help="create users and roles, leave auth as it is"
    )
    args = parser.parse_args(argv)
    tls = {"ca_cert": args.etcd_ca, "cert_cert": args.etcd_cert, "cert_key": args.etcd_key}
    try:
        client = connect(args.etcd, **{k: v for k, v in tls.items() if v})
        try:
            made = provision(client, args.prefix, nodes=args.node, enable=not args.no_enable)
        finally:
            client.close()
        files = write_password_files(made, Path(args.out))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({user: str(path) for user, path in files.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
