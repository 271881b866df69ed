"""A development CA and role certificates, so a secure cluster is one command away.

::

    python -m hotfleet.pki dev DIR [--host H ...]   # CA + one certificate per role
    python -m hotfleet.pki issue DIR --role operator --name alice [--host H ...]

``dev`` writes ``DIR/ca.pem`` (and ``ca.key``) plus ``<role>.pem``/``<role>.key``
for ``agent``, ``coordinator``, ``operator`` and ``reader``; ``issue`` adds
one more certificate signed by that CA.  Each certificate names its role in a
SAN URI ``hotfleet://role/<role>`` (see :mod:`hotfleet.tls`) and, for the
servers (agent, coordinator), the hosts it serves as SAN DNS/IP entries
(default ``127.0.0.1`` and ``localhost``).  The coordinator's certificate is
both its server certificate (coordctl connects to it) and its client
certificate towards agents.

Keys are EC P-256, written mode 0600 into a 0700 directory, never over an
existing file or through a link.  This is a dev CA: it lives on one disk,
its certificates last a year; production issues the same SAN URIs from its
own CA.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hotfleet.signing import _key_directory, _write_new
from hotfleet.tls import Role, TLSFiles

__all__ = ["DEFAULT_HOSTS", "DevPki", "issue", "issue_etcd_server", "make_ca", "make_dev_pki"]

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_VALID = datetime.timedelta(days=365)
_SKEW = datetime.timedelta(minutes=5)
_SERVERS = frozenset({Role.AGENT, Role.COORDINATOR})


@dataclass(frozen=True)
class DevPki:
    """Paths of a dev CA and its role certificates (see :func:`make_dev_pki`)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def cert(self, role: Role | str) -> Path:
        return self.directory / f"{Role(role).value}.pem"

    def key(self, role: Role | str) -> Path:
        return self.directory / f"{Role(role).value}.key"

    def files(self, role: Role | str) -> TLSFiles:
        """The role's certificate, key and the CA, as one party presents them."""
        return TLSFiles(str(self.cert(role)), str(self.key(role)), str(self.ca))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(directory: Path, name: str = "hotfleet dev CA") -> None:
    """Write ``ca.pem`` and ``ca.key`` (0600) into ``directory`` (created 0700)."""
    _key_directory(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_new(directory / "ca.key", _pem_key(key), 0o600)
    _write_new(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _sign_leaf(
    directory: Path,
    stem: str,
    subject: str,
    san: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
) -> tuple[Path, Path]:
    """A fresh key and a certificate signed by the CA in ``directory``, written as
    ``<stem>.pem``/``<stem>.key`` (the key 0600); ``(cert, key)`` paths."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'}: not an EC key")
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_new(key_path, _pem_key(key), 0o600)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def issue(
    directory: Path,
    role: Role | str,
    name: str | None = None,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    stem: str | None = None,
) -> tuple[Path, Path]:
    """Sign a certificate for ``role`` with the CA in ``directory``; ``(cert, key)`` paths.

    ``name`` is the common name (default: the role); servers (agent,
    coordinator) get ``hosts`` as SAN entries; the files are
    ``<stem>.pem``/``<stem>.key`` (default stem: the role).
    """
    role = Role(role)
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role.uri)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role in _SERVERS:
        san += [_host(h) for h in hosts]
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    return _sign_leaf(directory, stem or role.value, name or role.value, san, usages)


def issue_etcd_server(
    directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, stem: str = "etcd"
) -> tuple[Path, Path]:
    """An etcd server certificate from the CA in ``directory``: ``(cert, key)`` paths.

    It carries no hotfleet role (etcd must never be able to drive the fleet
    with it), only ``hosts`` as SAN entries, for server and client use (the
    embedded etcd's own health probe presents it).
    """
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return _sign_leaf(directory, stem, f"hotfleet {stem}", [_host(h) for h in hosts], usages)


def make_dev_pki(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> DevPki:
    """A new CA in ``directory`` and one certificate per role (see the module docstring)."""
    make_ca(directory)
    for role in Role:
        issue(directory, role, hosts=hosts)
    return DevPki(directory)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hotfleet.pki", description="Dev CA and hotfleet role certificates."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="new CA and one certificate per role in DIR")
    dev.add_argument("dir", metavar="DIR")
    dev.add_argument("--host", action="append", help="server SAN (repeatable)")
    one = sub.add_parser("issue", help="one more certificate from DIR's CA")
    one.add_argument("dir", metavar="DIR")
    one.add_argument("--role", required=True, choices=[r.value for r in Role])
    one.add_argument("--name", help="common name and file stem (default: the role)")
    one.add_argument("--host", action="append", help="server SAN (repeatable)")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    hosts = tuple(args.host or DEFAULT_HOSTS)
    try:
        if args.command == "dev":
            pki = make_dev_pki(directory, hosts)
            out = {"ca": str(pki.ca)} | {r.value: str(pki.cert(r)) for r in Role}
        else:
            cert, key = issue(directory, args.role, args.name, hosts, stem=args.name)
            out = {"cert": str(cert), "key": str(key), "role": args.role}
    except FileExistsError as exc:
        print(f"error: {exc.filename} exists; refusing to overwrite it", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
