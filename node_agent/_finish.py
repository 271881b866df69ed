"""The switch itself and its undo: what finish runs behind the drain barrier.

:func:`switch` applies a :class:`~node_agent._prepared.Prepared`'s precomputed
edits module by module, runs the release's changed statements and new module
bodies, and refreshes ``from m import x`` bindings, journaling every change so
that :func:`~node_agent._patch.undo` restores the previous version;
:func:`migrate` runs ``code_change`` for registered objects, all or none.  The
loader calls both inside ``barrier.hold(...)``, where the pause is measured in
microseconds: no locks, wake-ups or work that could be done before the hold
belong here (that is :mod:`node_agent._prefault`).  :func:`dry_run` is the same
switch and migrations in the staging process (:mod:`node_agent._rehearsal`),
and :func:`finish_errors` says what failed once the previous version is back.
"""

from __future__ import annotations

import functools
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from hotfleet.errors import ModuleError, Reason
from node_agent import stateful
from node_agent._classmerge import merge_class
from node_agent._deadline import Abandoned, Outcome, Overrun, Worker, interrupt_after
from node_agent._install import NewModule, register_source, release_importable
from node_agent._patch import (
    MISSING,
    InstallModule,
    Op,
    SetItem,
    SetState,
    StagedCode,
    apply_staged,
    stage_inverses,
)
from node_agent._prepared import Migration, Prepared
from node_agent._statecopy import StateNotCopyable, copy_state, fresh_locks_in_place
from node_agent._update import ModulePlan, Refused


class SwitchFailed(Exception):
    """A module of the release raised, overran or was refused during the switch."""

    def __init__(self, error: ModuleError) -> None:
        super().__init__(str(error))
        self.error = error


