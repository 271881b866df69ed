"""The loader's contract: all-or-nothing prepare, atomic finish, rollback, state migration, status."""

from __future__ import annotations

import threading

import pytest

from hotfleet import Reason
from hotfleet.release import Release
from node_agent import (
    FinishError,
    LoaderStateError,
    ModuleState,
    PreparedState,
    PrepareError,
)
from tests.codebase import Codebase

GOOD = {
    f"mod{i}": f"def version():\n    return 1\n\ndef work(x):\n    return x + {i}\n"
    for i in range(6)
}


def _v(version: int) -> dict[str, str]:
    return {m: s.replace("return 1", f"return {version}") for m, s in GOOD.items()}


def _versions(cb: Codebase) -> set[int]:
    return {cb.module(m).version() for m in GOOD}


@pytest.mark.parametrize(
    ("broken", "reason", "detail"),
    [
        ("def oops(:\n", Reason.BADFILE, "line 1"),
        (
            "import hf_surely_missing_module_xyz\n",
            Reason.MISSING_DEPENDENCY,
            "hf_surely_missing_module_xyz",
        ),
        ("from .nothere import x\n", Reason.MISSING_DEPENDENCY, "nothere"),
        ("raise RuntimeError('boom at import')\n", Reason.IMPORT_ERROR, "boom at import"),
    ],
)
def test_one_broken_new_module_refuses_the_whole_release(
    cb: Codebase, broken: str, reason: Reason, detail: str
) -> None:
    cb.boot(GOOD)
    release = cb.release("2", {**_v(2), "broken": broken})
    with pytest.raises(PrepareError) as info:
        cb.loader.prepare(release)
    errors = info.value.errors
    assert [e.module for e in errors] == [f"{cb.pkg}.broken"]
    assert errors[0].reason is reason and detail in errors[0].detail
    assert _versions(cb) == {1}
    assert f"{cb.pkg}.broken" not in __import__("sys").modules


def test_digest_mismatch_and_duplicate_are_refused(cb: Codebase) -> None:
    cb.boot(GOOD)
    tampered = cb.release("2", _v(2), modules={"mod3": {"sha256": "0" * 64}})
    with pytest.raises(PrepareError) as info:
        cb.loader.prepare(tampered)
    assert [(e.module, e.reason) for e in info.value.errors] == [
        (f"{cb.pkg}.mod3", Reason.DIGEST_MISMATCH)
    ]
    good = cb.release("2", _v(2))
    dup = Release(good.name, good.version, (*good.modules, good.modules[0]))
    with pytest.raises(PrepareError) as info:
        cb.loader.prepare(dup)
    assert info.value.errors[0].reason is Reason.DUPLICATED
    assert _versions(cb) == {1}


STATEFUL_V1 = """
import node_agent

class Counter:
    def __init__(self):
        self.count = 3

    def value(self):
        return self.count

COUNTER = node_agent.register(Counter())
"""

STATEFUL_V2 = """
import node_agent

class Counter:
    def __init__(self):
        self.hits = {"total": 0}

    def value(self):
        return self.hits["total"]

    def code_change(self, old_vsn, state, extra):
        if isinstance(old_vsn, tuple):
            return {"count": state["hits"]["total"]}
        if state.get("count") == 666:
            raise ValueError("cannot migrate 666")
        return {"hits": {"total": state["count"] * extra["factor"]}}

COUNTER = node_agent.register(Counter())
"""


def test_state_migration_up_and_down(cb: Codebase) -> None:
    mods = cb.boot({"state": STATEFUL_V1})
    counter = mods["state"].COUNTER
    cb.upgrade("2", {"state": STATEFUL_V2}, modules={"state": {"extra": {"factor": 10}}})
    assert mods["state"].COUNTER is counter and counter.value() == 30
    cb.loader.rollback()
    assert counter.value() == 30 and counter.count == 30  # down-migrated state, old code


