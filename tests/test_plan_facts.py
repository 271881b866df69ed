"""Sibling workers plan from each other's answers: the same plan, no tree, never a wrong answer.

The planner's questions about a module's two sources are answered once per
host (:mod:`node_agent._planfacts`); these tests plan the same change from
the trees and from a marshalled record (what the host cache hands a
sibling) and hold the two plans equal, op for op, for a module that
exercises every kind of change the planner knows.
"""

from __future__ import annotations

import ast
import importlib
import marshal
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hotfleet import imports
from hotfleet.release import Release
from node_agent import _codepaths, _planfacts
from node_agent._codecache import CodeCache
from node_agent._patch import ClearCache, SetClassAttr, SetCode, SetDefaults, SetItem
from node_agent._planfacts import Facts
from node_agent._update import ModulePlan, ModulePlanner, Refused
from node_agent.loader import Loader
from node_agent.release_files import ReleaseFiles

OLD = textwrap.dedent(
    '''\
    """Old docstring."""
    import functools

    LIMIT = 3
    TABLE = {"a": 1}
    REMOVED = "gone soon"


    def plain(x):
        return x + 1


    def literal_default(x, y=1):
        return x + y


    def computed_default(x, y=LIMIT):
        return x * y


    @functools.lru_cache(maxsize=None)
    def memo(x):
        return x


    def reformatted(a, b):
        return a + b


    def outer():
        def inner():
            return 1
        return inner


    class Shape:
        sides = 0

        def area(self):
            return 0

        @property
        def name(self):
            return "shape"

        @name.setter
        def name(self, value):
            self._name = value


    class Grows:
        def size(self):
            return 1


    class Box:
        depth = 2

        def volume(self):
            return 1

        def label(self):
            return "box"

        def legacy(self):
            return "old"
    '''
).encode()

