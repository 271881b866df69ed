"""Wire vocabulary shared by the coordinator service, its engine and coordctl.

Why one place: a refusal code is a contract with scripts (``coordctl -o
json`` and exit codes branch on it) and with the gRPC status a client sees;
spelled as strings in three modules, the three tables drifted (a code the
service did not know was sent as ``FAILED_PRECONDITION`` and mapped to no
exit code).  Every code, its gRPC status and its meaning are here.
"""

from __future__ import annotations

import enum

import grpc

__all__ = ["LEADER_KEY", "REFUSAL_KEY", "Refusal"]

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
    def status(self) -> grpc.StatusCode:
        """The gRPC status a refusal travels with."""
        return _STATUS[self]

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later without a change (coordctl: exit 6)."""
        return self in (Refusal.NOT_LEADER, Refusal.UNAVAILABLE)


_STATUS = {
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
