"""Import scanning and load order, including property tests against brute force."""

from __future__ import annotations

import random
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotfleet import imports
from hotfleet.imports import (
    FromBinding,
    ImportInfo,
    downgrade_order,
    load_order,
    release_dependencies,
    scan_imports,
)
from hotfleet.release import Release


def scan(source: str, module: str = "pkg.mod", *, is_package: bool = False) -> ImportInfo:
    return scan_imports(module, textwrap.dedent(source), is_package=is_package)


# -- scan_imports ---------------------------------------------------------------
def test_absolute_import_requires_every_parent_package() -> None:
    info = scan("import a.b.c\nimport x as y\n")
    assert info.required == {"a", "a.b", "a.b.c", "x"}
    assert info.optional == set()
    assert info.from_bindings == ()


def test_from_import_records_binding_and_submodule_candidate() -> None:
    info = scan("from a.b import c as d, e\nfrom z import *\n")
    assert info.required == {"a", "a.b", "z"}
    assert info.submodule_candidates == {"a.b.c", "a.b.e"}
    assert info.from_bindings == (FromBinding("d", "a.b", "c"), FromBinding("e", "a.b", "e"))
    assert info.all == info.required


@pytest.mark.parametrize(
    ("module", "is_package", "statement", "base", "candidate"),
    [
        ("p", True, "from . import x", "p", "p.x"),
        ("p.m", False, "from . import x", "p", "p.x"),
        ("p.q", True, "from . import x", "p.q", "p.q.x"),
        ("p.q.m", False, "from .. import x", "p", "p.x"),
        ("p.q.m", False, "from ..sub.deep import x", "p.sub.deep", "p.sub.deep.x"),
        ("p.q", True, "from .sib import x", "p.q.sib", "p.q.sib.x"),
    ],
)
def test_relative_imports_resolve_against_the_package(
    module: str, is_package: bool, statement: str, base: str, candidate: str
) -> None:
    info = scan(statement, module, is_package=is_package)
    assert base in info.required
    assert info.required <= {".".join(base.split(".")[: i + 1]) for i in range(9)}
    assert info.submodule_candidates == {candidate}
    assert info.from_bindings == (FromBinding("x", base, "x"),)


@pytest.mark.parametrize(
    ("module", "statement"), [("top", "from . import x"), ("p.m", "from ... import x")]
)
def test_relative_import_beyond_top_level_is_not_a_dependency(module: str, statement: str) -> None:
    assert scan(statement, module) == ImportInfo()


def test_guarded_imports_are_optional() -> None:
    info = scan(
        """
        try:
            import ujson as json
        except ImportError:
            import json
        try:
            import fast
        except (ValueError, ModuleNotFoundError):
            fast = None
        else:
            import fast.extras
        try:
            import bare
        except:
            pass
        try:
            import keyed
        except KeyError:
            pass
        finally:
            import always
        """
    )
    assert info.optional == {"ujson", "json", "fast", "fast.extras", "bare"}
    assert info.required == {"keyed", "always"}


def test_type_checking_imports_are_optional_and_bind_nothing() -> None:
    info = scan(
        """
        import typing
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from shop.db import Db
        else:
            from shop.runtime import Db
        if typing.TYPE_CHECKING:
            import heavy
        if not TYPE_CHECKING:
            import light
        """
    )
    assert {"shop.db", "heavy"} <= info.optional
    assert {"shop", "shop.runtime", "light", "typing"} <= info.required
    assert info.optional.isdisjoint(info.required)
    assert FromBinding("Db", "shop.runtime", "Db") in info.from_bindings
    assert FromBinding("Db", "shop.db", "Db") not in info.from_bindings


def test_function_level_imports_are_optional_and_class_body_ones_required() -> None:
    info = scan(
        """
        def f():
            import csv
            from json import dumps
        async def g():
            import asyncio
        class K:
            import decimal
            from fractions import Fraction
            def method(self):
                import sqlite3
        lam = lambda: __import__("lazy")
        """
    )
    assert info.optional == {"csv", "json", "asyncio", "sqlite3", "lazy"}
    assert info.required == {"decimal", "fractions"}
    assert info.from_bindings == ()


