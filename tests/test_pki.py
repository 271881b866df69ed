"""The dev CA (``python -m hotfleet.pki``) and what a certificate's role reads as."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hotfleet.pki import issue, make_dev_pki
from hotfleet.tls import AGENT_POLICY, COORDINATOR_POLICY, Role, RoleGuard, roles_of
from tests.agents import ROOT


def test_dev_pki_gives_each_role_its_certificate_and_private_keys(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    for role in Role:
        assert roles_of(pki.cert(role).read_bytes()) == {role}
        assert stat.S_IMODE(pki.key(role).stat().st_mode) == 0o600
    assert roles_of(pki.ca.read_bytes()) == frozenset()  # the CA drives nothing either
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    with pytest.raises(ValueError):
        issue(tmp_path / "pki", "admin")  # no such role
    with pytest.raises(FileExistsError):
        issue(tmp_path / "pki", Role.OPERATOR)  # never over an existing key


def test_pki_cli_issues_a_named_operator(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "hotfleet.pki", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)

    made = run("dev", str(tmp_path / "pki"))
    assert made.returncode == 0, made.stderr
    assert set(json.loads(made.stdout)) == {"ca", *(r.value for r in Role)}
    alice = run("issue", str(tmp_path / "pki"), "--role", "operator", "--name", "alice")
    assert alice.returncode == 0, alice.stderr
    assert roles_of((tmp_path / "pki" / "alice.pem").read_bytes()) == {Role.OPERATOR}
    again = run("issue", str(tmp_path / "pki"), "--role", "operator", "--name", "alice")
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr


def test_a_role_policy_must_name_every_method() -> None:
    with pytest.raises(ValueError, match="does not cover: Prepare"):
        RoleGuard(
            "hotfleet.v1.NodeAgent", {"Status": frozenset({Role.READER})}, ["Prepare", "Status"]
        )
    # no policy lets an agent certificate change anything
    for policy in (AGENT_POLICY, COORDINATOR_POLICY):
        assert all(Role.AGENT not in allowed for allowed in policy.values())
