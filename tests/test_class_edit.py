"""A class edited member by member: its statement never runs, its identity and instances stay.

When a class's change is methods added or removed, literal attributes set
and bodies changed (:meth:`node_agent._planfacts.Facts.class_edit`), prepare
makes the new functions from the compiled code and the switch only stores
them on the live class: no class statement runs, in the hold or anywhere,
and a release made only of such changes needs no staging process.  These
tests show what a live instance sees, what rollback restores, and that
everything the shortcut cannot state still goes through the class merge.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent import FinishError, PrepareError
from tests.codebase import Codebase

V1 = """
class Base:
    kind = "base"

    def name(self):
        return "base"

    def legacy(self):
        return "legacy"


class Child(Base):
    def name(self):
        return "child:" + super().name()
"""

V2 = """
class Base:
    kind = "base-v2"
    limits = (1, 2)

    def name(self):
        return "base"

    def extra(self, suffix="!", *, times=2):
        return self.name() * times + suffix


class Child(Base):
    def name(self):
        return "child2:" + super().name()

    def shout(self):
        return super().name().upper()
"""


@contextmanager
def class_statements_counted() -> Iterator[list[str]]:
    """Names of the classes created (class statements run) while inside."""
    made: list[str] = []
    real = builtins.__build_class__

    def counting(func: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        made.append(name)
        return real(func, name, *args, **kwargs)

    builtins.__build_class__ = counting
    try:
        yield made
    finally:
        builtins.__build_class__ = real


@pytest.fixture
def no_staging(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails the prepare if it forks a staging process (the release runs no code)."""
    forks: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        forks.append("rehearsed")
        raise AssertionError("a release that runs no code was rehearsed")

    monkeypatch.setattr("node_agent.loader.rehearse_switch", refuse)
    return forks


def test_methods_added_and_removed_on_the_live_class_without_running_it(
    cb: Codebase, no_staging: list[str]
) -> None:
    mods = cb.boot({"m": V1})
    m = mods["m"]
    base, child = m.Base, m.Child
    obj, kid = m.Base(), m.Child()
    prepared = cb.loader.prepare(cb.release("2", {"m": V2}))
    plan = prepared._plans[f"{cb.pkg}.m"]
    assert plan.statements == [] and not prepared.runs_code
    assert {
        "attribute Base.kind",
        "attribute Base.limits",
        "method Base.extra",
        "removed Base.legacy",
        "body Child.name",
        "method Child.shout",
    } <= set(plan.changes), plan.changes
    with class_statements_counted() as made:
        cb.loader.finish(prepared)
    assert "Base" not in made and "Child" not in made  # no class statement ran in the switch
    assert m.Base is base and m.Child is child and isinstance(kid, base)
    assert obj.extra() == "basebase!" and obj.extra("?", times=1) == "base?"
    assert kid.extra() == "child2:basechild2:base!"  # the subclass sees the base's new method
    assert kid.shout() == "BASE"  # super() in a method made in prepare: the live class
    assert obj.kind == "base-v2" and kid.limits == (1, 2)
    assert not hasattr(obj, "legacy")
    assert m.Base.extra.__qualname__ == "Base.extra" and m.Base.extra.__module__ == m.__name__
    cb.loader.rollback()
    assert not hasattr(obj, "extra") and not hasattr(kid, "shout") and not hasattr(obj, "limits")
    assert obj.legacy() == "legacy" and obj.kind == "base" and kid.name() == "child:base"
    assert no_staging == []


@pytest.mark.parametrize(
    ("why", "v1", "v2"),
    [
        (
            "an annotation runs code",
            "class K:\n    def a(self):\n        return 1\n",
            "class K:\n    def a(self):\n        return 1\n\n"
            "    def b(self) -> int:\n        return 2\n",
        ),
        (
            "a decorator runs code",
            "import functools\n\nclass K:\n    def a(self):\n        return 1\n",
            "import functools\n\nclass K:\n    def a(self):\n        return 1\n\n"
            "    @functools.cache\n    def b(self):\n        return 2\n",
        ),
        (
            "a computed default",
            "class K:\n    def a(self):\n        return 1\n",
            "class K:\n    def a(self):\n        return 1\n\n"
            "    def b(self, n=len('ab')):\n        return n\n",
        ),
        (
            "a class decorator",
            "def deco(c):\n    return c\n\n@deco\nclass K:\n    def a(self):\n        return 1\n",
            "def deco(c):\n    return c\n\n@deco\nclass K:\n    def a(self):\n        return 1\n\n"
            "    def b(self):\n        return 2\n",
        ),
        (
            "a metaclass other than type",
            "import abc\n\nclass K(abc.ABC):\n    def a(self):\n        return 1\n",
            "import abc\n\nclass K(abc.ABC):\n    def a(self):\n        return 1\n\n"
            "    def b(self):\n        return 2\n",
        ),
        (
            "a statement that is not a member",
            "class K:\n    def a(self):\n        return 1\n",
            "class K:\n    def a(self):\n        return 1\n\n"
            "    def b(self):\n        return 2\n\n    c = b\n",
        ),
        (
            "a changed docstring",
            'class K:\n    """One."""\n\n    def a(self):\n        return 1\n',
            'class K:\n    """Two."""\n\n    def a(self):\n        return 1\n\n'
            "    def b(self):\n        return 2\n",
        ),
    ],
)
def test_what_the_edit_cannot_state_runs_the_class_statement(
    cb: Codebase, why: str, v1: str, v2: str
) -> None:
    m = cb.boot({"m": v1})["m"]
    cls, obj = m.K, m.K()
    prepared = cb.loader.prepare(cb.release("2", {"m": v2}))
    plan = prepared._plans[f"{cb.pkg}.m"]
    assert [s.merge_class for s in plan.statements] == [cls], why
    with class_statements_counted() as made:
        cb.loader.finish(prepared)
    assert made.count("K") == 1, why  # the class statement ran, in the switch, and was merged
    assert m.K is cls and obj.b() == 2 and obj.a() == 1
    cb.loader.rollback()
    assert not hasattr(obj, "b")


