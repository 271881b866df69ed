"""The fleet as the coordinator sees it: membership records and gRPC stubs to agents."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from coordinator.transport import TransportError
from hotfleet._proto.hotfleet.v1 import agent_pb2_grpc
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.tls import TLSFiles

_DERIVED = frozenset({"desired_release", "convergence", "convergence_detail"})


@dataclass
class NodeInfo:
    """One registered agent, from its membership key."""

    node_id: str
    address: str = ""
    http_address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    current_release: str = ""
    previous_release: str = ""
    permanent_release: str = ""
    state: str = ""
    epoch_seen: int = 0
    pid: int = 0
    started_at: float = 0.0
    replaces: int = 0  # pid of the process before it that stopped on purpose (a recycle)
    # filled in by the engine (coordinator.convergence), not by the agent
    desired_release: str = ""
    convergence: str = ""  # converged | catching_up | drifting
    convergence_detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, raw: bytes) -> NodeInfo:
        d = json.loads(raw)
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in _DERIVED}
        return cls(**known)


@dataclass
class Target:
    """Which nodes a rollout is for: all, named ones, or a label selector."""

    all: bool = False
    nodes: list[str] = field(default_factory=list)
    selector: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.nodes:
            return "nodes " + ",".join(self.nodes)
        if self.selector:
            return "selector " + ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))
        return "all nodes"


def read_nodes(client: EtcdClient, keys: Keys) -> list[NodeInfo]:
    nodes = []
    for raw, _meta in client.get_prefix(keys.nodes):
        try:
            nodes.append(NodeInfo.from_record(raw))
        except (ValueError, TypeError):
            continue  # a malformed record is not a node we can drive
    return sorted(nodes, key=lambda n: n.node_id)


def select(nodes: list[NodeInfo], target: Target) -> tuple[list[NodeInfo], list[str]]:
    """``(selected, missing)``: named nodes that are not registered are *missing*."""
    if target.nodes:
        by_id = {n.node_id: n for n in nodes}
        return [by_id[n] for n in target.nodes if n in by_id], [
            n for n in target.nodes if n not in by_id
        ]
    if target.selector:
        chosen = [n for n in nodes if all(n.labels.get(k) == v for k, v in target.selector.items())]
        return chosen, []
    return list(nodes), []


# The coordinator presents one certificate (role coordinator) to agents and to coordctl.
ClientTLS = TLSFiles


class AgentPool:
    """One cached channel and stub per agent address; closed together.

    The stub is cached too: building one makes a callable per RPC of the
    service, which cost more coordinator CPU than the call itself in a
    1000-node fan-out (issue 17).
    """

    def __init__(self, tls: ClientTLS | None = None) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, agent_pb2_grpc.NodeAgentStub] = {}
        self._closed = False

    def stub(self, address: str) -> agent_pb2_grpc.NodeAgentStub:
        stub = self._stubs.get(address)
        if stub is not None:
            return stub
        with self._lock:
            if self._closed:  # stopping: an RPC fails at once, never waits out its deadline
                return _Closed()  # type: ignore[return-value]
            channel = self._channels.get(address)
            if channel is None:
                options = [
                    ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ]
                channel = (
                    grpc.secure_channel(address, self._tls.credentials(), options)
                    if self._tls
                    else grpc.insecure_channel(address, options)
                )
                self._channels[address] = channel
            stub = self._stubs[address] = agent_pb2_grpc.NodeAgentStub(channel)
            return stub

    def close(self) -> None:
        """Close every channel (their RPCs in flight end as CANCELLED) and open no new one."""
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
            self._stubs = {}
        for channel in channels:
            channel.close()


class _Closed:
    """The stub of a closed pool: every RPC fails as CANCELLED, at once."""

    def __getattr__(self, rpc: str) -> Any:
        if not rpc[:1].isupper():
            raise AttributeError(rpc)

        def call(request: Any, timeout: float | None = None) -> Any:
            raise TransportError(grpc.StatusCode.CANCELLED, "the coordinator is stopping")

        return call
