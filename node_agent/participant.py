"""The node's half of the two-phase commit, as a state machine that knows no wire.

Why a module of its own: the promise hotfleet prints (*a node that votes yes
has changed nothing and switches when told; a no vote, an abort or a dry run
leaves it as it was*) is decided here, and nowhere else.  Keeping it free of
gRPC, protobuf and etcd lets the same participant serve the real agent
(:class:`node_agent.agent.Agent` translates its RPCs), the simulated agents
of the scale benchmark (code that only sleeps) and the coordinator's
deterministic protocol tests (an in-process transport), so those can never
drift from what a production node does.

State machine (``State``; every transition happens under :attr:`Participant.lock`)::

    STARTING --reconcile--> RECONCILING --> IDLE | RECONCILE_FAILED
    IDLE --prepare--> PREPARING --yes--> PREPARED --finish--> FINISHING --> IDLE
                                  \\--no--> IDLE       \\--abort / decision abort--> IDLE
    IDLE | PREPARED --rollback--> ROLLING_BACK --> IDLE
    any --stop--> STOPPING (final)

One rollout is prepared at a time: a new prepare (or a rollback) supersedes
the one held.  Every operation is idempotent per rollout id: a replayed
prepare returns the same vote, a replayed finish or rollback the same
outcome (the last 64 are remembered), so a coordinator may retry any step
after any failure.

What the participant drives is a :class:`Code` (the :class:`~node_agent.loader.Loader`
in an agent): prepare stages without running release code, finish switches,
abort drops the staged plan, rollback restores the in-memory backup.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hotfleet.decisions import Decided
from hotfleet.errors import HotfleetError, ModuleError, Reason
from node_agent.errors import FinishError, LoaderStateError, PrepareError
from node_agent.loader import FinishReport, ReleaseInfo
from node_agent.participant_api import (
    Change,
    Code,
    DecisionWatch,
    Outcome,
    Permanence,
    PrepareCall,
    State,
    Vote,
)

__all__ = [
    "Change",
    "Code",
    "DecisionWatch",
    "Outcome",
    "Participant",
    "Permanence",
    "PrepareCall",
    "State",
    "Vote",
]

log = logging.getLogger(__name__)

REMEMBERED_ROLLOUTS = 64
MAX_COMMIT_DELAY_S = 10.0  # a commit instant further away than this is not waited for
COMMIT_SETTLE_S = 0.1  # a scheduled commit is acknowledged this long after its instant


@dataclass
class _RollbackPlan:
    """A prepared fleet-wide rollback: finishing it is the code's one-step rollback."""

    target: str


@dataclass
class _AlreadyThere:
    """This node already runs the target: it votes yes, and finishing does nothing.

    For a rollback, the node never switched or its finish failed and restored
    it.  For a release, the node runs the same content (a retried upgrade, a
    catch-up acting on a membership record written before the node's finish
    was published).  Loading it again would be harmless to the code but not
    to the way back: the backup held in memory would become this very release,
    and a rollback after it would have nowhere to go.
    """

    target: str


@dataclass
class _Staged:
    rollout_id: str
    digest: str
    label: str
    plan: Any  # the Code's prepared plan, a _RollbackPlan or _AlreadyThere
    vote: Vote
    release: Any = None  # what obtain() returned (committed releases are cached)
    watch: DecisionWatch | None = None


@dataclass
class _Memory:
    """Outcomes by rollout id, the newest ``REMEMBERED_ROLLOUTS`` kept (idempotent replays)."""

    items: OrderedDict[str, Outcome] = field(default_factory=OrderedDict)

    def __contains__(self, rid: str) -> bool:
        return rid in self.items

    def get(self, rid: str) -> Outcome | None:
        return self.items.get(rid)

    def keep(self, rid: str, outcome: Outcome) -> None:
        self.items[rid] = outcome
        while len(self.items) > REMEMBERED_ROLLOUTS:
            self.items.popitem(last=False)


def label(info: ReleaseInfo | None) -> str:
    """``name@version`` of a release, "" for the boot code."""
    return info.label if info is not None else ""


def digest_of(info: ReleaseInfo | None) -> str:
    """Content digest of a release, "" for the boot code."""
    return info.digest if info is not None else ""


def refusal(module: str, detail: str, reason: Reason = Reason.BAD_RELEASE) -> ModuleError:
    return ModuleError(module, reason, detail)


