"""The two-phase loader: OTP's ``prepare_loading``/``finish_loading`` for Python.

``prepare`` does every expensive and fallible thing without running any of
the release's code in this process: it verifies, compiles, diffs and plans
here, then *rehearses* the switch (new module bodies, changed statements,
class bodies, default values, ``code_change``) in a forked staging process
with a deadline (:mod:`node_agent._rehearsal`), whose effects die with it.
``finish`` applies the precomputed edits and runs the release's statements
once, behind the drain barrier, under deadlines, so guarded work sees the
whole release switch at once; the edits' inverses are the in-memory backup,
which makes ``rollback`` cost one finish.  At most two versions exist:
current and the backup.

This module is the :class:`Loader`: its state, its lock and the order of the
steps (prepare, finish, abort, rollback, make_permanent, status).  The steps
live beside it: validation, purge check, planning and the rehearsal in
:mod:`node_agent._prepare`; the switch, migrations and their errors in
:mod:`node_agent._finish`; touching memory before the hold in
:mod:`node_agent._prefault`; the code paths, what is loaded and compiling in
:mod:`node_agent._codepaths`; the records (:class:`Prepared`,
:class:`FinishReport`, ...) in :mod:`node_agent._prepared`, re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hotfleet._gc import paused_for as gc_paused_for
from hotfleet.errors import ModuleError, Reason
from hotfleet.imports import shared_trees
from hotfleet.release import Release
from node_agent._codecache import CodeCache, default_cache
from node_agent._codepaths import CodePaths
from node_agent._courtesy import in_background, yielding_gil
from node_agent._deadline import Abandoned, Overrun, Progress, Worker, start_watchdog
from node_agent._finish import (
    MigrationFailed,
    SwitchFailed,
    dry_run,
    finish_errors,
    migrate,
    overran,
    switch,
)
from node_agent._hold import held
from node_agent._hostslots import PrepareSlots, SlotWaitCancelled, SlotWaitTimeout
from node_agent._patch import Op, SetState, StagedCode, stage_inverses, undo
from node_agent._prefault import prefault, warm_migration
from node_agent._prepare import lap, plan_release, purge_check, rehearse_switch, validate
from node_agent._prepared import (
    Backup,
    FinishReport,
    Migration,
    ModuleState,
    ModuleStatus,
    Prepared,
    PreparedState,
    ReleaseInfo,
)
from node_agent._prepared import ModuleChange as ModuleChange  # re-exported, unused here
from node_agent._prologue import Instrumented, instrument_module
from node_agent._update import changed_parts
from node_agent.coverage import ChangedFunction, Coverage, changed_functions, needs_prologue
from node_agent.drain import DrainBarrier, HoldInfo
from node_agent.errors import FinishError, LoaderStateError, PrepareError

# The collector is paused while a prepare runs, at most this long (see prepare).
PREPARE_GC_PAUSE_S = 0.5
PREPARE_TIMEOUT_S = 30.0  # the staging process is killed after this long: ``timeout``
SWITCH_TIMEOUT_S = 10.0  # release statements inside the hold, then restored: ``timeout``
MIGRATION_TIMEOUT_S = 10.0  # each ``code_change`` at finish or rollback
# The staging process is background work beside a serving process: at +5 it gets about
# a third of a core that serving processes want (weights 335 vs 1024), all of an idle one.
STAGING_NICE = 5
T = TypeVar("T")


# A scheduled hold that begins more than this after its instant was late: a node
# starved or stopped through its lead.  Less is a sleep waking up late on a busy
# host (3 ms seen in CI), which no longer lead would change.
LATE_ALLOWANCE_S = 0.010
# After a scheduled hold (a fleet's commit instant), what a finish does next (the
# changed-code index, the counting twins, the participant's report, membership
# and reply) waits until this long after the instant.  Every worker of a packed
# host switches at the same instant on the same cores, and the bookkeeping of
# the first to switch took the CPU the last ones needed to begin their hold:
# 50 workers on 2 cores switched over 56-80 ms with it, 24-30 ms with it deferred
# (benchmarks/RESULTS.md, fleet).  Only the bookkeeping waits: the new code
# serves from the switch.
SETTLE_AFTER_INSTANT_S = 0.05


class _GaveWay(Exception):
    """An unpack stopped for a prepare."""


@dataclasses.dataclass(frozen=True)
class Unpacked:
    """What :meth:`Loader.unpack` did: ``done`` False says why not (``detail``, ``errors``)."""

    done: bool
    detail: str
    seconds: float
    errors: Sequence[ModuleError] = ()


class Loader:
    """Loads whole releases into this process, atomically and reversibly.

    ``code_paths`` are the directories the node's application code lives in;
    only modules under them can be replaced (everything else is *sticky*), and
    :meth:`make_permanent` writes the current release into the first one so a
    restarted worker boots into it.
    """

    def __init__(
        self,
        code_paths: Sequence[str | os.PathLike[str]],
        *,
        barrier: DrainBarrier | None = None,
        drain_timeout: float = 5.0,
        prepare_timeout: float = PREPARE_TIMEOUT_S,
        switch_timeout: float = SWITCH_TIMEOUT_S,
        migration_timeout: float = MIGRATION_TIMEOUT_S,
        code_cache: CodeCache | bool | None = True,
        prepare_slots: PrepareSlots | None = None,
        staging_nice: int = STAGING_NICE,
    ) -> None:
        """``code_cache``: where compiled code is shared with sibling workers of the host
        (:mod:`node_agent._codecache`); ``True`` = the host default, ``None``/``False`` = off.
        ``prepare_slots``: the host's turns to prepare, shared with its sibling workers
        (:mod:`node_agent._hostslots`; None = no limit).  ``staging_nice``: added to the
        staging process's niceness, so rehearsing a release yields the CPU to serving."""
        if not code_paths:
            raise ValueError("Loader needs at least one code path")
        if not hasattr(os, "fork"):
            raise RuntimeError(
                "hotfleet's loader needs os.fork() for its staging process (Linux, macOS)"
            )
        self.code_paths = [Path(p).resolve() for p in code_paths]
        self.barrier = barrier or DrainBarrier()
        self.drain_timeout = drain_timeout
        self.prepare_timeout = prepare_timeout
        self.switch_timeout = switch_timeout
        self.migration_timeout = migration_timeout
        self.prepare_slots = prepare_slots
        self.staging_nice = staging_nice
        self.code_cache: CodeCache | None = (
            default_cache() if code_cache is True else code_cache or None
        )
        # the code paths and, module by module, what of them is loaded
        self._code = CodePaths(self.code_paths, self.code_cache)
        self._cancel = threading.Event()  # set by cancel_prepare(): kills the staging process
        self._unpack_cancel = threading.Event()  # set by prepare(): an unpack gives way
        self._worker: Worker | None = None  # runs code_change, so a hung one can be left behind
        start_watchdog()
        self._lock = threading.RLock()
        self._generation = 0
        self._pending: Prepared | None = None
        self._backup: Backup | None = None
        # the journal whose SetCode ops hold the code that last left service (soft purge);
        # its code set is built when a purge check needs it, not inside a commit
        self._retired: Sequence[Op] = ()
        self.current_release: ReleaseInfo | None = None
        self.permanent_release: ReleaseInfo | None = None
        # calls and exceptions of what the provisional release changed (node_agent.coverage)
        self.coverage = Coverage()
        self._changed: list[ChangedFunction] = []
        for name, module in list(sys.modules.items()):
            if self._code.under(module) is not None:
                self._code.baseline(name, module)

    # ------------------------------------------------------------ properties
    @property
    def previous_release(self) -> ReleaseInfo | None:
        """The release :meth:`rollback` returns to, if a backup is held."""
        return self._backup.restores if self._backup else None

    @property
    def can_rollback(self) -> bool:
        return self._backup is not None

    def guard(self) -> Any:
        """Context manager marking guarded work (see :class:`DrainBarrier`)."""
        return self.barrier.guard()

    # ---------------------------------------------------------------- prepare
    def prepare(self, release: Release, *, force: bool = False) -> Prepared:
        """Validate and plan ``release``; raise :class:`PrepareError` listing every problem.

        Nothing of the release runs in this process: what needs running is
        rehearsed in a staging process, killed after ``prepare_timeout``
        (refused ``timeout``) or by :meth:`cancel_prepare`.  ``force`` skips
        the soft-purge check: threads still running the old version keep
        running it, and its backup is dropped.
        """
        self._unpack_cancel.set()  # an unpack under way stops at its next step
        with self._lock:
            try:
                with self._turn(release) as waited, yielding_gil():
                    prepared = self._prepare_locked(release, force)
            finally:
                # Spent here, not cleared on the way in: an Abort may come between the
                # caller announcing this prepare and this method taking the lock, and
                # must stop it (cleared on the way in, it was lost and the Abort waited
                # behind a stuck prepare until its deadline).  An Abort of this prepare
                # stopped no unpack: later unpacks go ahead.
                self._cancel.clear()
                self._unpack_cancel.clear()
            if waited:
                prepared.profile["slot_wait"] = waited
            return prepared

    @contextlib.contextmanager
    def _turn(self, release: Release) -> Iterator[float]:
        """This worker's turn among its host's siblings (:mod:`node_agent._hostslots`)."""
        if self.prepare_slots is None:
            yield 0.0
            return
        deadline = time.perf_counter() + self.prepare_timeout
        try:
            with self.prepare_slots.turn(deadline, self._cancel) as waited:
                yield waited
        except (SlotWaitTimeout, SlotWaitCancelled) as exc:
            why = (
                "cancelled (abort or agent stop) while waiting for a prepare slot"
                if isinstance(exc, SlotWaitCancelled)
                else f"waited prepare_timeout ({self.prepare_timeout:g}s) for one of the "
                f"{self.prepare_slots.slots} prepare slot(s) of this host: its other workers "
                "were preparing all that time"
            )
            raise PrepareError([ModuleError(release.label, Reason.TIMEOUT, why)]) from None

    def _prepare_locked(self, release: Release, force: bool) -> Prepared:
        started = time.perf_counter()
        if self._pending is not None:
            self._drop(self._pending)
        # Prepare allocates tens of thousands of objects (trees, plans) that die
        # with it: with the collector on they trigger dozens of collections,
        # full ones included, each walking the host's whole heap.
        # Each source is parsed once for all its readers, and the trees die here.
        cache0 = self.code_cache.stats() if self.code_cache is not None else {}
        profile: dict[str, float] = {}
        mark = started
        with gc_paused_for(PREPARE_GC_PAUSE_S) as checkpoint, shared_trees():
            errors = validate(release, checkpoint, self._code)
            if errors:
                raise PrepareError(errors)
            profile["validate"], mark = lap(mark)
            if not force:
                errors = purge_check(self._retired)
                if errors:
                    raise PrepareError(errors)
            profile["purge_check"], mark = lap(mark)
            prepared = plan_release(release, checkpoint, self._code, self._generation + 1)
            self._generation = prepared._generation
            profile["plan"], mark = lap(mark)
            prepared._instrumented = self._instrument(prepared)
            profile["instrument"], mark = lap(mark)
        if prepared.runs_code:
            self._rehearse(prepared, started)
        profile["rehearse"], mark = lap(mark)
        if self.code_cache is not None:
            for k, v in self.code_cache.stats().items():
                profile[f"cache_{k}"] = v - cache0.get(k, 0)
        profile.update(prepared.profile)  # the staging process's phases (rehearse_*)
        prepared.profile = profile
        prepared.prepare_s = time.perf_counter() - started
        self._pending = prepared
        return prepared

    def _instrument(self, prepared: Prepared) -> dict[str, Instrumented]:
        """Counting twins of the changed modules, where coverage needs them (3.11)."""
        if not needs_prologue():
            return {}
        out = {}
        for ms in prepared.release.modules:
            plan, new = prepared._plans.get(ms.name), prepared._new.get(ms.name)
            if plan is None and new is None:
                continue
            filename = new.filename if new is not None else self._code.filename(ms, plan.module)  # type: ignore[union-attr]
            try:
                out[ms.name] = instrument_module(
                    ms.name,
                    ms.source,
                    filename,
                    self.code_cache,
                    ms.actual_digest,
                    None if plan is None else changed_parts(plan),
                )
            except (SyntaxError, ValueError):  # compiled fine already; then it is not counted
                continue
        return out

    def changed_code(self) -> list[ChangedFunction]:
        """Functions and methods the current provisional release changed or added.

        Read off the finish journal: functions whose body was replaced (not a
        mere reformatting), functions and classes' methods bound by the
        release's statements, everything of its new modules.  Empty once the
        release is permanent or rolled back.
        """
        with self._lock:
            return list(self._changed)

    def unpack(self, release: Release, also: Callable[[], None] | None = None) -> Unpacked:
        """Do ahead of a rollout what a prepare of ``release`` would compute from its
        sources alone, and leave it in the host code cache: OTP's ``unpack_release``.

        Compiling, the planner's answers about the two sources (against what
        this worker runs now), the counting twins and the import sites are
        written to the host cache (:mod:`node_agent._codecache`) even by a
        worker without live siblings, so the rollout's prepare, on this worker
        and on every sibling, finds them there.  Nothing is staged, nothing of
        the release runs (no rehearsal: that depends on the state at the
        rollout), and nothing this process runs changes.  It runs on a thread
        of its own at :attr:`staging_nice` more niceness, yields the GIL as a
        prepare does, and gives way to a prepare: it does not start while one
        runs and stops at its next step when one begins.  Problems the
        release has are reported, not raised: the prepare will refuse it with
        the same reasons.  One worker of a host unpacks a release for the
        release it runs now (:meth:`CodeCache.claim`); its siblings answer
        that it was done.  ``also`` runs first, in the same conditions (the
        release files' own per-host answers).
        """
        started = time.perf_counter()
        if self.code_cache is None:
            return Unpacked(False, "no host code cache (HOTFLEET_CODE_CACHE=off)", 0.0)
        if not self._lock.acquire(blocking=False):
            return Unpacked(False, "a prepare is in progress", 0.0)
        try:
            if self._unpack_cancel.is_set():
                return Unpacked(False, "a prepare began", 0.0)
            base = self.current_release.digest if self.current_release else "boot code"
            if not self.code_cache.claim(f"unpack\0{release.digest}\0{base}"):
                return Unpacked(False, "this host has it unpacked already", 0.0)
            return in_background(
                lambda: self._unpack_locked(release, started, also),
                self.staging_nice,
                "hotfleet-unpack",
            )
        finally:
            self._lock.release()

    def _unpack_locked(
        self, release: Release, started: float, also: Callable[[], None] | None
    ) -> Unpacked:
        cache = self.code_cache
        assert cache is not None
        misses0 = cache.stats()["misses"]

        def step() -> None:
            checkpoint()
            if self._unpack_cancel.is_set():
                raise _GaveWay

        try:
            with gc_paused_for(PREPARE_GC_PAUSE_S) as checkpoint, shared_trees(), cache.writing():
                if also is not None:
                    also()
                errors = validate(release, step, self._code)
                if not errors:
                    prepared = plan_release(release, step, self._code, self._generation + 1)
                    step()
                    self._instrument(prepared)
        except _GaveWay:
            return Unpacked(False, "a prepare began", time.perf_counter() - started)
        except PrepareError as exc:
            errors = list(exc.errors)
        seconds = time.perf_counter() - started
        if errors:
            return Unpacked(False, "the release would be refused", seconds, errors)
        written = cache.stats()["misses"] - misses0
        return Unpacked(
            True, f"compiled and planned into the host code cache ({written} entries)", seconds
        )

    def cancel_prepare(self) -> None:
        """Stop a prepare in progress (from any thread): its staging process is killed.

        The prepare raises :class:`PrepareError` (``timeout``, "cancelled") at
        once; nothing was changed.  A cancel that comes before a prepare takes
        the loader stops that prepare too (its caller had announced it); each
        prepare spends the cancel it met.  An unpack in progress stops too.
        """
        self._cancel.set()
        self._unpack_cancel.set()
        if self.prepare_slots is not None:  # a prepare waiting for its turn leaves now
            self.prepare_slots.ring()

    def _rehearse(self, prepared: Prepared, started: float) -> None:
        """Run the switch and the migrations in a forked copy of this process."""
        rehearse_switch(
            prepared,
            started,
            self.prepare_timeout,
            self._cancel,
            self.staging_nice,
            lambda: dry_run(
                prepared,
                self.switch_timeout,
                self.migration_timeout,
                self._hold_worker,
                self._vsn(),
            ),
        )

    # ----------------------------------------------------------------- finish
    def finish(self, prepared: Prepared, *, at: float = 0.0) -> FinishReport:
        """Switch every module of ``prepared`` at once; idempotent.

        With ``at`` (unix time: a fleet's commit instant) everything before
        the hold (journals, warming, taking pages back) is done first and the
        hold begins at that instant; what follows the hold waits until
        :data:`SETTLE_AFTER_INSTANT_S` after it, so that the host's other
        workers, switching at the same instant, get the CPU first.

        The release's statements and new modules run here, once, behind the
        barrier, under ``switch_timeout``; each ``code_change`` under
        ``migration_timeout``.  Raises :class:`FinishError` (``restored=True``)
        if any of it raises or overruns: the previous version is restored
        before the barrier reopens.
        """
        with self._lock:
            if prepared.state is PreparedState.FINISHED and prepared.report is not None:
                return prepared.report
            self._check_current(prepared)
            journal: list[Op] = []
            # the counting twins go before the switch journals the code it replaces
            self.coverage.stop()
            old_vsn = self._vsn()
            staged: dict[str, list[StagedCode | None]] = {}

            def warm() -> None:  # on the holding thread: what wakes or faults, before the hold
                if prepared._migrations:  # its first run after the staging fork faults pages
                    warm_migration()
                prefault(prepared)
                # the journal of the code swaps is built here, not in the hold (and after
                # coverage.stop(), which puts the plain code back), and last: on the thread
                # and so in the CPU caches of the hold (made on the caller's thread, the
                # inverses were read cold from the other core's cache, measured in the hold)
                for name, plan in prepared._plans.items():
                    staged[name] = stage_inverses(plan.ops)

            def body(progress: Progress) -> tuple[float, float, int]:
                t0 = time.perf_counter()
                progress.step(self.switch_timeout, "switch")
                try:
                    switch(prepared, journal, self.switch_timeout, staged)
                    switched_at = time.time()
                    migrated = migrate(
                        prepared._migrations,
                        old_vsn,
                        journal,
                        progress.run_steps,
                        self.migration_timeout,
                    )
                except (SwitchFailed, MigrationFailed, Overrun) as exc:
                    progress.checkpoint()  # walked away from: the caller restored already
                    undo(journal)
                    raise FinishError(
                        finish_errors(exc, prepared, self.switch_timeout), restored=True
                    ) from None
                return time.perf_counter() - t0, switched_at, migrated

            (pause, switched_at, migrated), hold, ahead = self._held(
                body, self.switch_timeout, warm, journal, old_vsn, at
            )
            if at:  # the host's other workers switch at this instant too: they go first
                time.sleep(max(0.0, at + SETTLE_AFTER_INSTANT_S - time.time()))
            self._commit(prepared, journal)  # in the order applied: undo replays it backwards
            self._changed = changed_functions(journal)
            self.coverage.start(
                prepared.release.label, self._changed, prepared._instrumented
            )  # after the hold: nothing of it lengthens the pause
            report = FinishReport(
                ReleaseInfo.of(prepared.release),
                pause,
                hold.drained,
                hold.still_in_flight,
                migrated,
                tuple(prepared.warnings),
                switched_at,
                tuple(c.name for c in self._changed),
                ahead,
            )
            prepared.report = report
            return report

    def _check_current(self, prepared: Prepared) -> None:
        if (
            prepared.state is PreparedState.ABORTED
            or prepared._generation != self._generation
            or self._pending is not prepared
        ):
            raise LoaderStateError(
                [
                    ModuleError(
                        "*",
                        Reason.BAD_RELEASE,
                        f"prepared {prepared.release.name}@{prepared.release.version} is {prepared.state.value} or superseded; prepare again",
                    )
                ]
            )

    def _held(
        self,
        body: Callable[[Progress], T],
        first_step_s: float,
        before: Callable[[], None],
        journal: list[Op],
        vsn: Any,
        at: float = 0.0,
    ) -> tuple[T, HoldInfo, float | None]:
        """:func:`~node_agent._hold.held` on the loader's worker; every way it ends badly
        becomes a :class:`FinishError` with the previous version restored.

        Third: with ``at``, how long before that instant the hold was ready to
        begin (its warm-up done), or, if it began more than
        :data:`LATE_ALLOWANCE_S` after it, minus how late: for the
        coordinator's commit lead (:attr:`FinishReport.armed_ahead_s`).
        """
        ready: list[float] = []
        began: list[float] = []

        def warm_then_ready() -> None:
            before()
            ready.append(time.time())

        try:
            value, hold = held(
                self._hold_worker(),
                self.barrier,
                self.drain_timeout,
                first_step_s,
                body,
                before=warm_then_ready,
                restore=lambda: undo(journal),
                at=at,
                began=began,
            )
            if not (at and ready and began):
                return value, hold, None
            late = began[0] - at
            return value, hold, (at - ready[0]) if late <= LATE_ALLOWANCE_S else -late
        except Abandoned as stuck:
            raise FinishError(self._stuck(stuck.label, vsn), restored=True) from None
        except Overrun:  # outside the body's own steps: the drain outlasted its deadline
            undo(journal)
            detail = (
                f"the drain hold overran drain_timeout + {first_step_s:g}s; "
                "previous version restored"
            )
            raise FinishError([ModuleError("*", Reason.TIMEOUT, detail)], restored=True) from None

    def _stuck(self, label: object, old_vsn: Any) -> list[ModuleError]:
        """What the step the caller walked away from was doing (see :mod:`node_agent._hold`)."""
        after = "; previous version restored, its thread left behind"
        if isinstance(label, Migration):
            return [overran(label, old_vsn, self.migration_timeout, after)]
        what = (
            "the switch" if label == "switch" else "the drain hold"
        )  # blocked in C: the watchdog could not interrupt it
        return [
            ModuleError(
                "*",
                Reason.TIMEOUT,
                f"{what} did not return within switch_timeout ({self.switch_timeout:g}s): "
                f"release code blocked outside Python{after}",
            )
        ]

    def _hold_worker(self) -> Worker:
        """A healthy thread for holds and ``code_change`` calls, started before any hold."""
        if self._worker is None or not self._worker.healthy:
            self._worker = Worker("hotfleet-hold")
        return self._worker

    def _vsn(self) -> str | None:
        return self.current_release.version if self.current_release else None

    def _commit(self, prepared: Prepared, journal: list[Op]) -> None:
        release = prepared.release
        leaves = self.current_release
        loaded = self._code.loaded
        previous_loaded = {}
        for ms in release.modules:
            if ms.name in loaded:
                previous_loaded[ms.name] = loaded[ms.name]
            loaded[ms.name] = (ms.actual_digest, ms.source, release.label)
        self._backup = Backup(
            journal, leaves, ReleaseInfo.of(release), prepared._migrations, previous_loaded
        )
        self._retired = journal
        self.current_release = ReleaseInfo.of(release)
        prepared.state = PreparedState.FINISHED
        self._pending = None

    # ------------------------------------------------------------ abort etc.
    def abort(self, prepared: Prepared) -> None:
        """Drop a staged release; nothing visible had changed.  Idempotent."""
        with self._lock:
            if prepared.state is PreparedState.PREPARED:
                self._drop(prepared)

    def _drop(self, prepared: Prepared) -> None:
        prepared.state = PreparedState.ABORTED
        if self._pending is prepared:
            self._pending = None

    def rollback(self, *, at: float = 0.0) -> FinishReport:
        """Go back to the previous version from memory, behind the barrier (at ``at``).

        The newer code's ``code_change(("down", vsn), state, extra)`` runs for
        every object migrated by the upgrade, before the old code returns (as
        OTP does for downgrades).  If it raises, nothing changes.
        """
        with self._lock:
            backup = self._backup
            if backup is None:
                raise LoaderStateError(
                    [
                        ModuleError(
                            "*",
                            Reason.BAD_RELEASE,
                            "nothing to roll back to: no previous version is held in memory",
                        )
                    ]
                )
            if self._pending is not None:
                self._drop(self._pending)
            self.coverage.stop()  # plain code back before the undo journals it
            self._changed = []
            down = ("down", backup.restores.version if backup.restores else None)
            journal: list[Op] = []

            def body(progress: Progress) -> tuple[int, Sequence[Op], float]:
                t0 = time.perf_counter()
                try:
                    migrated = migrate(
                        backup.migrations, down, journal, progress.run_steps, self.migration_timeout
                    )
                except MigrationFailed as failed:
                    progress.checkpoint()  # walked away from: the caller restored already
                    undo(journal)
                    raise FinishError(failed.errors, restored=True) from None
                redo = undo(
                    [op for op in backup.journal if not isinstance(op, SetState)]
                )  # keep down-migrated state
                return migrated, redo, time.perf_counter() - t0

            (migrated, redo, pause), hold, ahead = self._held(
                body,
                self.migration_timeout,
                warm_migration if backup.migrations else lambda: None,
                journal,
                down,
                at,
            )
            self._generation += 1
            loaded = self._code.loaded
            for name in list(loaded):
                if name in backup.loaded:
                    loaded[name] = backup.loaded[name]
            self._retired = redo  # the version just left may still run in some thread
            self.current_release = backup.restores
            self._backup = None
            return FinishReport(
                backup.restores,
                pause,
                hold.drained,
                hold.still_in_flight,
                migrated,
                armed_ahead_s=ahead,
            )

    def make_permanent(self) -> None:
        """Make the current release what a restart boots into, and release the backup.

        Writes each module of the release into the first code path (atomic per
        file: write then rename), so ``status`` turns from ``modified`` to
        ``loaded``.
        """
        with self._lock:
            root = self.code_paths[0]
            for name, (digest, source, _label) in sorted(self._code.loaded.items()):
                module = sys.modules.get(name)
                if module is None or self._code.disk_digest(name) == digest:
                    continue
                path = (
                    root.joinpath(*name.split("."), "__init__.py")
                    if hasattr(module, "__path__")
                    else root.joinpath(*name.split(".")).with_suffix(".py")
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.hotfleet-tmp")
                tmp.write_bytes(source)
                os.replace(tmp, path)
            self.permanent_release = self.current_release
            self._backup = None
            self._retired = ()
            self.coverage.stop()
            self._changed = []

    # ----------------------------------------------------------------- status
    def status(self, module_name: str) -> ModuleStatus:
        """Compare the loaded code of a module with its source on the code path."""
        module = sys.modules.get(module_name)
        disk = self._code.disk_digest(module_name)
        if module is None:
            return ModuleStatus(module_name, ModuleState.NOT_LOADED, "", "", disk)
        if module_name in self._code.loaded:
            loaded, _, label = self._code.loaded[module_name]
        elif self._code.under(module) is not None:
            loaded, _, label = self._code.baseline(module_name, module)
        else:
            return ModuleStatus(module_name, ModuleState.LOADED, "", "", disk)
        if not disk:
            state = ModuleState.REMOVED
        else:
            state = ModuleState.LOADED if disk == loaded else ModuleState.MODIFIED
        return ModuleStatus(module_name, state, label, loaded, disk)

    def loaded_modules(self) -> list[str]:
        """Modules under the code paths this loader knows, sorted."""
        return sorted(self._code.loaded)


__all__ = [
    "FinishReport",
    "Loader",
    "ModuleChange",
    "ModuleState",
    "ModuleStatus",
    "Prepared",
    "PreparedState",
    "ReleaseInfo",
]