def test_failing_migration_is_refused_in_prepare(cb: Codebase) -> None:
    mods = cb.boot({"state": STATEFUL_V1, **GOOD})
    counter = mods["state"].COUNTER
    counter.count = 666
    with pytest.raises(PrepareError) as info:
        cb.loader.prepare(
            cb.release(
                "2", {"state": STATEFUL_V2, **_v(2)}, modules={"state": {"extra": {"factor": 10}}}
            )
        )
    (err,) = info.value.errors
    assert (
        err.reason is Reason.CODE_CHANGE_FAILED
        and "666" in err.detail
        and err.module == f"{cb.pkg}.state"
    )
    assert counter.value() == 666 and _versions(cb) == {1}


def test_migration_failing_only_at_run_time_restores_previous_version(cb: Codebase) -> None:
    mods = cb.boot({"state": STATEFUL_V1, **GOOD})
    counter = mods["state"].COUNTER
    prepared = cb.loader.prepare(
        cb.release(
            "2", {"state": STATEFUL_V2, **_v(2)}, modules={"state": {"extra": {"factor": 10}}}
        )
    )
    counter.count = 666  # the state changed between prepare and finish
    with pytest.raises(FinishError) as info:
        cb.loader.finish(prepared)
    assert info.value.restored and info.value.errors[0].reason is Reason.CODE_CHANGE_FAILED
    assert counter.value() == 666 and _versions(cb) == {1}
    assert cb.loader.current_release is None


def test_finish_is_idempotent_and_abort_changes_nothing(cb: Codebase) -> None:
    cb.boot(GOOD)
    prepared = cb.loader.prepare(cb.release("2", _v(2)))
    assert _versions(cb) == {1}
    first = cb.loader.finish(prepared)
    assert cb.loader.finish(prepared) is first and _versions(cb) == {2}
    aborted = cb.loader.prepare(cb.release("3", _v(3)))
    cb.loader.abort(aborted)
    assert aborted.state is PreparedState.ABORTED and _versions(cb) == {2}
    with pytest.raises(LoaderStateError):
        cb.loader.finish(aborted)
    cb.loader.rollback()
    assert _versions(cb) == {1}
    with pytest.raises(LoaderStateError):
        cb.loader.rollback()


def test_two_versions_at_most(cb: Codebase) -> None:
    cb.boot(GOOD)
    cb.upgrade("2", _v(2))
    cb.upgrade("3", _v(3))
    assert cb.loader.previous_release is not None and cb.loader.previous_release.version == "2"
    cb.loader.rollback()
    assert _versions(cb) == {2}
    assert not cb.loader.can_rollback


def test_new_modules_and_packages_are_installed_atomically(cb: Codebase) -> None:
    cb.boot(GOOD)
    release = cb.release(
        "2",
        {
            **_v(2),
            "sub": "from .helper import HELP\n",
            "sub.helper": "from .. import mod0\nHELP = mod0.version()\n",
        },
        packages=[f"{cb.pkg}.sub"],
    )
    prepared = cb.loader.prepare(release)
    import sys

    assert f"{cb.pkg}.sub" not in sys.modules
    cb.loader.finish(prepared)
    assert cb.module("sub").HELP == 2  # staged imports saw the staged version 2 of mod0
    cb.loader.rollback()
    assert f"{cb.pkg}.sub" not in sys.modules and _versions(cb) == {1}


def test_module_status_by_digest(cb: Codebase) -> None:
    cb.boot(GOOD)
    name = f"{cb.pkg}.mod0"
    assert cb.loader.status(name).state is ModuleState.LOADED
    assert cb.loader.status(f"{cb.pkg}.never").state is ModuleState.NOT_LOADED
    cb.upgrade("2", _v(2))
    status = cb.loader.status(name)
    assert (
        status.state is ModuleState.MODIFIED and status.release == "app@2"
    )  # provisional: disk still has v1
    cb.loader.make_permanent()
    assert cb.loader.status(name).state is ModuleState.LOADED and not cb.loader.can_rollback
    (cb.root / cb.pkg / "mod0.py").unlink()
    assert cb.loader.status(name).state is ModuleState.REMOVED


