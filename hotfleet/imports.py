"""Import graph and load order of a release, read from source text alone.

The loader must know which modules of a release need which others *before*
running any of them: a new module's body runs while staged, so its
dependencies must be staged first, and a downgrade must undo in the opposite
order.  Running the code to find out would defeat prepare's promise that
nothing visible happens, so everything here works on the AST and never
imports the modules it reads.

Static analysis only sees imports written as literals; explicit ``depends``
in release.toml covers the rest.
"""

from __future__ import annotations

import ast
import functools
import heapq
import importlib.util
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from hotfleet._gc import paused as gc_paused
from hotfleet.release import Release

__all__ = [
    "FromBinding",
    "ImportInfo",
    "ImportSite",
    "downgrade_order",
    "import_sites",
    "load_order",
    "release_dependencies",
    "remember_scan",
    "remember_sites",
    "scan_imports",
    "take_tree",
]

# Handlers that make an import in the ``try`` body optional: the module copes
# with its absence.
_IMPORT_GUARDS = frozenset({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})
_DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True)
class FromBinding:
    """A module-level ``from module import attr as local``.

    After a reload these names still point at the old objects unless the
    loader rebinds them, so it needs to know every one of them.
    """

    local: str
    module: str
    attr: str


@dataclass(frozen=True)
class ImportInfo:
    """What one module imports, split by whether its import can fail quietly.

    ``required`` imports run unconditionally when the module body runs, so a
    missing one is a ``missing_dependency``; ``optional`` ones run later
    (function bodies) or are guarded (``try``/``TYPE_CHECKING``).
    ``submodule_candidates`` are ``from pkg import name`` targets that *may*
    be submodules; only the caller knows which modules exist.
    """

    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    from_bindings: tuple[FromBinding, ...] = ()
    submodule_candidates: frozenset[str] = frozenset()

    @property
    def all(self) -> frozenset[str]:
        """Every module certainly imported (candidates excluded: they may be attributes)."""
        return self.required | self.optional

    def to_plain(self) -> tuple[Any, ...]:
        """Built-in types only (marshallable): what a cache of scans keeps."""
        return (
            tuple(sorted(self.required)),
            tuple(sorted(self.optional)),
            tuple((b.local, b.module, b.attr) for b in self.from_bindings),
            tuple(sorted(self.submodule_candidates)),
        )

    @classmethod
    def from_plain(cls, plain: Any) -> ImportInfo:
        """The inverse of :meth:`to_plain`; raises :class:`ValueError` for anything else."""
        try:
            required, optional, bindings, candidates = plain
            return cls(
                frozenset(map(str, required)),
                frozenset(map(str, optional)),
                tuple(FromBinding(str(a), str(b), str(c)) for a, b, c in bindings),
                frozenset(map(str, candidates)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a plain ImportInfo: {exc}") from None


@dataclass(frozen=True)
class _Context:
    """Where in the module a node sits, as far as import semantics go."""

    in_function: bool = False
    in_class: bool = False
    guarded: bool = False
    type_checking: bool = False

    @property
    def optional(self) -> bool:
        return self.in_function or self.guarded or self.type_checking

    @property
    def binds_module_global(self) -> bool:
        return not (self.in_function or self.in_class or self.type_checking)


def _names_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _catches_import_errors(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    if caught is None:
        return True
    for node in caught.elts if isinstance(caught, ast.Tuple) else [caught]:
        name = getattr(node, "id", None) or getattr(node, "attr", None)  # Name / builtins.X
        if name in _IMPORT_GUARDS:
            return True
    return False


def _guards_imports(node: ast.Try | ast.TryStar) -> bool:
    return any(_catches_import_errors(handler) for handler in node.handlers)


def _field_context(node: ast.AST, field: str, context: _Context) -> _Context:
    """The context of ``node``'s children stored in ``field``."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and field == "body":
        return replace(context, in_function=True)
    if isinstance(node, ast.ClassDef) and field == "body":
        return replace(context, in_class=True)
    if isinstance(node, ast.Try | ast.TryStar) and field != "finalbody" and _guards_imports(node):
        return replace(context, guarded=True)
    if isinstance(node, ast.If):
        test = node.test
        negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
        if isinstance(test, ast.UnaryOp) and negated:
            test = test.operand
        if _names_type_checking(test) and field == ("orelse" if negated else "body"):
            return replace(context, type_checking=True)
    return context


# what can hold an import statement; expressions only matter for import_module() calls
_STATEMENT_LEVEL = (ast.stmt, ast.excepthandler, ast.match_case)


def _children(
    node: ast.AST, context: _Context, expressions: bool
) -> Iterator[tuple[ast.AST, _Context]]:
    kinds = ast.AST if expressions else _STATEMENT_LEVEL
    for field, value in ast.iter_fields(node):
        if isinstance(value, list):
            children = [c for c in value if isinstance(c, kinds)]
        elif isinstance(value, kinds):
            children = [value]
        else:
            continue
        if children:
            child_context = _field_context(node, field, context)
            for child in children:
                yield child, child_context


def _with_parents(name: str) -> set[str]:
    """``a.b.c`` -> {a, a.b, a.b.c}: importing a submodule imports its packages."""
    parts = name.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


class _Scanner:
    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.required: set[str] = set()
        self.optional: set[str] = set()
        self.candidates: set[str] = set()
        self.bindings: dict[FromBinding, None] = {}  # ordered set

    def add(self, name: str, context: _Context) -> None:
        (self.optional if context.optional else self.required).update(_with_parents(name))

    def resolve(self, level: int, name: str | None) -> str | None:
        if level == 0:
            return name
        try:
            return importlib.util.resolve_name("." * level + (name or ""), self.package)
        except (ImportError, ValueError):
            return None  # beyond the top-level package: fails at run time, not a dependency

    def visit(self, node: ast.AST, context: _Context) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                self.add(alias.name, context)
        elif isinstance(node, ast.ImportFrom):
            self.visit_from(node, context)
        elif isinstance(node, ast.Call):
            self.visit_call(node, context)

    def visit_from(self, node: ast.ImportFrom, context: _Context) -> None:
        base = self.resolve(node.level, node.module)
        if base is None:
            return
        self.add(base, context)
        for alias in node.names:
            if alias.name == "*":
                continue
            self.candidates.add(f"{base}.{alias.name}")
            if context.binds_module_global:
                self.bindings[FromBinding(alias.asname or alias.name, base, alias.name)] = None

    def visit_call(self, node: ast.Call, context: _Context) -> None:
        """``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if called not in _DYNAMIC_IMPORTERS or not node.args:
            return
        name = getattr(node.args[0], "value", None)
        if isinstance(name, str) and name and not name.startswith("."):
            self.add(name, context)

    def result(self) -> ImportInfo:
        return ImportInfo(
            required=frozenset(self.required),
            optional=frozenset(self.optional - self.required),
            from_bindings=tuple(self.bindings),
            submodule_candidates=frozenset(self.candidates),
        )


_trees: OrderedDict[str | bytes, ast.Module] | None = None  # while shared_trees() is active
_trees_users = 0
_trees_lock = threading.Lock()
_SHARED_TREES_MAX = 256  # a huge release re-parses rather than hold every tree at once


@contextmanager
def shared_trees() -> Iterator[None]:
    """Within the block, :func:`parse_source` keeps the trees it makes.

    A prepare parses each source of the release for several readers (import
    scan, compile, the planner); outside one, nothing is kept: trees are tens
    of thousands of tracked objects each release, and kept for good they would
    slow every full collection of the host process.
    """
    global _trees, _trees_users
    with _trees_lock:
        _trees_users += 1
        if _trees is None:
            _trees = OrderedDict()
    try:
        yield
    finally:
        with _trees_lock:
            _trees_users -= 1
            if _trees_users == 0:
                _trees = None


def parse_source(source: str | bytes) -> ast.Module:
    """The syntax tree of ``source``: shared inside :func:`shared_trees`, so never mutate it.

    Raises :class:`SyntaxError` (also for null bytes).
    """
    trees = _trees
    if trees is not None:
        with _trees_lock:
            tree = trees.get(source)
            if tree is not None:
                trees.move_to_end(source)
                return tree
    tree = _parse(source)
    if trees is not None:
        with _trees_lock:
            trees[source] = tree
            while len(trees) > _SHARED_TREES_MAX:
                trees.popitem(last=False)
    return tree


def take_tree(source: str | bytes) -> ast.Module:
    """A tree of ``source`` its caller may change: the shared one, taken out of the
    shared trees (no later reader sees the change), or a fresh parse.

    For the last reader of a prepare (the counting twins, which instrument
    the tree in place): one parse of the release's sources saved.
    """
    trees = _trees
    if trees is not None:
        with _trees_lock:
            tree = trees.pop(source, None)
        if tree is not None:
            return tree
    return _parse(source)


def _parse(source: str | bytes) -> ast.Module:
    try:
        with gc_paused():  # tens of thousands of nodes: one collection afterwards, not dozens
            return ast.parse(source)
    except ValueError as exc:  # null bytes on older 3.11 patch releases
        raise SyntaxError(str(exc)) from exc


_known: OrderedDict[tuple[str, str | bytes, bool], ImportInfo] = OrderedDict()
_KNOWN_MAX = 256


def scan_imports(module: str, source: str | bytes, *, is_package: bool = False) -> ImportInfo:
    """The imports of ``module`` as written in ``source``.

    Raises :class:`SyntaxError` for source that does not parse; the loader
    reports that as ``badfile``.  Results are cached by content: a prepare
    scans every loaded module of the code path, which rarely changes.
    """
    known = _known.get((module, source, is_package))
    if known is not None:
        return known
    return _scan_cached(module, source, is_package)


def remember_scan(
    module: str, source: str | bytes, info: ImportInfo, *, is_package: bool = False
) -> None:
    """Take ``info`` as the scan of ``source`` (another process of the host made it).

    The caller vouches that it is :func:`scan_imports`'s result for exactly
    these arguments (the node agent's host cache keys it by the source's
    digest); the next scans of this source are answered without parsing.
    """
    _remember(_known, (module, source, is_package), info)


def _remember(store: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    """Keep ``value`` under ``key`` in a store of other processes' results, the oldest
    dropped past :data:`_KNOWN_MAX`."""
    with _trees_lock:
        store[key] = value
        while len(store) > _KNOWN_MAX:
            store.popitem(last=False)


@functools.lru_cache(maxsize=1024)
def _scan_cached(module: str, source: str | bytes, is_package: bool) -> ImportInfo:
    tree = parse_source(source)
    scanner = _Scanner(module, is_package)
    # Expressions are walked only when a dynamic import can be among them: most
    # modules never name import_module/__import__, and their statements are a
    # small fraction of the tree.
    text = source if isinstance(source, str) else source.decode("latin-1")
    expressions = any(name in text for name in _DYNAMIC_IMPORTERS)
    # Iterative walk: a generated module may nest deeper than the recursion limit.
    stack: list[tuple[ast.AST, _Context]] = [(tree, _Context())]
    while stack:
        node, context = stack.pop()
        scanner.visit(node, context)
        stack.extend(reversed(list(_children(node, context, expressions))))
    return scanner.result()


@dataclass(frozen=True)
class ImportSite:
    """One absolute ``import``/``from ... import`` statement, where it runs and what guards it."""

    name: str  # the module imported (``a.b`` for ``from a.b import c``)
    line: int
    in_function: bool
    guarded: bool  # inside a try that catches ImportError, or under TYPE_CHECKING

    @property
    def top(self) -> str:
        return self.name.partition(".")[0]


_known_sites: OrderedDict[str | bytes, tuple[ImportSite, ...]] = OrderedDict()


def remember_sites(source: str | bytes, sites: Iterable[ImportSite]) -> None:
    """Take ``sites`` as :func:`import_sites` of ``source`` (another process of the host
    found them; the caller vouches for it, as for :func:`remember_scan`)."""
    _remember(_known_sites, source, tuple(sites))


def import_sites(source: str | bytes) -> list[ImportSite]:
    """Every absolute import statement of ``source`` (relative ones stay in the release).

    Raises :class:`SyntaxError` for source that does not parse.
    """
    known = _known_sites.get(source)
    if known is not None:
        return list(known)
    sites: list[ImportSite] = []
    stack: list[tuple[ast.AST, _Context]] = [(parse_source(source), _Context())]
    while stack:
        node, context = stack.pop()
        guarded = context.guarded or context.type_checking
        if isinstance(node, ast.Import):
            for alias in node.names:
                sites.append(ImportSite(alias.name, node.lineno, context.in_function, guarded))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            sites.append(ImportSite(node.module, node.lineno, context.in_function, guarded))
        stack.extend(_children(node, context, False))
    return sorted(sites, key=lambda site: site.line)


def _strongly_connected(graph: Mapping[str, list[str]]) -> list[tuple[str, ...]]:
    """Tarjan's algorithm without recursion, so long import chains cannot overflow it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[tuple[str, ...]] = []

    def enter(node: str) -> tuple[str, Iterator[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        return node, iter(graph[node])

    for root in sorted(graph):
        if root in index:
            continue
        work = [enter(root)]
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    work.append(enter(successor))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while not component or component[-1] != node:
                        component.append(stack.pop())
                        on_stack.discard(component[-1])
                    components.append(tuple(sorted(component)))
    return components


def load_order(deps: Mapping[str, Iterable[str]]) -> list[tuple[str, ...]]:
    """Units to load, dependencies first; an import cycle is one unit.

    Among units whose dependencies are all loaded, the one with the smallest
    names goes first, so the order depends only on the graph, never on dict
    or set iteration order -- every node of a fleet loads in the same order.
    """
    nodes = set(deps)
    graph = {node: sorted(set(targets) & nodes) for node, targets in deps.items()}
    unit_of: dict[str, tuple[str, ...]] = {}
    for unit in _strongly_connected(graph):
        unit_of.update(dict.fromkeys(unit, unit))
    waiting_on: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    dependents: dict[tuple[str, ...], set[tuple[str, ...]]] = defaultdict(set)
    for unit in set(unit_of.values()):
        waiting_on[unit] = {unit_of[d] for node in unit for d in graph[node]} - {unit}
        for dependency in waiting_on[unit]:
            dependents[dependency].add(unit)
    ready = [unit for unit, waiting in waiting_on.items() if not waiting]
    heapq.heapify(ready)
    order: list[tuple[str, ...]] = []
    while ready:
        unit = heapq.heappop(ready)
        order.append(unit)
        for dependent in dependents[unit]:
            waiting_on[dependent].discard(unit)
            if not waiting_on[dependent]:
                heapq.heappush(ready, dependent)
    return order


def downgrade_order(deps: Mapping[str, Iterable[str]]) -> list[tuple[str, ...]]:
    """Dependents before what they depend on: the exact reverse of :func:`load_order`."""
    return load_order(deps)[::-1]


def release_dependencies(release: Release) -> dict[str, set[str]]:
    """For each module of ``release``, the modules of the same release it needs first.

    Imports, submodule candidates and explicit ``depends`` all count, and so
    does a submodule's parent package (``a.b`` cannot load before ``a``).
    Modules that do not parse keep only their parents and explicit
    ``depends``: the loader reports them as ``badfile``.
    """
    names = set(release.module_names())
    result: dict[str, set[str]] = {name: set() for name in names}
    for module in release.modules:
        found = _with_parents(module.name) | set(module.depends)
        try:
            info = scan_imports(module.name, module.source, is_package=module.is_package)
        except SyntaxError:
            pass
        else:
            found |= info.all | info.submodule_candidates
        result[module.name] |= (found & names) - {module.name}
    return result
