"""The agent's gRPC face: the ``hotfleet.v1.NodeAgent`` servicer and the server that serves it.

Why its own module: what goes on the wire (ports, TLS, who may call what,
message size limits, the address other nodes are told) is apart from what
the node does with a request.

:class:`FencedServicer`
    Every mutating RPC is fenced first (``fence(epoch)``; a refusal is
    ``FAILED_PRECONDITION``), then handed to the agent's operation.  It
    serves anything shaped like :class:`ServicerTarget`: the
    :class:`~node_agent.agent.Agent`, and the scale benchmark's simulated
    agents (``benchmarks/_simagent.py``, as ``node_agent.agent._Servicer``).
:class:`AgentServer`
    Owns the ``grpc.Server`` and its thread pool: built, bound and started by
    :meth:`~AgentServer.start` (which learns the address to advertise),
    stopped by :meth:`~AgentServer.stop` (called by
    :meth:`Agent.stop <node_agent.agent.Agent.stop>`).  With TLS, mutating
    RPCs are taken only from certificates with the ``coordinator`` role
    (:func:`hotfleet.tls.agent_guard`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import grpc

from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc
from hotfleet.limits import MAX_PREPARE_MESSAGE_BYTES
from hotfleet.tls import TLSFiles, agent_guard

__all__ = ["AgentServer", "FencedServicer", "ServicerTarget", "join_host_port"]

log = logging.getLogger("node_agent.agent")


class ServicerTarget(Protocol):
    """What :class:`FencedServicer` calls."""

    node_id: str

    def fence(self, epoch: int) -> str | None: ...
    def prepare(self, request: agent_pb2.PrepareRequest) -> agent_pb2.PrepareReply: ...
    def unpack(self, request: agent_pb2.PrepareRequest) -> agent_pb2.PrepareReply: ...
    def finish(self, request: agent_pb2.FinishRequest) -> agent_pb2.FinishReply: ...
    def abort(self, request: agent_pb2.AbortRequest) -> agent_pb2.AbortReply: ...
    def rollback(self, request: agent_pb2.RollbackRequest) -> agent_pb2.RollbackReply: ...
    def make_permanent(
        self, request: agent_pb2.MakePermanentRequest
    ) -> agent_pb2.MakePermanentReply: ...
    def status(self) -> agent_pb2.StatusReply: ...
    def module_status(self, modules: Sequence[str]) -> agent_pb2.ModuleStatusReply: ...
    def health(self) -> agent_pb2.HealthReply: ...


class FencedServicer(agent_pb2_grpc.NodeAgentServicer):
    """The gRPC face of an agent: fencing, then the agent's operation."""

    def __init__(self, agent: ServicerTarget) -> None:
        self.agent = agent

    def _fenced(self, epoch: int, context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        refusal = self.agent.fence(epoch)
        if refusal is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        return call()

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.prepare(request))

    def Unpack(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.unpack(request))

    def Finish(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.finish(request))

    def Abort(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.abort(request))

    def Rollback(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.rollback(request))

    def MakePermanent(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.make_permanent(request))

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.agent.status()

    def ModuleStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return self.agent.module_status(list(request.modules))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.agent.node_id}: {exc}")

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.agent.health()


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AgentServer:
    """A NodeAgent gRPC server on ``listen``, told to others as ``advertise_host`` (default:
    the listen host, or this host's name for a wildcard), with mutual ``tls`` unless None."""

    def __init__(
        self,
        node_id: str,
        *,
        listen: str = "127.0.0.1:0",
        advertise_host: str | None = None,
        tls: TLSFiles | None = None,
        workers: int = 8,
    ) -> None:
        self.node_id = node_id
        self.listen = listen
        self.advertise_host = advertise_host
        self.tls = tls
        self.workers = workers
        self.address = ""  # host:port once started
        self._server: grpc.Server | None = None

    def advertised(self, host: str) -> str:
        """The name other nodes reach ``host`` by."""
        if self.advertise_host:
            return self.advertise_host
        if host in ("0.0.0.0", "::", ""):
            return socket.getfqdn()
        return host

    def start(self, servicer: agent_pb2_grpc.NodeAgentServicer) -> str:
        """Bind and serve ``servicer``; returns the advertised ``host:port``."""
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hotfleet-grpc"),
            options=[
                ("grpc.so_reuseport", 0),
                # Stated, not inherited: a larger request is refused by gRPC
                # itself (RESOURCE_EXHAUSTED) before it is decoded.
                ("grpc.max_receive_message_length", MAX_PREPARE_MESSAGE_BYTES),
            ],
            # With TLS, who may call what comes from the client certificate's role
            # (hotfleet.tls.AGENT_POLICY): only coordinators change code here.
            interceptors=[agent_guard()] if self.tls is not None else [],
        )
        agent_pb2_grpc.add_NodeAgentServicer_to_server(servicer, server)
        if self.tls is not None:
            port = server.add_secure_port(self.listen, self.tls.server_credentials())
        else:
            port = server.add_insecure_port(self.listen)
        host = self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
        self.address = join_host_port(self.advertised(host), port)
        server.start()
        self._server = server
        log.info("node agent %s: gRPC NodeAgent on %s", self.node_id, self.address)
        if self.tls is None:
            log.warning(
                "!!! DEV MODE: node agent %s serves gRPC on %s WITHOUT TLS OR AUTHENTICATION; "
                "anyone who can reach it can load code into this process. Never use in production.",
                self.node_id,
                self.address,
            )
        return self.address

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds); a no-op if not serving."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait(grace + 1)
