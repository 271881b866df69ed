"""The ``hotfleet.v1.Coordinator`` gRPC service: a thin mapping onto :class:`Engine`.

Every RPC is one engine call.  Requests arrive as typed messages; replies carry
the engine's records as JSON (see ``proto/hotfleet/v1/coordinator.proto`` for
why).  Refusals keep their stable code so ``coordctl`` and scripts can branch
on it:

=============  =====================  ==========================================
refusal code   gRPC status            meaning
=============  =====================  ==========================================
busy           FAILED_PRECONDITION    another rollout is in progress
not_found      NOT_FOUND              no such release / rollout / node
exists         ALREADY_EXISTS         label already pushed with other content
invalid        INVALID_ARGUMENT       malformed request or release
no_targets     INVALID_ARGUMENT       the target matches no registered node
not_leader     UNAVAILABLE            ask the leader (``hotfleet-leader`` metadata)
unavailable    UNAVAILABLE            etcd / leader not reachable right now
quota          RESOURCE_EXHAUSTED     the push would pass a content-store limit
=============  =====================  ==========================================

Every refusal carries trailing metadata ``hotfleet-refusal`` (the code) and,
for ``not_leader``, ``hotfleet-leader`` (the leader's API address, possibly
empty while an election is in progress).  Anything else the engine raises is
``INTERNAL`` with the exception's message (and is logged with its traceback
here, never sent to the client).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from hotfleet import transient
from hotfleet._proto.hotfleet.v1 import coordinator_pb2, coordinator_pb2_grpc
from hotfleet.errors import HotfleetError, ModuleError, Reason
from hotfleet.limits import MAX_MODULES
from hotfleet.protocol import LEADER_KEY, REFUSAL_KEY, Refusal
from hotfleet.release import Release
from hotfleet.tls import TLSFiles, coordinator_guard
from hotfleet.wire import manifest_from_proto

if TYPE_CHECKING:
    from coordinator.engine import Engine, RolloutOptions, Target

log = logging.getLogger("hotfleet.coordinator.service")

__all__ = [
    "MAX_MESSAGE_BYTES",
    "REFUSAL_STATUS",
    "CoordinatorServicer",
    "serve",
]

#: The gRPC status each refusal travels with.
REFUSAL_STATUS: dict[Refusal, grpc.StatusCode] = {
    Refusal.BUSY: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Refusal.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.NO_TARGETS: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.DOWNGRADE: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.NOT_LEADER: grpc.StatusCode.UNAVAILABLE,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Refusal.QUOTA: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# A release push carries every source; keep well above any sane bundle.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC's default limit on received metadata is 8 KiB, and the status message
# travels in the trailers: keep messages comfortably below it.
_MAX_MESSAGE_CHARS = 3000
# An API request rides out an etcd outage for at most this long (less when the
# client's deadline is nearer), then answers "etcd unreachable".
REQUEST_RETRY_S = 10.0

R = TypeVar("R")


def _clip(text: str) -> str:
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) <= _MAX_MESSAGE_CHARS:
        return text
    return text[: _MAX_MESSAGE_CHARS - 40] + f" … ({len(text)} characters, clipped)"


def _refuse(context: grpc.ServicerContext, code: Refusal, message: str, leader: str = "") -> None:
    metadata: list[tuple[str, str]] = [(REFUSAL_KEY, str(code))]
    if code is Refusal.NOT_LEADER:
        metadata.append((LEADER_KEY, leader))
    context.set_trailing_metadata(metadata)
    context.abort(REFUSAL_STATUS[code], _clip(message))


def _retry_budget(context: grpc.ServicerContext) -> float:
    """Seconds etcd retries may take while answering: the client's deadline minus a margin."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e6:  # no deadline
        return REQUEST_RETRY_S
    return max(0.0, min(REQUEST_RETRY_S, remaining - 2.0))


def _refuse_cause(
    context: grpc.ServicerContext, address: str, method: str, exc: BaseException
) -> None:
    """An etcd (or agent) failure as a refusal naming it: unreachable, timed out, quota full."""
    code = Refusal.QUOTA if transient.is_quota(exc) else Refusal.UNAVAILABLE
    _refuse(
        context,
        code,
        f"the coordinator at {address} could not answer {method}: {transient.describe(exc)}",
    )