def test_atomicity_under_concurrent_readers(cb: Codebase) -> None:
    """Guarded readers never see two modules of one release at different versions."""
    cb.boot(GOOD)
    releases = [cb.release(str(v), _v(v)) for v in (2, 3)]
    stop = threading.Event()
    mixes: list[set[int]] = []
    calls = [0]
    mods = [cb.module(m) for m in GOOD]

    def reader() -> None:
        while not stop.is_set():
            with cb.loader.guard():
                seen = {m.version() for m in mods}
            calls[0] += 1
            if len(seen) != 1:
                mixes.append(seen)

    threads = [threading.Thread(target=reader, name=f"reader-{i}") for i in range(4)]
    for t in threads:
        t.start()
    try:
        for cycle in range(60):
            cb.loader.finish(cb.loader.prepare(releases[cycle % 2]))
            cb.loader.rollback()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert calls[0] > 100
    assert mixes == []


def test_thread_still_in_old_code_blocks_the_next_reload_until_forced(cb: Codebase) -> None:
    src = "import threading\nGATE = threading.Event()\n\ndef slow():\n    GATE.wait(10)\n    return 'v1'\n"
    mods = cb.boot({"m": src})
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(mods["m"].slow()), name="slow-worker")
    t.start()
    try:
        while not any(f.f_code.co_name == "slow" for f in _frames_of(t)):
            pass
        cb.upgrade("2", {"m": src.replace("'v1'", "'v2'")})  # v1 becomes old; its thread runs on
        with pytest.raises(PrepareError) as info:
            cb.loader.prepare(cb.release("3", {"m": src.replace("'v1'", "'v3'")}))
        (err,) = info.value.errors
        assert (
            err.reason is Reason.NOT_PURGED and "slow-worker" in err.detail and "slow" in err.detail
        )
        assert mods["m"].slow.__code__.co_consts.count("v2") == 1  # nothing changed
        cb.loader.finish(
            cb.loader.prepare(cb.release("3", {"m": src.replace("'v1'", "'v3'")}), force=True)
        )
    finally:
        mods["m"].GATE.set()
        t.join()
    assert result == ["v1"]  # the running frame finished on the code it started with
    assert mods["m"].slow() == "v3"


def _frames_of(thread: threading.Thread) -> list:  # type: ignore[type-arg]
    import sys

    frame = sys._current_frames().get(thread.ident or 0)
    out = []
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    return out


def test_finish_waits_for_guarded_work_then_proceeds_after_the_drain_timeout(cb: Codebase) -> None:
    cb.boot(GOOD)
    cb.loader.drain_timeout = 0.3
    prepared = cb.loader.prepare(cb.release("2", _v(2)))
    inside, release_it = threading.Event(), threading.Event()

    def stuck_request() -> None:
        with cb.loader.guard():
            inside.set()
            release_it.wait(10)

    t = threading.Thread(target=stuck_request)
    t.start()
    inside.wait()
    try:
        report = cb.loader.finish(prepared)
    finally:
        release_it.set()
        t.join()
    assert not report.drained and report.still_in_flight == 1  # reported, never a hang
    assert _versions(cb) == {2} and not cb.loader.barrier.held  # swapped and reopened


def test_many_classes_with_unchanged_bases_and_new_members_are_merged(cb: Codebase) -> None:
    """A regression test: comparing class headers must not confuse one class with another."""
    bases = "class A:\n    pass\n\nclass B:\n    pass\n\nclass M(type):\n    pass\n\n"
    heads = ["(A)", "(B)", "(A, B)", "(metaclass=M)", "(B, metaclass=M)"]
    v1 = bases + "".join(f"class K{i}{heads[i % 5]}:\n    x = 1\n\n" for i in range(40))
    v2 = bases + "".join(
        f"class K{i}{heads[i % 5]}:\n    x = 1\n    y = {i}\n\n" for i in range(40)
    )
    mods = cb.boot({"m": v1})
    cb.upgrade("2", {"m": v2})
    assert [mods["m"].__dict__[f"K{i}"].y for i in range(40)] == list(range(40))


