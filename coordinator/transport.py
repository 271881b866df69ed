"""How the coordinator reaches node agents: an interface, over gRPC or in process.

The engine, the convergence loop and the health sampler only ever call
``transport.stub(address).<Rpc>(request, timeout=...)`` and handle
``grpc.RpcError``.  :class:`coordinator.fleet.AgentPool` is the gRPC
implementation (one channel per agent); :class:`InProcessTransport`
delivers the same messages to participants living in the coordinator's own
process, so the 2PC can be driven deterministically, in milliseconds, with
a fault injected before or after any step of any node (a lost request, a
lost reply, a node that restarts), beside the tests that use real processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc

from hotfleet._proto.hotfleet.v1 import agent_pb2

__all__ = [
    "AgentStub",
    "Fault",
    "InProcessNode",
    "InProcessTransport",
    "Transport",
    "TransportError",
]


class AgentStub(Protocol):
    """What a ``hotfleet.v1.NodeAgent`` stub offers (the generated one satisfies it)."""

    def Prepare(self, request: Any, timeout: float | None = ...) -> Any: ...
    def Unpack(self, request: Any, timeout: float | None = ...) -> Any: ...
    def Finish(self, request: Any, timeout: float | None = ...) -> Any: ...
    def Abort(self, request: Any, timeout: float | None = ...) -> Any: ...
    def Rollback(self, request: Any, timeout: float | None = ...) -> Any: ...
    def MakePermanent(self, request: Any, timeout: float | None = ...) -> Any: ...
    def Status(self, request: Any, timeout: float | None = ...) -> Any: ...
    def ModuleStatus(self, request: Any, timeout: float | None = ...) -> Any: ...
    def Health(self, request: Any, timeout: float | None = ...) -> Any: ...


class Transport(Protocol):
    def stub(self, address: str) -> AgentStub: ...

    def close(self) -> None: ...


class TransportError(grpc.RpcError):
    """An RPC that failed in process, shaped like gRPC's (``code()``, ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InProcessNode(Protocol):
    """A node served in process: the agent's RPC handlers, by snake-case name.

    ``fence(epoch)`` returns a refusal message for an epoch the node must
    not obey (``FAILED_PRECONDITION``), None to go on.
    """

    def fence(self, epoch: int) -> str | None: ...

    def prepare(self, request: Any) -> Any: ...
    def finish(self, request: Any) -> Any: ...
    def abort(self, request: Any) -> Any: ...
    def rollback(self, request: Any) -> Any: ...
    def make_permanent(self, request: Any) -> Any: ...
    def status(self) -> Any: ...
    def health(self) -> Any: ...


@dataclass(frozen=True)
class Fault:
    """Where a call fails: ``before`` (the node never sees it) or ``after`` (its reply is lost).

    ``then`` runs when the fault fires (e.g. restart the node), with the
    node's address; a fault fires ``times`` times, then the call goes through.
    ``match(request)``, when given, limits it to the requests it accepts
    (e.g. only a rollback's Prepare).
    """

    rpc: str  # "Prepare", "Finish", ...
    when: str = "before"
    times: int = 1
    then: Callable[[str], None] | None = None
    match: Callable[[Any], bool] | None = None


_MUTATING = {
    "Prepare": "prepare",
    "Unpack": "unpack",
    "Finish": "finish",
    "Abort": "abort",
    "Rollback": "rollback",
    "MakePermanent": "make_permanent",
}


class InProcessTransport:
    """Delivers RPCs to :class:`InProcessNode` objects by address, with injected faults.

    A node that is not registered (or was :meth:`remove`\\ d: it is down)
    answers ``UNAVAILABLE`` like an unreachable agent.  ``calls`` records
    every delivered call as ``(address, rpc, rollout_id)`` in order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, InProcessNode] = {}
        self._faults: dict[str, list[Fault]] = {}
        self.calls: list[tuple[str, str, str]] = []

    def add(self, address: str, node: InProcessNode) -> None:
        with self._lock:
            self._nodes[address] = node

    def remove(self, address: str) -> None:
        with self._lock:
            self._nodes.pop(address, None)

    def inject(self, address: str, fault: Fault) -> None:
        with self._lock:
            self._faults.setdefault(address, []).append(fault)

    def stub(self, address: str) -> AgentStub:
        return _Stub(self, address)

    def close(self) -> None:
        with self._lock:
            self._nodes.clear()
            self._faults.clear()

    def _fault(self, address: str, rpc: str, when: str, request: Any) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults.get(address, [])):
                if fault.rpc != rpc or fault.when != when:
                    continue
                if fault.match is not None and not fault.match(request):
                    continue
                if fault.times <= 1:
                    del self._faults[address][i]
                else:
                    self._faults[address][i] = replace(fault, times=fault.times - 1)
                return fault
        return None

    def _fire(self, address: str, rpc: str, when: str, request: Any) -> None:
        fault = self._fault(address, rpc, when, request)
        if fault is None:
            return
        if fault.then is not None:
            fault.then(address)
        raise TransportError(grpc.StatusCode.UNAVAILABLE, f"injected: {rpc} {when} at {address}")

    def call(self, address: str, rpc: str, request: Any) -> Any:
        self._fire(address, rpc, "before", request)
        with self._lock:
            node = self._nodes.get(address)
        if node is None:
            raise TransportError(grpc.StatusCode.UNAVAILABLE, f"{address} is down")
        if rpc in _MUTATING:
            refusal = node.fence(int(request.epoch))
            if refusal is not None:
                raise TransportError(grpc.StatusCode.FAILED_PRECONDITION, refusal)
            with self._lock:
                self.calls.append((address, rpc, str(request.rollout_id)))
            reply = getattr(node, _MUTATING[rpc])(request)
        elif rpc == "Status":
            reply = node.status()
        elif rpc == "Health":
            reply = node.health()
        else:
            raise TransportError(grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not served in process")
        self._fire(address, rpc, "after", request)
        return reply


class _Stub:
    def __init__(self, transport: InProcessTransport, address: str) -> None:
        self._transport = transport
        self._address = address

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        if not rpc[:1].isupper():
            raise AttributeError(rpc)

        def call(request: Any, timeout: float | None = None) -> Any:
            return self._transport.call(self._address, rpc, request)

        return call


def empty_health() -> agent_pb2.HealthReply:
    """A Health reply with no traffic (in-process nodes that serve none)."""
    return agent_pb2.HealthReply()