def test_module_level_import_wins_over_a_guarded_one() -> None:
    info = scan("import os\ndef f():\n    import os\n")
    assert info.required == {"os"} and info.optional == set()


def test_literal_dynamic_imports_are_seen() -> None:
    info = scan(
        """
        import importlib
        plugin = importlib.import_module("plugins.a")
        def load(name):
            importlib.import_module(name)
            return __import__("plugins.b")
        """
    )
    assert {"plugins", "plugins.a"} <= info.required
    assert "plugins.b" in info.optional


def test_bindings_keep_source_order_and_skip_duplicates() -> None:
    info = scan(
        """
        try:
            from fast import loads
        except ImportError:
            from json import loads
        from fast import loads
        """
    )
    assert info.from_bindings == (
        FromBinding("loads", "fast", "loads"),
        FromBinding("loads", "json", "loads"),
    )


def test_bytes_source_honours_its_encoding_cookie() -> None:
    source = "# -*- coding: latin-1 -*-\nimport caf\xe9\n".encode("latin-1")
    assert scan_imports("m", source).required == {"caf\xe9"}


@pytest.mark.parametrize("source", ["def f(:\n", b"x = 1\x00\n", b"\xff\xfe = 1\n"])
def test_unparsable_source_raises_syntax_error(source: str | bytes) -> None:
    with pytest.raises(SyntaxError):
        scan_imports("m", source)


def test_deeply_nested_source_does_not_hit_recursion_limit() -> None:
    depth = 90  # below the parser's own indentation limit
    lines = [" " * i + "if x:" for i in range(depth)] + [" " * depth + "import deep"]
    assert scan_imports("m", "\n".join(lines)).required == {"deep"}


# -- load_order -------------------------------------------------------------------
def test_dependencies_come_first_and_cycles_are_one_unit() -> None:
    deps = {
        "app": ["shop.cart", "util"],
        "shop.cart": ["shop.db"],
        "shop.db": ["shop.cart", "util", "os"],  # os is not in the graph: ignored
        "util": [],
    }
    assert load_order(deps) == [("util",), ("shop.cart", "shop.db"), ("app",)]
    assert downgrade_order(deps) == [("app",), ("shop.cart", "shop.db"), ("util",)]


def test_independent_units_are_ordered_by_name() -> None:
    assert load_order({"c": [], "a": [], "b": ["c"]}) == [("a",), ("c",), ("b",)]


def test_self_import_is_a_single_unit() -> None:
    assert load_order({"a": ["a"]}) == [("a",)]


def test_deep_chain_does_not_recurse() -> None:
    n = 20_000
    deps = {f"m{i:05}": [f"m{i + 1:05}"] if i + 1 < n else [] for i in range(n)}
    order = load_order(deps)
    assert order[0] == (f"m{n - 1:05}",) and order[-1] == ("m00000",)
    big_cycle = {f"m{i:05}": [f"m{(i + 1) % n:05}"] for i in range(n)}
    assert load_order(big_cycle) == [tuple(sorted(big_cycle))]


def test_accepts_one_shot_iterables() -> None:
    assert load_order({"a": iter(["b"]), "b": iter([])}) == [("b",), ("a",)]


NAMES = [f"m{i}" for i in range(10)]


@st.composite
def graphs(draw: st.DrawFn, acyclic: bool) -> dict[str, set[str]]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=10, unique=True))
    # Acyclic: only edges towards names later in a random permutation.
    rank = {name: i for i, name in enumerate(draw(st.permutations(names)))}
    edges = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names))))
    deps: dict[str, set[str]] = {name: set() for name in names}
    for source, target in edges:
        if not acyclic or rank[source] < rank[target]:
            deps[source].add(target)
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        deps[name].add("external." + name)  # not in the graph: must be ignored
    return deps