class MigrationFailed(Exception):
    """One or more ``code_change`` calls raised or overran: no state was installed."""

    def __init__(self, errors: list[ModuleError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


def finish_errors(
    exc: BaseException, prepared: Prepared, switch_timeout: float
) -> list[ModuleError]:
    if isinstance(exc, SwitchFailed):
        e = exc.error
        return [ModuleError(e.module, e.reason, f"{e.detail}; previous version restored")]
    if isinstance(exc, MigrationFailed):
        return exc.errors
    return [
        ModuleError(
            prepared.release.label,
            Reason.TIMEOUT,
            f"the switch overran switch_timeout ({switch_timeout:g}s); previous version restored",
        )
    ]


def switch(
    prepared: Prepared,
    journal: list[Op],
    switch_timeout: float,
    staged: dict[str, list[StagedCode | None]] | None = None,
) -> None:
    """The swap itself, module by module in dependency order.

    Precomputed edits, then the module's changed statements (the only
    release code that runs, with new modules' bodies); every binding they
    change is journaled, even when the statement raises half-way.
    Raises :class:`SwitchFailed` naming the module.
    """
    changed: list[tuple[str, str, Any]] = []
    with release_importable(list(prepared._new.values())):
        for unit in prepared.order:
            for name in unit:
                try:
                    if name in prepared._new:
                        install(prepared._new[name], journal)
                    elif name in prepared._plans:
                        plan = prepared._plans[name]
                        codes = staged.get(name) if staged is not None else None
                        apply_plan(plan, journal, changed, codes)
                except Refused as exc:
                    raise SwitchFailed(ModuleError(name, exc.reason, exc.detail)) from None
                except Overrun:
                    raise SwitchFailed(
                        ModuleError(
                            name,
                            Reason.TIMEOUT,
                            f"its code overran switch_timeout ({switch_timeout:g}s)",
                        )
                    ) from None
                except Exception as exc:
                    raise SwitchFailed(
                        ModuleError(name, Reason.IMPORT_ERROR, _describe(exc, name))
                    ) from None
    rebind_from_imports(prepared, changed, journal)
    if hasattr(sys, "_clear_type_cache"):
        sys._clear_type_cache()


def install(new: NewModule, journal: list[Op]) -> None:
    """Run a new module's body (unless an import earlier in the switch did) and journal it."""
    try:
        if new.name not in sys.modules:
            importlib.import_module(new.name)
    finally:
        if new.name in sys.modules:  # whoever imported it: undo removes it
            journal.append(InstallModule(new.name, None))
        else:
            register_source(new.filename, new.source)


def apply_plan(
    plan: ModulePlan,
    journal: list[Op],
    changed: list[tuple[str, str, Any]],
    staged: list[StagedCode | None] | None = None,
) -> None:
    # the inverses of the code swaps were built before the hold (see Loader.finish)
    apply_staged(plan.ops, stage_inverses(plan.ops) if staged is None else staged, journal)
    g = plan.module.__dict__
    watched = plan.watched  # only what a binding elsewhere holds matters to the rebinding
    for st in plan.statements:
        if st.literal is not None:  # precomputed: nothing to execute
            key, value = st.literal
            old = g.get(key, MISSING)
            g[key] = value
            journal.append(SetItem(g, key, old))
            if key in watched:
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
                    if k in watched:
                        changed.append((plan.module.__name__, k, old))
            if st.binds is None:
                for k in before.keys() - g.keys():
                    journal.append(SetItem(g, k, before[k]))
    for op in plan.late_ops:
        journal.append(op.apply())
    for name in plan.removed:
        old = g.get(name, MISSING)
        journal.append(SetItem(g, name, MISSING).apply())
        if name in watched:
            changed.append((plan.module.__name__, name, old))


def rebind_from_imports(
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


RunCalls = Callable[[Sequence[Callable[[], Any]], float, Sequence[object]], list[Outcome]]


def overran(m: Migration, old_vsn: Any, timeout: float, after: str) -> ModuleError:
    """The refusal for a ``code_change`` that did not return within ``migration_timeout``."""
    return ModuleError(
        m.module,
        Reason.TIMEOUT,
        f"{type(m.obj).__qualname__}.code_change({old_vsn!r}) did not return "
        f"within migration_timeout ({timeout:g}s){after}",
    )


def migrate(
    migrations: list[Migration],
    old_vsn: Any,
    journal: list[Op],
    run: RunCalls,
    migration_timeout: float,
    *,
    dry_run: bool = False,
) -> int:
    """Run ``code_change`` (already-current code) for every registered object, all or none.

    Each call gets a faithful copy of the object's state (fresh locks, see
    :mod:`node_agent._statecopy`) and runs through ``run`` (on the holding
    worker itself at finish, :meth:`Progress.run_steps`; on a worker of the
    staging process in a dry run), each under ``migration_timeout``; the
    states are installed only once all returned.  A call that overruns
    stops the batch: the later ones never run.
    """
    pending = [(m, fn) for m in migrations if (fn := getattr(m.obj, "code_change", None))]
    if not pending:
        return 0

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
    after = " (dry run on a copy of the live state)" if dry_run else "; previous version restored"
    errors = []
    try:  # each step labelled with its Migration, for whoever reports an overrun
        outcomes = run(calls, migration_timeout, [m for m, _ in pending])
    except Abandoned as exc:
        assert isinstance(exc.label, Migration)
        raise MigrationFailed([overran(exc.label, old_vsn, migration_timeout, after)]) from None
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
        raise MigrationFailed(errors)
    for (m, _), outcome in zip(pending, outcomes, strict=True):
        journal.append(SetState(m.obj, outcome.value).apply())
    return len(pending)


def dry_run(
    prepared: Prepared,
    switch_timeout: float,
    migration_timeout: float,
    worker: Callable[[], Worker],
    old_vsn: Any,
) -> tuple[list[ModuleError], list[str]]:
    """In the staging process: do what finish will do, report what failed.

    ``worker`` makes the migrations' worker, after the switch and only if
    there are migrations; returns the errors and the notes for the vote.
    """
    notes: list[str] = []
    for m in prepared._migrations:
        owner = type(m.obj).__qualname__
        notes.extend(fresh_locks_in_place(m.obj, owner, stateful.set_state, stateful.get_state))
    journal: list[Op] = []
    try:
        with interrupt_after(switch_timeout):
            switch(prepared, journal, switch_timeout)
        migrate(
            prepared._migrations,
            old_vsn,
            journal,
            lambda calls, seconds, labels: worker().run_all(calls, seconds, labels),
            migration_timeout,
            dry_run=True,
        )
    except SwitchFailed as failed:
        return [failed.error], notes
    except MigrationFailed as failed:
        return list(failed.errors), notes
    except Overrun:
        error = ModuleError(
            prepared.release.label,
            Reason.TIMEOUT,
            f"the switch overran switch_timeout ({switch_timeout:g}s) in the staging process",
        )
        return [error], notes
    return [], notes


def _describe(exc: BaseException, module: str) -> str:
    """Where in the release an exception came from: file and line, then what it said."""
    frames = traceback.extract_tb(exc.__traceback__)
    release_frames = [
        f for f in frames if module.replace(".", "/") in f.filename.replace("\\", "/")
    ]
    where = f"line {release_frames[-1].lineno}: " if release_frames else ""
    return f"{where}{type(exc).__name__}: {exc}"
