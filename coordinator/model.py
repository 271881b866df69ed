"""The rollout record: what the leader writes to etcd at every step of a 2PC.

A rollout is recorded *before* anything is sent to a node, and every state
change is a fenced write of the whole record, so a new leader (or an
operator with ``coordctl status``) reads exactly what happened: who voted
what, with which errors, how long each step took and why it ended as it did.
"""

from __future__ import annotations

import copy
import enum
import json
import time
from dataclasses import dataclass, field, fields
from typing import Any

from hotfleet.errors import ModuleError, Reason


class Kind(enum.StrEnum):
    """What a rollout does: install a release, or take the fleet back to one."""

    UPGRADE = "upgrade"
    ROLLBACK = "rollback"


class Phase(enum.StrEnum):
    """Where a rollout is.  Terminal phases never change again."""

    PREPARING = "preparing"  # recorded; Prepare sent to targets
    COMMITTED = "committed"  # decision=commit is durable; Finish being driven
    ABORTING = "aborting"  # decision=abort is durable; Abort being driven
    PROVISIONAL = "provisional"  # every node finished; rollback window open
    PERMANENT = "permanent"  # terminal: the release is what nodes boot into
    ABORTED = "aborted"  # terminal: nothing changed anywhere
    ROLLED_BACK = "rolled_back"  # terminal: finished, then taken back out
    DRY_RUN = "dry_run"  # terminal: prepared everywhere and aborted on purpose

    @property
    def terminal(self) -> bool:
        return self in {Phase.PERMANENT, Phase.ABORTED, Phase.ROLLED_BACK, Phase.DRY_RUN}


class Vote(enum.StrEnum):
    PENDING = ""
    YES = "yes"
    NO = "no"
    UNREACHABLE = "unreachable"


@dataclass
class NodeResult:
    """One target node's part in a rollout."""

    node: str
    address: str = ""
    vote: Vote = Vote.PENDING
    errors: list[ModuleError] = field(default_factory=list)
    prepare_s: float = 0.0
    finished: bool = False
    finished_at: float = 0.0  # unix time the node acknowledged the switch
    pause_s: float = 0.0  # how long the node held guarded work for the switch
    aborted: bool = False
    detail: str = ""  # transport errors, retries
    wave: int = 0  # which wave of the rollout the node belongs to
    # what the node said beyond yes/no: non-fatal findings of its prepare (e.g. a
    # loop outside hotfleet's supervision that keeps running old code) and of its
    # finish, and whether the finish drained guarded work (False: the drain timed
    # out and the swap went ahead with still_in_flight requests on the old code)
    prepare_warnings: list[str] = field(default_factory=list)
    finish_warnings: list[str] = field(default_factory=list)
    drained: bool = True
    still_in_flight: int = 0
    # how long before the commit instant the node was ready to switch (negative: the
    # commit reached it that late); None without an instant (coordinator.commitlead)
    armed_ahead_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        # field by field, not dataclasses.asdict: its deep copy of every value was most
        # of the coordinator's CPU in a 1000-node rollout's record writes (issue 17)
        d = {name: getattr(self, name) for name in _NODE_FIELDS}
        d["vote"] = self.vote.value
        d["errors"] = [_error_json(e) for e in self.errors]
        d["prepare_warnings"] = list(self.prepare_warnings)
        d["finish_warnings"] = list(self.finish_warnings)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeResult:
        d = dict(d)
        d["vote"] = Vote(d.get("vote", ""))
        d["errors"] = [_error_from_json(e) for e in d.get("errors", [])]
        return cls(**d)


