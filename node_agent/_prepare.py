"""Prepare's steps, each a plain function: validate, purge check, plan, rehearse.

What :meth:`~node_agent.loader.Loader.prepare` does with a release before any
of it runs here: :func:`validate` (digests, syntax, sticky modules, missing
dependencies), :func:`purge_check` (no thread or generator still runs the
code the last switch retired), :func:`plan_release` (diff every changed module into
the edits finish applies, find the migrations and ``from`` bindings: a
:class:`~node_agent._prepared.Prepared`), and :func:`rehearse_switch`, which
runs :func:`node_agent._finish.dry_run` in the staging process and turns what
it reports into refusals.  The loader holds the state and the lock; these
functions get what they read as arguments.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.machinery
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hotfleet.errors import ModuleError, Reason
from hotfleet.imports import load_order, release_dependencies, scan_imports
from hotfleet.release import ModuleSource, Release
from node_agent import stateful
from node_agent._codepaths import CodePaths
from node_agent._functions import Codes, scan_heap
from node_agent._install import NewModule
from node_agent._patch import Op, SetCode
from node_agent._planfacts import Facts, facts_key
from node_agent._prepared import Binding, Migration, ModuleChange, Prepared
from node_agent._rehearsal import rehearse
from node_agent._update import ModulePlan, ModulePlanner, Refused
from node_agent.errors import PrepareError

_OWN_PACKAGES = frozenset({"hotfleet", "node_agent", "coordinator"})


def lap(since: float) -> tuple[float, float]:
    """Seconds since ``since``, and now (a step of the prepare's profile)."""
    now = time.perf_counter()
    return now - since, now


def validate(
    release: Release, checkpoint: Callable[[], None], code: CodePaths
) -> list[ModuleError]:
    """Every problem of the release found without running it: all of them, not the first."""
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
        loaded = code.loaded.get(ms.name)
        try:
            if loaded is None or loaded[0] != ms.actual_digest or ms.name not in sys.modules:
                code.compile(ms, sys.modules.get(ms.name))  # else it runs already: unchanged
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
        sticky = sticky_reason(ms.name, code)
        if sticky:
            errors.append(ModuleError(ms.name, Reason.STICKY, sticky))
    if errors:
        return errors
    code.scan(release.modules)  # once per host: the checks below and the planner read them
    for ms in release.modules:
        errors.extend(missing_dependencies(ms, release, code.paths))
    return errors


def sticky_reason(name: str, code: CodePaths) -> str:
    """Why the module cannot be replaced or added here ("" if it can)."""
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
        if code.under(module) is None:
            return f"loaded from {file}, outside the node's code paths"
        return ""
    if "." not in name:
        spec = importlib.machinery.PathFinder.find_spec(
            name, [p for p in sys.path if p and Path(p).resolve() not in code.paths]
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
        if code.under(package) is None:
            return f"{top} is an installed package ({where}), not under the code paths"
        return ""
    spec = importlib.machinery.PathFinder.find_spec(
        top, [p for p in sys.path if p and Path(p).resolve() not in code.paths]
    )
    where = "" if spec is None else spec.origin or " ".join(spec.submodule_search_locations or ())
    if "site-packages" in where or "dist-packages" in where:
        return f"{top} is an installed package ({where}), not under the code paths"
    return ""


def missing_dependencies(
    ms: ModuleSource, release: Release, code_paths: Sequence[Path]
) -> list[ModuleError]:
    info = scan_imports(ms.name, ms.source, is_package=ms.is_package)
    names = set(release.module_names())
    out = []
    for dep in sorted(set(info.required) | set(ms.depends)):
        if dep in names or dep in sys.modules or importable(dep, names, code_paths):
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


def importable(name: str, release_names: set[str], code_paths: Sequence[Path]) -> bool:
    parent, _, _ = name.rpartition(".")
    if not parent:
        return (
            name in sys.builtin_module_names
            or importlib.machinery.PathFinder.find_spec(name, [*map(str, code_paths), *sys.path])
            is not None
        )
    if parent in release_names:
        return False
    pkg = sys.modules.get(parent)
    path = getattr(pkg, "__path__", None)
    if path is None:
        return importable(parent, release_names, code_paths)
    return importlib.machinery.PathFinder.find_spec(name, list(path)) is not None


def purge_check(retired: Sequence[Op]) -> list[ModuleError]:
    """Soft purge: refuse while any thread or generator still runs the old version."""
    old_codes = Codes(op.code for op in retired if isinstance(op, SetCode))
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


def plan_release(
    release: Release, checkpoint: Callable[[], None], code: CodePaths, generation: int
) -> Prepared:
    """Everything finish needs, computed from the trees: nothing of the release runs."""
    deps = release_dependencies(release)
    order = load_order(deps)
    by_name = {ms.name: ms for ms in release.modules}
    changes: list[ModuleChange] = []
    warnings: list[str] = []
    errors: list[ModuleError] = []
    plans: dict[str, ModulePlan] = {}
    new_modules: dict[str, NewModule] = {}
    todo: list[tuple[types.ModuleType, ModuleSource, str, bytes]] = []
    for unit in order:
        for name in unit:
            ms = by_name[name]
            module = sys.modules.get(name)
            if module is None:
                new_modules[name] = code.new_module(ms)
                changes.append(ModuleChange(name, "new"))
                continue
            old_digest, old_source, _ = code.baseline(name, module)
            if old_digest == ms.actual_digest:
                changes.append(ModuleChange(name, "unchanged"))
                continue
            changes.append(ModuleChange(name, "updated"))  # its details once planned
            todo.append((module, ms, old_digest, old_source))
    planned = plan_modules(code, todo, checkpoint)
    for i, change in enumerate(changes):
        result = planned.get(change.module)
        if isinstance(result, Refused):
            errors.append(ModuleError(change.module, result.reason, result.detail))
        elif result is not None:
            plans[change.module] = result
            changes[i] = ModuleChange(change.module, "updated", tuple(result.changes))
            warnings.extend(result.warnings)
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
    prepared = Prepared(
        release,
        order,
        changes,
        warnings,
        0.0,
        _generation=generation,
        _new=new_modules,
        _plans=plans,
        _migrations=migrations_of(release, plans),
    )
    prepared._bindings = from_bindings(release, list(plans.values()), code.loaded)
    watched: dict[str, set[str]] = {}
    for bound_in, key in prepared._bindings:
        watched.setdefault(bound_in, set()).add(key)
    for plan in plans.values():
        plan.watched = frozenset(watched.get(plan.module.__name__, ()))
    return prepared


def plan_modules(
    code: CodePaths,
    todo: Sequence[tuple[types.ModuleType, ModuleSource, str, bytes]],
    checkpoint: Callable[[], None],
) -> dict[str, ModulePlan | Refused]:
    """The plan of each loaded module of ``todo`` (module, source, old digest, old source),
    or why it cannot be planned; what the planner asks of the sources answered once per host.

    The first worker of a host to plan this change answers the planner's
    questions from the trees and leaves the answers, every module's in one
    entry, in the host code cache (:mod:`node_agent._planfacts`); its
    siblings plan from them, deciding everything about their own live
    objects themselves.
    """

    def plan_all(
        answers: dict[str, dict[Any, Any]],
    ) -> tuple[dict[str, ModulePlan | Refused], dict[str, Any]]:
        planned: dict[str, ModulePlan | Refused] = {}
        records: dict[str, Any] = {}
        for module, ms, _, old_source in todo:
            checkpoint()
            recorded = answers.get(ms.name)
            filename, compiled = code.filename(ms, module), code.compile(ms, module)
            facts = Facts(old_source, ms.source, filename, recorded)
            try:
                try:
                    planned[ms.name] = ModulePlanner(module, facts, compiled).build()
                except (TypeError, ValueError, LookupError, AttributeError):
                    if recorded is None:
                        raise
                    # answers of another shape (a record this planner did not write):
                    # the trees answer everything
                    facts = Facts(old_source, ms.source, filename)
                    planned[ms.name] = ModulePlanner(module, facts, compiled).build()
            except Refused as exc:
                planned[ms.name] = exc
            records[ms.name] = facts.record()
        return planned, records

    if code.cache is None or not todo:
        return plan_all({})[0]
    made: list[dict[str, ModulePlan | Refused]] = []

    def make() -> dict[str, Any]:
        planned, records = plan_all({})
        made.append(planned)
        return records

    key = hashlib.sha256(
        b"\0".join(
            f"{ms.name}:{facts_key(old_digest, ms.actual_digest)}".encode()
            for _, ms, old_digest, _ in todo
        )
    ).hexdigest()
    answers = code.cache.get("plan", key, make)
    if made:
        return made[0]
    return plan_all(_by_module(answers))[0]


def _by_module(answers: Any) -> dict[str, dict[Any, Any]]:
    """A plan entry read from the host cache, as ``module -> answers``; what is not is ignored."""
    if not isinstance(answers, dict):
        return {}
    return {k: v for k, v in answers.items() if isinstance(k, str) and isinstance(v, dict)}


def migrations_of(release: Release, plans: dict[str, ModulePlan]) -> list[Migration]:
    """Registered objects whose class's module this release updates (instruction update)."""
    out = []
    for obj in stateful.registered():
        module = type(obj).__module__
        ms = release.get(module)
        if module in plans and ms is not None and ms.instruction == "update":
            out.append(Migration(obj, module, ms.extra))
    return out


def from_bindings(
    release: Release, plans: list[ModulePlan], loaded: dict[str, tuple[str, bytes, str]]
) -> dict[tuple[str, str], list[Binding]]:
    """Who bound names of the updated modules with ``from m import x``."""
    targets = {p.module.__name__ for p in plans}
    out: dict[tuple[str, str], list[Binding]] = {}
    if not targets:
        return out
    holders: list[tuple[str, bytes, bool, dict[str, Any]]] = []
    for name, (_, source, _) in list(loaded.items()):
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
                out.setdefault((b.module, b.attr), []).append(Binding(holder, b.local))
    return out


def rehearse_switch(
    prepared: Prepared,
    started: float,
    prepare_timeout: float,
    cancel: threading.Event,
    nice: int,
    dry_run: Callable[[], tuple[list[ModuleError], list[str]]],
) -> None:
    """Run ``dry_run`` (the switch and the migrations) in a forked copy of this process.

    What is left of ``prepare_timeout`` since ``started`` is the staging
    process's deadline; raises :class:`PrepareError` with what it refused,
    else adds its notes to the prepared release's warnings.
    """
    left = max(0.0, prepare_timeout - (time.perf_counter() - started))
    outcome = rehearse(lambda: _reported(*dry_run()), left, cancel, nice=nice)
    prepared.rehearsal_s, prepared.rehearsal_cpu_s = outcome.wall_s, outcome.cpu_s
    prepared.profile.update({f"rehearse_{k}": v for k, v in outcome.phases.items()})
    label = prepared.release.label
    if outcome.timed_out or outcome.cancelled:
        why = (
            "cancelled (abort or agent stop)"
            if outcome.cancelled
            else f"the release's code did not finish running within prepare_timeout "
            f"({prepare_timeout:g}s) in the staging process; it was killed"
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


def _reported(
    errors: list[ModuleError], notes: list[str]
) -> tuple[list[dict[str, str]], list[str]]:
    """In the staging process: the errors as the plain dicts its report carries."""
    return [_as_dict(e) for e in errors], notes


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
