"""Release signing: ed25519 keys, signatures over the release digest, verification."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from hotfleet.errors import HotfleetError, Reason
from hotfleet.release import Release
from hotfleet.signing import (
    DEFAULT_FLEET,
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_public_keys,
    sign_release,
    verify_release,
)

ROOT = Path(__file__).resolve().parents[1]
RELEASES = ROOT / "examples" / "releases"


SHOP2 = "shop@2.0.0"
BOUND = {"release": SHOP2, "fleet": "prod"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "a.key", d / "a.pub")
    generate_keypair(d / "b.key", d / "b.pub")
    return d


def reasons(exc: pytest.ExceptionInfo[HotfleetError]) -> list[tuple[str, Reason]]:
    return [(e.module, e.reason) for e in exc.value.errors]


def test_round_trip_over_a_real_release_digest(keys: Path) -> None:
    digest = Release.from_path(RELEASES / "shop-2.0.0").digest
    private = load_private_key(keys / "a.key")
    trusted = load_public_keys([keys / "a.pub", keys / "b.pub"])
    signature, signer = sign_release(digest, private, release=SHOP2, fleet="prod")
    assert len(bytes.fromhex(signature)) == 64
    assert signer in trusted and len(signer) == 16
    raw = load_public_key(keys / "a.pub").public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert signer == hashlib.sha256(raw).hexdigest()[:16] == key_id(private.public_key())
    verify_release(digest, signature, signer, trusted, release=SHOP2, fleet="prod")


def test_tampered_digest_unknown_key_and_missing_signature_are_refused(keys: Path) -> None:
    digest = Release.from_path(RELEASES / "shop-2.0.0").digest
    other = Release.from_path(RELEASES / "shop-2.1.0-bad").digest
    signature, signer = sign_release(
        digest, load_private_key(keys / "a.key"), release=SHOP2, fleet="prod"
    )
    only_b = load_public_keys([keys / "b.pub"])
    both = load_public_keys([keys / "a.pub", keys / "b.pub"])

    with pytest.raises(HotfleetError) as info:
        verify_release(other, signature, signer, both, **BOUND)  # signature of another release
    assert reasons(info) == [("*", Reason.BAD_SIGNATURE)]
    assert "is not one of release shop@2.0.0" in info.value.errors[0].detail

    with pytest.raises(HotfleetError) as info:
        verify_release(digest, signature, signer, only_b, **BOUND)  # signer not trusted
    assert reasons(info) == [("*", Reason.BAD_SIGNATURE)]
    assert signer in info.value.errors[0].detail and "not trusted" in info.value.errors[0].detail

    b_id = next(iter(only_b))
    with pytest.raises(HotfleetError) as info:
        verify_release(digest, signature, b_id, both, **BOUND)  # a's signature claimed by b
    assert reasons(info) == [("*", Reason.BAD_SIGNATURE)]

    flipped = bytearray(bytes.fromhex(signature))
    flipped[0] ^= 1
    for bad in (flipped.hex(), "zz" * 64, signature[:-2]):
        with pytest.raises(HotfleetError) as info:
            verify_release(digest, bad, signer, both, **BOUND)
        assert reasons(info) == [("*", Reason.BAD_SIGNATURE)]

    with pytest.raises(HotfleetError) as info:
        verify_release(digest, "", "", both, **BOUND)
    assert reasons(info) == [("*", Reason.UNSIGNED)]

    with pytest.raises(HotfleetError) as info:
        verify_release(digest, signature, "", both, **BOUND)
    assert reasons(info) == [("*", Reason.BAD_SIGNATURE)]


def test_keygen_cli_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "hotfleet.signing", "keygen", str(tmp_path / "k")]
    proc = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    private, public = tmp_path / "k" / PRIVATE_KEY_NAME, tmp_path / "k" / PUBLIC_KEY_NAME
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert list(load_public_keys([public])) == [out["key_id"]]
    assert key_id(load_private_key(private).public_key()) == out["key_id"]

    again = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert list(load_public_keys([public])) == [out["key_id"]]  # untouched

    sign = subprocess.run(
        [sys.executable, "-m", "hotfleet.signing", "sign", "--key", str(private),
         str(RELEASES / "shop-2.0.0")],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert sign.returncode == 0, sign.stderr
    signed = json.loads(sign.stdout)
    assert signed["fleet"] == DEFAULT_FLEET
    verify_release(
        signed["digest"],
        signed["signature"],
        signed["signer"],
        load_public_keys([public]),
        release=signed["release"],
        fleet=DEFAULT_FLEET,
    )


def test_loaders_refuse_keys_of_the_wrong_kind(keys: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(keys / "a.key")
    with pytest.raises(ValueError, match="private key"):
        load_private_key(keys / "a.pub")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ValueError):
        load_public_keys([tmp_path / "junk.pub"])


def test_a_signature_binds_release_name_version_and_fleet(keys: Path) -> None:
    """A valid signature of one release says nothing about another name, version or fleet."""
    digest = Release.from_path(RELEASES / "shop-2.0.0").digest
    trusted = load_public_keys([keys / "a.pub"])
    signature, signer = sign_release(
        digest, load_private_key(keys / "a.key"), release=SHOP2, fleet="prod"
    )
    verify_release(digest, signature, signer, trusted, release=SHOP2, fleet="prod")
    for release, fleet in (
        ("shop@2.5.0", "prod"),  # an old release passed off as a newer version
        ("cart@2.0.0", "prod"),  # ... or as another application
        (SHOP2, "staging"),  # signed for one fleet, replayed into another
        (SHOP2, "prod\nrelease: shop@2.0.0"),  # a field smuggled into another
    ):
        with pytest.raises(HotfleetError) as info:
            verify_release(digest, signature, signer, trusted, release=release, fleet=fleet)
        assert reasons(info) == [("*", Reason.BAD_SIGNATURE)], (release, fleet)
    with pytest.raises(ValueError, match="fleet"):
        sign_release(digest, load_private_key(keys / "a.key"), release=SHOP2, fleet="")
