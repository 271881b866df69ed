"""Mutual TLS for every hotfleet link, and roles taken from the peer's certificate.

One place builds gRPC credentials (agent server, coordinator server,
coordinator -> agent client, coordctl client, etcd client), so every link
verifies the same way.

**Roles.** Holding *a* certificate of the fleet's CA is not enough to drive
the fleet: a worker's own certificate is on every worker host.  A
certificate names its role with a SAN URI ``hotfleet://role/<role>``:

=============== ==========================================================
``agent``       a worker's node agent; serves the agent API, drives nothing
``coordinator`` a coordinator; the only caller of an agent's mutating RPCs
``operator``    a human or CI job; drives the coordinator API
``reader``      dashboards and scripts; the coordinator's read-only verbs
=============== ==========================================================

A certificate without a role URI, or with an unknown one, may complete the
TLS handshake (it is signed by the CA) but every RPC is refused
``PERMISSION_DENIED`` naming the certificate and what it lacks.  Several role
URIs in one certificate grant each of them (a dev coordinator that is also an
operator, say); keep them separate in production.

The check is a gRPC server interceptor (:class:`RoleGuard`) with a policy
per method: every method of the service must be listed, so a new RPC cannot
slip in unguarded.  Without TLS (dev mode) there is no identity to check and
the guard is not installed; dev mode says so loudly.
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

__all__ = [
    "ROLE_URI_PREFIX",
    "Role",
    "RoleGuard",
    "TLSFiles",
    "channel_credentials",
    "peer_roles",
    "roles_of",
    "server_credentials",
]

ROLE_URI_PREFIX = "hotfleet://role/"

PathLike = str | os.PathLike[str]


class Role(enum.Enum):
    """What a certificate may do; see the module docstring."""

    AGENT = "agent"
    COORDINATOR = "coordinator"
    OPERATOR = "operator"
    READER = "reader"

    @property
    def uri(self) -> str:
        return f"{ROLE_URI_PREFIX}{self.value}"


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one party: its certificate, its key, and the CA it trusts for peers."""

    cert: str
    key: str
    ca: str

    def server_credentials(self) -> grpc.ServerCredentials:
        return server_credentials(self.cert, self.key, self.ca)

    def credentials(self) -> grpc.ChannelCredentials:
        """Client credentials presenting this certificate."""
        return channel_credentials(self.ca, self.key, self.cert)


