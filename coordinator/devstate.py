"""The record of a dev cluster: ``DIR/cluster.json`` and who in it is alive.

``coordctl dev up`` (:mod:`coordinator.devcluster`) writes one
:class:`Cluster` per directory: every process's pid, its start time (so
that a pid the kernel recycled for another program is never signalled, see
:func:`proc_start_time`), its command line, ports and log file.  Everything
that reads the record lives here too: coordctl's defaults for the
coordinator address and a secure cluster's credentials
(:func:`default_coordinator`, :func:`default_security`), the lock that keeps
two ``dev`` commands off one directory, and how a printed hint names the
cluster (:func:`naming`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hotfleet.keys import DEFAULT_PREFIX

__all__ = [
    "DEFAULT_DIR",
    "DIR_ENV",
    "STATE_FILE",
    "Cluster",
    "DevClusterError",
    "Member",
    "default_coordinator",
    "default_security",
    "load",
    "naming",
    "proc_start_time",
    "resolve_dir",
]

DIR_ENV = "HOTFLEET_DEV_DIR"

DEFAULT_DIR = ".hotfleet-dev"

STATE_FILE = "cluster.json"

STATE_VERSION = 1


class DevClusterError(Exception):
    """A failure to report: the message says what to do next."""


# ---------------------------------------------------------------- processes
def proc_start_time(pid: int) -> str | None:
    """An identity for the process ``pid``: its start time, None when there is none.

    Linux: field 22 of ``/proc/PID/stat`` (clock ticks after boot), fixed at
    fork.  Elsewhere ``ps -o lstart=``.  A zombie has exited: None.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        raw = ""
    if raw:
        fields = raw[raw.rfind(")") + 2 :].split()
        if not fields or fields[0] in ("Z", "X"):
            return None
        return fields[19]
    if Path("/proc/self/stat").exists():
        return None
    try:
        result = subprocess.run(
            ["ps", "-o", "stat=,lstart=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = result.stdout.strip()
    if result.returncode != 0 or not line or line.startswith("Z"):
        return None
    return line.split(None, 1)[1] if " " in line else line


@dataclass
class Member:
    """One process of the dev cluster, as recorded in ``cluster.json``."""

    name: str
    role: str  # "etcd" | "coordinator" | "agent" | "traffic"
    cmd: list[str]
    log: str
    pid: int = 0
    start_time: str = ""
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    address: str = ""  # etcd client URL, coordinator API, agent gRPC
    http: str = ""  # agents: the shop's HTTP address
    labels: dict[str, str] = field(default_factory=dict)
    ready_line: str = ""  # printed on stdout once it serves

    def state(self) -> str:
        """``alive``, ``dead`` or ``replaced`` (the pid now belongs to another process)."""
        if self.pid <= 0:
            return "dead"
        now = proc_start_time(self.pid)
        if now is None:
            return "dead"
        return "alive" if now == self.start_time else "replaced"

    def alive(self) -> bool:
        return self.state() == "alive"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Member:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Cluster:
    """What ``dev up`` started, as written to ``DIR/cluster.json``."""

    dir: str
    etcd: str = ""
    embedded_etcd: bool = True
    coordinator: str = ""
    prefix: str = DEFAULT_PREFIX
    members: list[Member] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    version: int = STATE_VERSION
    secure: bool = False  # `dev up --secure`: DIR/pki, DIR/keys, DIR/secrets

    @property
    def pki(self) -> Path:
        return Path(self.dir) / "pki"

    @property
    def secrets(self) -> Path:
        return Path(self.dir) / "secrets"

    @property
    def sign_key(self) -> Path:
        return Path(self.dir) / "keys" / "release-signing.key"

    def etcd_options(self) -> dict[str, Any]:
        """``open_client`` keyword arguments for this cluster's etcd (as the coordinator user)."""
        if not self.secure:
            return {}
        from hotfleet.config import secret
        from hotfleet.etcd_auth import COORDINATOR_USER

        password_file = self.secrets / f"{COORDINATOR_USER}.password"
        return {
            **etcd_tls(self.pki),
            "user": COORDINATOR_USER,
            "password": secret("HOTFLEET_ETCD_PASSWORD", {}, file=str(password_file)),
        }

    @property
    def path(self) -> Path:
        return Path(self.dir) / STATE_FILE

    @property
    def agents(self) -> list[Member]:
        return [m for m in self.members if m.role == "agent"]

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["members"] = [asdict(m) for m in self.members]
        return d

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Cluster:
        d = dict(d)
        members = [Member.from_json(m) for m in d.pop("members", [])]
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**{**known, "members": members})


def resolve_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """``directory``, else ``$HOTFLEET_DEV_DIR``, else ``./.hotfleet-dev``; absolute."""
    chosen = directory or os.environ.get(DIR_ENV) or DEFAULT_DIR
    return Path(chosen).expanduser().absolute()


def load(directory: str | os.PathLike[str] | None = None) -> Cluster | None:
    """The recorded cluster in ``directory``, None when there is none (or it is unreadable)."""
    path = resolve_dir(directory) / STATE_FILE
    try:
        return Cluster.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def default_coordinator(directory: str | os.PathLike[str] | None = None) -> str | None:
    """The coordinator address recorded by ``coordctl dev up``, if a cluster state exists."""
    cluster = load(directory)
    return cluster.coordinator if cluster is not None and cluster.coordinator else None


def default_security(directory: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """coordctl's credentials for a ``dev up --secure`` cluster: ``tls_cert``, ``tls_key``,
    ``tls_ca`` (the operator's) and ``sign_key``; empty for any other cluster."""
    cluster = load(directory)
    if cluster is None or not cluster.secure:
        return {}
    return {
        "tls_cert": str(cluster.pki / "operator.pem"),
        "tls_key": str(cluster.pki / "operator.key"),
        "tls_ca": str(cluster.pki / "ca.pem"),
        "sign_key": str(cluster.sign_key),
    }


def etcd_tls(pki: Path) -> dict[str, str]:
    """TLS files a client of the secure dev etcd presents (the coordinator's certificate)."""
    return {
        "ca_cert": str(pki / "ca.pem"),
        "cert_cert": str(pki / "coordinator.pem"),
        "cert_key": str(pki / "coordinator.key"),
    }


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One ``dev up``/``dev down`` at a time per directory."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DevClusterError(
                f"another `coordctl dev` command is working on {directory}; wait for it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- describing
def naming(directory: str | os.PathLike[str]) -> tuple[str, str]:
    """How a printed command names this cluster: ``(env prefix, --dir flag)``.

    Both are empty for the cluster a plain ``coordctl`` finds (``./.hotfleet-dev``
    or ``$HOTFLEET_DEV_DIR``).  Any other one is named in every hint: a hint
    that works only for the default cluster would silently drive another
    cluster's fleet when two run side by side.
    """
    path = resolve_dir(directory)
    if path == resolve_dir(None):
        return "", ""
    quoted = shlex.quote(str(path))
    return f"{DIR_ENV}={quoted} ", f" --dir {quoted}"
