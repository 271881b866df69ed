"""Release signing: ed25519 signatures over a statement naming fleet, release and digest.

A release's digest (:attr:`hotfleet.release.Release.digest`) covers every
module's content digest, its name and path, version, ``extra``, ``depends``,
smoke checks and health policy.  What is signed is a statement that binds it
to what it means (:func:`release_statement`)::

    hotfleet-release-signature v2
    fleet: <fleet id>
    release: <name>@<version>
    digest: <release digest>

so a signature is valid only for that name and version in that fleet: a
release signed for the staging fleet does not verify in production, and an
old signed release cannot be passed off under another version's name.
(Replaying an old release *as itself* is a downgrade, which the coordinator
refuses unless asked; see ``coordctl upgrade --allow-downgrade``.)
The fleet id is a name the operator chooses per fleet (``--fleet`` /
``HOTFLEET_FLEET``, default :data:`DEFAULT_FLEET`).

Keys are PEM files: the private key PKCS#8 (unencrypted, mode 0600), the
public key SubjectPublicKeyInfo.  A key is named by its *key id*: the first
16 hex characters of the sha256 of the raw 32-byte public key; it travels
with the signature (``ReleaseManifest.signer``) so an agent holding several
trusted keys knows which one to check.

::

    python -m hotfleet.signing keygen DIR          # DIR/release-signing.key + .pub
    python -m hotfleet.signing sign --key K [--fleet F] BUNDLE  # signature, signer as JSON
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hotfleet.errors import HotfleetError, ModuleError, Reason

__all__ = [
    "DEFAULT_FLEET",
    "FLEET_ENV",
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "SignatureError",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "release_statement",
    "sign_release",
    "verify_release",
]

PRIVATE_KEY_NAME = "release-signing.key"
PUBLIC_KEY_NAME = "release-signing.pub"
_KEY_ID_LEN = 16
DEFAULT_FLEET = "default"
FLEET_ENV = "HOTFLEET_FLEET"
_STATEMENT_HEADER = "hotfleet-release-signature v2"

PathLike = str | os.PathLike[str]


class SignatureError(HotfleetError):
    """A release is unsigned or its signature does not verify (reason on ``errors``)."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex chars of sha256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:_KEY_ID_LEN]


def generate_keypair(private_path: PathLike, public_path: PathLike) -> str:
    """Write a new ed25519 key pair; return its key id.

    The private key is created 0600 and the public key 0644, a missing
    directory 0700; an existing directory others can write to is refused.
    Refuses to overwrite an existing key or to follow a planted symlink:
    losing a signing key by accident would lock every agent that trusts it
    out of new releases, and a link would write the key where an attacker
    reads it (or make a chosen public key the trusted one).
    """
    private_path, public_path = Path(private_path), Path(public_path)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _key_directory(private_path.parent)
    _key_directory(public_path.parent)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)  # half a key pair is worse than none
        raise
    return key_id(key.public_key())