def _rpc(method: Callable[..., R]) -> Callable[..., R]:
    """Translate engine exceptions into gRPC statuses; never leak a traceback."""

    @functools.wraps(method)
    def wrapper(self: CoordinatorServicer, request: Any, context: grpc.ServicerContext) -> R:
        try:
            # etcd retries give up before the client's deadline, so it hears the cause
            with transient.request_budget(_retry_budget(context)):
                return method(self, request, context)
        except HotfleetError as exc:
            code = getattr(exc, "code", None)
            if isinstance(code, Refusal):  # engine.Refused
                _refuse(context, code, str(exc), str(getattr(exc, "leader", "") or ""))
            else:
                _refuse(context, Refusal.INVALID, str(exc))
            raise AssertionError("unreachable: context.abort raises") from exc
        except grpc.RpcError as exc:
            if context.code() is not None:
                raise  # context.abort's own exception
            _refuse_cause(context, self.engine.address, method.__name__, exc)
            raise AssertionError("unreachable: context.abort raises") from exc
        except Exception as exc:
            if transient.is_transient(exc) or transient.is_quota(exc):
                _refuse_cause(context, self.engine.address, method.__name__, exc)
            log.exception("%s failed", method.__name__)
            context.abort(
                grpc.StatusCode.INTERNAL,
                _clip(f"coordinator error in {method.__name__}: {type(exc).__name__}: {exc}"),
            )
            raise AssertionError("unreachable: context.abort raises") from exc

    return wrapper


