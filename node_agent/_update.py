"""Planning the update of a module the process has already loaded.

The old and new sources are compared statement by statement (AST, positions
ignored) and every change is classified:

* ``body``: a ``def`` (top level or method) whose decorators and closure shape
  did not change.  Precomputed as :class:`SetCode` edits on the live function
  objects, so identity, registries, wrappers and ``from m import f`` keep
  working; memoizing wrappers are cleared.
* ``statement``: a new or reshaped definition, a changed module statement, a
  class whose layout changed.  Compiled in prepare, never executed in the
  live process before the decision: it runs in the staging process
  (:mod:`node_agent._rehearsal`) and then once for real in finish, in the
  module's own namespace, behind the barrier.  A redefined class is merged
  back into the old class object (:mod:`node_agent._classmerge`), so its
  identity survives.
* ``removed``: names the new source no longer binds are unbound.
* refusals (``incompatible_change``): a changed base class, metaclass or
  ``__slots__`` (from the trees); changed enum members (found by the switch,
  so in the staging process).

Default values of a patched function are kept when their expressions did not
change, computed from the tree when they are literals, and otherwise
evaluated by the switch (:class:`~node_agent._patch.SetDefaults`): never in
prepare.

Unchanged statements are never re-run, so module state survives.
"""

from __future__ import annotations

import ast
import functools
import io
import tokenize
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hotfleet.errors import Reason
from hotfleet.imports import parse_source
from node_agent import _functions as fx
from node_agent._patch import MISSING, ClearCache, Op, SetCode, SetDefaults

_dumps: dict[int, str] = {}  # per build(): the same statements are compared several times


def _dump(node: ast.AST) -> str:
    """Position-free text of a node, memoized for the duration of one :meth:`ModulePlanner.build`.

    Keyed by ``id``: only valid while the trees are alive, so ``build`` clears it.
    """
    text = _dumps.get(id(node))
    if text is None:
        text = _dumps[id(node)] = ast.dump(node, include_attributes=False)
    return text


@functools.lru_cache(maxsize=64)
def _utf8_lines(source: bytes) -> list[bytes] | None:
    """The source as the parser's offsets see it: UTF-8 lines (``None`` if undecodable)."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
        return source.decode(encoding).encode("utf-8").splitlines(keepends=True)
    except (SyntaxError, LookupError, UnicodeError):
        return None


def _segment(lines: list[bytes] | None, node: ast.stmt) -> bytes | None:
    """The exact source text of a statement, its decorators included."""
    end, end_col = node.end_lineno, node.end_col_offset
    if lines is None or end is None or end_col is None:
        return None
    decorators = getattr(node, "decorator_list", None)
    first, col = (
        (min(d.lineno for d in decorators), 0) if decorators else (node.lineno, node.col_offset)
    )
    if first == end:
        return lines[first - 1][col:end_col]
    return b"".join([lines[first - 1][col:], *lines[first : end - 1], lines[end - 1][:end_col]])


def _is_constant(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def bound_names(body: Iterable[ast.stmt]) -> set[str]:
    """Names a block of statements binds at its own level (defs, assignments, imports)."""
    names: set[str] = set()
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(stmt.name)
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            for alias in stmt.names:
                if alias.name != "*":
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _dynamic(stmt: ast.stmt) -> bool:
    """May the statement bind names :func:`bound_names` cannot see (blocks, star imports, calls)?"""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Import):
        return False
    if isinstance(stmt, ast.ImportFrom):
        return any(a.name == "*" for a in stmt.names)
    if isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign):
        return any(isinstance(n, ast.NamedExpr) for n in ast.walk(stmt))
    return True  # expressions (a call may set globals), if/for/try/with blocks


def _defs(body: Iterable[ast.stmt]) -> dict[str, ast.stmt]:
    return {
        s.name: s
        for s in body
        if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }


def _slots(node: ast.ClassDef) -> str | None:
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in stmt.targets
        ):
            return _dump(stmt.value)
    return None


def _header(node: ast.ClassDef) -> str:
    # a temporary node: dumped directly, never memoized (its id is reused at once)
    return ast.dump(
        ast.Tuple(elts=[*node.bases, *[k.value for k in node.keywords]], ctx=ast.Load()),
        include_attributes=False,
    ) + str([k.arg for k in node.keywords])


def _signature_only_body_changed(old: ast.AST, new: ast.AST) -> bool:
    """Same decorators and same kind of definition: the code object may be swapped."""
    return (
        type(old) is type(new)
        and isinstance(new, ast.FunctionDef | ast.AsyncFunctionDef)
        and isinstance(old, ast.FunctionDef | ast.AsyncFunctionDef)
        and [_dump(d) for d in old.decorator_list] == [_dump(d) for d in new.decorator_list]
    )


class Refused(Exception):
    """Internal: an update that cannot be planned; becomes a :class:`ModuleError`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Statement:
    """A statement executed for real during finish, in the module's namespace."""

    code: types.CodeType
    lineno: int
    merge_class: type | None = None  # the live class a redefinition is merged into
    name: str = ""
    binds: frozenset[str] | None = None  # names it may bind; None: compare the whole namespace
    # ``NAME = <literal>``: (NAME, value) read off the tree in prepare (ast.literal_eval
    # runs nothing); the switch binds it without executing a statement
    literal: tuple[str, Any] | None = None