def _key_directory(directory: Path) -> None:
    """Create ``directory`` (mode 0700) or check that nobody else can write into it.

    A key written where another user can rename or replace files is a key
    an attacker chooses; a symlinked directory may point anywhere.
    """
    if not directory.exists() and not directory.is_symlink():
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # mkdir's mode goes through the umask
        return
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"{directory} is a symlink; refusing to write a key through it")
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{directory} is not a directory")
    if info.st_mode & 0o022:
        raise PermissionError(
            f"{directory} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o});"
            " refusing to write a key where another user could replace it"
        )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with exactly ``mode``, never through a symlink nor over a file.

    ``O_EXCL`` refuses an existing file or a planted (even dangling) symlink,
    ``O_NOFOLLOW`` says so again for good measure; ``fchmod`` undoes the umask.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def load_private_key(path: PathLike) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM file; ``ValueError`` for anything else."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: PathLike) -> Ed25519PublicKey:
    """An ed25519 public key from a PEM file; ``ValueError`` for anything else."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an ed25519 public key ({type(key).__name__})")
    return key


def load_public_keys(paths: Iterable[PathLike]) -> dict[str, Ed25519PublicKey]:
    """Trusted keys by key id, from PEM public key files."""
    return {key_id(key): key for key in map(load_public_key, paths)}


def release_statement(release_digest: str, *, release: str, fleet: str) -> bytes:
    """The bytes a release signature covers: fleet, ``name@version`` and digest.

    Each field is one line, so no value can smuggle in another field; a
    field that is empty or holds a line break is refused.
    """
    for what, value in (("digest", release_digest), ("release", release), ("fleet", fleet)):
        if not value or any(c in value for c in "\r\n"):
            raise ValueError(f"cannot sign a release statement with {what} {value!r}")
    text = f"{_STATEMENT_HEADER}\nfleet: {fleet}\nrelease: {release}\ndigest: {release_digest}\n"
    return text.encode("utf-8")


def sign_release(
    release_digest: str, private_key: Ed25519PrivateKey, *, release: str, fleet: str
) -> tuple[str, str]:
    """``(signature_hex, key_id)`` over :func:`release_statement`."""
    statement = release_statement(release_digest, release=release, fleet=fleet)
    return private_key.sign(statement).hex(), key_id(private_key.public_key())


def _refuse(reason: Reason, detail: str) -> SignatureError:
    return SignatureError([ModuleError("*", reason, detail)])


def verify_release(
    release_digest: str,
    signature_hex: str,
    signer_key_id: str,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    release: str,
    fleet: str,
) -> None:
    """Return if ``signature_hex`` is a trusted key's signature of this release; raise otherwise.

    Raises :class:`SignatureError` (a :class:`HotfleetError`) with one
    ``*`` entry: ``unsigned`` when there is no signature, ``bad_signature``
    when the signer is unknown or untrusted, the signature malformed, or it
    does not verify over :func:`release_statement` of ``release_digest``,
    ``release`` (``name@version``) and ``fleet``.
    """
    if not signature_hex:
        raise _refuse(Reason.UNSIGNED, f"release {release_digest} carries no signature")
    if not signer_key_id:
        raise _refuse(Reason.BAD_SIGNATURE, "signature without a signer key id")
    key = trusted.get(signer_key_id)
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise _refuse(
            Reason.BAD_SIGNATURE,
            f"signed by key {signer_key_id}, which is not trusted here (trusted: {known})",
        )
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        raise _refuse(Reason.BAD_SIGNATURE, "signature is not hex") from None
    if len(signature) != 64:
        raise _refuse(
            Reason.BAD_SIGNATURE, f"an ed25519 signature is 64 bytes, got {len(signature)}"
        )
    try:
        key.verify(signature, release_statement(release_digest, release=release, fleet=fleet))
    except (InvalidSignature, ValueError):
        raise _refuse(
            Reason.BAD_SIGNATURE,
            f"signature by key {signer_key_id} is not one of release {release} with digest"
            f" {release_digest} in fleet {fleet!r} (signed for another release, version,"
            " fleet or content)",
        ) from None


# ------------------------------------------------------------------ CLI
def _keygen(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    private, public = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    try:
        kid = generate_keypair(private, public)
    except FileExistsError as exc:
        print(
            f"error: {exc.filename or private} exists (or is a link); refusing to overwrite a"
            " signing key",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"error: cannot write the key pair into {directory}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"key_id": kid, "private_key": str(private), "public_key": str(public)}))
    return 0


def _sign(args: argparse.Namespace) -> int:
    from hotfleet.release import Release

    release = Release.from_path(args.bundle)
    signature, kid = sign_release(
        release.digest, load_private_key(args.key), release=release.label, fleet=args.fleet
    )
    print(
        json.dumps(
            {
                "release": release.label,
                "digest": release.digest,
                "fleet": args.fleet,
                "signature": signature,
                "signer": kid,
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hotfleet.signing", description="ed25519 release signing keys."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser(
        "keygen", help=f"write DIR/{PRIVATE_KEY_NAME} (mode 0600) and DIR/{PUBLIC_KEY_NAME}"
    )
    keygen.add_argument("dir", metavar="DIR")
    keygen.set_defaults(run=_keygen)
    sign = sub.add_parser("sign", help="sign a release bundle; prints digest, signature, signer")
    sign.add_argument("--key", required=True, help="private key (PEM)")
    sign.add_argument(
        "--fleet",
        default=os.environ.get(FLEET_ENV) or DEFAULT_FLEET,
        help=f"fleet id the signature is valid in (${FLEET_ENV}, default {DEFAULT_FLEET!r})",
    )
    sign.add_argument("bundle", metavar="BUNDLE", help="release directory or archive")
    sign.set_defaults(run=_sign)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