def test_a_new_plain_function_is_made_in_prepare(cb: Codebase, no_staging: list[str]) -> None:
    m = cb.boot({"m": "def f():\n    return 1\n"})["m"]
    v2 = (
        "def f():\n    return 1\n\n\n"
        "def g(x, y=(1, 2), *, z=None):\n"
        '    """Docstring."""\n'
        "    return f() + x + len(y)\n"
    )
    prepared = cb.loader.prepare(cb.release("2", {"m": v2}))
    plan = prepared._plans[f"{cb.pkg}.m"]
    assert plan.statements == [] and "new g" in plan.changes and not prepared.runs_code
    cb.loader.finish(prepared)
    assert m.g(1) == 4 and m.g.__doc__ == "Docstring." and m.g.__kwdefaults__ == {"z": None}
    assert m.g.__module__ == m.__name__ and m.g.__globals__ is vars(m)
    changed = {c.name for c in cb.loader.changed_code()}
    assert (
        f"{m.__name__}:g" in changed
    )  # counted by the provisional release's coverage like any new def
    cb.loader.rollback()
    assert not hasattr(m, "g")


def test_a_new_function_over_a_name_bound_at_run_time_runs_its_def(cb: Codebase) -> None:
    """``g`` exists in the live module (bound at run time): its ``def`` runs, so
    whatever replaced the binding is journaled like any statement's."""
    m = cb.boot({"m": "def f():\n    return 1\n"})["m"]
    m.g = "bound at run time"
    v2 = "def f():\n    return 1\n\n\ndef g():\n    return 2\n"
    prepared = cb.loader.prepare(cb.release("2", {"m": v2}))
    plan = prepared._plans[f"{cb.pkg}.m"]
    assert [s.name for s in plan.statements] == ["g"]
    cb.loader.finish(prepared)
    assert m.g() == 2
    cb.loader.rollback()
    assert m.g == "bound at run time"


# ------------------------------------------------------------------ property
_METHODS = ("m0", "m1", "m2", "m3", "__p", "__eq__")  # a private name; one a class treats apart
_ATTRS = ("a0", "a1", "a2", "__q")

members = st.fixed_dictionaries(
    {
        **{m: st.sampled_from([None, "plain", "super", "default"]) for m in _METHODS},
        **{a: st.sampled_from([None, 1, 2, "x", (1, 2)]) for a in _ATTRS},
    }
)


def _class_source(spec: dict[str, Any], version: int) -> str:
    lines = ["class Base:", "    def m0(self):", "        return 'base-m0'", "", ""]
    lines.append("class K(Base):")
    body = []
    for name, how in spec.items():
        if how is None:
            continue
        if name in _ATTRS:
            body.append(f"    {name} = {how!r}")
        elif how == "plain":
            body += [f"    def {name}(self):", f"        return ({name!r}, {version})"]
        elif how == "super":
            body += [f"    def {name}(self):", f"        return (super().m0(), {version})"]
        else:
            body += [f"    def {name}(self, k={version}, *, j='{name}'):", "        return (k, j)"]
    lines += body or ["    pass"]
    return "\n".join(lines) + "\n"


