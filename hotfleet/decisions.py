"""The 2PC decision record: written by a leader, believed only if a leader wrote it.

``<prefix>rollouts/<id>/decision`` is the commit point of a rollout.  Agents
act on it by themselves (a prepared node never waits for a dead
coordinator) and a new leader re-drives what it says, so whoever can write
that key could otherwise switch code on every prepared node.  A decision
therefore carries the epoch of the leader that wrote it::

    {"decision": "commit", "epoch": 4711, "participants": ["n1", "n2"], "commit_at": 1764569085.5}

``participants`` names the nodes bound by a commit (those that voted yes):
a node outside it (one whose prepare finished after the vote was counted,
or one left out under ``--allow-missing``) never commits on the record; it
drops what it prepared and the coordinator's convergence loop catches it up.
A record without the field (written before it existed) binds every
prepared node.  ``commit_at`` (unix time) is the instant every participant
switches at: a node that reads the commit from its decision watch schedules
its switch for it by itself, so the fleet switches together however long the
coordinator's Finish fan-out takes (0 or absent: no instant, the node waits
for the coordinator's Finish for a grace period).

and the leader writes it in a transaction guarded by its leader key
(:meth:`coordinator.election.Leadership.transaction`).  A reader believes it
only if, at the revision the decision was written, the election prefix
names exactly that epoch as the leader (:func:`hotfleet.fencing.leader_epoch_at`).
A value without an epoch, with an epoch that never led, or written while no
leader held that epoch is *forged*: agents do not act on it and a leader
replaces it with its own decision.

This is defence in depth: etcd's roles (agents cannot write decisions) are
the boundary; the epoch check stops a client that merely has write access
to the prefix from committing a rollout nobody decided.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass

from hotfleet.etcd_client import EtcdClient
from hotfleet.fencing import leader_epoch_at
from hotfleet.keys import Keys

__all__ = [
    "ABORT",
    "COMMIT",
    "DECISIONS",
    "Decided",
    "Decision",
    "ForgedDecision",
    "encode",
    "parse",
    "verify",
]


class Decided(enum.StrEnum):
    """What a rollout's decision record says (its wire spelling is the value)."""

    COMMIT = "commit"
    ABORT = "abort"


COMMIT = Decided.COMMIT
ABORT = Decided.ABORT
DECISIONS = frozenset(Decided)
_MAX_BYTES = 512 * 1024  # a participant list of a few thousand node ids


class ForgedDecision(ValueError):
    """A decision record no leader wrote; the message says what is wrong with it."""


@dataclass(frozen=True)
class Decision:
    """A verified decision: what was decided and by which leader epoch."""

    decision: Decided
    epoch: int
    participants: tuple[str, ...] | None = None  # None: the record names none
    commit_at: float = 0.0  # the instant participants switch at (unix time); 0: none

    def binds(self, node_id: str) -> bool:
        """Whether this decision applies to ``node_id``."""
        return self.participants is None or node_id in self.participants


def encode(
    decision: Decided,
    epoch: int,
    participants: Sequence[str] | None = None,
    commit_at: float = 0.0,
) -> str:
    """The record a leader of ``epoch`` writes for ``decision`` binding ``participants``."""
    if decision not in DECISIONS:
        raise ValueError(f"a decision is {' or '.join(sorted(DECISIONS))}, not {decision!r}")
    if epoch <= 0:
        raise ValueError(f"a decision needs the leader's epoch, got {epoch}")
    record: dict[str, object] = {"decision": decision, "epoch": epoch}
    if participants is not None:
        record["participants"] = sorted(participants)
    if commit_at > 0:
        record["commit_at"] = round(commit_at, 6)
    return json.dumps(record, separators=(",", ":"))


def parse(raw: bytes) -> Decision:
    """The claim a record makes (unverified); :class:`ForgedDecision` if it is not one."""
    if len(raw) > _MAX_BYTES:
        raise ForgedDecision(f"{len(raw)} bytes, not a decision record")
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        text = raw[:40].decode("utf-8", "replace")
        raise ForgedDecision(f"{text!r} is not a decision record with a leader epoch") from None
    if not isinstance(record, dict):
        raise ForgedDecision(f"a decision record is a JSON object, not {type(record).__name__}")
    decision, epoch = record.get("decision"), record.get("epoch")
    if decision not in DECISIONS:
        raise ForgedDecision(f"decision {decision!r} is neither commit nor abort")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= 0:
        raise ForgedDecision(f"epoch {epoch!r} is not a leader epoch")
    named = record.get("participants")
    if named is not None and (
        not isinstance(named, list) or not all(isinstance(n, str) for n in named)
    ):
        raise ForgedDecision("'participants' is not a list of node ids")
    commit_at = record.get("commit_at", 0.0)
    if not isinstance(commit_at, int | float) or isinstance(commit_at, bool) or commit_at < 0:
        raise ForgedDecision(f"commit_at {commit_at!r} is not an instant")
    return Decision(
        Decided(decision), epoch, tuple(named) if named is not None else None, float(commit_at)
    )


def verify(client: EtcdClient, keys: Keys, raw: bytes, mod_revision: int) -> Decision:
    """The decision in ``raw`` (read at ``mod_revision``) if the leader it names wrote it.

    Raises :class:`ForgedDecision` when it was not; etcd errors (unreachable,
    the revision compacted away) propagate: unverifiable is never verified.
    """
    claim = parse(raw)
    leader = leader_epoch_at(client, keys, mod_revision)
    if leader != claim.epoch:
        who = f"epoch {leader} led" if leader is not None else "no coordinator led"
        raise ForgedDecision(
            f"{claim.decision!r} claims epoch {claim.epoch}, but {who} when it was written"
            f" (revision {mod_revision})"
        )
    return claim
