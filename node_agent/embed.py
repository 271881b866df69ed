"""An :class:`~node_agent.agent.Agent` built from the environment, for servers hotfleet does not run.

Under gunicorn (:mod:`node_agent.gunicorn`) or uvicorn (:mod:`node_agent.asgi`)
the server owns the processes, so the agent's settings come from environment
variables, read once per worker with the same strictness as ``node-agent``'s
flags (:mod:`hotfleet.config`):

=============================  ==============================================================
``HOTFLEET_ETCD``              etcd endpoints (``http://127.0.0.1:2379``)
``HOTFLEET_PREFIX``            cluster key prefix (``/hotfleet/``)
``HOTFLEET_CODE_PATH``         the app's replaceable code, ``os.pathsep``-separated (cwd);
                               the first directory receives permanent releases
``HOTFLEET_HOST``              this host's name in node ids and the ``host`` label
                               (``socket.gethostname()``)
``HOTFLEET_NODE_ID``           node id template, ``{host}`` and ``{slot}`` (``{host}-w{slot}``)
``HOTFLEET_LABELS``            ``k=v,...``, the host's labels; ``host`` and ``worker`` are added
``HOTFLEET_LISTEN``            gRPC ``HOST:PORT``; port 0 binds any free port, another port is
                               a base: worker slot ``n`` listens on ``PORT + n`` (``127.0.0.1:0``)
``HOTFLEET_ADVERTISE_HOST``    host published in etcd (the listen host)
``HOTFLEET_DEV``               insecure development mode (no TLS, unsigned releases)
``HOTFLEET_TLS_CERT/KEY/CA``   mutual TLS of the agent's gRPC server (all three)
``HOTFLEET_TRUST_KEY``         release-signing public keys, ``os.pathsep``-separated
``HOTFLEET_FLEET``             fleet id signatures must name
``HOTFLEET_LEASE_TTL``         membership lease TTL, seconds (10)
``HOTFLEET_CACHE_DIR``         local cache of fetched sources (a temp dir per user)
``HOTFLEET_DRAIN_TIMEOUT``     max wait for in-flight requests at finish, seconds (5)
``HOTFLEET_PREPARE_TIMEOUT``   staging deadline, seconds (30)
``HOTFLEET_ETCD_CA/CERT/KEY``  etcd TLS; ``HOTFLEET_ETCD_USER`` and ``HOTFLEET_ETCD_PASSWORD``
                               (or ``_FILE``) for etcd auth (https only)
``HOTFLEET_SLOT_DIR``          where worker slots are claimed by lock file when no master
                               allocates them (uvicorn ``--workers``); the host's prepare
                               turns live there too
``HOTFLEET_PREPARE_SLOTS``     workers of this host that may prepare at once (half the
                               cores, at least 1; ``0``: no limit)
``HOTFLEET_STAGING_NICE``      niceness added to the staging process that rehearses a
                               release (5)
=============================  ==============================================================

**Worker slots.**  A node id must survive a worker's recycling: a worker that
gunicorn replaces (``max_requests``, a crash) comes back with the same id, so
the fleet sees the same participant return and the agent's start-up
reconciliation loads the fleet's current release (a rollout in its window
names its targets by id).  gunicorn's master hands out the lowest free slot
(:mod:`node_agent.gunicorn`); where no hook runs in a master (uvicorn
``--workers``), :func:`claim_slot` takes the lowest slot whose lock file no
live process holds (``flock``: the kernel frees it when the process dies).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from hotfleet.config import ConfigError, env_flag, etcd_options
from hotfleet.keys import DEFAULT_PREFIX
from node_agent._hostslots import PrepareSlots, default_slot_count
from node_agent.loader import STAGING_NICE

if TYPE_CHECKING:
    from node_agent.agent import Agent

__all__ = ["Settings", "claim_slot", "parse_labels"]

MAX_SLOTS = 1024


def parse_labels(text: str, name: str = "HOTFLEET_LABELS") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{name}: labels are k=v[,k=v...], got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise ConfigError(f"{name}={raw!r} must be positive")
    return value


def _whole(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} must be between {low} and {high}")
    return value


def _paths(env: Mapping[str, str], name: str) -> list[str]:
    return [p for p in env.get(name, "").split(os.pathsep) if p]


@dataclass
class Settings:
    """Everything an embedded agent needs that is the same for every worker of a host."""

    etcd: str = "http://127.0.0.1:2379"
    prefix: str = DEFAULT_PREFIX
    code_paths: list[str] = field(default_factory=lambda: [os.getcwd()])
    host: str = field(default_factory=socket.gethostname)
    node_id_template: str = "{host}-w{slot}"
    labels: dict[str, str] = field(default_factory=dict)
    listen: str = "127.0.0.1:0"
    advertise_host: str | None = None
    dev: bool = False
    tls: tuple[str, str, str] | None = None
    trust_keys: list[str] = field(default_factory=list)
    fleet: str | None = None
    lease_ttl: int = 10
    cache_dir: str | None = None
    drain_timeout: float = 5.0
    prepare_timeout: float = 30.0
    etcd_options: dict[str, Any] = field(default_factory=dict)
    slot_dir: str | None = None
    prepare_slots: int = field(default_factory=default_slot_count)
    staging_nice: int = STAGING_NICE

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``HOTFLEET_*`` variables (module docstring); :class:`ConfigError` names a bad one."""
        env = os.environ if environ is None else environ
        etcd = env.get("HOTFLEET_ETCD") or "http://127.0.0.1:2379"
        tls_parts = [env.get(f"HOTFLEET_TLS_{p}") or "" for p in ("CERT", "KEY", "CA")]
        if any(tls_parts) and not all(tls_parts):
            raise ConfigError("mutual TLS needs all of HOTFLEET_TLS_CERT, _KEY and _CA")
        etcd_settings = etcd_options(
            etcd,
            ca_cert=env.get("HOTFLEET_ETCD_CA") or None,
            cert_cert=env.get("HOTFLEET_ETCD_CERT") or None,
            cert_key=env.get("HOTFLEET_ETCD_KEY") or None,
            user=env.get("HOTFLEET_ETCD_USER") or None,
            environ=env,
        )
        listen = env.get("HOTFLEET_LISTEN") or "127.0.0.1:0"
        _split_listen(listen)
        template = env.get("HOTFLEET_NODE_ID") or "{host}-w{slot}"
        if "{slot}" not in template:
            raise ConfigError(
                f"HOTFLEET_NODE_ID={template!r} must contain {{slot}}: every worker of a host "
                "needs its own node id"
            )
        return cls(
            etcd=etcd,
            prefix=env.get("HOTFLEET_PREFIX") or DEFAULT_PREFIX,
            code_paths=[os.path.abspath(p) for p in _paths(env, "HOTFLEET_CODE_PATH")]
            or [os.getcwd()],
            host=env.get("HOTFLEET_HOST") or socket.gethostname(),
            node_id_template=template,
            labels=parse_labels(env.get("HOTFLEET_LABELS", "")),
            listen=listen,
            advertise_host=env.get("HOTFLEET_ADVERTISE_HOST") or None,
            dev=env_flag("HOTFLEET_DEV", environ=env),
            tls=(tls_parts[0], tls_parts[1], tls_parts[2]) if all(tls_parts) else None,
            trust_keys=_paths(env, "HOTFLEET_TRUST_KEY"),
            fleet=env.get("HOTFLEET_FLEET") or None,
            lease_ttl=int(_number(env, "HOTFLEET_LEASE_TTL", 10)),
            cache_dir=env.get("HOTFLEET_CACHE_DIR") or None,
            drain_timeout=_number(env, "HOTFLEET_DRAIN_TIMEOUT", 5.0),
            prepare_timeout=_number(env, "HOTFLEET_PREPARE_TIMEOUT", 30.0),
            etcd_options=etcd_settings,
            slot_dir=env.get("HOTFLEET_SLOT_DIR") or None,
            prepare_slots=_whole(env, "HOTFLEET_PREPARE_SLOTS", default_slot_count(), 0, 1024),
            staging_nice=_whole(env, "HOTFLEET_STAGING_NICE", STAGING_NICE, 0, 19),
        )

    def node_id(self, slot: int) -> str:
        return self.node_id_template.format(host=self.host, slot=slot)

    def listen_for(self, slot: int) -> str:
        """The gRPC address of worker ``slot``: port 0 stays 0, a base port is offset."""
        host, port = _split_listen(self.listen)
        return f"{host}:{port + slot if port else 0}"

    def agent(self, slot: int, http_address: str = "") -> Agent:
        """The agent of worker ``slot`` (not started)."""
        from hotfleet.signing import DEFAULT_FLEET
        from hotfleet.tls import TLSFiles
        from node_agent.agent import Agent
        from node_agent.supervision import SupervisedLoader

        loader = SupervisedLoader(
            self.code_paths,
            drain_timeout=self.drain_timeout,
            prepare_timeout=self.prepare_timeout,
            prepare_slots=self.host_prepare_slots(),
            staging_nice=self.staging_nice,
        )
        return Agent(
            self.node_id(slot),
            self.code_paths,
            self.etcd,
            prefix=self.prefix,
            listen=self.listen_for(slot),
            advertise_host=self.advertise_host,
            labels={**self.labels, "host": self.host, "worker": str(slot)},
            http_address=http_address,
            dev=self.dev,
            tls=TLSFiles(*self.tls) if self.tls else None,
            trusted_keys=self.trust_keys,
            fleet=self.fleet or os.environ.get("HOTFLEET_FLEET") or DEFAULT_FLEET,
            lease_ttl=self.lease_ttl,
            cache_dir=self.cache_dir,
            drain_timeout=self.drain_timeout,
            prepare_timeout=self.prepare_timeout,
            etcd_options=self.etcd_options,
            loader=loader,
        )

    def host_prepare_slots(self) -> PrepareSlots | None:
        """The turns this host's workers take to prepare (:mod:`node_agent._hostslots`)."""
        if self.prepare_slots <= 0:
            return None
        return PrepareSlots(_slot_base(self.slot_dir), self.prepare_slots, scope=self.host)


def _slot_base(directory: str | os.PathLike[str] | None) -> Path:
    base = Path(directory) if directory else Path(tempfile.gettempdir())
    return base / f"hotfleet-slots-{os.getuid()}"


def _split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"HOTFLEET_LISTEN wants HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


class SlotClaim:
    """A worker slot held by an open, ``flock``-ed file; released when the process dies."""

    def __init__(self, slot: int, handle: IO[bytes]) -> None:
        self.slot = slot
        self._handle = handle

    def release(self) -> None:
        self._handle.close()


def claim_slot(directory: str | os.PathLike[str] | None, scope: str) -> SlotClaim:
    """The lowest worker slot of ``scope`` (e.g. the node id template and host) no live process holds."""
    base = _slot_base(directory)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in scope)[:80]
    for slot in range(MAX_SLOTS):
        handle = open(base / f"{tag}.{slot}.lock", "ab")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return SlotClaim(slot, handle)
    raise RuntimeError(f"no free worker slot among {MAX_SLOTS} in {base}")
