"""The operator's commands on rollouts: upgrade, rollback, abort, promote.

Each command refuses what cannot work before anything starts (a bad health
policy, an unknown node, a downgrade not asked for, nothing to roll back)
and then starts a rollout (:mod:`coordinator.driver`) or ends one.  A
rollout whose window is being judged is ended by its own driver: the
promote or rollback is handed to it (:meth:`Window.through_driver
<coordinator.window.Window.through_driver>`), never raced with its judge.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from coordinator.errors import Refused
from coordinator.fencing import AMEND_ATTEMPTS, Superseded
from coordinator.fleet import Target, select
from coordinator.model import Kind, Phase, Rollout
from coordinator.options import RolloutOptions
from coordinator.releases import ReleaseEntry, entry_manifest_health
from hotfleet.decisions import Decided
from hotfleet.protocol import Refusal

if TYPE_CHECKING:
    from coordinator.election import Leadership
    from coordinator.engine import Engine

__all__ = ["Commands"]


class Commands:
    """What ``coordctl upgrade|rollback|abort|promote`` asks of the leader's engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def upgrade(self, ref: str, target: Target, options: RolloutOptions) -> Rollout:
        lead = self.engine._require_leader()
        entry = self.engine.release(ref)
        self.engine.window.policy(
            entry_manifest_health(entry), options
        )  # refuse a bad policy before anything starts
        self._refuse_unknown(target, options)
        if not options.allow_downgrade:
            self._refuse_downgrade(entry)
        return self.engine.driver.start(Kind.UPGRADE, entry, target, options, lead)

    def _refuse_downgrade(self, entry: ReleaseEntry) -> None:
        """An upgrade never takes a node to an older version unless asked (``--allow-downgrade``).

        An old release stays validly signed for ever; without this rule anyone
        who may push could replay it (a known-bad build) as an "upgrade".
        """
        older = {
            n.node_id: n.current_release
            for n in self.engine.nodes()
            if n.current_release.partition("@")[0] == entry.name
            and _version_key(entry.version) < _version_key(n.current_release.partition("@")[2])
        }
        if older:
            runs = ", ".join(f"{node} runs {label}" for node, label in sorted(older.items()))
            raise Refused(
                Refusal.DOWNGRADE,
                f"{entry.label} is older than what the fleet runs ({runs}): a downgrade must be "
                "asked for with --allow-downgrade (recorded in the rollout), or use "
                "`coordctl rollback --to VERSION`",
            )

    def _refuse_unknown(self, target: Target, options: RolloutOptions) -> None:
        """A named node that is not registered is refused up front, as an unmatched selector is.

        Starting a rollout that can only abort wastes a prepare on every other
        node and hides a typo behind an abort; ``--allow-missing`` still goes
        ahead without a node that is down.
        """
        if options.allow_missing or not target.nodes:
            return
        registered = self.engine.nodes()
        _, missing = select(registered, target)
        if missing:
            known = ", ".join(n.node_id for n in registered) or "none"
            raise Refused(
                Refusal.NO_TARGETS,
                f"node(s) not registered (unknown, or down): {', '.join(missing)}; "
                f"registered: {known} (--allow-missing goes ahead without them)",
            )

    def rollback(
        self, target: Target, to_version: str | None, options: RolloutOptions, *, why: str = ""
    ) -> Rollout:
        """Back to the previous release: from every node's memory, or to a pushed version."""
        lead = self.engine._require_leader()
        if why:
            options.health = {**options.health, "why": why}
        if to_version:
            # --to VERSION, or --to NAME@VERSION as every other verb spells a release
            ref = (
                to_version if "@" in to_version else f"{self._current_release_name()}@{to_version}"
            )
            return self.engine.driver.start(
                Kind.ROLLBACK, self.engine.release(ref), target, options, lead
            )
        last = self._last_applied()
        if last is None:
            raise Refused(
                Refusal.NOT_FOUND,
                "nothing to roll back: no change that is still in place has finished in this "
                "cluster (see `coordctl rollouts`; --to VERSION picks a pushed release)",
            )
        previous = sorted(set(last.previous.values()))
        if len(previous) != 1:
            ran = ", ".join(p or "boot code" for p in previous)
            raise Refused(
                Refusal.INVALID,
                f"nodes ran different releases before {last.release} ({ran}); use --to VERSION",
            )
        options.window_s = 0.0  # a rollback is not analysed: it is the way out
        target = target if (target.nodes or target.selector) else Target(nodes=sorted(last.nodes))
        if last.phase is Phase.PROVISIONAL:  # the nodes still hold the old code in memory
            entry = (
                self.engine._entry_or_stub(previous[0])
                if previous[0]
                else ReleaseEntry("", "", "", "", 0.0, 0, False)
            )

            def revert(_window: Rollout) -> Rollout:
                return self.engine.driver.start(
                    Kind.ROLLBACK, entry, target, options, lead, from_memory=True, reverts=last.id
                )

            # taken by the window's driver if it has one: never raced with its judge
            return self.engine.window.through_driver(last.id, "rollback", revert) or revert(last)
        # permanent: the in-memory backup is gone; go back through the pushed release
        if not previous[0]:
            raise Refused(
                Refusal.INVALID,
                f"{last.release} is permanent and the nodes ran unversioned boot code before it; "
                "push the old code as a release and use --to VERSION",
            )
        return self.engine.driver.start(
            Kind.ROLLBACK, self.engine.release(previous[0]), target, options, lead, reverts=last.id
        )

    def abort(self, rollout_id: str | None = None) -> Rollout:
        lead = self.engine._require_leader()
        rollout = self.engine.rollout(rollout_id or self.engine._active_id() or None)
        if rollout.phase.terminal:
            raise Refused(
                Refusal.INVALID, f"rollout {rollout.id} already ended {rollout.phase.value}"
            )
        if rollout.phase is Phase.PROVISIONAL:
            return self.rollback(Target(nodes=sorted(rollout.nodes)), None, RolloutOptions())
        if self.engine.protocol.decide(lead, rollout.id, Decided.ABORT) is not Decided.ABORT:
            raise Refused(
                Refusal.INVALID,
                f"rollout {rollout.id} is already committed; wait for it and roll back",
            )
        return self.engine.rollout(rollout.id)

    def promote(self, rollout_id: str | None = None) -> Rollout:
        """Make a provisional rollout permanent now (its analysis loop stops on its next write)."""
        lead = self.engine._require_leader()
        rid = rollout_id or self.engine._active_id() or self.engine.rollout().id
        taken = self.engine.window.through_driver(
            rid, "promote", lambda r: self._promote_now(lead, r)
        )
        if taken is not None:
            return taken
        for _ in range(AMEND_ATTEMPTS):
            rollout = self.engine.rollout(rid)
            if rollout.phase is not Phase.PROVISIONAL:
                raise Refused(
                    Refusal.INVALID,
                    f"rollout {rollout.id} is {rollout.phase.value}, only a provisional rollout can be promoted",
                )
            try:
                self.engine.endings.make_permanent(lead, rollout, "promoted by the operator")
            except Superseded:
                continue  # its driver wrote the record meanwhile: read it again
            return self.engine.rollout(rollout.id)
        raise Refused(Refusal.BUSY, f"rollout {rollout_id} changes too fast to promote; retry")

    def _promote_now(self, lead: Leadership, rollout: Rollout) -> Rollout:
        """Promote, on the window's driver thread (its record is current there)."""
        if rollout.phase is not Phase.PROVISIONAL:
            raise Refused(
                Refusal.INVALID,
                f"rollout {rollout.id} is {rollout.phase.value}, only a provisional rollout can be promoted",
            )
        self.engine.endings.make_permanent(lead, rollout, "promoted by the operator")
        return self.engine.rollout(rollout.id)

    def _current_release_name(self) -> str:
        names = {
            n.current_release.partition("@")[0] for n in self.engine.nodes() if n.current_release
        }
        if not names:
            # membership records lag a switch by their debounce: right after a rollout
            # ended they may still show the boot code; the rollouts themselves know
            ended = [
                r
                for r in self.engine.rollouts(limit=20)
                if r.phase in {Phase.PROVISIONAL, Phase.PERMANENT}
            ]
            names = {ended[0].release.partition("@")[0]} if ended else set()
        if len(names) != 1:
            raise Refused(
                Refusal.INVALID,
                f"cannot tell which release to roll back: nodes run {sorted(names) or 'nothing known'}",
            )
        return names.pop()

    def _last_applied(self) -> Rollout | None:
        """The newest change that stuck: what ``rollback`` without ``--to`` undoes.

        A rollback and the change it reverted cancel each other and are
        skipped, so each ``coordctl rollback`` goes one release further back,
        and after an automatic rollback the next one goes to what ran before
        the current release.  A ``rollback --to`` is a change of its own.
        """
        history = self.engine.rollouts(limit=200)
        # a rollback that reverted X went through: both are skipped (read from the
        # rollback itself, so no race with X's record being marked rolled_back)
        undone = {
            str(r.options.get("reverts"))
            for r in history
            if r.kind is Kind.ROLLBACK and r.options.get("reverts") and r.phase is Phase.PERMANENT
        }
        for r in history:
            if r.phase not in {Phase.PROVISIONAL, Phase.PERMANENT} or r.id in undone:
                continue
            if r.kind is Kind.ROLLBACK and r.options.get("reverts"):
                continue
            return r
        return None


def _version_key(version: str) -> tuple[int, ...]:
    """The leading dotted numbers of ``version`` (``2.1.0-bad`` -> ``(2, 1, 0)``).

    Enough to tell an older release from a newer one of the same name;
    versions that differ only after the numbers compare equal, which is
    never called a downgrade.
    """
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()
