"""The coordinator API client shared by coordctl and the demo: connection, leader, errors.

Why its own module: ``coordctl`` (:mod:`coordinator.cli`) and the guided
demo (:mod:`coordinator.demo`) both talk to the coordinator the same way
(follow ``not_leader`` to the leader, skip unreachable addresses, turn
refusals into an exit code and a message); keeping that here lets the demo
use it without importing the CLI, so imports flow one way.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from coordinator import render
from hotfleet._proto.hotfleet.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from hotfleet.protocol import LEADER_KEY, REFUSAL_KEY, Refusal
from hotfleet.tls import channel_credentials

DEFAULT_COORDINATOR = "127.0.0.1:7600"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_ABORTED = 4
EXIT_ROLLED_BACK = 5
EXIT_UNREACHABLE = 6
EXIT_PAUSED = 7
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "the asked-for outcome happened (a --dry-run that prepared everywhere counts)",
    EXIT_ERROR: "any other error",
    EXIT_USAGE: "usage error (bad flags or arguments)",
    EXIT_REFUSED: "refused: the request was rejected and nothing started "
    "(busy, unknown release, bad bundle, no matching node, ...)",
    EXIT_ABORTED: "aborted: the two-phase commit aborted (a node refused or was missing); "
    "nothing changed",
    EXIT_ROLLED_BACK: "rolled back: the release went out and was taken back out",
    EXIT_UNREACHABLE: "coordinator unreachable, no leader, or timed out waiting "
    "(the rollout may go on: see `coordctl status`)",
    EXIT_PAUSED: "paused: the analysis could not judge the release yet (too little data); "
    "it resumes by itself once it can, or `coordctl promote` / `coordctl rollback`",
}

RPC_TIMEOUT_S = 15.0
PUSH_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.2
# While watching, how long the coordinator may stay unreachable (a leader
# failover) before coordctl gives up.
WATCH_GRACE_S = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# ---------------------------------------------------------------- errors
@dataclass
class CoordctlError(Exception):
    """A failure to report to the user: a message, an exit code, maybe per-module errors."""

    message: str
    exit_code: int = EXIT_ERROR
    code: str = "error"  # refusal code, "unreachable", "timeout", "error", ...
    errors: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


def refusal_exit(code: str) -> int:
    """coordctl's exit code for a refusal: 6 when retrying may work as is, else 3."""
    try:
        return EXIT_UNREACHABLE if Refusal(code).retryable else EXIT_REFUSED
    except ValueError:  # a code from a newer coordinator
        return EXIT_REFUSED


# ---------------------------------------------------------------- connection
def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    if host in ("localhost", ""):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    # 0.0.0.0 / :: (a coordinator advertising its wildcard listen address) connect locally.
    return ip.is_loopback or ip.is_unspecified


@dataclass
class Security:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    dev: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.cert and self.key and self.ca)

    def credentials(self) -> grpc.ChannelCredentials:
        assert self.cert and self.key and self.ca
        try:
            return channel_credentials(self.ca, self.key, self.cert)
        except OSError as exc:
            raise CoordctlError(f"cannot read TLS file: {exc}", EXIT_USAGE, "usage") from exc

    def check(self, address: str) -> None:
        if self.tls or self.dev or is_loopback(address):
            return
        raise CoordctlError(
            f"refusing to talk to the coordinator at {address} without TLS: the coordinator "
            "API loads code into every worker. Give --tls-cert/--tls-key/--tls-ca, or --dev "
            "(HOTFLEET_DEV=1) for an insecure development cluster",
            EXIT_USAGE,
            "usage",
        )


