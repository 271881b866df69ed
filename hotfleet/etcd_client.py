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

**Authentication.** With ``user``/``password`` the client authenticates
itself, not through etcd3: etcd3 takes one token at construction and keeps
it for ever, but etcd forgets a token (a simple token after
``--auth-token-ttl`` seconds unused, 300 by default, and every simple token
when etcd restarts; a JWT when it expires).  Here a gRPC interceptor puts
the current token on every call; a unary call refused for its token
(``invalid auth token``, or ``revision of auth store is old`` after a
permission change) authenticates again and is sent once more, and a stream
refused for it marks the token stale so that the next call renews it.  The
password stays in the client's memory for that (never in a log line).
Callers keep etcd3's own ``client.metadata``/``call_credentials`` (None).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias
from urllib.parse import urlsplit

import etcd3
import grpc
from etcd3 import etcdrpc

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


log = logging.getLogger(__name__)


class EtcdConnectError(ConnectionError):
    """No endpoint of an etcd endpoint list could be used; names each and why."""


class EtcdAuthError(PermissionError):
    """etcd refused the user name and password (or auth is not enabled there)."""


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


# ---------------------------------------------------------------- authentication
# What etcd answers when a token is unknown or expired, or was issued before
# a change of users/roles: the client authenticates again (as clientv3 does).
_STALE_TOKEN = (
    (grpc.StatusCode.UNAUTHENTICATED, "invalid auth token"),
    (grpc.StatusCode.INVALID_ARGUMENT, "revision of auth store is old"),
)
_TOKEN_KEY = "token"


def _token_refused(call: Any) -> bool:
    try:
        code, details = call.code(), call.details() or ""
    except Exception:
        return False
    return any(code is c and text in details for c, text in _STALE_TOKEN)


