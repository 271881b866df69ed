"""Turn an ``--etcd`` endpoint string into a working etcd client.

Why not just ``etcd3.client(host, port)``: after a single UNAVAILABLE error
that client marks its only endpoint failed for 300 s and answers every later
call with ``ValueError('Trying to use a failed node')``, so a coordinator or
agent would stay cut off for five minutes after an etcd restart.  The client
built here retries a lone endpoint at once and, with several endpoints, fails
over to the others for a short while, so callers can retry transient etcd
errors (``etcd3.exceptions.Etcd3Exception``) with their usual backoff.

The client type is ``etcd3.MultiEndpointEtcd3Client``, the base class of
``etcd3.Etcd3Client`` with the same API.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import urlsplit

import etcd3
import grpc

from hotfleet.tls import channel_credentials

DEFAULT_PORT = 2379
# How long a failed endpoint is skipped when there are others to use instead.
FAILOVER_RETRY_S = 2.0
# gRPC's defaults back off reconnects up to 120 s, so a client would stay
# cut off long after etcd came back; keepalive pings on active streams
# (watches) notice a dead etcd that never closed the connection.
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]

# etcd3 ships no type information, so this alias documents more than it checks.
EtcdClient: TypeAlias = etcd3.MultiEndpointEtcd3Client
PathLike: TypeAlias = str | os.PathLike[str]


class EtcdConnectError(ConnectionError):
    """No endpoint of an etcd endpoint list could be used; names each and why."""


@dataclass(frozen=True, slots=True)
class EtcdEndpoint:
    """One parsed client URL."""

    host: str
    port: int
    secure: bool

    @property
    def netloc(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.netloc}"


def parse_endpoints(spec: str) -> list[EtcdEndpoint]:
    """Parse ``"http(s)://host:port"`` or a comma-separated list of them.

    A missing scheme means http and a missing port 2379, as etcdctl does.
    """
    endpoints: list[EtcdEndpoint] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https"):
            raise ValueError(f"etcd endpoint {item!r}: scheme must be http or https")
        if url.path not in ("", "/") or url.query or url.fragment:
            raise ValueError(f"etcd endpoint {item!r}: expected scheme://host:port only")
        try:
            port = url.port or DEFAULT_PORT
        except ValueError as exc:
            raise ValueError(f"etcd endpoint {item!r}: {exc}") from None
        if not url.hostname:
            raise ValueError(f"etcd endpoint {item!r}: no host")
        endpoints.append(EtcdEndpoint(url.hostname, port, url.scheme == "https"))
    if not endpoints:
        raise ValueError(f"no etcd endpoint in {spec!r}")
    return endpoints


def _tls_credentials(
    endpoints: Sequence[EtcdEndpoint],
    ca_cert: PathLike | None,
    cert_key: PathLike | None,
    cert_cert: PathLike | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials for https endpoints; ca_cert None means the system roots."""
    if (cert_key is None) != (cert_cert is None):
        raise ValueError("etcd client TLS needs both cert_key and cert_cert, or neither")
    secure = {ep.secure for ep in endpoints}
    if len(secure) > 1:
        raise ValueError("etcd endpoints mix http and https")
    if not secure.pop():
        if ca_cert is not None or cert_key is not None:
            raise ValueError("etcd TLS files given but the endpoints are http://; use https://")
        return None
    return channel_credentials(ca_cert, cert_key, cert_cert)


def _etcd3_endpoint(
    endpoint: EtcdEndpoint, creds: grpc.ChannelCredentials | None, retry_s: float
) -> etcd3.Endpoint:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return etcd3.Endpoint(
        host,
        endpoint.port,
        secure=endpoint.secure,
        creds=creds,
        time_retry=retry_s,
        opts=GRPC_OPTIONS,  # etcd3 annotates a dict but hands it to gRPC, which wants pairs
    )


def _build(
    eps: Sequence[EtcdEndpoint],
    creds: grpc.ChannelCredentials | None,
    timeout: float,
    user: str | None,
    password: str | None,
) -> EtcdClient:
    # A lone endpoint is retried at once: there is nothing to fail over to.
    retry_s = FAILOVER_RETRY_S if len(eps) > 1 else 0.0
    first = _etcd3_endpoint(eps[0], creds, retry_s)
    try:
        client = etcd3.MultiEndpointEtcd3Client(
            endpoints=[first], timeout=timeout, user=user, password=password, failover=True
        )
    except BaseException:
        first.close()  # authentication failed: do not leak the channel
        raise
    # Added after construction so that the first endpoint is the one in use
    # (the constructor would pick one at random and authenticate there).
    for ep in eps[1:]:
        client.endpoints[ep.netloc] = _etcd3_endpoint(ep, creds, retry_s)
    return client


def _check_auth(user: str | None, password: str | None) -> None:
    if (user is None) != (password is None):
        raise ValueError("etcd auth needs both user and password, or neither")


def open_client(
    endpoints: str | Sequence[EtcdEndpoint],
    *,
    timeout: float = 5,
    ca_cert: PathLike | None = None,
    cert_key: PathLike | None = None,
    cert_cert: PathLike | None = None,
    user: str | None = None,
    password: str | None = None,
) -> EtcdClient:
    """Build a client without checking that etcd answers (see :func:`connect`).

    The first endpoint is the one in use; the others are failover targets.
    ``timeout`` bounds every RPC, so no call can hang on a dead etcd.
    With ``user``/``password`` the constructor authenticates against the
    first endpoint, which therefore must be reachable.
    """
    eps = parse_endpoints(endpoints) if isinstance(endpoints, str) else list(endpoints)
    if not eps:
        raise ValueError("no etcd endpoint given")
    _check_auth(user, password)
    creds = _tls_credentials(eps, ca_cert, cert_key, cert_cert)
    return _build(eps, creds, timeout, user, password)


def connect(
    endpoint: str,
    *,
    timeout: float = 5,
    ca_cert: PathLike | None = None,
    cert_key: PathLike | None = None,
    cert_cert: PathLike | None = None,
    user: str | None = None,
    password: str | None = None,
) -> EtcdClient:
    """A client to the first endpoint of ``endpoint`` that answers a status call.

    Raises :class:`EtcdConnectError` naming every endpoint tried and why it
    failed, so a wrong ``--etcd`` is obvious at startup rather than on the
    first write.  Configuration mistakes (bad URL, half a TLS key pair, a
    missing certificate file) raise ``ValueError``/``OSError`` before any
    connection is tried.
    """
    eps = parse_endpoints(endpoint)
    _check_auth(user, password)
    creds = _tls_credentials(eps, ca_cert, cert_key, cert_cert)
    failures: list[str] = []
    for i, ep in enumerate(eps):
        client = None
        try:
            client = _build([ep, *eps[i + 1 :], *eps[:i]], creds, timeout, user, password)
            client.status()
        except Exception as exc:
            if client is not None:
                client.close()
            failures.append(f"{ep.url}: {_describe(exc)}")
            continue
        return client
    raise EtcdConnectError(
        f"cannot reach etcd at {endpoint} (timeout {timeout:g}s): " + "; ".join(failures)
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else ""
        return f"{getattr(code, 'name', code)}: {details}"
    return str(exc) or type(exc).__name__