NEW = textwrap.dedent(
    '''\
    """New docstring."""
    import functools

    LIMIT = 4
    TABLE = {"a": 1}


    def plain(x):
        return x + 2


    def literal_default(x, y=2):
        return x + y


    def computed_default(x, y=LIMIT * 2):
        return x * y


    @functools.lru_cache(maxsize=None)
    def memo(x):
        return x * 10


    def reformatted(a,
                    b):
        return a + b  # same tree


    def outer():
        def inner():
            return 2
        return inner


    def added():
        return "new"


    class Shape:
        sides = 0

        def area(self):
            return 1

        @property
        def name(self):
            return "SHAPE"

        @name.setter
        def name(self, value):
            self._name = value


    class Grows:
        colour = "red"

        def size(self):
            return 2

        def grow(self, by=2, *, unit="cm"):
            return f"{super().__repr__()} +{by}{unit}"


    class Box:
        depth = 2

        def volume(self):
            return 8

        def label(self):
            return "box"
    '''
).encode()


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The old source, loaded for real (the planner looks at live objects)."""
    (tmp_path / "facts_mod.py").write_bytes(OLD)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("facts_mod")
    try:
        yield mod
    finally:
        sys.modules.pop("facts_mod", None)


def _plan(mod: types.ModuleType, facts: Facts) -> ModulePlan:
    code = compile(NEW, mod.__file__ or "facts_mod.py", "exec", dont_inherit=True)
    return ModulePlanner(mod, facts, code).build()


def _facts(mod: types.ModuleType, answers: dict[Any, Any] | None = None) -> Facts:
    return Facts(OLD, NEW, mod.__file__ or "facts_mod.py", answers)


def _shape(plan: ModulePlan) -> dict[str, Any]:
    """Everything the switch will do, comparable across two plans of one process."""

    def op(o: Any) -> tuple[Any, ...]:
        if isinstance(o, SetCode):
            return ("code", id(o.func), o.code, o.defaults, o.kwdefaults, o.doc)
        if isinstance(o, SetDefaults):
            return ("defaults", id(o.func), o.code)
        if isinstance(o, ClearCache):
            return ("clear", o.clear)  # a bound method: equal, not identical
        if isinstance(o, SetClassAttr | SetItem):  # a new function: made afresh by each plan
            value = o.value
            if isinstance(value, types.FunctionType):
                value = (value.__code__, value.__defaults__, value.__kwdefaults__)
            where = id(o.cls) if isinstance(o, SetClassAttr) else id(o.mapping)
            return (
                type(o).__name__,
                where,
                o.name if isinstance(o, SetClassAttr) else o.key,
                value,
            )
        return (type(o).__name__,)

    return {
        "ops": [op(o) for o in plan.ops],
        "late": [op(o) for o in plan.late_ops],
        "statements": [
            (s.code, s.lineno, s.merge_class, s.name, s.binds, s.literal) for s in plan.statements
        ],
        "removed": plan.removed,
        "changes": plan.changes,
        "nested": {k: v for k, v in plan.nested.items()},
    }


def _record(mod: types.ModuleType) -> tuple[ModulePlan, dict[Any, Any]]:
    """Plan from the trees; the answers as a sibling reads them (marshalled and back)."""
    facts = _facts(mod)
    plan = _plan(mod, facts)
    assert facts.computed > 0 and facts.replayed == 0
    return plan, marshal.loads(marshal.dumps(facts.record()))


def test_a_plan_from_a_siblings_answers_equals_one_from_the_trees(
    module: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh, record = _record(module)

    def no_tree(source: object) -> None:
        raise AssertionError("a sibling with every answer parsed a source")

    monkeypatch.setattr(_planfacts, "parse_source", no_tree)
    facts = _facts(module, record)
    replayed = _plan(module, facts)
    assert facts.computed == 0 and facts.replayed > 0
    assert _shape(replayed) == _shape(fresh)
    # and the plan is the one the change needs (not two equal wrong plans)
    changes = set(fresh.changes)
    assert {
        "body plain",
        "body literal_default",
        "body computed_default",
        "body memo",
        "body outer",
        "new added",
        "class Shape",  # a getter and a setter of one name: merged whole, rehearsed
        "attribute Grows.colour",  # an added attribute, method and body: edited in place
        "method Grows.grow",
        "body Grows.size",
        "body Box.volume",
        "removed Box.legacy",
        "statement line 4",
        "removed REMOVED",
        "docstring line 1",
    } <= changes, changes
    assert not any("label" in c for c in changes)
    late = [o for o in fresh.late_ops if isinstance(o, SetDefaults)]
    assert [o.func.__name__ for o in late] == ["computed_default"]
    literal = next(
        o for o in fresh.ops if isinstance(o, SetCode) and o.func.__name__ == "literal_default"
    )
    assert literal.defaults == (2,)


def test_a_sibling_whose_live_state_differs_answers_the_rest_from_the_trees(
    module: types.ModuleType,
) -> None:
    """The record's producer could swap ``plain``'s code; this worker has no live
    ``plain`` any more, so it asks what the producer never did, and parses for it."""
    _, record = _record(module)
    del module.plain
    facts = _facts(module, record)
    plan = _plan(module, facts)
    assert facts.computed > 0  # what the record could not say
    assert "redefined plain" in plan.changes
    assert _shape(plan) == _shape(_plan(module, _facts(module)))


def test_answers_of_another_shape_are_not_trusted(tmp_path: Path) -> None:
    """A plan entry this planner did not write (garbage answers) is planned from the trees."""
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "facts_shape_mod.py").write_text("def f():\n    return 1\n")
    sys.path.insert(0, str(code_dir))
    cache = CodeCache(tmp_path / "cache")
    loader = Loader([code_dir], code_cache=cache)
    try:
        importlib.import_module("facts_shape_mod")
        release = Release.from_sources(
            "shape", "2", {"facts_shape_mod": "def f():\n    return 2\n"}
        )
        real_get = cache.get

        def poisoned(kind: str, digest: str, make: Any, **kw: Any) -> Any:
            if kind == "plan":
                return {"facts_shape_mod": {("top",): "garbage", ("old", "f"): 7}}
            return real_get(kind, digest, make, **kw)

        cache.get = poisoned  # type: ignore[method-assign]
        prepared = loader.prepare(release)
        assert [c.details for c in prepared.changes] == [("body f",)]
        loader.finish(prepared)
        assert sys.modules["facts_shape_mod"].f() == 2
    finally:
        sys.path.remove(str(code_dir))
        sys.modules.pop("facts_shape_mod", None)


@pytest.fixture
def old_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], tuple[Path, Release]]:
    """``make(name)``: ``OLD`` as module ``name`` in a code directory on the path, loaded,
    and ``NEW`` as its release (the module and the path entry go at teardown)."""
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    monkeypatch.syspath_prepend(str(code_dir))

    def make(name: str) -> tuple[Path, Release]:
        (code_dir / f"{name}.py").write_bytes(OLD)
        monkeypatch.delitem(sys.modules, name, raising=False)  # removed again at teardown
        importlib.import_module(name)
        return code_dir, Release.from_sources(name, "2", {name: NEW.decode()})

    return make


def _forget_scans() -> None:
    """What this process remembers of the first worker's scans: a sibling process has none."""
    imports._scan_cached.cache_clear()
    imports._known.clear()
    imports._known_sites.clear()