def reachable(deps: dict[str, set[str]], start: str) -> set[str]:
    seen = {start}
    frontier = [start]
    while frontier:
        for target in deps[frontier.pop()]:
            if target in deps and target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def check_order(deps: dict[str, set[str]]) -> list[tuple[str, ...]]:
    order = load_order(deps)
    position = {name: i for i, unit in enumerate(order) for name in unit}
    # Every node appears exactly once, and units are sorted tuples.
    assert sorted(position) == sorted(deps)
    assert sum(len(unit) for unit in order) == len(deps)
    assert all(list(unit) == sorted(unit) for unit in order)
    # Dependencies load earlier or in the same unit.
    for node, targets in deps.items():
        for target in targets & deps.keys():
            assert position[target] <= position[node]
    # Units are exactly the strongly connected components.
    reach = {node: reachable(deps, node) for node in deps}
    for node in deps:
        component = {other for other in deps if other in reach[node] and node in reach[other]}
        assert set(order[position[node]]) == component
    # Ties go by name: each unit is the smallest of those whose dependencies are loaded.
    loaded: set[str] = set()
    for unit in order:
        ready = [
            u
            for u in order
            if not loaded & set(u)
            and all(t in loaded or t in u for n in u for t in deps[n] & deps.keys())
        ]
        assert unit == min(ready)
        loaded.update(unit)
    # The result depends on the graph only, not on the mapping's order.
    shuffled = list(deps.items())
    random.Random(len(deps)).shuffle(shuffled)
    assert load_order({k: sorted(v, reverse=True) for k, v in shuffled}) == order
    assert downgrade_order(deps) == order[::-1]
    return order


@settings(max_examples=300, deadline=None)
@given(graphs(acyclic=True))
def test_load_order_on_random_dags(deps: dict[str, set[str]]) -> None:
    order = check_order(deps)
    assert all(len(unit) == 1 for unit in order)


@settings(max_examples=300, deadline=None)
@given(graphs(acyclic=False))
def test_load_order_on_random_graphs_with_cycles(deps: dict[str, set[str]]) -> None:
    check_order(deps)


# -- release_dependencies -------------------------------------------------------------
def test_release_dependencies() -> None:
    release = Release.from_sources(
        "shop",
        "1",
        {
            "shop": "from . import cart\n",
            "shop.cart": "from shop.db import connect\nimport json\n",
            "shop.db": "def connect():\n    from shop import cart\n",
            "shop.api": "from shop import db as database\n",
            "util": "X = 1\n",
            "broken": "def (:\n",
            "late": "import os\n",
        },
        packages=["shop"],
        modules={"late": {"depends": ["util", "elsewhere.mod"]}, "broken": {"depends": ["util"]}},
    )
    deps = release_dependencies(release)
    assert deps == {
        "shop": {"shop.cart"},
        "shop.cart": {"shop", "shop.db"},
        "shop.db": {"shop", "shop.cart"},
        "shop.api": {"shop", "shop.db"},
        "util": set(),
        "broken": {"util"},
        "late": {"util"},
    }
    assert load_order(deps) == [
        ("shop", "shop.cart", "shop.db"),
        ("shop.api",),
        ("util",),
        ("broken",),
        ("late",),
    ]


def test_release_dependencies_merge_duplicated_entries() -> None:
    release = Release(
        name="dup",
        version="1",
        modules=(
            *Release.from_sources("x", "1", {"a.b": "import c\n", "c": ""}).modules,
            *Release.from_sources(
                "x", "1", {"a.b": "import d\n", "d": ""}, packages=["a.b"]
            ).modules,
        ),
    )
    assert len(release.modules) == 4
    assert release_dependencies(release)["a.b"] == {"c", "d"}


def test_a_taken_tree_is_no_longer_shared() -> None:
    """The twins instrument the tree they take in place: no later reader may see it."""
    source = "def f():\n    return 1\n"
    with imports.shared_trees():
        shared = imports.parse_source(source)
        taken = imports.take_tree(source)
        assert taken is shared
        taken.body.clear()
        again = imports.parse_source(source)
        assert again is not taken and len(again.body) == 1
    assert len(imports.take_tree(source).body) == 1  # outside a prepare: a fresh parse
