"""What a node says about itself: Status, ModuleStatus, Health, its membership record, Prometheus.

Why its own module: every way the node is observed (the coordinator's RPCs,
the membership record in etcd, ``/-/metrics``) reads the same facts (who the
node is, what it runs, its 2PC state, the epoch it obeys, its request
metrics and changed-code coverage) and changes nothing; keeping them
together keeps the answers consistent with each other and out of the code
that changes state.

:class:`NodeCard`
    Who the node is: id, labels, addresses (the gRPC one filled in when the
    server starts, the app's set by whoever serves it), start time, whether
    it is secure and which signing keys it trusts.
:class:`Reports`
    The answers, built from the card, the loader, the metrics, the
    participant, the fence and the membership (for ``etcd_unreachable``).
    It owns nothing that runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.limits import MAX_MODULES
from hotfleet.release import is_module_name
from node_agent.coverage import health_fields, prometheus_lines
from node_agent.fence import Fence
from node_agent.metrics import Metrics
from node_agent.participant import Participant, State, label

if TYPE_CHECKING:
    from node_agent.loader import Loader
    from node_agent.membership import Membership

__all__ = ["NodeCard", "Reports"]

ETCD_UNREACHABLE = "etcd_unreachable"


@dataclass
class NodeCard:
    """Who this node is, as Status and its membership record say."""

    node_id: str
    labels: dict[str, str] = field(default_factory=dict)
    secure: bool = False  # mutual TLS on the gRPC API
    trusted_keys: Sequence[str] = ()  # release-signing key ids
    address: str = ""  # gRPC host:port once started
    http_address: str = ""  # the app's, "" if none
    started_at: float = field(default_factory=time.time)  # unix seconds


class Reports:
    """The node's answers about itself; ``membership()`` is None without etcd."""

    def __init__(
        self,
        card: NodeCard,
        loader: Loader,
        metrics: Metrics,
        participant: Participant,
        fence: Fence,
        membership: Callable[[], Membership | None],
    ) -> None:
        self.card = card
        self.loader = loader
        self.metrics = metrics
        self.participant = participant
        self.fence = fence
        self._membership = membership

    @property
    def etcd_connected(self) -> bool:
        membership = self._membership()
        return membership is not None and membership.connected

    @property
    def state(self) -> str:
        """What Status reports: the participant's state, or ``etcd_unreachable`` while cut off."""
        membership = self._membership()
        cut_off = membership is not None and not membership.connected
        state = self.participant.state
        if cut_off and state not in (State.STOPPING, State.RECONCILING):
            return ETCD_UNREACHABLE
        return str(state)

    def status(self) -> agent_pb2.StatusReply:
        return agent_pb2.StatusReply(
            node_id=self.card.node_id,
            state=self.state,
            current_release=label(self.loader.current_release),
            previous_release=label(self.loader.previous_release),
            permanent_release=label(self.loader.permanent_release),
            labels=self.card.labels,
            epoch_seen=self.fence.epoch,
            prepared_rollout=self.participant.prepared_rollout,
        )

    def module_status(self, modules: Sequence[str]) -> agent_pb2.ModuleStatusReply:
        """What each named module (default: every known one) runs against its source on disk.

        Only dotted module names are answered: the digest lookup maps a name
        to a file under the code paths, and a path or ``..`` in a "name"
        would make it a way to hash any ``*.py`` on the host.  Raises
        ``ValueError`` naming the first bad name.
        """
        if len(modules) > MAX_MODULES:
            raise ValueError(f"{len(modules)} module names asked for, more than {MAX_MODULES}")
        for name in modules:
            if not is_module_name(name):
                raise ValueError(
                    f"{name[:200]!r} is not a dotted module name (ASCII identifiers joined by .)"
                )
        names = list(modules) or self.loader.loaded_modules()
        out = []
        for name in names:
            s = self.loader.status(name)
            out.append(
                agent_pb2.ModuleState(
                    module=s.module,
                    state=s.state.value,
                    release=s.release,
                    loaded_digest=s.loaded_digest,
                    disk_digest=s.disk_digest,
                )
            )
        return agent_pb2.ModuleStatusReply(modules=out)

    def health(self) -> agent_pb2.HealthReply:
        s = self.metrics.snapshot()
        return agent_pb2.HealthReply(
            requests=s.requests,
            errors=s.errors,
            latency_bounds_s=list(s.latency_bounds_s),
            latency_counts=list(s.latency_counts),
            cpu_s=s.cpu_s,
            rss_bytes=s.rss_bytes,
            uncaught=s.uncaught,
            gauges=dict(s.gauges),
            uptime_s=s.uptime_s,
            release=label(self.loader.current_release),
            **health_fields(self.loader.coverage.report(), s.host),
        )

    def membership_record(self) -> dict[str, Any]:
        """The JSON object at ``<prefix>nodes/<node_id>`` (see :mod:`node_agent.agent`)."""
        snap = self.metrics.snapshot()
        loader = self.loader
        card = self.card
        return {
            "node_id": card.node_id,
            "address": card.address,
            "http_address": card.http_address,
            "labels": card.labels,
            "current_release": label(loader.current_release),
            "previous_release": label(loader.previous_release),
            "permanent_release": label(loader.permanent_release),
            "state": str(self.participant.state),
            "prepared_rollout": self.participant.prepared_rollout,
            "switch_at": self.participant.switch_at,
            "epoch_seen": self.fence.epoch,
            "pid": os.getpid(),
            "started_at": card.started_at,
            "secure": card.secure,
            "trusted_keys": sorted(card.trusted_keys),
            "health": {"requests": snap.requests, "errors": snap.errors, "uncaught": snap.uncaught},
        }

    def prometheus(self) -> str:
        """The text ``/-/metrics`` serves."""
        barrier = self.loader.barrier
        stats = barrier.stats()
        node = {"node": self.card.node_id}
        return self.metrics.prometheus(
            node,
            info={
                "current": label(self.loader.current_release),
                "previous": label(self.loader.previous_release),
                "permanent": label(self.loader.permanent_release),
                "state": self.state,
            },
            extra=lambda: {
                "hotfleet_epoch_seen": self.fence.epoch,
                "hotfleet_etcd_connected": float(self.etcd_connected),
                "hotfleet_drain_holds": stats.held_total,
                "hotfleet_drain_last_hold_seconds": stats.last_hold_s,
                "hotfleet_drain_max_hold_seconds": stats.max_hold_s,
                "hotfleet_in_flight_requests": barrier.in_flight,
            },
        ) + prometheus_lines(self.loader.coverage.report(), node)
