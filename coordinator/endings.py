"""How a rollout that switched nodes ends: made permanent, or taken back.

:meth:`Endings.make_permanent` tells every switched node to keep the release
and writes the desired state that goes with it (the cluster's permanent
release, or per-node ``desired/<node>`` records for a partial target, and the
``current`` record of a window); a rollback made permanent marks the rollout
it reverted ``rolled_back``.  The ways back — a yes voter that did not switch
(``finish_failed``), a failed window, an aborted later wave — all start a
rollback from memory (:meth:`Endings.rollback_of`); a rollback that aborts
leaves the reverted rollout provisional with the reason (never pending).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc

from coordinator.fencing import TXN_OPS, Deposed, retry
from coordinator.fleet import Target
from coordinator.model import Kind, NodeResult, Phase, Rollout, Vote
from coordinator.options import RolloutOptions
from coordinator.releases import ReleaseEntry
from coordinator.twophase import fan_out, rpc_detail
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.errors import ModuleError, Reason

if TYPE_CHECKING:
    from coordinator.election import Leadership
    from coordinator.engine import Engine

log = logging.getLogger("hotfleet.coordinator")

__all__ = ["ALL_NODES", "Endings"]

ALL_NODES = Target(all=True).describe()  # how a rollout for the whole fleet records its target


class Endings:
    """Permanent or rolled back: the records and RPCs that end a switched rollout."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def finish_failed(self, lead: Leadership, rollout: Rollout, failed: list[NodeResult]) -> None:
        """Some yes voter did not switch: take every node of the rollout back.

        The rollout stays ``committed`` (never provisional, never permanent)
        until the rollback rollout marks it ``rolled_back``; nodes that never
        switched (or restored themselves) vote yes to it without doing anything.
        """
        errors: list[ModuleError] = []
        for n in failed:
            errors.extend(n.errors)
            if not n.errors:
                errors.append(
                    ModuleError(
                        "*",
                        Reason.TIMEOUT,
                        f"finish not acknowledged: {n.detail or 'no answer'}",
                        n.node,
                    )
                )
        why = "finish_failed: " + "; ".join(
            f"{e.node}: {e.module}: {e.reason.value}: {e.detail}" for e in errors
        )
        rollout.errors = errors
        rollout.reason = f"{why}; rolling the whole fleet back"
        self.engine._save(lead, rollout)
        log.error("rollout %s: %s", rollout.id, rollout.reason)
        voters = sorted(n.node for n in rollout.nodes.values() if n.vote is Vote.YES)
        self.rollback_of(lead, rollout, voters, why)

    def make_permanent(self, lead: Leadership, rollout: Rollout, reason: str) -> None:
        entry = self.engine._entry_or_stub(rollout.release)
        live = self.engine.protocol.live_addresses()

        request = agent_pb2.MakePermanentRequest(
            rollout_id=rollout.id, epoch=lead.epoch, release=rollout.release
        )

        def permanent(result: NodeResult) -> None:
            if not result.finished:
                return
            result.address = live.get(result.node) or result.address
            try:
                self.engine.agents.stub(result.address).MakePermanent(request, timeout=10)
            except grpc.RpcError as exc:
                result.detail = f"make permanent: {rpc_detail(exc)}"

        fan_out(permanent, rollout.nodes.values(), 32)
        rollout.phase, rollout.ended_at = Phase.PERMANENT, time.time()
        rollout.reason = reason
        tx = self.engine.client.transactions
        ops = [tx.delete(self.engine.keys.active)] if self.engine._active_id() == rollout.id else []
        ops.append(tx.delete(self.engine.keys.current))  # the permanent release is the target again
        reverted = rollout.options.get("reverts")
        switched = [n.node for n in rollout.nodes.values() if n.finished]
        desired: dict[str, str | None] = {}  # the per-node overrides this ending writes
        if reverted:  # back to what was permanent before the reverted upgrade
            old = self.engine.rollout(reverted)
            if old.options.get("target") == ALL_NODES:
                before = old.options.get("previous_permanent", "")
                ops.append(
                    tx.put(self.engine.keys.permanent, before)
                    if before
                    else tx.delete(self.engine.keys.permanent)
                )
            desired = {n: old.previous.get(n, "") for n in switched}
        elif entry.manifest and rollout.options.get("target") == ALL_NODES:
            ops.append(
                tx.put(self.engine.keys.permanent, json.dumps(self.engine._release_record(entry)))
            )
            stale = [
                m.key.decode() for _, m in self.engine.client.get_prefix(self.engine.keys.desired)
            ]
            desired = {k.rpartition("/")[2]: None for k in stale}
        elif entry.manifest:  # some nodes only: their own permanent release
            desired = dict.fromkeys(switched, entry.label)
        if reverted:
            # in the same transaction as this rollout turning permanent (and the active
            # key going): nobody reads one without the other.  The reverted rollout's
            # own driver, if it still writes, fails its revision compare and stops.
            why = rollout.options.get("health", {}).get("why") or "operator request"
            old = self.engine.rollout(reverted)
            old.phase, old.reason = Phase.ROLLED_BACK, f"rolled back by {rollout.id}: {why}"
            old.ended_at = time.time()
            old.epoch = lead.epoch
            ops.append(tx.put(self.engine.keys.rollout(reverted), old.dumps()))
            ops.append(self.engine.baselines.drop_op(reverted))  # as _save does for its record
        overrides = self._desired_ops(desired)
        if len(ops) + len(overrides) + 2 <= TXN_OPS:  # + the record and its baseline's drop
            # in the transaction that changes the permanent release: a reader (the
            # convergence loop, a booting node) never sees the overrides gone and the
            # old permanent release still there (it would want that release of a node
            # that is no target, and load it)
            ops += overrides
        else:  # more than one transaction takes: written first, as many as it takes
            self._write_desired(lead, overrides)
        self.engine._hook("before_permanent", rollout)
        self.engine._save(lead, rollout, *ops)
        log.info("rollout %s: %s permanent", rollout.id, rollout.release)

    def _desired_ops(self, labels: dict[str, str | None]) -> list[Any]:
        """Writes of per-node permanent releases (``desired/<node>``; None removes one)."""
        tx = self.engine.client.transactions
        return [
            tx.delete(self.engine.keys.desired_of(node))
            if label is None
            else tx.put(self.engine.keys.desired_of(node), json.dumps({"release": label}))
            for node, label in sorted(labels.items())
        ]

    def _write_desired(self, lead: Leadership, ops: list[Any]) -> None:
        for i in range(0, len(ops), TXN_OPS):  # etcd's default limit is 128 ops a transaction
            if not retry(functools.partial(lead.guarded_txn, ops[i : i + TXN_OPS])):
                raise Deposed()

    def current_ops(self, rollout: Rollout) -> list[Any]:
        """Make the rollout's release the desired one of the nodes that switched to it.

        Read by :mod:`coordinator.convergence` (catch-up of nodes that restart
        inside the window) and by agents at start.  A rollback needs no
        record: when it ends, the permanent release is the target again.
        """
        entry = self.engine._entry_or_stub(rollout.release)
        if rollout.options.get("from_memory") or not entry.manifest:
            return []
        record = {
            **self.engine._release_record(entry),
            "rollout": rollout.id,
            "targets": sorted(n.node for n in rollout.nodes.values() if n.finished),
        }
        return [self.engine.client.transactions.put(self.engine.keys.current, json.dumps(record))]

    def rollback_of(self, lead: Leadership, rollout: Rollout, nodes: list[str], why: str) -> None:
        """Take ``nodes`` of a provisional ``rollout`` back to what they ran, from memory.

        A node that died meanwhile is skipped: it boots the permanent (old)
        release anyway.
        """
        previous = sorted({rollout.previous.get(n, "") for n in nodes})
        label = previous[0] if len(previous) == 1 else ""
        entry = (
            self.engine._entry_or_stub(label)
            if label
            else ReleaseEntry("", "", "", "", 0.0, 0, False)
        )
        options = RolloutOptions(allow_missing=True, window_s=0.0, health={"why": why})
        self.engine.driver.start(
            Kind.ROLLBACK,
            entry,
            Target(nodes=nodes),
            options,
            lead,
            from_memory=True,
            reverts=rollout.id,
        )

    def rollback_failed(self, lead: Leadership, rollback: Rollout, reverted: str) -> None:
        """The rollback of a half-committed upgrade aborted: say so on the upgrade.

        A committed upgrade whose finish failed somewhere waits for its
        rollback in ``committed``; if that rollback cannot go through, the
        upgrade turns provisional with the reason, so the operator sees the
        split and can roll back or promote (nothing is left pending for ever).
        """

        def split(old: Rollout) -> bool:
            if old.phase is not Phase.COMMITTED:
                return False
            old.phase = Phase.PROVISIONAL
            old.reason = (
                f"{old.reason}; the automatic rollback {rollback.id} aborted ({rollback.reason}): "
                "the fleet is split, see `coordctl nodes`; retry with `coordctl rollback`"
            )
            return True

        self.engine._amend(lead, reverted, split)