@dataclass
class ModulePlan:
    """Everything finish needs to switch one loaded module."""

    module: types.ModuleType
    ops: list[Op] = field(default_factory=list)
    statements: list[Statement] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # "kind name" lines, for the report
    warnings: list[str] = field(default_factory=list)
    late_ops: list[Op] = field(default_factory=list)  # after the statements: default values
    replaced_codes: fx.Codes = field(default_factory=fx.Codes)  # may still run in a frame
    new_codes: dict[str, types.CodeType | None] = field(default_factory=dict)
    # id(old) -> (old, new) code of functions made at run time by the functions patched
    nested: dict[int, tuple[types.CodeType, types.CodeType | None]] = field(default_factory=dict)

    def patch_closures(self, live: dict[int, list[types.FunctionType]]) -> None:
        """Closures created at run time by patched functions get the new body too.

        ``live``: the live function objects by ``id`` of their code (see
        :func:`~node_agent._functions.scan_heap`).
        """
        for key, (old, new) in self.nested.items():
            for f in live.get(key, []):
                if new is not None and new.co_freevars == old.co_freevars:
                    self.ops.append(SetCode(f, new, f.__defaults__, f.__kwdefaults__))
                else:
                    self.warnings.append(
                        f"{old.co_qualname}: a live closure keeps its old code "
                        f"({'removed' if new is None else 'closure shape changed'}); "
                        "new calls of the enclosing function create new-code closures"
                    )


def _default_exprs(
    node: ast.FunctionDef | ast.AsyncFunctionDef,
) -> tuple[list[ast.expr], dict[str, ast.expr]]:
    args = node.args
    kw = {a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None}
    return list(args.defaults), kw


def _defaults_code(node: ast.FunctionDef | ast.AsyncFunctionDef, filename: str) -> types.CodeType:
    """Code evaluating to ``(__defaults__, __kwdefaults__)``, run by the switch, not in prepare."""
    positional, kw = _default_exprs(node)
    pair = ast.Tuple(
        elts=[
            ast.Tuple(elts=positional, ctx=ast.Load()) if positional else ast.Constant(None),
            ast.Dict(keys=[ast.Constant(k) for k in kw], values=list(kw.values()))
            if kw
            else ast.Constant(None),
        ],
        ctx=ast.Load(),
    )
    expr = ast.fix_missing_locations(ast.copy_location(ast.Expression(pair), node))
    return compile(expr, filename, "eval", dont_inherit=True)


def _literal_defaults(
    node: ast.FunctionDef | ast.AsyncFunctionDef,
) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None] | None:
    """The default values if every one is a literal (no code runs), else ``None``."""
    positional, kw = _default_exprs(node)
    try:
        values = tuple(ast.literal_eval(e) for e in positional)
        kwvalues = {k: ast.literal_eval(e) for k, e in kw.items()}
    except ValueError:
        return None
    return (values or None), (kwvalues or None)


def _same_defaults(
    old: ast.FunctionDef | ast.AsyncFunctionDef, new: ast.FunctionDef | ast.AsyncFunctionDef
) -> bool:
    (op, ok), (np, nk) = _default_exprs(old), _default_exprs(new)
    return [_dump(e) for e in op] == [_dump(e) for e in np] and {
        k: _dump(e) for k, e in ok.items()
    } == {k: _dump(e) for k, e in nk.items()}