def test_docstring_changes_rebind_doc_and_bare_strings_do_nothing(cb: Codebase) -> None:
    """Only the module's first statement is its docstring.

    A changed bare string further down (a "comment" string) is a no-op: run as
    a statement of its own it would otherwise be compiled as a docstring and
    overwrite ``__doc__``.  A changed docstring rebinds ``__doc__``, and
    rollback restores it; dropping the docstring leaves ``__doc__`` None.
    """
    v1 = '"""Version one."""\n\nX = 1\n\n"""a note about X"""\n\ndef f():\n    return X\n'
    cb.boot({"m": v1})
    mod = cb.module("m")
    report = cb.upgrade("2", {"m": v1.replace("a note about X", "another note")})
    assert mod.__doc__ == "Version one." and mod.f() == 1
    assert report.release.version == "2"

    cb.upgrade("3", {"m": v1.replace("Version one.", "Version three.")})
    assert mod.__doc__ == "Version three."
    cb.loader.rollback()
    assert mod.__doc__ == "Version one."

    cb.upgrade("4", {"m": v1.split("\n", 1)[1]})
    assert mod.__doc__ is None and mod.f() == 1


REFORMAT_V1 = """\
# -*- coding: latin-1 -*-
EVENTS = []
EVENTS.append("booted")
CACHE = {}
NAME = "caf\u00e9"; SEEN = []
REGISTRY = []


def register(fn):
    REGISTRY.append(fn)
    return len(REGISTRY)  # the name no longer holds a function: not patchable in place


@register
def handler():
    return "h1"


def f(x):
    return x + 1


class C:
    LIMIT = 3

    def g(self):
        return self.LIMIT
"""

REFORMAT_V2 = """\
# -*- coding: latin-1 -*-
EVENTS = [ ]
EVENTS.append( "booted" )  # reformatted: still the same statement
CACHE = {
}
NAME = 'caf\u00e9' ; SEEN = []
REGISTRY = []


def register(fn):
    REGISTRY.append(fn)
    return len(REGISTRY)


@register
def handler():  # a comment
    return ("h1")


def f(x):
    # a comment moves the body down a line
    return x + 1


class C:
    LIMIT = (3)

    def g(self):
        return self.LIMIT  # why
"""


def _line_of(text: str, source: str) -> int:
    return source.splitlines().index(text) + 1


def test_reformatting_reruns_nothing_and_keeps_state(cb: Codebase) -> None:
    """Prepare compares statements by source text first and by syntax tree when
    the text differs, so a release that only reformats (comments, spacing,
    parentheses, another encoding cookie's bytes) re-runs no statement: module
    state, registrations and call side effects stay as they are.  Functions
    whose text changed get the new code object (equivalent, with the new line
    numbers for tracebacks)."""
    mods = cb.boot({"m": REFORMAT_V1})
    m = mods["m"]
    cache, f, cls, handler = m.CACHE, m.f, m.C, m.handler
    m.CACHE["kept"] = True
    prepared = cb.loader.prepare(cb.release("2", {"m": REFORMAT_V2}))
    details = [d for change in prepared.changes for d in change.details]
    assert details and all(d.startswith("body ") for d in details), details
    cb.loader.finish(prepared)
    assert m.EVENTS == ["booted"] and m.CACHE is cache and m.CACHE == {"kept": True}
    assert len(m.REGISTRY) == 1 and m.handler == handler == 1
    assert (
        m.f is f and f(1) == 2 and f.__code__.co_firstlineno == _line_of("def f(x):", REFORMAT_V2)
    )
    assert m.C is cls and cls().g() == 3
    latin1 = "caf\u00e9".encode().decode("latin-1")  # the file's UTF-8 bytes, read as latin-1
    assert latin1 == m.NAME

    # a real change next to the unchanged ones is still seen
    v3 = REFORMAT_V2.replace('EVENTS.append( "booted" )', 'EVENTS.append("v3")')
    cb.upgrade("3", {"m": v3})
    assert m.EVENTS == ["booted", "v3"] and m.CACHE is cache


def test_rollback_undoes_a_name_bound_twice_in_one_release(cb: Codebase) -> None:
    """The journal holds two inverses for ``X``; rollback must replay them newest
    first (a regression: the stored backup was replayed oldest first, leaving
    ``X`` at the intermediate value 10 instead of 2)."""
    m = cb.boot({"m": "X = 1\nX = X + 1\n"})["m"]
    cb.upgrade("2", {"m": "X = 10\nX = X + 5\n"})
    assert m.X == 15
    cb.loader.rollback()
    assert m.X == 2
    cb.upgrade("3", {"m": "X = 10\nX = X + 5\n"})
    cb.loader.rollback()
    assert m.X == 2
