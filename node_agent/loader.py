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
"""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
import hashlib
import importlib.machinery
import os
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotfleet._gc import paused as gc_paused
from hotfleet._gc import paused_for as gc_paused_for
from hotfleet.errors import ModuleError, Reason
from hotfleet.imports import (
    load_order,
    parse_source,
    release_dependencies,
    scan_imports,
    shared_trees,
)
from hotfleet.release import ModuleSource, Release
from node_agent import stateful
from node_agent._codecache import CodeCache, default_cache, retarget
from node_agent._deadline import (
    Abandoned,
    Overrun,
    Worker,
    arm,
    disarm,
    interrupt_after,
    reset,
    start_watchdog,
)
from node_agent._functions import Codes, functions_in, scan_heap
from node_agent._hostslots import PrepareSlots, SlotWaitCancelled, SlotWaitTimeout
from node_agent._install import NewModule, register_source, release_importable
from node_agent._patch import (
    MISSING,
    InstallModule,
    Op,
    SetCode,
    SetItem,
    SetState,
    apply_staged,
    stage_inverses,
    undo,
)
from node_agent._prologue import Instrumented, instrument_module
from node_agent._rehearsal import rehearse
from node_agent._statecopy import StateNotCopyable, copy_state, fresh_locks_in_place
from node_agent._update import (
    ModulePlan,
    ModulePlanner,
    Refused,
    merge_class,
)
from node_agent.coverage import ChangedFunction, Coverage, changed_functions, needs_prologue
from node_agent.drain import DrainBarrier
from node_agent.errors import FinishError, LoaderStateError, PrepareError

_OWN_PACKAGES = frozenset({"hotfleet", "node_agent", "coordinator"})
# The collector is paused while a prepare runs, at most this long (see prepare).
PREPARE_GC_PAUSE_S = 0.5
PREPARE_TIMEOUT_S = 30.0  # the staging process is killed after this long: ``timeout``
SWITCH_TIMEOUT_S = 10.0  # release statements inside the hold, then restored: ``timeout``
MIGRATION_TIMEOUT_S = 10.0  # each ``code_change`` at finish or rollback
# The staging process is background work beside a serving process: at +5 it gets about
# a third of a core that serving processes want (weights 335 vs 1024), all of an idle one.
STAGING_NICE = 5


class ModuleState(enum.StrEnum):
    NOT_LOADED = "not_loaded"
    LOADED = "loaded"
    MODIFIED = "modified"
    REMOVED = "removed"


@dataclass(frozen=True)
class ModuleStatus:
    """What :meth:`Loader.status` says of one module, compared by digest, never mtime."""

    module: str
    state: ModuleState
    release: str  # "name@version" of the release that loaded it, "" for the boot code
    loaded_digest: str
    disk_digest: str


@dataclass(frozen=True)
class ReleaseInfo:
    name: str
    version: str
    digest: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def of(cls, release: Release) -> ReleaseInfo:
        return cls(release.name, release.version, release.digest)


@dataclass(frozen=True)
class ModuleChange:
    """How prepare classified one module of the release."""

    module: str
    kind: str  # "new" | "updated" | "unchanged"
    details: tuple[str, ...] = ()


class PreparedState(enum.StrEnum):
    PREPARED = "prepared"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True)
class FinishReport:
    """What a finish or rollback did; ``pause_s`` is how long guarded work was held."""

    release: ReleaseInfo | None
    pause_s: float
    drained: bool
    still_in_flight: int
    migrated: int
    warnings: tuple[str, ...] = ()
    switched_at: float = 0.0  # wall-clock instant the new code became current (commit skew)
    changed_code: tuple[str, ...] = ()  # module:qualname of every function changed or added


@dataclass
class _Migration:
    obj: Any
    module: str
    extra: Any


@dataclass(frozen=True)
class _Binding:
    """``holder.<local>`` was bound by ``from <module> import <attr>``."""

    holder: dict[str, Any]
    local: str


@dataclass
class Prepared:
    """A release staged by :meth:`Loader.prepare`, ready to finish or abort."""

    release: Release
    order: list[tuple[str, ...]]
    changes: list[ModuleChange]
    warnings: list[str]
    prepare_s: float
    state: PreparedState = PreparedState.PREPARED
    report: FinishReport | None = None
    rehearsal_s: float = 0.0  # wall time of the staging process (0: nothing to run)
    rehearsal_cpu_s: float = 0.0  # its CPU
    # where the prepare's wall time went: step -> seconds (validate, purge_check, plan,
    # instrument, rehearse), plus the host code cache's hits/misses/waits of this prepare
    profile: dict[str, float] = field(default_factory=dict)
    _generation: int = 0
    _new: dict[str, NewModule] = field(default_factory=dict)
    _plans: dict[str, ModulePlan] = field(default_factory=dict)
    _migrations: list[_Migration] = field(default_factory=list)
    _bindings: dict[tuple[str, str], list[_Binding]] = field(default_factory=dict)
    # 3.11 only: counting twins of the changed modules' code (node_agent._prologue)
    _instrumented: dict[str, Instrumented] = field(default_factory=dict)

    @property
    def runs_code(self) -> bool:
        """Does finishing it execute any of the release's code (else it is pure patching)?"""
        return bool(
            self._new
            or self._migrations
            or any(p.statements or p.late_ops for p in self._plans.values())
        )