class Client:
    """A Coordinator stub that follows the leader and skips unreachable addresses."""

    def __init__(
        self, addresses: Sequence[str], security: Security, *, notes: TextIO | None = None
    ) -> None:
        if not addresses:
            raise CoordctlError("no coordinator address given", EXIT_USAGE, "usage")
        self.addresses = list(addresses)
        self.security = security
        self.notes = notes
        self.address = self.addresses[0]
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def _connect(self, address: str) -> Any:
        if self._channel is not None and address == self.address and self._stub is not None:
            return self._stub
        self.close()
        self.security.check(address)
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.security.tls:
            self._channel = grpc.secure_channel(address, self.security.credentials(), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self.address = address
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def _note(self, text: str) -> None:
        if self.notes is not None:
            print(f"coordctl: {text}", file=self.notes, flush=True)

    def call(self, method: str, request: Any, timeout: float = RPC_TIMEOUT_S) -> Any:
        """Call ``method``; follow a not_leader answer once; try the other addresses."""
        candidates = [self.address] + [a for a in self.addresses if a != self.address]
        redirected, redirected_from, leader_hint = False, "", ""
        unreachable: list[str] = []
        while candidates:
            address = candidates.pop(0)
            stub = self._connect(address)
            try:
                return getattr(stub, method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                metadata = dict(trailing_metadata(exc))
                refusal = metadata.get(REFUSAL_KEY, "")
                status = status_code(exc)
                if refusal == "not_leader":
                    leader = metadata.get(LEADER_KEY, "")
                    if leader and not redirected and leader != address:
                        self._note(f"{address} is not the leader; following the leader at {leader}")
                        redirected, redirected_from, leader_hint = True, address, leader
                        candidates.insert(0, leader)
                        continue
                    raise CoordctlError(
                        details_of(exc)
                        or f"the coordinator at {address} does not lead and knows no leader",
                        EXIT_UNREACHABLE,
                        "not_leader",
                    ) from exc
                if refusal:
                    raise CoordctlError(
                        details_of(exc) or f"refused ({refusal})",
                        refusal_exit(refusal),
                        refusal,
                    ) from exc
                if status is grpc.StatusCode.UNIMPLEMENTED:
                    # something else answers on that port (a coordinator's port taken
                    # over by another process after it died): not ours, try the others
                    unreachable.append(f"{address} (not a hotfleet coordinator: {method} unknown)")
                    continue
                if status is grpc.StatusCode.UNAVAILABLE:
                    if redirected and address == leader_hint:
                        raise CoordctlError(
                            f"{redirected_from} says the leader is {address}, but it cannot be "
                            f"reached ({details_of(exc) or 'unavailable'}); a leader failover may be "
                            "in progress: retry in a few seconds",
                            EXIT_UNREACHABLE,
                            "unreachable",
                        ) from exc
                    unreachable.append(f"{address} ({details_of(exc) or 'unavailable'})")
                    continue
                if status is grpc.StatusCode.PERMISSION_DENIED:  # our certificate's role
                    raise CoordctlError(
                        f"the coordinator at {address} refused {method}: {details_of(exc)}",
                        EXIT_REFUSED,
                        "forbidden",
                    ) from exc
                if status is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise CoordctlError(
                        f"the coordinator at {address} did not answer {method} within "
                        f"{render.duration(timeout)}",
                        EXIT_UNREACHABLE,
                        "timeout",
                    ) from exc
                name = status.name if status is not None else "error"
                raise CoordctlError(
                    f"the coordinator at {address} failed {method}: {name}: {details_of(exc)}",
                    EXIT_ERROR,
                    "error",
                ) from exc
        raise CoordctlError(
            "cannot reach coordinator at "
            + "; ".join(unreachable)
            + ": is it running? start a local cluster with `coordctl dev up` or pass "
            "--coordinator (or set HOTFLEET_COORDINATOR)",
            EXIT_UNREACHABLE,
            "unreachable",
        )


def trailing_metadata(exc: grpc.RpcError) -> list[tuple[str, str]]:
    get = getattr(exc, "trailing_metadata", None)
    try:
        items = get() if get else None
    except Exception:
        items = None
    out = []
    for key, value in items or ():
        out.append((key, value.decode("utf-8", "replace") if isinstance(value, bytes) else value))
    return out


def status_code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    get = getattr(exc, "code", None)
    return get() if get else None


def details_of(exc: grpc.RpcError) -> str:
    get = getattr(exc, "details", None)
    return str((get() if get else "") or "")


def error_dict(e: Any) -> dict[str, Any]:
    reason = getattr(e, "reason", "")
    return {
        "node": getattr(e, "node", ""),
        "module": getattr(e, "module", ""),
        "reason": getattr(reason, "value", reason),
        "detail": getattr(e, "detail", ""),
    }


def no_bundle(path: str) -> CoordctlError:
    """The one answer to a bundle path that is not there, whichever verb was given it."""
    return CoordctlError(
        f"no release bundle at {path} (a directory, .tar.gz or .zip with release.toml; "
        "a pushed release is NAME@VERSION)",
        EXIT_USAGE,
        "usage",
    )


def push_request(
    path: str, sign_key: str | None = None, fleet: str | None = None
) -> tuple[coordinator_pb2.PushReleaseRequest, str]:
    """Read a bundle (and sign it) and build the push; refuses locally what cannot be sent."""
    from hotfleet.errors import HotfleetError
    from hotfleet.release import Release
    from hotfleet.wire import manifest_to_proto

    if not os.path.exists(path):
        raise no_bundle(path)
    try:
        release = Release.from_path(path)
    except HotfleetError as exc:
        raise CoordctlError(
            f"cannot read the release bundle {path}",
            EXIT_REFUSED,
            "invalid",
            [error_dict(e) for e in exc.errors],
        ) from exc
    except OSError as exc:
        raise CoordctlError(
            f"cannot read the release bundle {path}: {exc}", EXIT_USAGE, "usage"
        ) from exc
    sources: dict[str, bytes] = {}
    for item in release.data:
        sources.setdefault(item.digest, item.content)
    for module in release.modules:
        known = sources.setdefault(module.digest, module.source)
        if known != module.source:
            raise CoordctlError(
                f"{path}: two modules declare digest {module.digest[:12]}… with different bytes",
                EXIT_REFUSED,
                "invalid",
                [
                    {
                        "node": "",
                        "module": module.name,
                        "reason": "digest_mismatch",
                        "detail": f"{module.path} does not match its declared sha256",
                    }
                ],
            )
    request = coordinator_pb2.PushReleaseRequest(
        release=manifest_to_proto(release.to_manifest()),
        sources=sources,
        problems=[
            common_pb2.ModuleError(module=p.module, reason=p.reason.value, detail=p.detail)
            for p in release.problems
        ],
    )
    if sign_key:
        from hotfleet.signing import DEFAULT_FLEET, load_private_key, sign_release

        try:
            signature_hex, signer = sign_release(
                release.digest,
                load_private_key(sign_key),
                release=release.label,
                fleet=fleet or DEFAULT_FLEET,
            )
        except (OSError, ValueError) as exc:
            raise CoordctlError(f"cannot sign with {sign_key}: {exc}", EXIT_USAGE, "usage") from exc
        request.release.signature = bytes.fromhex(signature_hex)
        request.release.signer = signer
    return request, release.label