class _Auth:
    """One user's etcd token, shared by the client's endpoints; renewed when refused."""

    def __init__(self, user: str, password: str, timeout: float) -> None:
        self.user = user
        self._password = password
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: str | None = None
        self.renewals = 0  # authentications after the first (tests and logs)

    def __repr__(self) -> str:  # never the password
        return f"_Auth(user={self.user!r})"

    def token(self, channel: grpc.Channel) -> str:
        with self._lock:
            if self._token is None:
                self._token = self._authenticate(channel)
            return self._token

    def stale(self, token: str) -> None:
        """``token`` was refused: the next call authenticates again."""
        with self._lock:
            if self._token == token:
                self._token = None

    def renew(self, channel: grpc.Channel, refused: str) -> str:
        with self._lock:
            if self._token in (None, refused):
                log.info("etcd refused the auth token of %s; authenticating again", self.user)
                self._token = self._authenticate(channel)
                self.renewals += 1
            return self._token

    def _authenticate(self, channel: grpc.Channel) -> str:
        request = etcdrpc.AuthenticateRequest(name=self.user, password=self._password)
        try:
            reply = etcdrpc.AuthStub(channel).Authenticate(request, self._timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                details = exc.details() if hasattr(exc, "details") else ""
                raise EtcdAuthError(f"etcd refused user {self.user!r}: {details or code}") from None
            raise
        return str(reply.token)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _Stream:
    """A response stream that tells :class:`_Auth` when etcd refused its token."""

    def __init__(self, call: Any, auth: _Auth, token: str) -> None:
        self._call, self._auth, self._token = call, auth, token

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            if _token_refused(exc):
                self._auth.stale(self._token)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Puts the current token on every call of one endpoint's channel."""

    def __init__(self, auth: _Auth, raw: grpc.Channel) -> None:
        self._auth = auth
        self._raw = raw  # authentication goes out on the channel without this interceptor

    def _with(self, details: Any, token: str) -> _CallDetails:
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != _TOKEN_KEY]
        metadata.append((_TOKEN_KEY, token))
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def _unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        token = self._auth.token(self._raw)
        call = continuation(self._with(details, token), request)
        if _token_refused(call):
            token = self._auth.renew(self._raw, token)
            call = continuation(self._with(details, token), request)
        return call

    def _stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        token = self._auth.token(self._raw)
        return _Stream(continuation(self._with(details, token), request), self._auth, token)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._unary(continuation, details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        # A request iterator cannot be replayed: no retry, the caller's own retry renews.
        token = self._auth.token(self._raw)
        call = continuation(self._with(details, token), requests)
        if _token_refused(call):
            self._auth.stale(token)
        return call

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._stream(continuation, details, request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return self._stream(continuation, details, requests)


class _Endpoint(etcd3.Endpoint):
    """etcd3's endpoint whose channel carries :class:`_Auth`'s token when there is one."""

    def __init__(self, *args: Any, auth: _Auth | None, **kwargs: Any) -> None:
        self._auth = auth
        self._raw: grpc.Channel | None = None
        super().__init__(*args, **kwargs)

    def _mkchannel(self, opts: Any) -> grpc.Channel:
        raw = super()._mkchannel(opts)
        self._raw = raw
        if self._auth is None:
            return raw
        return grpc.intercept_channel(raw, _TokenInterceptor(self._auth, raw))

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()


def _etcd3_endpoint(
    endpoint: EtcdEndpoint,
    creds: grpc.ChannelCredentials | None,
    retry_s: float,
    auth: _Auth | None = None,
) -> etcd3.Endpoint:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return _Endpoint(
        host,
        endpoint.port,
        secure=endpoint.secure,
        creds=creds,
        time_retry=retry_s,
        opts=GRPC_OPTIONS,  # etcd3 annotates a dict but hands it to gRPC, which wants pairs
        auth=auth,
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
    auth = _Auth(user, password, timeout) if user is not None and password is not None else None
    first = _etcd3_endpoint(eps[0], creds, retry_s, auth)
    try:
        # etcd3's own user/password would pin one token for ever: ours renews it.
        client = etcd3.MultiEndpointEtcd3Client(endpoints=[first], timeout=timeout, failover=True)
        if auth is not None:
            auth.token(first._raw)  # wrong credentials fail here, not on the first write
    except BaseException:
        first.close()  # authentication failed: do not leak the channel
        raise
    client.hotfleet_auth = auth
    # Added after construction so that the first endpoint is the one in use.
    for ep in eps[1:]:
        client.endpoints[ep.netloc] = _etcd3_endpoint(ep, creds, retry_s, auth)
    return client


def auth_renewals(client: EtcdClient) -> int:
    """How often ``client`` authenticated again after its first token (0 without auth)."""
    auth = getattr(client, "hotfleet_auth", None)
    return auth.renewals if auth is not None else 0


def _check_auth(user: str | None, password: str | None, endpoints: Sequence[EtcdEndpoint]) -> None:
    if (user is None) != (password is None):
        raise ValueError("etcd auth needs both user and password, or neither")
    plain = [ep.url for ep in endpoints if not ep.secure]
    if password is not None and plain:
        raise ValueError(
            f"an etcd password is set but {', '.join(plain)} is not https://: the password "
            "would cross the network in the clear; use TLS endpoints (https://...)"
        )


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
    _check_auth(user, password, eps)
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
    _check_auth(user, password, eps)
    creds = _tls_credentials(eps, ca_cert, cert_key, cert_cert)
    failures: list[str] = []
    for i, ep in enumerate(eps):
        client = None
        try:
            client = _build([ep, *eps[i + 1 :], *eps[:i]], creds, timeout, user, password)
            client.status()
        except EtcdAuthError:
            raise  # the same credentials go to every endpoint: no use trying the others
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


# ---------------------------------------------------------------- auth administration
# etcd3 has no API for users and roles; hotfleet.etcd_auth says what to grant,
# these calls say it to etcd (as root once auth is on).
READ, WRITE, READWRITE = "read", "write", "readwrite"
_PERMISSIONS = {READ: 0, WRITE: 1, READWRITE: 2}


def _auth_call(client: EtcdClient, method: str, request: Any) -> Any:
    stub = etcdrpc.AuthStub(client.channel)
    return getattr(stub, method)(request, client.timeout)


def _exists(exc: grpc.RpcError) -> bool:
    details = exc.details() if hasattr(exc, "details") else ""
    return "already exists" in (details or "")


def add_role(client: EtcdClient, role: str) -> None:
    """Create ``role`` unless it exists."""
    try:
        _auth_call(client, "RoleAdd", etcdrpc.AuthRoleAddRequest(name=role))
    except grpc.RpcError as exc:
        if not _exists(exc):
            raise


def grant(
    client: EtcdClient, role: str, key: str, permission: str, *, prefix: bool = False
) -> None:
    """Let ``role`` read/write/readwrite ``key`` (every key starting with it if ``prefix``)."""
    from etcd3.etcdrpc import auth_pb2

    raw = key.encode()
    perm = auth_pb2.Permission(permType=_PERMISSIONS[permission], key=raw)
    if prefix:
        perm.range_end = prefix_end(raw)
    request = etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=perm)
    _auth_call(client, "RoleGrantPermission", request)


def set_user(client: EtcdClient, user: str, password: str, roles: Sequence[str]) -> None:
    """Create ``user`` (or set its password) and grant it ``roles``."""
    try:
        _auth_call(client, "UserAdd", etcdrpc.AuthUserAddRequest(name=user, password=password))
    except grpc.RpcError as exc:
        if not _exists(exc):
            raise
        change = etcdrpc.AuthUserChangePasswordRequest(name=user, password=password)
        _auth_call(client, "UserChangePassword", change)
    for role in roles:
        request = etcdrpc.AuthUserGrantRoleRequest(user=user, role=role)
        _auth_call(client, "UserGrantRole", request)


def enable_auth(client: EtcdClient) -> None:
    """Turn etcd's authentication on (needs a ``root`` user with the ``root`` role)."""
    _auth_call(client, "AuthEnable", etcdrpc.AuthEnableRequest())


def role_permissions(client: EtcdClient, role: str) -> list[tuple[str, str, str]]:
    """``(permission, key, range_end)`` of each grant of ``role`` (for tests and audits)."""
    reply = _auth_call(client, "RoleGet", etcdrpc.AuthRoleGetRequest(role=role))
    names = {v: k for k, v in _PERMISSIONS.items()}
    return [(names[p.permType], p.key.decode(), p.range_end.decode()) for p in reply.perm]


def is_permission_denied(exc: BaseException) -> bool:
    """etcd refused an operation because the user's roles do not allow it."""
    if not isinstance(exc, grpc.RpcError) or not hasattr(exc, "code"):
        return False
    return exc.code() is grpc.StatusCode.PERMISSION_DENIED


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def read_together(
    client: EtcdClient, keys: Sequence[str], prefixes: Sequence[str] = ()
) -> tuple[list[bytes | None], list[list[tuple[bytes, Any]]]]:
    """``keys``' values and ``prefixes``' ``(value, metadata)`` lists, read at one revision.

    Records that one writer changes together in a transaction (say, the
    permanent release written and the window's release deleted) must be read
    together too: two separate reads can straddle that write and see a state
    that never existed (the old permanent release and no window), and a
    reader acting on it pulls the fleet back (seen in CI).  One read-only
    transaction is one revision of the store.
    """
    tx = client.transactions
    ops = [tx.get(key) for key in keys]
    ops += [tx.get(p, range_end=prefix_end(p.encode())) for p in prefixes]
    _, responses = client.transaction(compare=[], success=ops, failure=[])
    values = [kvs[0][0] if kvs else None for kvs in responses[: len(keys)]]
    return values, [list(kvs) for kvs in responses[len(keys) :]]