@dataclass
class _Backup:
    """The previous version, in memory: the journal that undoes the last switch."""

    journal: list[Op]
    restores: ReleaseInfo | None
    leaves: ReleaseInfo | None
    migrations: list[_Migration]
    loaded: dict[str, tuple[str, bytes, str]]


def _lap(since: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - since, now


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        self._cancel = threading.Event()  # set by cancel_prepare(): kills the staging process
        self._worker: Worker | None = None  # runs code_change, so a hung one can be left behind
        start_watchdog()
        self._lock = threading.RLock()
        self._generation = 0
        self._pending: Prepared | None = None
        self._backup: _Backup | None = None
        # the journal whose SetCode ops hold the code that last left service (soft purge);
        # its code set is built when a purge check needs it, not inside a commit
        self._retired: Sequence[Op] = ()
        # module -> (digest, source, release label) of what is loaded
        self._loaded: dict[str, tuple[str, bytes, str]] = {}
        self.current_release: ReleaseInfo | None = None
        self.permanent_release: ReleaseInfo | None = None
        # calls and exceptions of what the provisional release changed (node_agent.coverage)
        self.coverage = Coverage()
        self._changed: list[ChangedFunction] = []
        for name, module in list(sys.modules.items()):
            if self._file_under_code_path(module) is not None:
                self._baseline(name, module)

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
        with self._lock:
            self._cancel.clear()
            with self._turn(release) as waited:
                prepared = self._prepare_locked(release, force)
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
            errors = self._validate(release, checkpoint)
            if errors:
                raise PrepareError(errors)
            profile["validate"], mark = _lap(mark)
            if not force:
                errors = self._purge_check()
                if errors:
                    raise PrepareError(errors)
            profile["purge_check"], mark = _lap(mark)
            prepared = self._plan(release, checkpoint)
            profile["plan"], mark = _lap(mark)
            prepared._instrumented = self._instrument(prepared)
            profile["instrument"], mark = _lap(mark)
        if prepared.runs_code:
            self._rehearse(prepared, started)
        profile["rehearse"], mark = _lap(mark)
        if self.code_cache is not None:
            for k, v in self.code_cache.stats().items():
                profile[f"cache_{k}"] = v - cache0.get(k, 0)
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
            filename = new.filename if new is not None else self._filename(ms, plan.module)  # type: ignore[union-attr]
            try:
                out[ms.name] = instrument_module(
                    ms.name, ms.source, filename, self.code_cache, ms.actual_digest
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

    def cancel_prepare(self) -> None:
        """Stop a prepare in progress (from any thread): its staging process is killed.

        The prepare raises :class:`PrepareError` (``timeout``, "cancelled") at
        once; nothing was changed.
        """
        self._cancel.set()

    def _rehearse(self, prepared: Prepared, started: float) -> None:
        """Run the switch and the migrations in a forked copy of this process."""
        left = max(0.0, self.prepare_timeout - (time.perf_counter() - started))
        outcome = rehearse(
            lambda: self._rehearsal(prepared), left, self._cancel, nice=self.staging_nice
        )
        prepared.rehearsal_s, prepared.rehearsal_cpu_s = outcome.wall_s, outcome.cpu_s
        label = prepared.release.label
        if outcome.timed_out or outcome.cancelled:
            why = (
                "cancelled (abort or agent stop)"
                if outcome.cancelled
                else f"the release's code did not finish running within prepare_timeout "
                f"({self.prepare_timeout:g}s) in the staging process; it was killed"
            )
            raise PrepareError([ModuleError(label, Reason.TIMEOUT, why)])
        if outcome.died:
            raise PrepareError(
                [ModuleError(label, Reason.IMPORT_ERROR, f"staging process {outcome.died}")]
            )
        errors = [_from_dict(e) for e in outcome.errors]
        if errors:
            raise PrepareError(errors)
        prepared.warnings.extend(outcome.warnings)

    def _rehearsal(self, prepared: Prepared) -> tuple[list[dict[str, str]], list[str]]:
        """In the staging process: do what finish will do, report what failed."""
        notes: list[str] = []
        for m in prepared._migrations:
            owner = type(m.obj).__qualname__
            notes.extend(fresh_locks_in_place(m.obj, owner, stateful.set_state, stateful.get_state))
        journal: list[Op] = []
        try:
            with interrupt_after(self.switch_timeout):
                self._switch(prepared, journal)
            worker = self._migration_worker() if prepared._migrations else None
            self._migrate(prepared._migrations, self._vsn(), journal, worker, dry_run=True)
        except _SwitchFailed as failed:
            return [_as_dict(failed.error)], notes
        except _MigrationFailed as failed:
            return [_as_dict(e) for e in failed.errors], notes
        except Overrun:
            error = ModuleError(
                prepared.release.label,
                Reason.TIMEOUT,
                f"the switch overran switch_timeout ({self.switch_timeout:g}s) in the staging process",
            )
            return [_as_dict(error)], notes
        return [], notes

    def _validate(self, release: Release, checkpoint: Callable[[], None]) -> list[ModuleError]:
        errors = list(release.problems)
        seen: dict[str, ModuleSource] = {}
        for ms in release.modules:
            checkpoint()
            if ms.name in seen:
                errors.append(
                    ModuleError(
                        ms.name,
                        Reason.DUPLICATED,
                        f"both {seen[ms.name].path} and {ms.path} define it",
                    )
                )
                continue
            seen[ms.name] = ms
            if ms.digest != ms.actual_digest:
                errors.append(
                    ModuleError(
                        ms.name,
                        Reason.DIGEST_MISMATCH,
                        f"{ms.path}: expected sha256 {ms.digest}, content is {ms.actual_digest}",
                    )
                )
                continue
            loaded = self._loaded.get(ms.name)
            try:
                if loaded is None or loaded[0] != ms.actual_digest or ms.name not in sys.modules:
                    self._compile(ms, sys.modules.get(ms.name))  # else it runs already: unchanged
            except (SyntaxError, ValueError) as exc:
                line = getattr(exc, "lineno", None)
                errors.append(
                    ModuleError(
                        ms.name,
                        Reason.BADFILE,
                        f"{ms.path}{f' line {line}' if line else ''}: {getattr(exc, 'msg', exc)}",
                    )
                )
                continue
            sticky = self._sticky_reason(ms.name)
            if sticky:
                errors.append(ModuleError(ms.name, Reason.STICKY, sticky))
        if errors:
            return errors
        for ms in release.modules:
            errors.extend(self._missing_dependencies(ms, release))
        return errors

    def _sticky_reason(self, name: str) -> str:
        top = name.partition(".")[0]
        if name == "__main__":
            return "__main__ cannot be replaced"
        if top in _OWN_PACKAGES:
            return "hotfleet's own code cannot be hot-loaded"
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            return f"{top} is a standard library module"
        module = sys.modules.get(name)
        if module is not None:
            if getattr(module, "__hotfleet_sticky__", False):
                return "the module opted out (__hotfleet_sticky__ = True)"
            file = getattr(module, "__file__", None)
            if not file:
                return "built-in or namespace module without source"
            if not file.endswith(".py"):
                return f"C extension or compiled module ({file})"
            if self._file_under_code_path(module) is None:
                return f"loaded from {file}, outside the node's code paths"
            return ""
        if "." not in name:
            spec = importlib.machinery.PathFinder.find_spec(
                name, [p for p in sys.path if p and Path(p).resolve() not in self.code_paths]
            )
            if spec is not None and spec.origin and "site-packages" in spec.origin:
                return f"would shadow the installed package at {spec.origin}"
            return ""
        # A new submodule of an installed package (``tenacity.injected``) would
        # run release code inside a third-party package's namespace, where its
        # own modules import it: only packages under the code paths take new
        # modules.  Judged by the top-level package, loaded or merely installed.
        package = sys.modules.get(top)
        if package is not None:
            where = getattr(package, "__file__", None) or "no source file"
            if self._file_under_code_path(package) is None:
                return f"{top} is an installed package ({where}), not under the code paths"
            return ""
        spec = importlib.machinery.PathFinder.find_spec(
            top, [p for p in sys.path if p and Path(p).resolve() not in self.code_paths]
        )
        where = (
            "" if spec is None else spec.origin or " ".join(spec.submodule_search_locations or ())
        )
        if "site-packages" in where or "dist-packages" in where:
            return f"{top} is an installed package ({where}), not under the code paths"
        return ""

    def _missing_dependencies(self, ms: ModuleSource, release: Release) -> list[ModuleError]:
        info = scan_imports(ms.name, ms.source, is_package=ms.is_package)
        names = set(release.module_names())
        out = []
        for dep in sorted(set(info.required) | set(ms.depends)):
            if dep in names or dep in sys.modules or self._importable(dep, names):
                continue
            why = "declared in depends" if dep in ms.depends else "imported at module level"
            out.append(
                ModuleError(
                    ms.name,
                    Reason.MISSING_DEPENDENCY,
                    f"{dep} ({why}) is neither in the release nor importable on this node",
                )
            )
        return out

    def _importable(self, name: str, release_names: set[str]) -> bool:
        parent, _, _ = name.rpartition(".")
        if not parent:
            return (
                name in sys.builtin_module_names
                or importlib.machinery.PathFinder.find_spec(
                    name, [*map(str, self.code_paths), *sys.path]
                )
                is not None
            )
        if parent in release_names:
            return False
        pkg = sys.modules.get(parent)
        path = getattr(pkg, "__path__", None)
        if path is None:
            return self._importable(parent, release_names)
        return importlib.machinery.PathFinder.find_spec(name, list(path)) is not None

    def _purge_check(self) -> list[ModuleError]:
        """Soft purge: refuse while any thread or generator still runs the old version."""
        old_codes = Codes(op.code for op in self._retired if isinstance(op, SetCode))
        if not old_codes:
            return []
        errors = []
        me = threading.get_ident()
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            f: types.FrameType | None = frame
            while f is not None:
                if f.f_code in old_codes and ident != me:
                    errors.append(
                        ModuleError(
                            f.f_globals.get("__name__", "?"),
                            Reason.NOT_PURGED,
                            f"thread {names.get(ident, ident)!r} is still executing the old {f.f_code.co_qualname} "
                            f"(line {f.f_lineno}); retry when it returns, or force",
                        )
                    )
                    break
                f = f.f_back
        for desc in scan_heap(Codes(), old_codes)[1]:
            errors.append(
                ModuleError(
                    "?",
                    Reason.NOT_PURGED,
                    f"a suspended {desc} still runs the old version; close it, or force",
                )
            )
        return errors

    def _plan(self, release: Release, checkpoint: Callable[[], None]) -> Prepared:
        """Everything finish needs, computed from the trees: nothing of the release runs."""
        deps = release_dependencies(release)
        order = load_order(deps)
        by_name = {ms.name: ms for ms in release.modules}
        changes: list[ModuleChange] = []
        warnings: list[str] = []
        errors: list[ModuleError] = []
        plans: dict[str, ModulePlan] = {}
        new_modules: dict[str, NewModule] = {}
        for unit in order:
            for name in unit:
                checkpoint()
                ms = by_name[name]
                module = sys.modules.get(name)
                if module is None:
                    new_modules[name] = self._new_module(ms)
                    changes.append(ModuleChange(name, "new"))
                    continue
                old_digest, old_source, _ = self._baseline(name, module)
                if old_digest == ms.actual_digest:
                    changes.append(ModuleChange(name, "unchanged"))
                    continue
                code = self._compile(ms, module)
                planner = ModulePlanner(
                    module, old_source, ms.source, self._filename(ms, module), code
                )
                try:
                    plan = planner.build()
                except Refused as exc:
                    errors.append(ModuleError(name, exc.reason, exc.detail))
                    continue
                plans[name] = plan
                changes.append(ModuleChange(name, "updated", tuple(plan.changes)))
                warnings.extend(plan.warnings)
        if errors:
            raise PrepareError(errors)
        live, suspended = scan_heap(
            Codes(old for p in plans.values() for old, _ in p.nested.values()),
            Codes(c for p in plans.values() for c in p.replaced_codes),
        )
        for plan in plans.values():
            before = len(plan.warnings)
            plan.patch_closures(live)
            warnings.extend(plan.warnings[before:])
        warnings.extend(f"{g} keeps running its old code until it finishes" for g in suspended)
        frozen = gc.get_freeze_count()
        if frozen and any(p.nested or p.replaced_codes for p in plans.values()):
            warnings.append(
                f"{frozen} objects are frozen (gc.freeze()) and invisible to the heap scan: "
                "closures or generators among them keep their old code"
            )
        self._generation += 1
        prepared = Prepared(
            release,
            order,
            changes,
            warnings,
            0.0,
            _generation=self._generation,
            _new=new_modules,
            _plans=plans,
            _migrations=self._migrations_of(release, plans),
        )
        prepared._bindings = self._from_bindings(release, list(plans.values()))
        return prepared

    def _new_module(self, ms: ModuleSource) -> NewModule:
        filename = self._filename(ms)
        search = tuple(str(p.joinpath(*ms.name.split("."))) for p in self.code_paths)
        return NewModule(ms.name, filename, ms.source, self._compile(ms), ms.is_package, search)

    @staticmethod
    def _migrations_of(release: Release, plans: dict[str, ModulePlan]) -> list[_Migration]:
        """Registered objects whose class's module this release updates (instruction update)."""
        out = []
        for obj in stateful.registered():
            module = type(obj).__module__
            ms = release.get(module)
            if module in plans and ms is not None and ms.instruction == "update":
                out.append(_Migration(obj, module, ms.extra))
        return out

    def _from_bindings(
        self, release: Release, plans: list[ModulePlan]
    ) -> dict[tuple[str, str], list[_Binding]]:
        """Who bound names of the updated modules with ``from m import x``."""
        targets = {p.module.__name__ for p in plans}
        out: dict[tuple[str, str], list[_Binding]] = {}
        if not targets:
            return out
        holders: list[tuple[str, bytes, bool, dict[str, Any]]] = []
        for name, (_, source, _) in list(self._loaded.items()):
            module = sys.modules.get(name)
            if module is not None:
                ms = release.get(name)
                holders.append(
                    (
                        name,
                        ms.source if ms else source,
                        hasattr(module, "__path__"),
                        module.__dict__,
                    )
                )
        for name, source, is_pkg, holder in holders:
            try:
                info = scan_imports(name, source, is_package=is_pkg)
            except SyntaxError:
                continue
            for b in info.from_bindings:
                if b.module in targets:
                    out.setdefault((b.module, b.attr), []).append(_Binding(holder, b.local))
        return out

    # ----------------------------------------------------------------- finish
    def finish(self, prepared: Prepared) -> FinishReport:
        """Switch every module of ``prepared`` at once; idempotent.

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
            # Everything that wakes a thread or faults a page happens before the hold.
            worker = self._migration_worker() if prepared._migrations else None
            if worker is not None:  # its first run after the staging fork faults pages
                worker.run_all([_warm_migration], self.migration_timeout)
            # the journal of the code swaps is built here, not in the hold (and after
            # coverage.stop(), which puts the plain code back)
            staged = {name: stage_inverses(plan.ops) for name, plan in prepared._plans.items()}
            _prefault(prepared)
            token = arm(self.drain_timeout + self.switch_timeout)
            try:
                with gc_paused(), self.barrier.hold(self.drain_timeout) as hold:
                    t0 = time.perf_counter()
                    reset(token, self.switch_timeout)
                    try:
                        self._switch(prepared, journal, staged)
                        disarm(token)
                        switched_at = time.time()
                        migrated = self._migrate(prepared._migrations, self._vsn(), journal, worker)
                    except (_SwitchFailed, _MigrationFailed, Overrun) as exc:
                        disarm(token)
                        undo(journal)
                        raise FinishError(
                            self._finish_errors(exc, prepared), restored=True
                        ) from None
                    pause = time.perf_counter() - t0
            except Overrun:  # only if the drain itself outlasted both timeouts
                raise FinishError(self._finish_errors(Overrun(), prepared), restored=True) from None
            finally:
                disarm(token)
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
            )
            prepared.report = report
            return report

    def _finish_errors(self, exc: BaseException, prepared: Prepared) -> list[ModuleError]:
        if isinstance(exc, _SwitchFailed):
            e = exc.error
            return [ModuleError(e.module, e.reason, f"{e.detail}; previous version restored")]
        if isinstance(exc, _MigrationFailed):
            return exc.errors
        return [
            ModuleError(
                prepared.release.label,
                Reason.TIMEOUT,
                f"the switch overran switch_timeout ({self.switch_timeout:g}s); "
                "previous version restored",
            )
        ]

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

    def _switch(
        self,
        prepared: Prepared,
        journal: list[Op],
        staged: dict[str, list[SetCode | None]] | None = None,
    ) -> None:
        """The swap itself, module by module in dependency order.

        Precomputed edits, then the module's changed statements (the only
        release code that runs, with new modules' bodies); every binding they
        change is journaled, even when the statement raises half-way.
        Raises :class:`_SwitchFailed` naming the module.
        """
        changed: list[tuple[str, str, Any]] = []
        with release_importable(list(prepared._new.values())):
            for unit in prepared.order:
                for name in unit:
                    try:
                        if name in prepared._new:
                            self._install(prepared._new[name], journal)
                        elif name in prepared._plans:
                            plan = prepared._plans[name]
                            inverses = staged.get(name) if staged is not None else None
                            self._apply_plan(plan, journal, changed, inverses)
                    except Refused as exc:
                        raise _SwitchFailed(ModuleError(name, exc.reason, exc.detail)) from None
                    except Overrun:
                        raise _SwitchFailed(
                            ModuleError(
                                name,
                                Reason.TIMEOUT,
                                f"its code overran switch_timeout ({self.switch_timeout:g}s)",
                            )
                        ) from None
                    except Exception as exc:
                        raise _SwitchFailed(
                            ModuleError(name, Reason.IMPORT_ERROR, _describe(exc, name))
                        ) from None
        self._rebind_from_imports(prepared, changed, journal)
        if hasattr(sys, "_clear_type_cache"):
            sys._clear_type_cache()

    @staticmethod
    def _install(new: NewModule, journal: list[Op]) -> None:
        """Run a new module's body (unless an import earlier in the switch did) and journal it."""
        try:
            if new.name not in sys.modules:
                importlib.import_module(new.name)
        finally:
            if new.name in sys.modules:  # whoever imported it: undo removes it
                journal.append(InstallModule(new.name, None))
            else:
                register_source(new.filename, new.source)

    @staticmethod
    def _apply_plan(
        plan: ModulePlan,
        journal: list[Op],
        changed: list[tuple[str, str, Any]],
        inverses: list[SetCode | None] | None = None,
    ) -> None:
        # the inverses of the code swaps were built before the hold (see finish)
        apply_staged(plan.ops, stage_inverses(plan.ops) if inverses is None else inverses, journal)
        g = plan.module.__dict__
        for st in plan.statements:
            if st.literal is not None:  # precomputed: nothing to execute
                key, value = st.literal
                old = g.get(key, MISSING)
                g[key] = value
                journal.append(SetItem(g, key, old))
                changed.append((plan.module.__name__, key, old))
                continue
            # only the names the statement can bind are compared (the pause must not
            # grow with the size of the module), the whole namespace when unsure
            before = dict(g) if st.binds is None else {k: g.get(k, MISSING) for k in st.binds}
            try:
                exec(st.code, g)
                if st.merge_class is not None:
                    fresh = g[st.name]
                    g[st.name] = st.merge_class
                    merge_ops: list[Op] = []
                    merge_class(st.merge_class, fresh, merge_ops)
                    journal.extend(op.apply() for op in merge_ops)
            finally:
                after = g.keys() if st.binds is None else st.binds
                for k in list(after):
                    old, new = before.get(k, MISSING), g.get(k, MISSING)
                    if old is not new:
                        journal.append(SetItem(g, k, old))
                        changed.append((plan.module.__name__, k, old))
                if st.binds is None:
                    for k in before.keys() - g.keys():
                        journal.append(SetItem(g, k, before[k]))
        for op in plan.late_ops:
            journal.append(op.apply())
        for name in plan.removed:
            old = g.get(name, MISSING)
            journal.append(SetItem(g, name, MISSING).apply())
            changed.append((plan.module.__name__, name, old))

    @staticmethod
    def _rebind_from_imports(
        prepared: Prepared, changed: list[tuple[str, str, Any]], journal: list[Op]
    ) -> None:
        """``from m import x`` elsewhere that still holds an object this switch replaced.

        Few bindings, many changed names: looked up from the bindings' side.
        """
        stale: dict[tuple[str, str], list[Any]] = {}
        for module, key, old in changed:
            stale.setdefault((module, key), []).append(old)
        for (module, key), bindings in prepared._bindings.items():
            olds = stale.get((module, key))
            if not olds:
                continue
            new = sys.modules[module].__dict__.get(key, MISSING)
            for b in bindings:
                bound = b.holder.get(b.local, MISSING)
                if bound is not new and any(bound is o for o in olds):
                    journal.append(SetItem(b.holder, b.local, new).apply())

    def _migration_worker(self) -> Worker:
        """A healthy worker for ``code_change`` calls, started before any hold."""
        if self._worker is None or not self._worker.healthy:
            self._worker = Worker("hotfleet-migrations")
        return self._worker

    def _migrate(
        self,
        migrations: list[_Migration],
        old_vsn: Any,
        journal: list[Op],
        worker: Worker | None,
        *,
        dry_run: bool = False,
    ) -> int:
        """Run ``code_change`` (already-current code) for every registered object, all or none.

        Each call gets a faithful copy of the object's state (fresh locks, see
        :mod:`node_agent._statecopy`) and runs on ``worker`` (handed over in
        one batch), each under ``migration_timeout``; the states are
        installed only once all returned.  A call that overruns is left
        behind on its worker (which is replaced) and the later ones never run.
        """
        pending = [(m, fn) for m in migrations if (fn := getattr(m.obj, "code_change", None))]
        if not pending:
            return 0
        assert worker is not None

        def call(obj: Any, fn: Any, extra: Any) -> Any:
            owner = type(obj).__qualname__
            try:
                state, _ = copy_state(stateful.get_state(obj), owner, stand_ins=dry_run)
            except StateNotCopyable:
                state = dict(stateful.get_state(obj))
            result = fn(old_vsn, state, extra)
            if not isinstance(result, dict):
                raise TypeError(f"code_change returned {type(result).__name__}, expected a dict")
            return result

        calls = [functools.partial(call, m.obj, fn, m.extra) for m, fn in pending]
        after = (
            " (dry run on a copy of the live state)" if dry_run else "; previous version restored"
        )
        errors = []
        try:
            outcomes = worker.run_all(calls, self.migration_timeout)
        except Abandoned as exc:
            m = pending[exc.index][0]
            raise _MigrationFailed(
                [
                    ModuleError(
                        m.module,
                        Reason.TIMEOUT,
                        f"{type(m.obj).__qualname__}.code_change({old_vsn!r}) did not return "
                        f"within migration_timeout ({self.migration_timeout:g}s){after}",
                    )
                ]
            ) from None
        for (m, _), outcome in zip(pending, outcomes, strict=True):
            if not outcome.ok:
                raised = outcome.value
                errors.append(
                    ModuleError(
                        m.module,
                        Reason.CODE_CHANGE_FAILED,
                        f"{type(m.obj).__qualname__}.code_change({old_vsn!r}) raised "
                        f"{type(raised).__name__}: {raised}{after}",
                    )
                )
        if errors:
            raise _MigrationFailed(errors)
        for (m, _), outcome in zip(pending, outcomes, strict=True):
            journal.append(SetState(m.obj, outcome.value).apply())
        return len(pending)

    def _vsn(self) -> str | None:
        return self.current_release.version if self.current_release else None

    def _commit(self, prepared: Prepared, journal: list[Op]) -> None:
        release = prepared.release
        leaves = self.current_release
        previous_loaded = {}
        for ms in release.modules:
            if ms.name in self._loaded:
                previous_loaded[ms.name] = self._loaded[ms.name]
            self._loaded[ms.name] = (ms.actual_digest, ms.source, release.label)
        self._backup = _Backup(
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

    def rollback(self) -> FinishReport:
        """Go back to the previous version from memory, behind the barrier.

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
            worker = self._migration_worker() if backup.migrations else None
            with gc_paused(), self.barrier.hold(self.drain_timeout) as hold:
                t0 = time.perf_counter()
                try:
                    migrated = self._migrate(backup.migrations, down, journal, worker)
                except _MigrationFailed as failed:
                    undo(journal)
                    raise FinishError(failed.errors, restored=True) from None
                redo = undo(
                    [op for op in backup.journal if not isinstance(op, SetState)]
                )  # keep down-migrated state
                pause = time.perf_counter() - t0
            self._generation += 1
            for name in list(self._loaded):
                if name in backup.loaded:
                    self._loaded[name] = backup.loaded[name]
            self._retired = redo  # the version just left may still run in some thread
            self.current_release = backup.restores
            self._backup = None
            return FinishReport(
                backup.restores, pause, hold.drained, hold.still_in_flight, migrated
            )

    def make_permanent(self) -> None:
        """Make the current release what a restart boots into, and release the backup.

        Writes each module of the release into the first code path (atomic per
        file: write then rename), so ``status`` turns from ``modified`` to
        ``loaded``.
        """
        with self._lock:
            root = self.code_paths[0]
            for name, (digest, source, _label) in sorted(self._loaded.items()):
                module = sys.modules.get(name)
                if module is None or self._disk_digest(name) == digest:
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
        disk = self._disk_digest(module_name)
        if module is None:
            return ModuleStatus(module_name, ModuleState.NOT_LOADED, "", "", disk)
        if module_name in self._loaded:
            loaded, _, label = self._loaded[module_name]
        elif self._file_under_code_path(module) is not None:
            loaded, _, label = self._baseline(module_name, module)
        else:
            return ModuleStatus(module_name, ModuleState.LOADED, "", "", disk)
        if not disk:
            state = ModuleState.REMOVED
        else:
            state = ModuleState.LOADED if disk == loaded else ModuleState.MODIFIED
        return ModuleStatus(module_name, state, label, loaded, disk)

    def loaded_modules(self) -> list[str]:
        """Modules under the code paths this loader knows, sorted."""
        return sorted(self._loaded)

    # ---------------------------------------------------------------- helpers
    def _file_under_code_path(self, module: Any) -> Path | None:
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or not file.endswith(".py"):
            return None
        path = Path(file).resolve()
        return path if any(path.is_relative_to(root) for root in self.code_paths) else None

    def _baseline(self, name: str, module: types.ModuleType) -> tuple[str, bytes, str]:
        """What is loaded: the release's source, or for boot code the file as first seen."""
        known = self._loaded.get(name)
        if known is None:
            path = self._file_under_code_path(module)
            source = path.read_bytes() if path is not None and path.exists() else b""
            known = (_digest(source), source, "")
            self._loaded[name] = known
        return known

    def _disk_digest(self, name: str) -> str:
        rel = name.split(".")
        for root in self.code_paths:
            for candidate in (
                root.joinpath(*rel, "__init__.py"),
                root.joinpath(*rel).with_suffix(".py"),
            ):
                if candidate.is_file():
                    return _digest(candidate.read_bytes())
        return ""

    def _compile(self, ms: ModuleSource, module: Any = None) -> types.CodeType:
        """Compile once per distinct source and file name (validation compiled it already)."""
        return _compile_cached(ms.source, self._filename(ms, module), self.code_cache)

    def _filename(self, ms: ModuleSource, module: Any = None) -> str:
        file = getattr(module, "__file__", None)
        return file if isinstance(file, str) else str(self.code_paths[0] / ms.path)


@functools.lru_cache(maxsize=64)
def _compile_cached(source: bytes, filename: str, cache: CodeCache | None) -> types.CodeType:
    """Compiled once per process and, through the host ``cache``, once per host."""

    def make() -> types.CodeType:
        # from the (cached) tree the planner diffs anyway: the source is parsed once
        tree = parse_source(source)
        with gc_paused():
            return compile(tree, filename, "exec", dont_inherit=True)

    if cache is None:
        return make()
    code = cache.get("exec", _digest(source), make)
    if not isinstance(code, types.CodeType):  # not what "exec" entries hold: ignore it
        return make()
    return retarget(code, filename)


class _MigrationFailed(Exception):
    def __init__(self, errors: list[ModuleError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


def _as_dict(error: ModuleError) -> dict[str, str]:
    return {"module": error.module, "reason": error.reason.value, "detail": error.detail}


def _from_dict(raw: dict[str, Any]) -> ModuleError:
    reason = str(raw.get("reason"))
    known = reason in {r.value for r in Reason}
    return ModuleError(
        str(raw.get("module", "*")),
        Reason(reason) if known else Reason.IMPORT_ERROR,
        str(raw.get("detail", "")),
    )


def _prefault(prepared: Prepared) -> None:
    """Touch, before the hold, the memory the switch will write.

    After the staging fork every page of this process is copy-on-write: the
    first write to each costs a page fault (~2 µs in a VM; ~200 of them in the
    benchmark's switch, measured per step with ``RUSAGE_THREAD``).  In
    CPython a read that takes a reference writes the object's reference
    count, so reading here what the switch will read or replace moves the
    fault out of the hold.  Measured sources, largest first: the type
    cache clear (the cache array and every cached name's reference count,
    ~110 faults: cleared here once, so the clear in the hold writes private
    pages), the classes a statement merges into (their members and code),
    the functions whose code, defaults and docstring are replaced, module
    dict entries the statements rebind, the state of migrated objects.
    """
    if hasattr(sys, "_clear_type_cache"):
        sys._clear_type_cache()
    _warm_switch_code()
    for plan in prepared._plans.values():
        for op in (*plan.ops, *plan.late_ops):
            for name in getattr(type(op), "__slots__", ()):
                getattr(op, name)
            func = getattr(op, "func", None)
            if isinstance(func, types.FunctionType):
                _touch_function(func)
        g = plan.module.__dict__
        for st in plan.statements:
            _touch_code(st.code)
            for key in st.binds or ():
                if key in g:
                    g[key] = g[key]
            if st.merge_class is not None:
                _touch_class(st.merge_class)
    for new in prepared._new.values():
        _touch_code(new.code)
    for bindings in prepared._bindings.values():
        for b in bindings:
            b.holder.get(b.local)
    for m in prepared._migrations:
        d = getattr(m.obj, "__dict__", None)
        if isinstance(d, dict):
            for value in list(d.values()):
                del value


class _WarmOld:
    """Merged into by :func:`_warm_switch_code`: runs the merge's own code before a hold."""

    def method(self) -> int:
        return 1

    @property
    def prop(self) -> int:
        return 1


class _WarmNew:
    def method(self) -> int:
        return 2

    @property
    def prop(self) -> int:
        return 2

    @staticmethod
    def added() -> int:
        return 3


def _warm_switch_code() -> None:
    """Run the switch's own functions once on throw-away objects, outside the hold.

    Calling a function writes its function and code objects (reference
    counts, the frame stack): after the staging fork, the first call of each
    costs page faults.  The edits are applied and undone on private objects.
    """
    journal: list[Op] = []
    ops: list[Op] = []
    merge_class(_WarmOld, _WarmNew, ops)
    journal.extend(op.apply() for op in ops)
    scratch: dict[str, Any] = {"x": 1}
    journal.append(SetItem(scratch, "x", 2).apply())
    f = _WarmOld.__dict__["method"]
    assert isinstance(f, types.FunctionType)
    code_ops: list[Op] = [SetCode(f, _WarmNew.method.__code__, None, None)]
    apply_staged(code_ops, stage_inverses(code_ops), journal)
    undo(journal)


def _warm_migration() -> Any:
    """A throw-away migration on the worker, before the hold (see :func:`_warm_switch_code`)."""
    state, _ = copy_state({"n": [1], "lock": threading.Lock()}, "warm-up", stand_ins=False)
    return SetState(_WarmOld(), state).apply()


def _touch_function(f: types.FunctionType) -> None:
    f.__code__, f.__defaults__, f.__kwdefaults__, f.__doc__, f.__closure__  # noqa: B018


def _touch_class(cls: type, depth: int = 0) -> None:
    """What :func:`~node_agent._update.merge_class` reads: members, their functions and code."""
    for value in list(cls.__dict__.values()):
        if isinstance(value, type):
            if depth < 4:
                _touch_class(value, depth + 1)
            continue
        for f in functions_in(value):
            _touch_function(f)
            f.__code__.co_qualname, f.__code__.co_freevars  # noqa: B018


def _touch_code(code: types.CodeType) -> None:
    """A code object and the code objects it will make functions of (referenced = touched)."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _touch_code(const)


class _SwitchFailed(Exception):
    def __init__(self, error: ModuleError) -> None:
        super().__init__(str(error))
        self.error = error


def _describe(exc: BaseException, module: str) -> str:
    """Where in the release an exception came from: file and line, then what it said."""
    frames = traceback.extract_tb(exc.__traceback__)
    release_frames = [
        f for f in frames if module.replace(".", "/") in f.filename.replace("\\", "/")
    ]
    where = f"line {release_frames[-1].lineno}: " if release_frames else ""
    return f"{where}{type(exc).__name__}: {exc}"


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