def _observed(cls: type, obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in (*_METHODS[1:], *_ATTRS):  # m0 is Base's when K lacks it
        key = f"_K{name}" if name.startswith("__") and not name.endswith("__") else name
        if name == "__eq__":  # defined here or not, and what that did to hashing
            out[name] = ("__eq__" in vars(cls), cls.__hash__ is None)
        elif name in _ATTRS:
            out[name] = getattr(cls, key, "absent")
        else:
            method = getattr(obj, key, None)
            out[name] = method() if method is not None else "absent"
    out["m0"] = obj.m0()
    return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(old=members, new=members)
def test_an_edited_class_behaves_as_the_new_source_imported_afresh(
    tmp_path_factory: pytest.TempPathFactory, old: dict[str, Any], new: dict[str, Any]
) -> None:
    """Whatever members come and go (methods plain, with ``super()``, with literal
    defaults; literal attributes; private names; an ``__eq__``, which makes a class
    unhashable), a live instance of the upgraded class answers as an instance of
    the new source's class would; rollback gives the old answers."""
    cb = Codebase(tmp_path_factory.mktemp("edit") / "code")
    try:
        v1, v2 = _class_source(old, 1), _class_source(new, 2)
        m = cb.boot({"m": v1})["m"]
        cls, obj = m.K, m.K()
        before = _observed(cls, obj)
        fresh: dict[str, Any] = {"__name__": "fresh"}
        exec(compile(v2, "fresh.py", "exec"), fresh)
        expected = _observed(fresh["K"], fresh["K"]())
        cb.upgrade("2", {"m": v2})
        assert m.K is cls and _observed(cls, obj) == expected
        cb.loader.rollback()
        assert _observed(cls, obj) == before
    finally:
        cb.close()


def test_a_literal_over_a_slot_is_refused_as_a_class_statement_would_be(cb: Codebase) -> None:
    v1 = "class P:\n    __slots__ = ('x',)\n\n    def get(self):\n        return self.x\n"
    m = cb.boot({"m": v1})["m"]
    p = m.P()
    p.x = 1
    with pytest.raises(PrepareError) as err:
        cb.loader.prepare(cb.release("2", {"m": v1 + "\n    x = 5\n"}))
    assert "conflicts with class variable" in str(err.value), err.value
    assert p.get() == 1 and "x" not in {k for k, v in vars(m.P).items() if v == 5}


# a plugin registry a base class fills as its subclasses are defined
PLUGINS = (
    "REGISTRY = []\n\n\nclass Plugin:\n"
    "    def __init_subclass__(cls, **kw):\n"
    "        super().__init_subclass__(**kw)\n"
    "        REGISTRY.append(cls)\n\n\n"
    "class Csv(Plugin):\n    def load(self):\n        return 1\n"
)


def test_an_edited_subclass_is_not_registered_again(cb: Codebase) -> None:
    """A base's ``__init_subclass__`` (a plugin registry) ran when the class was first
    defined; editing the class member by member does not run it again, so the
    registry keeps the one live class and no stray fresh copy."""
    m = cb.boot({"m": PLUGINS})["m"]
    live = m.Csv
    cb.upgrade("2", {"m": PLUGINS + "\n    def dump(self):\n        return 2\n"})
    registered = list(m.REGISTRY)
    assert registered == [live] and m.Csv is live and live().dump() == 2


def test_a_merged_subclass_warns_that_its_base_hook_runs_again(cb: Codebase) -> None:
    """What the member-by-member edit avoids, the merge cannot: the class statement
    runs, and a base's ``__init_subclass__`` registers a fresh copy.  The vote says so."""
    m = cb.boot({"m": PLUGINS})["m"]
    live = m.Csv
    annotated = (
        PLUGINS + "\n    def dump(self) -> int:\n        return 2\n"
    )  # an annotation: merged
    prepared = cb.loader.prepare(cb.release("2", {"m": annotated}))
    (warning,) = [w for w in prepared.warnings if "__init_subclass__" in w]
    assert f"{cb.pkg}.m.Csv" in warning and "Plugin.__init_subclass__" in warning
    cb.loader.finish(prepared)
    assert m.Csv is live and live().dump() == 2
    assert len(m.REGISTRY) == 2 and m.REGISTRY[0] is live  # as the warning said


def test_an_edited_class_is_untouched_by_prepare_and_restored_by_a_failed_finish(
    cb: Codebase,
) -> None:
    """All or nothing with the edit: prepare (made functions, no stores) changes nothing;
    a finish whose migration fails only at run time puts every member back."""
    v1 = (
        "import node_agent\n\n\nclass K:\n    kind = 'v1'\n\n    def old(self):\n        return 1\n"
        "\n\nclass Counter:\n    def code_change(self, old_vsn, state, extra):\n"
        "        if state['n'] == 666:\n            raise ValueError('unexpected state')\n"
        "        return dict(state)\n\n\ndef make():\n    c = Counter()\n    c.n = 0\n"
        "    return node_agent.register(c)\n\n\nC = make()\n"
    )
    v2 = v1.replace("kind = 'v1'", "kind = 'v2'").replace(
        "    def old(self):\n        return 1\n", "    def new(self):\n        return 2\n"
    )
    m = cb.boot({"m": v1})["m"]
    obj, members = m.K(), dict(vars(m.K))
    prepared = cb.loader.prepare(cb.release("2", {"m": v2}))
    assert "method K.new" in prepared._plans[f"{cb.pkg}.m"].changes
    assert dict(vars(m.K)) == members  # prepare stored nothing
    m.C.n = 666  # the state changed between prepare and finish
    with pytest.raises(FinishError) as info:
        cb.loader.finish(prepared)
    assert info.value.restored
    assert dict(vars(m.K)) == members and obj.old() == 1 and not hasattr(obj, "new")
