"""Unpacking a pushed release on every node, ahead of its rollout (OTP's ``unpack_release``).

Why: a rollout's prepare phase is where a fleet's hosts are busiest (every
worker of a host fetching, parsing, compiling and planning at the same
instant, beside serving), and what it computes from the sources alone does
not need to wait for the rollout.  After ``coordctl release push`` the
leader asks every node to *unpack* the release (``NodeAgent.Unpack``): the
node fetches and verifies it like a Prepare, keeps its sources, and one
worker per host compiles and plans it into the host's code cache, at a
lower CPU priority; nothing is staged and nothing of the release runs.  The
rollout's Prepare then finds that work done.  The replies say per node what
was done and why not (already runs it, a sibling did it, a prepare was in
progress, what a Prepare would refuse), so the operator sees a bad release
before rolling it out.

Best effort by design: a node that is down, slow or refuses just prepares
from scratch later.  Fenced like every mutating call (the leader's epoch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import grpc

from coordinator.fleet import NodeInfo
from coordinator.twophase import fan_out, rpc_detail
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.wire import manifest_to_proto

__all__ = ["UNPACK_TIMEOUT_S", "NodeUnpack", "unpack_on"]

UNPACK_TIMEOUT_S = 30.0  # one node's unpack: a slow node is reported, never waited for longer


@dataclass(frozen=True)
class NodeUnpack:
    """One node's answer: ``done`` False says why not in ``detail`` (and ``errors``)."""

    node: str
    done: bool
    detail: str
    seconds: float
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def unpack_on(
    nodes: list[NodeInfo],
    stub: Any,
    entry: Any,
    epoch: int,
    *,
    concurrency: int = 32,
    timeout_s: float = UNPACK_TIMEOUT_S,
) -> list[NodeUnpack]:
    """Ask each of ``nodes`` to unpack the release of store ``entry``; their answers, by node.

    ``stub(address)`` is the agent stub (:class:`coordinator.transport.Transport`).
    """
    message = manifest_to_proto(dict(entry.manifest))
    message.signature = bytes.fromhex(entry.signature)
    message.signer = entry.signer
    request = agent_pb2.PrepareRequest(epoch=epoch, release=message)
    out: dict[str, NodeUnpack] = {}

    def one(node: NodeInfo) -> None:
        if not node.address:
            out[node.node_id] = NodeUnpack(node.node_id, False, "no address registered", 0.0)
            return
        try:
            reply = stub(node.address).Unpack(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            out[node.node_id] = NodeUnpack(node.node_id, False, rpc_detail(exc), 0.0)
            return
        errors = tuple(f"{e.module}: {e.reason}: {e.detail}" for e in reply.errors)
        detail = "; ".join(reply.warnings) or ("unpacked" if reply.ok else "not unpacked")
        out[node.node_id] = NodeUnpack(node.node_id, reply.ok, detail, reply.prepare_s, errors)

    fan_out(one, nodes, concurrency)
    return [out[n.node_id] for n in nodes]
