"""Wire vocabulary shared by the coordinator service, its engine and coordctl.

Why one place: a refusal code is a contract with scripts (``coordctl -o
json`` and exit codes branch on it); spelled as strings in three modules, the
three tables drifted (a code the service did not know was sent as
``FAILED_PRECONDITION`` and mapped to no exit code).  Every code and its
meaning are here; the gRPC status each travels with is the service's
(:mod:`coordinator.service`).  No third-party import: the worker's metrics
read the latency bounds from here, in interpreters that may lack grpc.
"""

from __future__ import annotations

import enum

__all__ = [
    "AGENT_READY",
    "COORDINATOR_READY",
    "LATENCY_BOUNDS_S",
    "LEADER_KEY",
    "REFUSAL_KEY",
    "Refusal",
]

#: The agent's request-latency histogram bounds (seconds).  The agent reports
#: the bounds with every Health reply; the judge's synthetic samples use these.
LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: What a process prints on stdout once it serves (launchers wait for it).
AGENT_READY = "node-agent ready"
COORDINATOR_READY = "hotfleet-coordinator ready"

REFUSAL_KEY = "hotfleet-refusal"  # trailing metadata: the refusal code
LEADER_KEY = "hotfleet-leader"  # trailing metadata of not_leader: the leader's API address


class Refusal(enum.StrEnum):
    """Why the coordinator refused a request; nothing was started or changed."""

    BUSY = "busy"  # another rollout is in progress
    NOT_FOUND = "not_found"  # no such release / rollout / node
    EXISTS = "exists"  # label already pushed with other content
    INVALID = "invalid"  # malformed request or release, or not possible in this state
    NO_TARGETS = "no_targets"  # the target matches no registered node
    DOWNGRADE = "downgrade"  # an older version than the fleet runs, without --allow-downgrade
    NOT_LEADER = "not_leader"  # ask the leader (LEADER_KEY names it)
    UNAVAILABLE = "unavailable"  # etcd / leader not reachable right now
    QUOTA = "quota"  # the push would pass a content-store limit

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later without a change (coordctl: exit 6)."""
        return self in (Refusal.NOT_LEADER, Refusal.UNAVAILABLE)