def _literal_binding(stmt: ast.stmt) -> tuple[str, Any] | None:
    """``(name, value)`` of ``name = <literal>`` (a constant, or containers of constants)."""
    if not (
        isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
    ):
        return None
    try:
        value = ast.literal_eval(stmt.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return stmt.targets[0].id, value


def _docstring(node: ast.AST) -> Any:
    return (
        ast.get_docstring(node, clean=False)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        else None
    )


class ModulePlanner:
    """Builds the :class:`ModulePlan` of one loaded module."""

    def __init__(
        self,
        module: types.ModuleType,
        old_source: bytes,
        new_source: bytes,
        filename: str,
        new_code: types.CodeType,
    ) -> None:
        self.module = module
        self.g: dict[str, Any] = module.__dict__
        self.filename = filename
        # one tree per source for the whole prepare (hotfleet.imports.shared_trees)
        self.old_tree = parse_source(old_source)
        self.new_tree = parse_source(new_source)
        self._old_lines = _utf8_lines(old_source)
        self._new_lines = _utf8_lines(new_source)
        self.plan = ModulePlan(module, new_codes=fx.code_index(new_code))
        self.index = fx.module_functions(self.g, module.__name__)

    # ---------------------------------------------------------------- public
    def build(self) -> ModulePlan:
        try:
            return self._build()
        finally:
            _dumps.clear()

    def _build(self) -> ModulePlan:
        old_defs = _defs(self.old_tree.body)
        unchanged = self._unchanged_statements()
        for stmt in self.new_tree.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                old = old_defs.get(stmt.name)
                if old is not None and self._same_text(old, stmt):
                    continue
                self._plan_definition(stmt, old)
            elif not _is_constant(stmt) and id(stmt) not in unchanged:
                self._statement(stmt, "statement")
        self._docstring()
        removed = bound_names(self.old_tree.body) - bound_names(self.new_tree.body)
        self.plan.removed = sorted(n for n in removed if n in self.g)
        self.plan.changes.extend(f"removed {n}" for n in self.plan.removed)
        return self.plan

    # ------------------------------------------------------------- internals
    def _same_text(self, old: ast.stmt, new: ast.stmt) -> bool:
        """Byte-identical source: the cheap test that settles most statements.

        Identical text is an identical tree; different text may still be the
        same tree (formatting, comments), which :func:`_dump` decides where it
        matters: wherever re-running a statement would have effects.
        """
        text = _segment(self._new_lines, new)
        return text is not None and text == _segment(self._old_lines, old)

    def _unchanged_statements(self) -> set[int]:
        """Ids of the new module-level statements (not definitions) the old source has too.

        Matched as multisets, by text first and by tree for the rest, so a
        reformatted ``CACHE = {}`` is not run again and state survives.
        """

        def plain(body: list[ast.stmt]) -> list[ast.stmt]:
            return [
                s
                for s in body
                if not isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and not _is_constant(s)
            ]

        old_texts: dict[bytes | None, list[ast.stmt]] = {}
        for s in plain(self.old_tree.body):
            old_texts.setdefault(_segment(self._old_lines, s), []).append(s)
        same: set[int] = set()
        rest: list[ast.stmt] = []
        for s in plain(self.new_tree.body):
            text = _segment(self._new_lines, s)
            if text is not None and old_texts.get(text):
                old_texts[text].pop()
                same.add(id(s))
            else:
                rest.append(s)
        old_trees: dict[str, int] = {}
        for left in old_texts.values():
            for s in left:
                old_trees[_dump(s)] = old_trees.get(_dump(s), 0) + 1
        for s in rest:
            if old_trees.get(_dump(s)):
                old_trees[_dump(s)] -= 1
                same.add(id(s))
        return same

    def _docstring(self) -> None:
        """Rebind ``__doc__`` when the module docstring changed.

        Run as a statement of its own, a bare string would be compiled as a
        docstring wherever it stood, so only the module's first statement may
        set ``__doc__``, and only through this one explicit assignment.
        """
        old, new = ast.get_docstring(self.old_tree, False), ast.get_docstring(self.new_tree, False)
        if old == new:
            return
        assign = ast.Assign(
            targets=[ast.Name("__doc__", ast.Store())], value=ast.Constant(new), lineno=1
        )
        self._statement(ast.fix_missing_locations(assign), "docstring")

    def _statement(self, stmt: ast.stmt, kind: str, merge_class: type | None = None) -> None:
        """Compile ``stmt`` and schedule it for the switch (it never runs here)."""
        module_ast = ast.Module(body=[stmt], type_ignores=[])
        code = compile(module_ast, self.filename, "exec", dont_inherit=True)
        name = getattr(stmt, "name", "")
        binds = None if _dynamic(stmt) else frozenset(bound_names([stmt]))
        self.plan.statements.append(
            Statement(code, stmt.lineno, merge_class, name, binds, _literal_binding(stmt))
        )
        self.plan.changes.append(f"{kind} {name or f'line {stmt.lineno}'}")

    def _plan_definition(self, stmt: ast.stmt, old: ast.stmt | None) -> None:
        assert isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        live = self.g.get(stmt.name, MISSING)
        if (
            isinstance(stmt, ast.ClassDef)
            and isinstance(old, ast.ClassDef)
            and isinstance(live, type)
            and live.__module__ == self.module.__name__
        ):
            self._plan_class(stmt, old, live)
        elif (
            old is not None
            and _signature_only_body_changed(old, stmt)
            and self.index.get(stmt.name)
        ):
            assert isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef)
            assert isinstance(old, ast.FunctionDef | ast.AsyncFunctionDef)
            self._swap_code(stmt, old, stmt.name, self.index[stmt.name], live)
            self.plan.changes.append(f"body {stmt.name}")
        elif old is None or _dump(old) != _dump(stmt):  # not a mere reformatting
            self._statement(stmt, "new" if old is None else "redefined")

    def _swap_code(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef,
        old: ast.FunctionDef | ast.AsyncFunctionDef,
        qualname: str,
        funcs: list[types.FunctionType],
        holder: Any,
    ) -> None:
        new = self.plan.new_codes.get(qualname)
        if new is None:
            raise Refused(
                Reason.INCOMPATIBLE_CHANGE,
                f"{qualname}: defined more than once; cannot tell which to patch",
            )
        # Default values: kept if their expressions did not change, taken from the
        # tree if literal, otherwise evaluated by the switch (no code runs here).
        late: types.CodeType | None = None
        literal = None
        if not _same_defaults(old, node):
            literal = _literal_defaults(node)
            if literal is None:
                late = _defaults_code(node, self.filename)
        for f in funcs:
            if f.__code__.co_freevars != new.co_freevars:
                raise Refused(
                    Reason.INCOMPATIBLE_CHANGE,
                    f"{qualname}: closure shape changed {f.__code__.co_freevars} -> {new.co_freevars}",
                )
            self._remember_nested(f.__code__)
            self.plan.replaced_codes.add(f.__code__)
            defaults, kwdefaults = literal or (f.__defaults__, f.__kwdefaults__)
            self.plan.ops.append(SetCode(f, new, defaults, kwdefaults, _docstring(node)))
            if late is not None:
                self.plan.late_ops.append(SetDefaults(f, late))
        if holder is not MISSING:
            self.plan.ops.extend(ClearCache(c) for c in fx.caches_of(holder))

    def _remember_nested(self, code: types.CodeType) -> None:
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                # Generator expressions are left out: they are consumed where they
                # are made (a stored, half-run one keeps its old code unreported),
                # and looking for them would cost a heap walk in nearly every prepare.
                if fx.callable_again(const):
                    self.plan.replaced_codes.add(const)
                    self.plan.nested[id(const)] = (
                        const,
                        self.plan.new_codes.get(const.co_qualname),
                    )
                self._remember_nested(const)

    def _plan_class(self, node: ast.ClassDef, old: ast.ClassDef, cls: type) -> None:
        qual = cls.__qualname__
        if _header(node) != _header(old):
            raise Refused(
                Reason.INCOMPATIBLE_CHANGE, f"class {qual}: base classes or metaclass changed"
            )
        if _slots(node) != _slots(old):
            raise Refused(
                Reason.INCOMPATIBLE_CHANGE,
                f"class {qual}: __slots__ changed (instance layout cannot change in place)",
            )
        if [_dump(d) for d in node.decorator_list] == [
            _dump(d) for d in old.decorator_list
        ] and self._bodies_only(node, old, cls):
            return
        if _dump(node) == _dump(old):  # reformatted, nothing to merge
            return
        self._statement(node, "class", merge_class=cls)

    def _bodies_only(self, node: ast.ClassDef, old: ast.ClassDef, cls: type) -> bool:
        """Patch methods in place when nothing but method bodies changed."""
        new_keys = [
            (_dump(s) if not isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef) else s.name)
            for s in node.body
        ]
        old_keys = [
            (_dump(s) if not isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef) else s.name)
            for s in old.body
        ]
        if new_keys != old_keys:
            return False
        old_defs = _defs(old.body)
        swaps = []
        for stmt in node.body:
            if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            before = old_defs[stmt.name]
            if self._same_text(before, stmt):
                continue
            qualname = f"{cls.__qualname__}.{stmt.name}"
            funcs = [
                f for f in fx.class_functions(cls, self.g) if f.__code__.co_qualname == qualname
            ]
            new = self.plan.new_codes.get(qualname)
            if (
                _signature_only_body_changed(before, stmt)
                and funcs
                and new is not None
                and all(f.__code__.co_freevars == new.co_freevars for f in funcs)
            ):
                assert isinstance(before, ast.FunctionDef | ast.AsyncFunctionDef)
                swaps.append((stmt, before, qualname, funcs))  # a reformatting swaps harmlessly
            elif _dump(before) != _dump(stmt):
                return False
        for stmt, before, qualname, funcs in swaps:
            self._swap_code(stmt, before, qualname, funcs, cls.__dict__.get(stmt.name, MISSING))
            self.plan.changes.append(f"body {qualname}")
        return True
