"""A fleet with no insecure link: coordctl ⇄ coordinator ⇄ agents over mutual TLS,
releases signed, real processes on 127.0.0.1.

What the operator does outside ``--dev``, end to end, and what an attacker
without the fleet's certificates or signing key gets: a refusal, never a
reload.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import EXIT_ABORTED, EXIT_OK, EXIT_UNREACHABLE
from hotfleet.signing import generate_keypair
from hotfleet.tls import Role
from tests.agents import RELEASES, Agents, make_pki, wait_for
from tests.coordinators import Coordinators, coordctl, versions

pytestmark = pytest.mark.integration


def test_secure_fleet_end_to_end_over_mutual_tls(
    agents: Agents, coordinators: Coordinators, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    generate_keypair(tmp_path / "fleet.key", tmp_path / "fleet.pub")
    node = agents.start(
        "n-tls",
        dev=False,
        pki=pki,
        trust_keys=[tmp_path / "fleet.pub"],
        # a host code cache of its own: what other tests unpacked is not this host's
        env={"HOTFLEET_CODE_CACHE": str(tmp_path / "code-cache")},
    )
    daemon = coordinators.start("tls", tls=pki)
    client = pki.tls_args(Role.OPERATOR)

    def registered() -> bool:
        listed = coordctl(daemon, *client, "-o", "json", "nodes")
        return listed.code == EXIT_OK and [n["node_id"] for n in listed.json()["items"]] == [
            "n-tls"
        ]

    wait_for(registered, timeout=20, interval=0.2)

    # no client certificate, or one from another CA: the handshake fails, nothing runs
    plain = coordctl(daemon, "nodes")
    assert plain.code == EXIT_UNREACHABLE, plain
    rogue = make_pki(tmp_path / "rogue")
    forged = coordctl(
        daemon,
        *rogue.tls_args(Role.OPERATOR)[:4],
        *["--tls-ca", str(pki.ca)],
        "release",
        "push",
        str(RELEASES / "shop-2.0.0"),
    )
    assert forged.code == EXIT_UNREACHABLE, forged

    # an unsigned release reaches the agent only to be refused, naming node and reason
    unsigned = coordctl(daemon, *client, "release", "push", str(RELEASES / "shop-2.1.0-bad"))
    assert unsigned.code == EXIT_OK, unsigned
    # ... and its unpack at push is refused the same way, before a byte of it is fetched
    assert "a prepare would refuse it on n-tls" in unsigned.out, unsigned
    assert "unsigned" in unsigned.out, unsigned
    refused = coordctl(
        daemon,
        *client,
        "upgrade",
        "--all",
        "--release",
        "shop@2.1.0-bad",
        "--wait",
        "--window",
        "0",
    )
    assert refused.code == EXIT_ABORTED and "n-tls" in refused.out, refused
    assert "unsigned" in refused.out + refused.err, refused
    assert versions([node]) == {"1"}

    # the operator's path: push signed, upgrade, every hop authenticated
    key = str(tmp_path / "fleet.key")
    pushed = coordctl(
        daemon, *client, "release", "push", str(RELEASES / "shop-2.0.0"), "--sign-key", key
    )
    assert pushed.code == EXIT_OK, pushed
    assert "unpacked on 1 node(s)" in pushed.out and "[n-tls]" in pushed.out, pushed
    up = coordctl(
        daemon, *client, "upgrade", "--all", "--release", "shop@2.0.0", "--wait", "--window", "0"
    )
    assert up.code == EXIT_OK, up
    assert versions([node]) == {"2"}