def _dumps(record: Any) -> str:
    data = record.to_json() if hasattr(record, "to_json") else record
    return json.dumps(data, sort_keys=True, default=str)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """``hotfleet.v1.Coordinator`` on top of an :class:`Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---------------------------------------------------------------- replies
    def _one(self, record: Any) -> coordinator_pb2.RecordReply:
        return coordinator_pb2.RecordReply(
            record_json=_dumps(record),
            coordinator=self.engine.address,
            leader=self.engine.is_leader(),
        )

    def _many(self, records: Iterable[Any]) -> coordinator_pb2.RecordsReply:
        return coordinator_pb2.RecordsReply(
            records_json=[_dumps(r) for r in records],
            coordinator=self.engine.address,
            leader=self.engine.is_leader(),
        )

    # ---------------------------------------------------------------- reads
    @_rpc
    def Nodes(self, request: Any, context: grpc.ServicerContext) -> coordinator_pb2.RecordsReply:
        return self._many(self.engine.fleet())

    @_rpc
    def ListReleases(
        self, request: Any, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordsReply:
        return self._many(self.engine.releases())

    @_rpc
    def ShowRelease(
        self, request: coordinator_pb2.ShowReleaseRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        _check_ref(request.ref)
        return self._one(self.engine.release(request.ref))

    @_rpc
    def UnpackRelease(
        self, request: coordinator_pb2.UnpackReleaseRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        _check_ref(request.ref)
        return self._one(self._unpacked(request.ref, {"release": request.ref}))

    def _unpacked(self, ref: str, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with every node's answer to an unpack of ``ref``."""
        return {**record, "unpacked": [u.to_json() for u in self.engine.unpack_release(ref)]}

    @_rpc
    def RemoveRelease(
        self, request: coordinator_pb2.RemoveReleaseRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        _check_ref(request.ref)
        collected = self.engine.remove_release(request.ref)
        return self._one({"release": request.ref, "collected": collected})

    @_rpc
    def GetRollout(
        self, request: coordinator_pb2.GetRolloutRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        return self._one(self.engine.rollout(request.rollout_id or None))

    @_rpc
    def ListRollouts(
        self, request: coordinator_pb2.ListRolloutsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordsReply:
        return self._many(self.engine.rollouts(limit=request.limit or 50))

    @_rpc
    def Modules(
        self, request: coordinator_pb2.FleetModulesRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordsReply:
        return self._many(self.engine.module_status(request.node or None))

    # ---------------------------------------------------------------- writes
    @_rpc
    def PushRelease(
        self, request: coordinator_pb2.PushReleaseRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        release = release_from_push(request)
        signature = request.release.signature.hex()
        entry = self.engine.push_release(
            release, signature=signature, signer=request.release.signer
        )
        if not request.unpack:
            return self._one(entry)
        return self._one(self._unpacked(entry.label, entry.to_json()))

    @_rpc
    def Upgrade(
        self, request: coordinator_pb2.UpgradeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        _check_ref(request.ref)
        target = _target(request.target, require=True)
        return self._one(self.engine.upgrade(request.ref, target, _options(request.options)))

    @_rpc
    def Rollback(
        self, request: coordinator_pb2.FleetRollbackRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        target = _target(request.target, require=False)
        return self._one(
            self.engine.rollback(target, request.to_version or None, _options(request.options))
        )

    @_rpc
    def Abort(
        self, request: coordinator_pb2.AbortRolloutRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        return self._one(self.engine.abort(request.rollout_id or None))

    @_rpc
    def Promote(
        self, request: coordinator_pb2.PromoteRolloutRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RecordReply:
        return self._one(self.engine.promote(request.rollout_id or None))


class _Invalid(HotfleetError):
    code = "invalid"


def _invalid(message: str, errors: Iterable[ModuleError] = ()) -> _Invalid:
    errors = list(errors) or [ModuleError("*", Reason.BAD_RELEASE, message)]
    return _Invalid(errors, message)


def _check_ref(ref: str) -> None:
    name, sep, version = ref.partition("@")
    if not (name and sep and version):
        raise _invalid(f"release reference must be NAME@VERSION, got {ref!r}")


def _target(message: coordinator_pb2.Target, *, require: bool) -> Target:
    from coordinator.engine import Target

    given = sum([message.all, bool(message.nodes), bool(message.selector)])
    if given > 1:
        raise _invalid("give exactly one target: all nodes, named nodes or a label selector")
    if require and given == 0:
        raise _invalid("no target: give all nodes, named nodes or a label selector")
    return Target(all=message.all, nodes=list(message.nodes), selector=dict(message.selector))


def _options(message: coordinator_pb2.RolloutOptions) -> RolloutOptions:
    from coordinator.engine import RolloutOptions

    options = RolloutOptions(
        dry_run=message.dry_run,
        allow_missing=message.allow_missing,
        force=message.force,
        allow_downgrade=message.allow_downgrade,
    )
    if message.timeout_s < 0 or message.window_s < 0:
        raise _invalid("timeout and window must not be negative")
    if message.timeout_s:
        options.timeout_s = message.timeout_s
    if message.concurrency:
        options.concurrency = message.concurrency
    if message.has_window_s and hasattr(options, "window_s"):
        options.window_s = message.window_s
    options.waves = list(message.waves)
    options.health = dict(message.health)
    return options


def release_from_push(request: coordinator_pb2.PushReleaseRequest) -> Release:
    """Rebuild the operator's :class:`Release` from a push, refusing what does not add up."""
    try:
        manifest = manifest_from_proto(request.release)
    except ValueError as exc:
        raise _invalid(f"release manifest has malformed JSON fields: {exc}") from exc
    manifest["problems"] = [
        {"module": p.module, "reason": p.reason, "detail": p.detail} for p in request.problems
    ]
    if len(request.sources) > MAX_MODULES:
        raise _invalid(
            f"the push carries {len(request.sources)} sources, more than the {MAX_MODULES}"
            " modules a release may hold"
        )
    sources = dict(request.sources)
    declared = {m["digest"] for m in manifest["modules"]} | {
        d["digest"] for d in manifest.get("data", [])
    }
    missing = sorted(declared - sources.keys())
    if missing:
        raise _invalid(
            f"release {request.release.name}@{request.release.version}: the push carries no "
            f"source for {len(missing)} module digest(s): {', '.join(d[:12] for d in missing)}"
        )
    try:
        return Release.from_manifest(manifest, sources.__getitem__)
    except HotfleetError as exc:
        raise _invalid(f"release is malformed: {exc}", exc.errors) from exc


def serve(
    engine: Engine,
    listen: str,
    *,
    dev: bool = False,
    tls: TLSFiles | None = None,
    max_workers: int = 16,
) -> tuple[grpc.Server, str]:
    """Start the Coordinator API on ``listen`` (port 0: any free one).

    Returns the started server and the bound ``host:port``.  Without ``tls``
    it refuses to start unless ``dev`` asks for an insecure setup: this API
    can push code into every worker of the fleet.
    """
    if tls is None and not dev:
        raise ValueError(
            "refusing to serve the coordinator API without mutual TLS: anyone who reaches it "
            "can load code into every worker. Give TLS files, or dev mode for an insecure "
            "development setup"
        )
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hotfleet-coord-api"),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
        # With TLS, operators drive and readers read (hotfleet.tls.COORDINATOR_POLICY).
        interceptors=[coordinator_guard()] if tls is not None else [],
    )
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(engine), server)
    if tls is not None:
        port = server.add_secure_port(listen, tls.server_credentials())
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    host = listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
    bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server.start()
    if tls is None:
        log.warning(
            "!!! DEV MODE: coordinator API on %s WITHOUT TLS OR AUTHENTICATION; anyone who can "
            "reach it can load code into every worker. Never use in production.",
            bound,
        )
    return server, bound