def test_sibling_loaders_share_the_plan_and_the_import_scans(
    tmp_path: Path, old_code: Callable[[str], tuple[Path, Release]]
) -> None:
    """The second worker of a host prepares an update without a single cache miss, and
    its switch does what the first worker's would have."""
    code_dir, release = old_code("facts_sib_mod")
    mod = sys.modules["facts_sib_mod"]
    first = Loader([code_dir], code_cache=CodeCache(tmp_path / "cache"))
    second = Loader([code_dir], code_cache=CodeCache(tmp_path / "cache"))
    a = first.prepare(release)
    first.abort(a)
    assert first.code_cache is not None and first.code_cache.misses >= 3  # exec, imports, plan
    b = second.prepare(release)
    assert second.code_cache is not None and second.code_cache.misses == 0
    assert [c.details for c in b.changes] == [c.details for c in a.changes]
    second.finish(b)
    assert mod.plain(1) == 3 and mod.memo(1) == 10 and mod.Shape().area() == 1
    assert mod.Shape().name == "SHAPE" and mod.Grows.colour == "red"
    assert mod.Box().volume() == 8 and mod.Grows().grow().endswith("+2cm")
    assert mod.literal_default(1) == 3 and mod.computed_default(1) == 8
    assert not hasattr(mod, "REMOVED") and mod.__doc__ == "New docstring."


def test_a_sibling_agent_parses_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    old_code: Callable[[str], tuple[Path, Release]],
) -> None:
    """The agent's whole prepare (the package check of :mod:`node_agent.release_files`,
    then the loader) in the second worker of a host: every source read from the host
    cache, not one parsed."""
    code_dir, release = old_code("facts_agent_mod")
    first = ReleaseFiles(Loader([code_dir], code_cache=CodeCache(tmp_path / "cache")))
    second = ReleaseFiles(Loader([code_dir], code_cache=CodeCache(tmp_path / "cache")))
    a = first.prepare(release)
    a_changes = [c.details for c in a.changes]
    first.abort(a)
    _forget_scans()

    def no_parse(source: object) -> None:
        raise AssertionError("the second worker parsed a source")

    for where in (imports, _planfacts, _codepaths):
        monkeypatch.setattr(where, "parse_source", no_parse)
    prepared = second.prepare(release)
    assert prepared.changes[0].details == next(iter(a_changes))
    second.abort(prepared)


def test_a_first_worker_parses_each_source_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    old_code: Callable[[str], tuple[Path, Release]],
) -> None:
    """The package check, the planner and the counting twins of one prepare read one
    tree per source (the twins take the planner's tree, which they instrument in place)."""
    code_dir, release = old_code("facts_once_mod")
    files = ReleaseFiles(Loader([code_dir], code_cache=CodeCache(tmp_path / "cache")))
    parsed: list[bytes] = []
    real = ast.parse

    def counting(source: str | bytes, *args: Any, **kwargs: Any) -> ast.Module:
        parsed.append(source.encode() if isinstance(source, str) else bytes(source))
        return real(source, *args, **kwargs)

    _forget_scans()
    monkeypatch.setattr(ast, "parse", counting)
    prepared = files.prepare(release)
    monkeypatch.setattr(ast, "parse", real)
    assert prepared._instrumented["facts_once_mod"].codes  # the twins were made
    assert parsed.count(NEW) == 1 and parsed.count(OLD) == 1, [len(p) for p in parsed]
    files.abort(prepared)


def test_a_refusal_is_the_same_from_the_record(module: types.ModuleType) -> None:
    """A change the planner refuses (base class changed) is refused by the sibling too."""
    old = b"class Base:\n    pass\n\nclass K(Base):\n    def m(self):\n        return 1\n"
    new = b"class Base:\n    pass\n\nclass K(object):\n    def m(self):\n        return 2\n"
    base = type("Base", (), {"__module__": module.__name__})
    module.__dict__.update(Base=base, K=type("K", (base,), {"__module__": module.__name__}))
    code = compile(new, "k.py", "exec", dont_inherit=True)
    facts = Facts(old, new, "k.py")
    with pytest.raises(Refused) as fresh:
        ModulePlanner(module, facts, code).build()
    replay = Facts(old, new, "k.py", marshal.loads(marshal.dumps(facts.record())))
    with pytest.raises(Refused) as replayed:
        ModulePlanner(module, replay, code).build()
    assert replayed.value.detail == fresh.value.detail and replay.computed == 0


def test_a_sibling_with_its_own_checkout_gets_code_named_after_its_files(
    module: types.ModuleType,
) -> None:
    """The answers are shared by source digests, not file names: a worker whose code
    path differs gets code objects that name its own file (tracebacks, coverage)."""
    _, record = _record(module)
    facts = Facts(OLD, NEW, "/elsewhere/facts_mod.py", record)
    plan = _plan(module, facts)
    assert facts.computed == 0
    codes = [s.code for s in plan.statements] + [o.code for o in plan.late_ops]
    assert codes and all(c.co_filename == "/elsewhere/facts_mod.py" for c in codes)
