"""Signing key files: safe modes whatever the umask, no planted links followed.

The finding: the key directory and the ``.pub`` were created world-writable
under a permissive umask, and a symlink planted where the key goes was
followed.  A public key someone else can replace is a trust anchor they
choose; a private key written through a link lands where they read it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotfleet.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_keypair


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_modes_are_safe_under_a_permissive_umask(tmp_path: Path, open_umask: None) -> None:
    keys = tmp_path / "keys" / "fleet"
    generate_keypair(keys / "k.key", keys / "k.pub")
    assert _mode(keys / "k.key") == 0o600
    assert _mode(keys / "k.pub") == 0o644
    assert _mode(keys) == 0o700


def test_a_planted_symlink_for_the_private_key_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "attacker-reads-this"
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "k.key").symlink_to(target)  # dangling: O_CREAT alone would create the target
    with pytest.raises(FileExistsError):
        generate_keypair(keys / "k.key", keys / "k.pub")
    assert not target.exists()
    assert not (keys / "k.pub").exists()


def test_a_planted_symlink_for_the_public_key_is_not_followed(tmp_path: Path) -> None:
    chosen = tmp_path / "attacker.pub"
    chosen.write_text("attacker's key")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "k.pub").symlink_to(chosen)
    with pytest.raises(FileExistsError):
        generate_keypair(keys / "k.key", keys / "k.pub")
    assert chosen.read_text() == "attacker's key"
    assert not (keys / "k.key").exists()  # no half key pair left behind


def test_a_symlinked_or_shared_key_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PermissionError, match="is a symlink"):
        generate_keypair(tmp_path / "link" / "k.key", tmp_path / "link" / "k.pub")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by group or others"):
        generate_keypair(shared / "k.key", shared / "k.pub")
    assert list(real.iterdir()) == [] and list(shared.iterdir()) == []


def test_keygen_cli_reports_a_planted_link_and_exits_1(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / PUBLIC_KEY_NAME).symlink_to(tmp_path / "elsewhere")
    run = subprocess.run(
        [sys.executable, "-m", "hotfleet.signing", "keygen", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert PUBLIC_KEY_NAME in run.stderr and "refusing to overwrite" in run.stderr
    assert not (keys / PRIVATE_KEY_NAME).exists()
    assert not (tmp_path / "elsewhere").exists()