class Participant:
    """One node's 2PC participant; see the module docstring for its states.

    ``watch(rollout_id)`` (optional) makes the decision watch of a prepared
    rollout, started when it is staged and stopped when it ends;
    ``on_state`` is called after every state change (the agent republishes
    its membership record); ``on_committed(release)`` after a release is
    switched to (the agent caches its sources).
    """

    def __init__(
        self,
        code: Code,
        *,
        node_id: str = "",
        watch: Callable[[str], DecisionWatch] | None = None,
        on_state: Callable[[], None] | None = None,
        on_committed: Callable[[Any], None] | None = None,
    ) -> None:
        self.code = code
        self.node_id = node_id
        self.lock = threading.RLock()  # serializes every mutating operation
        self._watch = watch
        self._on_state = on_state or (lambda: None)
        self._on_committed = on_committed or (lambda _release: None)
        self._state = State.STARTING
        self._preparing = ""  # the rollout whose prepare holds the lock (Abort cancels it)
        self._staged: _Staged | None = None
        self._switch_at = 0.0  # the instant a scheduled finish switches at, while it waits
        self._finished = _Memory()
        self._rolled_back = _Memory()

    # ---------------------------------------------------------------- state
    @property
    def state(self) -> State:
        return self._state

    @property
    def switch_at(self) -> float:
        """The unix time a scheduled finish switches at, while it waits for it; else 0.

        Published in the membership record: a node that will leave its
        transient state at a known instant need not write that state first
        (:mod:`node_agent.membership`).
        """
        return self._switch_at

    @property
    def prepared_rollout(self) -> str:
        staged = self._staged
        return staged.rollout_id if staged is not None else ""

    def set_state(self, state: State, *, publish: bool = True) -> None:
        """Enter ``state`` (never leaving STOPPING) and publish it.

        ``publish=False`` for the transient states entered right before a
        switch: a membership write (an etcd round trip) there would delay the
        switch and, on a packed host, the fleet's commit skew.
        """
        with self.lock:
            if self._state is State.STOPPING:
                return
            self._state = state
        if publish:
            self._on_state()

    def settle(self) -> None:
        """Back to the resting state after an operation: PREPARED if one is held, else IDLE."""
        self.set_state(State.PREPARED if self._staged is not None else State.IDLE)

    def stop(self) -> None:
        """Enter STOPPING for good; a prepare in progress is cancelled, watches end.

        Deliberately not under the lock: a stuck prepare holds it, and
        stopping must never wait behind the operation it cancels.
        """
        self._state = State.STOPPING
        self.code.cancel_prepare()
        staged = self._staged
        if staged is not None and staged.watch is not None:
            staged.watch.stop()

    # -------------------------------------------------------------- prepare
    def prepare(self, call: PrepareCall) -> Vote:
        started = time.perf_counter()
        with self.lock:
            staged = self._staged
            if (
                staged is not None
                and staged.rollout_id == call.rollout_id
                and staged.digest == call.digest
            ):
                return staged.vote  # idempotent replay
            if call.rollout_id and call.rollout_id in self._finished:
                return self._vote(True, started)
            if call.rollback:
                return self._prepare_rollback(call, started)
            return self._prepare_release(call, started)

    def _obtain(self, call: PrepareCall, started: float) -> Any:
        """The release ``call`` names, fetched and verified; or the no vote that refuses it."""
        try:
            return call.obtain()
        except HotfleetError as exc:
            return self._vote(False, started, exc.errors)
        except ValueError as exc:
            return self._vote(False, started, [refusal(call.label or "*", f"bad manifest: {exc}")])

    def _prepare_release(self, call: PrepareCall, started: float) -> Vote:
        release = self._obtain(call, started)
        if isinstance(release, Vote):
            return release
        self._drop_staged(f"superseded by rollout {call.rollout_id!r}")
        current = self.code.current_release
        digest = getattr(release, "digest", call.digest)
        if current is not None and digest and digest == current.digest:
            vote = self._vote(True, started, warnings=[f"already runs {current.label}"])
            self._stage(
                _Staged(
                    call.rollout_id,
                    digest,
                    current.label,
                    _AlreadyThere(current.label),
                    vote,
                    release,
                )
            )
            return vote
        obtained = time.perf_counter()
        cpu0 = time.thread_time()
        self._preparing = call.rollout_id
        self.set_state(State.PREPARING)
        try:
            plan = self.code.prepare(release, force=call.force)
        except PrepareError as exc:
            self.settle()
            return self._vote(False, started, exc.errors)
        finally:
            self._preparing = ""
        log.info(
            "rollout %s: prepared %s (sources %.0f ms, code %.0f ms, of which %.0f ms CPU "
            "here and %.0f ms in the staging process; host code cache: %d hits, %d misses)",
            call.rollout_id,
            call.label or getattr(release, "label", "?"),
            (obtained - started) * 1e3,
            (time.perf_counter() - obtained) * 1e3,
            (time.thread_time() - cpu0) * 1e3,
            getattr(plan, "rehearsal_cpu_s", 0.0) * 1e3,
            (getattr(plan, "profile", None) or {}).get("cache_hits", 0),
            (getattr(plan, "profile", None) or {}).get("cache_misses", 0),
        )
        vote = self._vote(
            True,
            started,
            changes=[Change(c.module, c.kind, "; ".join(c.details)) for c in plan.changes],
            warnings=plan.warnings,
        )
        self._stage(_Staged(call.rollout_id, digest, call.label, plan, vote, release))
        return vote

    def unpack(self, call: PrepareCall) -> Vote:
        """Fetch and verify a pushed release and do ahead of its rollout what its
        prepare computes from the sources (:meth:`node_agent.loader.Loader.unpack`).

        Not under the participant's lock and not a state of the 2PC: it stages
        nothing, so a Prepare never waits for it (the loader stops it when one
        begins).  ``ok`` False with a warning says why nothing was done; with
        errors, what a Prepare of this release would refuse.
        """
        started = time.perf_counter()
        unpack = getattr(self.code, "unpack", None)  # a simulated loader may have none
        if unpack is None:
            return self._vote(False, started, warnings=["this node's loader does not unpack"])
        if self._preparing or self._staged is not None or self._state is State.STOPPING:
            return self._vote(False, started, warnings=["a rollout is being prepared here"])
        release = self._obtain(call, started)
        if isinstance(release, Vote):
            return release
        current = self.code.current_release
        if current is not None and current.digest == release.digest:
            return self._vote(False, started, warnings=[f"already runs {current.label}"])
        done = unpack(release)
        log.info("%s: %s in %.0f ms", release.label, done.detail, done.seconds * 1e3)
        return self._vote(done.done, started, list(done.errors), warnings=[done.detail])

    def _prepare_rollback(self, call: PrepareCall, started: float) -> Vote:
        code = self.code
        want, current, previous = call.label, label(code.current_release), code.previous_release
        if want == current and (want or not code.can_rollback):
            # already where the fleet goes back to: a yes vote that changes nothing
            return self._stage_rollback(call, started, _AlreadyThere(want))
        from_memory = code.can_rollback and (not want or want == label(previous))
        if not from_memory and want and call.has_sources:
            # No backup of the target in memory (this process restarted or joined
            # after the upgrade): the previous release is loaded from the store,
            # verified like any other release.
            log.info(
                "rollback %s: %s is not held in memory, loading it from the store",
                call.rollout_id,
                want,
            )
            return self._prepare_release(call, started)
        if not code.can_rollback:
            detail = (
                f"no previous release is held in memory and the rollback names "
                f"{want or 'the boot code'}, which the store cannot provide"
            )
            return self._vote(False, started, [refusal("*", detail)])
        if want and want != label(previous):
            detail = (
                f"rollback target {want} is not the previous release "
                f"{label(previous) or '(boot code)'}"
            )
            return self._vote(False, started, [refusal("*", detail)])
        return self._stage_rollback(call, started, _RollbackPlan(want))

    def _stage_rollback(
        self, call: PrepareCall, started: float, plan: _RollbackPlan | _AlreadyThere
    ) -> Vote:
        self._drop_staged(f"superseded by rollback rollout {call.rollout_id!r}")
        vote = self._vote(True, started)
        self._stage(_Staged(call.rollout_id, call.digest, plan.target, plan, vote))
        return vote

    def _vote(
        self,
        ok: bool,
        started: float,
        errors: Sequence[ModuleError] = (),
        changes: Sequence[Change] = (),
        warnings: Sequence[str] = (),
    ) -> Vote:
        return Vote(
            ok,
            tuple(errors),
            tuple(changes),
            tuple(warnings),
            time.perf_counter() - started,
            label(self.code.current_release),
        )

    # ------------------------------------------------------ the staged plan
    def _stage(self, staged: _Staged) -> None:
        """Hold ``staged`` as the prepared rollout and watch its decision (lock held)."""
        self._staged = staged
        if self._watch is not None and staged.rollout_id and self._state is not State.STOPPING:
            staged.watch = self._watch(staged.rollout_id)
            staged.watch.start()
        self.settle()

    def _take_staged(self) -> _Staged | None:
        """Stop holding the prepared rollout (lock held); its decision watch ends."""
        staged, self._staged = self._staged, None
        if staged is not None and staged.watch is not None:
            staged.watch.stop()  # not joined: this may be the watch's own thread
        return staged

    def _drop_staged(self, why: str = "") -> None:
        staged = self._take_staged()
        if staged is None:
            return
        if why:
            log.warning(
                "dropping prepared rollout %s (%s): %s", staged.rollout_id, staged.label, why
            )
        if not isinstance(staged.plan, _RollbackPlan | _AlreadyThere):
            self.code.abort(staged.plan)

    # --------------------------------------------------------------- finish
    def finish(self, rollout_id: str, commit_at: float = 0.0) -> Outcome:
        """Switch to the prepared rollout, at ``commit_at`` (unix time) if one is given.

        A scheduled commit makes every node switch at one instant: the code
        does everything but the hold before it (``at``), so that on a host
        that packs many nodes only the holds themselves queue for the cores at
        the instant; the acknowledgement then waits until just after it,
        outside the lock, so nodes that switched first do not take CPU from
        those still switching.
        """
        delay = commit_at - time.time() if commit_at else 0.0
        at = commit_at if 0 < delay <= MAX_COMMIT_DELAY_S else 0.0
        with self.lock:
            done = self._finished.get(rollout_id)
            if done is not None:
                return _replayed(done)
            staged = self._staged
            if staged is None or staged.rollout_id != rollout_id:
                what = f"rollout {staged.rollout_id!r}" if staged else "nothing"
                detail = f"rollout {rollout_id!r} is not prepared here ({what} is)"
                return self._outcome(False, errors=[refusal("*", detail)])
            self.set_state(State.FINISHING, publish=False)
            self._take_staged()
            self._switch_at = at
            try:
                report = self._switch(staged.plan, at)
            except (FinishError, LoaderStateError) as exc:
                # remembered like a success: the decision watch and the coordinator's
                # Finish both drive this finish, and whichever comes second must
                # report what happened (restored or not), not "nothing is prepared"
                failed = self._outcome(
                    False, errors=exc.errors, restored=getattr(exc, "restored", False)
                )
                self._finished.keep(rollout_id, failed)
                self.settle()
                return failed
            finally:
                self._switch_at = 0.0
            # how long before the instant this node was ready to switch; a commit that
            # arrived after it says how late (the coordinator's lead learns from both)
            late = delay if commit_at and delay <= 0 else None
            ahead = report.armed_ahead_s if at else late
            outcome = replace(self._outcome(True, report=report), armed_ahead_s=ahead)
            self._finished.keep(rollout_id, outcome)
            self.settle()
        if commit_at:
            wait = min(commit_at + COMMIT_SETTLE_S - time.time(), COMMIT_SETTLE_S)
            time.sleep(max(0.0, wait))
        if staged.release is not None:
            self._on_committed(staged.release)
        log.info(
            "rollout %s finished: now %s (pause %.2f ms)",
            rollout_id,
            outcome.release,
            outcome.pause_s * 1000,
        )
        return outcome

    def _switch(self, plan: Any, at: float = 0.0) -> FinishReport:
        if isinstance(plan, _AlreadyThere):
            return FinishReport(self.code.current_release, 0.0, True, 0, 0)
        if isinstance(plan, _RollbackPlan):
            return self.code.rollback(at=at)
        return self.code.finish(plan, at=at)

    def _outcome(
        self,
        ok: bool,
        *,
        errors: Sequence[ModuleError] = (),
        restored: bool = False,
        report: FinishReport | None = None,
    ) -> Outcome:
        current = self.code.current_release
        if report is None:
            return Outcome(
                ok, tuple(errors), restored, release=label(current), digest=digest_of(current)
            )
        return Outcome(
            ok,
            tuple(errors),
            restored,
            report.pause_s,
            label(self.code.current_release),
            tuple(report.warnings),
            report.switched_at or time.time(),
            drained=report.drained,
            still_in_flight=report.still_in_flight,
            digest=digest_of(current),
        )

    # ---------------------------------------------------------------- abort
    def abort(self, rollout_id: str) -> bool:
        """Drop the prepared ``rollout_id`` (or cancel its prepare); True if one was dropped."""
        if rollout_id and self._preparing == rollout_id:
            # never wait behind the prepare being aborted: kill its staging process
            self.code.cancel_prepare()
        with self.lock:
            staged = self._staged
            if staged is None or staged.rollout_id != rollout_id:
                return False
            self._drop_staged()
            self.settle()
            log.info("rollout %s aborted: prepared release dropped", rollout_id)
            return True

    # ------------------------------------------------------------- rollback
    def rollback(self, rollout_id: str, expected: str = "") -> Outcome:
        """Go back to the previous release held in memory (one step, no prepare)."""
        with self.lock:
            done = self._rolled_back.get(rollout_id) if rollout_id else None
            if done is not None:
                return done
            previous = label(self.code.previous_release)
            if not self.code.can_rollback:
                return self._outcome(
                    False, errors=[refusal("*", "no previous release is held in memory")]
                )
            if expected and expected != previous:
                detail = (
                    f"expected to return to {expected}, but the previous release is "
                    f"{previous or '(boot code)'}"
                )
                return self._outcome(False, errors=[refusal("*", detail)])
            self._drop_staged(f"rollback {rollout_id!r} takes precedence")
            self.set_state(State.ROLLING_BACK, publish=False)
            try:
                report = self.code.rollback()
            except (FinishError, LoaderStateError) as exc:
                self.settle()
                return self._outcome(False, errors=exc.errors)
            outcome = self._outcome(True, report=report)
            if rollout_id:
                self._rolled_back.keep(rollout_id, outcome)
            self.settle()
        log.info(
            "rolled back to %s (pause %.2f ms)",
            outcome.release or "the boot code",
            outcome.pause_s * 1000,
        )
        return outcome

    # ------------------------------------------------------------ permanent
    def make_permanent(self, release: str = "") -> Permanence:
        """Make the current release the one this node boots into; ``release`` must be current."""
        with self.lock:
            current = label(self.code.current_release)
            if release and release != current:
                detail = f"{release} is not current here ({current or 'boot code'} is)"
                return self._permanence(False, [refusal("*", detail)])
            try:
                self.code.make_permanent()
            except OSError as exc:
                detail = f"cannot write the release to the code path: {exc}"
                return self._permanence(False, [refusal("*", detail)])
            self.settle()
            return self._permanence(True)

    def _permanence(self, ok: bool, errors: Sequence[ModuleError] = ()) -> Permanence:
        return Permanence(ok, label(self.code.permanent_release), tuple(errors))

    # ------------------------------------------------------------ decisions
    def apply_decision(
        self,
        rollout_id: str,
        decision: str,
        watch: DecisionWatch | None = None,
        *,
        included: bool = True,
    ) -> bool:
        """Act on a rollout's durable decision; True once nothing is left to do.

        ``commit`` finishes the prepared rollout through :meth:`finish`,
        ``abort`` drops it through :meth:`abort`; both are idempotent with the
        coordinator's own Finish/Abort.  ``included`` is False when the
        decision does not name this node among its participants (it voted too
        late, or was left out under ``--allow-missing``): such a node never
        commits on it; it drops what it prepared and is caught up later by
        the coordinator's convergence loop.
        """
        when: float | None = None  # switch at this instant (0: now), once the lock is released
        with self.lock:
            staged = self._staged
            if (
                self._state is State.STOPPING
                or staged is None
                or staged.rollout_id != rollout_id
                or (watch is not None and (watch.stopped.is_set() or staged.watch is not watch))
            ):
                return True  # finished, aborted or superseded meanwhile
            if decision == Decided.COMMIT and not included:
                log.warning(
                    "rollout %s: committed without this node (not among the decision's "
                    "participants); dropping the prepared %s",
                    rollout_id,
                    staged.label,
                )
                self.abort(rollout_id)
                return True
            if decision == Decided.COMMIT and watch is not None and watch.commit_at > 0:
                when = watch.commit_at  # the fleet's instant, whenever the Finish RPC comes
            elif decision == Decided.COMMIT and watch is not None and not watch.grace_over():
                return False  # the coordinator's Finish (with its commit instant) is on its way
            elif decision == Decided.COMMIT:
                log.warning(
                    "rollout %s: decision 'commit' found in etcd; finishing %s here without "
                    "waiting for the coordinator",
                    rollout_id,
                    staged.label,
                )
                when = 0.0
            elif decision == Decided.ABORT:
                log.warning(
                    "rollout %s: decision 'abort' found in etcd; dropping the prepared %s "
                    "without waiting for the coordinator",
                    rollout_id,
                    staged.label,
                )
                self.abort(rollout_id)
                return True
            else:
                return False
        # Outside the lock: a scheduled finish sleeps until the instant, and the
        # coordinator's Finish for the same rollout (which waits for it too) must not
        # queue behind it; whichever takes the lock first switches, the other replays.
        outcome = self.finish(rollout_id, when)
        if not outcome.ok and not outcome.already:
            log.error(
                "rollout %s: finish on the durable commit failed: %s",
                rollout_id,
                "; ".join(map(str, outcome.errors)),
            )
        elif not when and not outcome.already:
            log.warning(
                "rollout %s: finished by the node itself on the durable commit; now %s",
                rollout_id,
                outcome.release,
            )
        return True


def _replayed(done: Outcome) -> Outcome:
    return replace(done, already=True)