@dataclass
class Rollout:
    """The durable record of one rollout (upgrade, rollback or dry run)."""

    id: str
    kind: Kind
    release: str  # label "name@version" being installed
    release_digest: str
    targets: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    phase: Phase = Phase.PREPARING
    decision: str = ""  # mirrors rollouts/<id>/decision once written
    reason: str = ""  # why it ended the way it did, for humans
    errors: list[ModuleError] = field(default_factory=list)  # every node's refusals
    nodes: dict[str, NodeResult] = field(default_factory=dict)
    epoch: int = 0  # leader epoch that last wrote the record
    leader: str = ""
    previous: dict[str, str] = field(default_factory=dict)  # node -> release it ran before
    analysis: dict[str, Any] = field(default_factory=dict)  # live verdict of the rollback window
    waves: int = 1  # waves of nodes, each its own 2PC and window
    wave: int = 0  # the wave being driven (0-based)
    created_at: float = field(default_factory=time.time)
    decided_at: float = 0.0
    commit_at: float = 0.0  # the wave's commit instant, as its decision record names it
    commit_lead_s: float = 0.0  # how far ahead of the decision that instant was set
    finished_at: float = 0.0
    ended_at: float = 0.0
    # etcd mod revision of the record this copy was read as or last written as: every
    # write compares it (one writer at a time, no lost update); not stored in the value
    revision: int = 0

    def __post_init__(self) -> None:
        self.kind = Kind(self.kind)  # "rollback" given as a plain string compares as Kind

    # ------------------------------------------------------------ summaries
    @property
    def commit_skew_s(self) -> float:
        """The worst wave's latest minus earliest finish instant.

        Each wave is its own commit, scheduled at its own instant after the
        previous wave's analysis window: comparing nodes across waves would
        report the window, not skew.
        """
        by_wave: dict[int, list[float]] = {}
        for n in self.nodes.values():
            if n.finished:
                by_wave.setdefault(n.wave, []).append(n.finished_at)
        return max((max(t) - min(t) for t in by_wave.values() if len(t) > 1), default=0.0)

    @property
    def duration_s(self) -> float:
        end = self.ended_at or self.finished_at or time.time()
        return end - self.created_at

    def to_json(self) -> dict[str, Any]:
        # the small fields deep-copied as asdict would; the per-node ones built directly
        d = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in fields(self)
            if f.name not in _PER_NODE
        }
        d["phase"] = self.phase.value
        d["errors"] = [_error_json(e) for e in self.errors]
        d["targets"] = list(self.targets)
        d["previous"] = dict(self.previous)
        d["nodes"] = {k: v.to_json() for k, v in self.nodes.items()}
        d["commit_skew_s"] = self.commit_skew_s
        d["duration_s"] = self.duration_s
        return d

    def dumps(self) -> str:
        """The record as stored in etcd: per-node results compact (see :func:`_compact_node`).

        A 1000-node rollout is rewritten at every step, so its size is the
        fleet's etcd traffic: ~130 bytes a node instead of ~400 keeps the
        record far below etcd's request limit (1.5 MiB by default).
        """
        d = self.to_json()
        d.pop("revision")
        d["nodes"] = {k: _compact_node(v) for k, v in d["nodes"].items()}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: bytes | str, revision: int = 0) -> Rollout:
        d = json.loads(raw)
        d["revision"] = revision or int(d.get("revision") or 0)
        d.pop("commit_skew_s", None)
        d.pop("duration_s", None)
        d["phase"] = Phase(d["phase"])
        d["errors"] = [_error_from_json(e) for e in d.get("errors", [])]
        d["nodes"] = {
            k: NodeResult.from_json({"node": k, **v}) for k, v in d.get("nodes", {}).items()
        }
        return cls(**d)


_NODE_FIELDS = tuple(f.name for f in fields(NodeResult))
_PER_NODE = frozenset({"errors", "targets", "previous", "nodes"})  # Rollout fields of N entries
_NODE_DEFAULTS = {
    k: v for k, v in NodeResult("").to_json().items() if k != "node"
}  # what a compact per-node entry leaves out
_MICROS = (
    "prepare_s",
    "pause_s",
    "finished_at",
    "armed_ahead_s",
)  # measured times: microseconds are plenty


def _compact_node(d: dict[str, Any]) -> dict[str, Any]:
    """A node's result without its name (the key), defaults, or sub-microsecond digits."""
    out = {}
    for k, v in d.items():
        if k == "node" or (k in _NODE_DEFAULTS and v == _NODE_DEFAULTS[k]):
            continue
        out[k] = round(v, 6) if k in _MICROS and isinstance(v, float) else v
    return out


def _error_json(e: ModuleError) -> dict[str, str]:
    return {"node": e.node, "module": e.module, "reason": e.reason.value, "detail": e.detail}


def _error_from_json(d: dict[str, str]) -> ModuleError:
    return ModuleError(d["module"], Reason(d["reason"]), d["detail"], d.get("node", ""))