def _read(path: PathLike | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def server_credentials(cert: PathLike, key: PathLike, ca: PathLike) -> grpc.ServerCredentials:
    """A server that requires a client certificate signed by ``ca``."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(ca).read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(
    ca: PathLike | None, key: PathLike | None = None, cert: PathLike | None = None
) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca`` (None: the system roots), present ``cert`` if given."""
    if (key is None) != (cert is None):
        raise ValueError("a client certificate needs both its key and its certificate, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


@functools.lru_cache(maxsize=256)
def _parse(pem: bytes) -> tuple[str, frozenset[Role]]:
    cert = x509.load_pem_x509_certificate(pem)
    subject = cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return subject, frozenset()
    roles = set()
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(ROLE_URI_PREFIX):
            try:
                roles.add(Role(uri[len(ROLE_URI_PREFIX) :]))
            except ValueError:
                continue  # an unknown role grants nothing
    return subject, frozenset(roles)


def roles_of(pem: bytes) -> frozenset[Role]:
    """The roles a PEM certificate names (empty if none)."""
    return _parse(pem)[1]


def peer_roles(context: grpc.ServicerContext) -> tuple[str, frozenset[Role]]:
    """``(subject, roles)`` of the verified client certificate of this call.

    gRPC has already checked the chain against the server's CA; an empty
    role set means "no certificate" or "a certificate without a role".
    """
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return "no client certificate", frozenset()
    return _parse(bytes(pems[0]))


# A policy: method name (e.g. "Prepare") -> roles allowed to call it.
Policy = Mapping[str, frozenset[Role]]


class RoleGuard(grpc.ServerInterceptor):
    """Refuse calls whose client certificate lacks a role the method's policy allows.

    ``service`` is the full service name (``hotfleet.v1.NodeAgent``) and
    ``methods`` every method it has: the policy must name each of them
    (checked here, at construction), and a method not in the policy is
    refused at run time too.
    """

    def __init__(self, service: str, policy: Policy, methods: Iterable[str]) -> None:
        missing = sorted(set(methods) - set(policy))
        if missing:
            raise ValueError(f"role policy of {service} does not cover: {', '.join(missing)}")
        self.service = service
        self.policy = dict(policy)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method  # "/hotfleet.v1.NodeAgent/Prepare"
        service, _, method = full.lstrip("/").partition("/")
        allowed = self.policy.get(method, frozenset()) if service == self.service else frozenset()
        return _guarded(handler, full, allowed)


def _refusal(
    full_method: str, subject: str, roles: frozenset[Role], allowed: frozenset[Role]
) -> str:
    have = ", ".join(sorted(r.value for r in roles)) or "none"
    want = ", ".join(sorted(r.value for r in allowed)) or "nobody"
    return (
        f"{full_method} refused for certificate {subject}: its roles ({have}) do not include "
        f"one allowed here ({want}); roles come from SAN URIs {ROLE_URI_PREFIX}<role>"
    )


def _guarded(
    handler: grpc.RpcMethodHandler, full_method: str, allowed: frozenset[Role]
) -> grpc.RpcMethodHandler:
    def check(context: grpc.ServicerContext) -> None:
        subject, roles = peer_roles(context)
        if not roles & allowed:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, _refusal(full_method, subject, roles, allowed)
            )

    def wrap(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        @functools.wraps(behaviour)
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return behaviour(request, context)

        return guarded

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    raise ValueError(f"{full_method}: streaming requests are not guarded; add them to RoleGuard")


_WRITE_AGENT = frozenset({Role.COORDINATOR})
_READ_AGENT = frozenset({Role.COORDINATOR, Role.OPERATOR, Role.READER})
_DRIVE = frozenset({Role.OPERATOR})
_READ = frozenset({Role.OPERATOR, Role.READER})

# Agents obey coordinators only; an agent's certificate drives nothing.
AGENT_POLICY: Policy = {
    "Prepare": _WRITE_AGENT,
    "Unpack": _WRITE_AGENT,
    "Finish": _WRITE_AGENT,
    "Abort": _WRITE_AGENT,
    "Rollback": _WRITE_AGENT,
    "MakePermanent": _WRITE_AGENT,
    "Status": _READ_AGENT,
    "ModuleStatus": _READ_AGENT,
    "Health": _READ_AGENT,
}

# The coordinator API obeys operators; readers see, never change.
COORDINATOR_POLICY: Policy = {
    "PushRelease": _DRIVE,
    "RemoveRelease": _DRIVE,
    "UnpackRelease": _DRIVE,
    "Upgrade": _DRIVE,
    "Rollback": _DRIVE,
    "Abort": _DRIVE,
    "Promote": _DRIVE,
    "Nodes": _READ,
    "ListReleases": _READ,
    "ShowRelease": _READ,
    "GetRollout": _READ,
    "ListRollouts": _READ,
    "Modules": _READ,
}


def _guard(file_descriptor: Any, service: str, policy: Policy) -> RoleGuard:
    described = file_descriptor.services_by_name[service]
    return RoleGuard(described.full_name, policy, (m.name for m in described.methods))


def agent_guard() -> RoleGuard:
    """The role check of the NodeAgent service (:data:`AGENT_POLICY`)."""
    from hotfleet._proto.hotfleet.v1 import agent_pb2

    return _guard(agent_pb2.DESCRIPTOR, "NodeAgent", AGENT_POLICY)


def coordinator_guard() -> RoleGuard:
    """The role check of the Coordinator service (:data:`COORDINATOR_POLICY`)."""
    from hotfleet._proto.hotfleet.v1 import coordinator_pb2

    return _guard(coordinator_pb2.DESCRIPTOR, "Coordinator", COORDINATOR_POLICY)
