"""A rollout's driver: record and start it, then run its waves one after the other.

:meth:`Driver.start` records the rollout and claims the cluster's ``active``
key in one fenced transaction, then hands it to a thread of the engine's.
Each wave is its own two-phase commit (:mod:`coordinator.twophase`),
analysed in its window (:mod:`coordinator.window`) before the next wave
starts; an aborted wave takes the earlier, switched waves back
(:mod:`coordinator.endings`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from coordinator.analysis import Action
from coordinator.errors import Refused
from coordinator.fleet import Target, select
from coordinator.model import Kind, NodeResult, Phase, Rollout, Vote
from coordinator.options import RolloutOptions
from coordinator.releases import ReleaseEntry, entry_manifest_health
from coordinator.twophase import abort_reason, wave_id, wave_members
from hotfleet.decisions import Decided
from hotfleet.protocol import Refusal

if TYPE_CHECKING:
    from coordinator.election import Leadership
    from coordinator.engine import Engine

log = logging.getLogger("hotfleet.coordinator")

__all__ = ["Driver"]


class Driver:
    """Starts rollouts and drives each through its waves (on the engine's threads)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start(
        self,
        kind: Kind,
        entry: ReleaseEntry,
        target: Target,
        options: RolloutOptions,
        lead: Leadership,
        *,
        from_memory: bool = False,
        reverts: str = "",
    ) -> Rollout:
        """Record a rollout, claim ``active`` and spawn its driver (never under a catch-up)."""
        with self.engine._rollout_gate:
            nodes, missing = select(self.engine.nodes(), target)
            if not nodes and not missing:
                raise Refused(Refusal.NO_TARGETS, f"no registered node matches {target.describe()}")
            rollout = Rollout(
                _new_id(),
                kind,
                entry.label,
                entry.digest,
                sorted([n.node_id for n in nodes] + missing),
                options={
                    **asdict(options),
                    "target": target.describe(),
                    "from_memory": from_memory,
                    "reverts": reverts,
                    "previous_permanent": self.engine._permanent_raw(),
                },
                epoch=lead.epoch,
                leader=self.engine.address,
                nodes={n.node_id: NodeResult(n.node_id, n.address) for n in nodes},
                previous={n.node_id: n.current_release for n in nodes},
            )
            rollout.waves = _assign_waves(rollout, options.waves)
            for name in missing:
                rollout.nodes[name] = NodeResult(
                    name, vote=Vote.UNREACHABLE, detail="not registered (down or unknown)"
                )
            tx = self.engine.client.transactions
            # a rollback makes the release it restores the target again from its start
            undesired = [tx.delete(self.engine.keys.current)] if kind is Kind.ROLLBACK else []
            ok, created = lead.transaction(
                [
                    tx.put(self.engine.keys.active, rollout.id),
                    tx.put(self.engine.keys.rollout(rollout.id), rollout.dumps()),
                    *undesired,
                ],
                [tx.value(self.engine.keys.active) == reverts]
                if reverts and self.engine._active_id() == reverts
                else [tx.version(self.engine.keys.active) == 0],
            )
            if not ok:
                if not lead.is_valid():
                    raise Refused(
                        Refusal.NOT_LEADER,
                        "leadership was lost while starting the rollout",
                        leader=self.engine.leader_address(),
                    )
                raise Refused(
                    Refusal.BUSY,
                    f"rollout {self.engine._active_id()} is in progress; one rollout at a time per cluster (watch it with `coordctl status`, or `coordctl abort`)",
                )
            rollout.revision = int(created[1].response_put.header.revision)
            log.info(
                "rollout %s: %s %s on %s", rollout.id, kind, entry.label, ", ".join(rollout.targets)
            )
            self.engine._spawn(
                lambda: self.drive(lead, rollout, entry, options),
                f"rollout-{rollout.id}",
                rollout.id,
            )
            return rollout

    def drive(
        self, lead: Leadership, rollout: Rollout, entry: ReleaseEntry, options: RolloutOptions
    ) -> None:
        """Each wave is its own two-phase commit, analysed before the next one starts.

        No health sampling while a wave prepares and commits: its samples
        would serve nothing (the baseline ends when the rollout starts, the
        window begins after the commit) and compete for the nodes' and the
        coordinator's CPU (a round is an RPC to every node).  Without a window
        (``window_s=0``) nothing is judged until the rollout ends, so sampling
        resumes only then.
        """
        sampler = self.engine.sampler
        try:
            while True:
                if sampler is not None:
                    sampler.pause()
                committed = self._commit_wave(lead, rollout, entry, options)
                if sampler is not None and options.window_s != 0:
                    sampler.resume_at(time.time())  # finish set it just after its commit instant
                if not committed or not self.next_wave(lead, rollout, options):
                    return
        finally:
            if sampler is not None:
                sampler.resume_at(time.time())

    def next_wave(self, lead: Leadership, rollout: Rollout, options: RolloutOptions) -> bool:
        """Judge the finished wave's window; True when the next wave is recorded and may start."""
        if not self.after_finish(lead, rollout, options):
            return False
        rollout.wave += 1
        rollout.phase = Phase.PREPARING
        self.engine._save(lead, rollout)
        return True

    def _commit_wave(
        self, lead: Leadership, rollout: Rollout, entry: ReleaseEntry, options: RolloutOptions
    ) -> bool:
        """Prepare, decide, then finish or abort one wave; True when it committed."""
        self.engine._hook("before_prepare", rollout)
        self.engine.protocol.prepare_all(lead, rollout, entry, options)
        self.engine._save(lead, rollout)
        self.engine._hook("before_decision", rollout)
        members = wave_members(rollout)
        voters = [n for n in members if n.vote is not Vote.UNREACHABLE or not options.allow_missing]
        yes = all(n.vote is Vote.YES for n in voters) and any(n.vote is Vote.YES for n in voters)
        wanted = Decided.COMMIT if yes and not options.dry_run else Decided.ABORT
        # the commit binds the yes voters alone: a node whose vote arrives too late,
        # or one left out under --allow-missing, never acts on it (the convergence
        # loop catches it up instead)
        bound = [n.node for n in members if n.vote is Vote.YES]
        lead_s = self.engine.commit_lead.lead(len(bound)) if wanted is Decided.COMMIT else 0.0
        commit_at = time.time() + lead_s if lead_s else 0.0
        decision = self.engine.protocol.decide(lead, wave_id(rollout), wanted, bound, commit_at)
        rollout.decision, rollout.decided_at = decision, time.time()
        rollout.commit_at = commit_at if decision is wanted else 0.0
        rollout.commit_lead_s = lead_s if decision is wanted else 0.0
        if decision is not Decided.COMMIT:
            rollout.phase = Phase.ABORTING
            self.engine._save(lead, rollout)
            self.abort_wave(lead, rollout, options, dry_run=options.dry_run and yes)
            return False
        rollout.phase = Phase.COMMITTED
        self.engine._save(lead, rollout)
        self.engine._hook("after_decision", rollout)
        return self.engine.protocol.finish_all(lead, rollout, options)

    def after_finish(self, lead: Leadership, rollout: Rollout, options: RolloutOptions) -> bool:
        """Analyse the window; True when the next wave may start."""
        last = rollout.wave >= rollout.waves - 1
        if options.window_s == 0:
            action: Action | None = Action.PROMOTE
        else:
            entry = self.engine._entry_or_stub(rollout.release)
            action = self.engine.window.analyse(
                lead, rollout, self.engine.window.policy(entry_manifest_health(entry), options)
            )
        if action is not Action.PROMOTE:
            return False
        if last:
            reason = rollout.analysis.get("reason") if rollout.analysis else ""
            window = rollout.analysis.get("window_s") if rollout.analysis else 0
            self.engine.endings.make_permanent(
                lead, rollout, f"healthy for {window:g}s: {reason}" if reason else rollout.reason
            )
            return False
        return True

    def abort_wave(
        self, lead: Leadership, rollout: Rollout, options: RolloutOptions, *, dry_run: bool
    ) -> None:
        """Abort the current wave; earlier waves already switched go back too."""
        switched = sorted(n.node for n in rollout.nodes.values() if n.finished)
        if not switched:
            self.engine.protocol.abort_all(lead, rollout, options, dry_run=dry_run)
            return
        self.engine.protocol.abort_all(lead, rollout, options, dry_run=False, release_active=False)
        why = f"wave {rollout.wave + 1} aborted: {abort_reason(rollout)}"
        rollout.phase, rollout.reason = Phase.PROVISIONAL, why
        self.engine._save(lead, rollout)
        self.engine.endings.rollback_of(lead, rollout, switched, why)


def _new_id() -> str:
    """``20261130-201637123-e3fce1``: UTC time to the millisecond first, so ids sort by age."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"


def _assign_waves(rollout: Rollout, spec: list[str]) -> int:
    """Split the targets into waves of cumulative sizes (``["1", "25%", "100%"]``)."""
    names = sorted(rollout.nodes)
    total, done, wave = len(names), 0, 0
    for item in spec or ["100%"]:
        item = item.strip()
        try:
            size = math.ceil(float(item[:-1]) * total / 100) if item.endswith("%") else int(item)
        except ValueError:
            raise Refused(
                Refusal.INVALID, f"wave size {item!r} is neither a count nor a percentage"
            ) from None
        size = min(total, max(size, done + 1))
        for name in names[done:size]:
            rollout.nodes[name].wave = wave
        done, wave = size, wave + 1
        if done >= total:
            break
    for name in names[done:]:
        rollout.nodes[name].wave = wave
    return wave + (1 if done < total else 0)
