"""Strict reading of hotfleet's environment: flags and secrets.

A flag such as ``HOTFLEET_DEV`` decides whether a process runs without TLS
and signatures, so a value that reads as "off" to a human must never turn it
on, and every component must read it the same way.  Anything not clearly
true or false is an error naming the variable, not a guess.

Secrets (the etcd password) are taken from the environment or from a file
(``<NAME>_FILE``, for container secrets), never both, and never sent over a
plaintext endpoint.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "add_etcd_arguments",
    "env_flag",
    "etcd_options",
    "etcd_options_from_args",
    "etcd_password",
    "parse_flag",
    "refuse_plaintext_secret",
    "secret",
]

_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"", "0", "false", "no", "off", "n", "f"})
# A secret file is a password or a token, not a document.
_MAX_SECRET_BYTES = 64 * 1024


class ConfigError(ValueError):
    """A setting that cannot be understood; the message names the setting."""


def parse_flag(name: str, value: str) -> bool:
    """``value`` of setting ``name`` as a boolean: 1/true/yes/on or 0/false/no/off/empty.

    Case and surrounding blanks are ignored; anything else raises
    :class:`ConfigError` naming ``name``.
    """
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(
        f"{name}={value!r} is not a boolean: use one of 1, true, yes, on"
        " or 0, false, no, off (or leave it unset)"
    )


def env_flag(name: str, default: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """The boolean environment variable ``name`` (``default`` when unset)."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    return default if value is None else parse_flag(name, value)


def secret(
    name: str, environ: Mapping[str, str] | None = None, *, file: str | None = None
) -> str | None:
    """A secret from ``$name``, the file ``$<name>_FILE`` or ``file``; None if none is set.

    Setting it twice is an error (which one would win is a surprise); a
    secret file is read whole with one trailing newline removed, and must not
    be readable by others (mode 0600 or 0400).
    """
    env = os.environ if environ is None else environ
    inline = env.get(name) or None
    path = file or env.get(f"{name}_FILE") or None
    if inline is not None and path is not None:
        raise ConfigError(f"{name} is set both inline and as a file ({path}); set only one")
    if path is None:
        return inline
    source = Path(path)
    try:
        mode = source.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{name}: secret file {path} is readable or writable by others"
                f" (mode {mode & 0o777:o}); chmod 600 it"
            )
        with source.open("rb") as handle:
            data = handle.read(_MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read secret file {path}: {exc.strerror}") from None
    if len(data) > _MAX_SECRET_BYTES:
        raise ConfigError(f"{name}: secret file {path} is larger than {_MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: secret file {path} is not UTF-8 text") from None
    text = text[:-1] if text.endswith("\n") else text
    if not text:
        raise ConfigError(f"{name}: secret file {path} is empty")
    return text


def refuse_plaintext_secret(name: str, endpoints: Iterable[str]) -> None:
    """Raise :class:`ConfigError` if a secret named ``name`` would go to an http:// endpoint.

    etcd's password authentication sends the password in the clear unless
    the connection is TLS, so a password with a plaintext endpoint is a
    misconfiguration, not a choice.
    """
    plain = [e for e in endpoints if not e.strip().lower().startswith("https://")]
    if plain:
        raise ConfigError(
            f"{name} is set but {', '.join(plain)} is not https://: the password would"
            " cross the network in the clear; use TLS endpoints (--etcd https://...)"
        )


def etcd_password(
    endpoints: str,
    given: str | None = None,
    file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The etcd password for comma-separated ``endpoints``, or None without auth.

    From ``given`` (a command-line value), else ``file``, ``$HOTFLEET_ETCD_PASSWORD``
    or ``$HOTFLEET_ETCD_PASSWORD_FILE`` (exactly one of them); refused for
    plaintext endpoints (:func:`refuse_plaintext_secret`).
    """
    name = "HOTFLEET_ETCD_PASSWORD"
    if given is not None and file is not None:
        raise ConfigError("--etcd-password and --etcd-password-file are both set; set only one")
    password = given if given is not None else secret(name, environ, file=file)
    if password is not None:
        refuse_plaintext_secret("the etcd password", endpoints.split(","))
    return password


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--etcd*`` options every daemon takes, each defaulting to its ``HOTFLEET_*`` variable.

    One definition, so that an agent and a coordinator pointed at the same
    etcd are configured the same way (see :func:`etcd_options_from_args`).
    """
    env = os.environ.get
    parser.add_argument(
        "--etcd", default=env("HOTFLEET_ETCD", "http://127.0.0.1:2379"), metavar="URL[,URL...]"
    )
    for part, what in (
        ("ca", "CA for https etcd endpoints"),
        ("cert", "client certificate for etcd"),
        ("key", "client key for etcd"),
    ):
        name = f"HOTFLEET_ETCD_{part.upper()}"
        parser.add_argument(
            f"--etcd-{part}", default=env(name) or None, help=f"{what} (env {name})"
        )
    parser.add_argument(
        "--etcd-user",
        default=env("HOTFLEET_ETCD_USER") or None,
        help="etcd user (env HOTFLEET_ETCD_USER); its password comes from "
        "--etcd-password-file or HOTFLEET_ETCD_PASSWORD[_FILE], never from the command line",
    )
    parser.add_argument(
        "--etcd-password-file",
        default=None,
        metavar="PATH",
        help="file holding the etcd password (mode 0600; also HOTFLEET_ETCD_PASSWORD_FILE)",
    )


def etcd_options(
    endpoints: str,
    *,
    ca_cert: str | None = None,
    cert_cert: str | None = None,
    cert_key: str | None = None,
    user: str | None = None,
    password_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The :func:`hotfleet.etcd_client.connect` keywords for these settings, the password
    read as :func:`etcd_password` does; :class:`ConfigError` for a user without a password
    or the reverse (etcd would refuse every call later, far from the cause)."""
    password = etcd_password(endpoints, None, password_file, environ)
    if (password is None) != (user is None):
        raise ConfigError(
            "etcd auth needs both --etcd-user (HOTFLEET_ETCD_USER) and a password "
            "(--etcd-password-file, HOTFLEET_ETCD_PASSWORD or HOTFLEET_ETCD_PASSWORD_FILE)"
        )
    given = {
        "ca_cert": ca_cert,
        "cert_cert": cert_cert,
        "cert_key": cert_key,
        "user": user,
        "password": password,
    }
    return {k: v for k, v in given.items() if v is not None}


def etcd_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`etcd_options` for the options :func:`add_etcd_arguments` added."""
    return etcd_options(
        args.etcd,
        ca_cert=args.etcd_ca,
        cert_cert=args.etcd_cert,
        cert_key=args.etcd_key,
        user=args.etcd_user,
        password_file=args.etcd_password_file,
    )
