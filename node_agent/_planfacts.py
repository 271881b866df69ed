"""What the planner asks about a module's old and new source, answered once per host.

Planning the update of a loaded module (:mod:`node_agent._update`) mixes two
kinds of question: questions about the two sources (did this ``def``'s text
change, only its body, are its defaults literals, what does this statement
compile to) and questions about the live process (which function objects
carry this code, is this name a class of the module).  The first kind is a
pure function of the two sources and the file name, and answering it is
most of a sibling worker's prepare: parsing both sources, dumping and
comparing their trees, compiling the changed statements.

:class:`Facts` answers the first kind through :meth:`Facts.ask`, keyed by
the question, and records every answer: the record is plain marshallable
data (bools, strings, code objects, literal values), which the host code
cache (:mod:`node_agent._codecache`) keeps under the old and new digests, so
a sibling worker plans from its siblings' answers without a tree.  The
planner's live decisions are still made by each worker on its own objects;
a worker whose live state leads it to a question its sibling never asked
parses the sources and answers it itself (never a wrong answer, only a
slower one).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import tokenize
import types
from collections.abc import Callable, Iterable
from typing import Any

from hotfleet.imports import parse_source
from node_agent._codecache import retarget

__all__ = ["Facts", "StatementFacts", "bound_names", "class_key", "facts_key"]

FORMAT = (
    "hotfleet-planfacts-3"  # part of the cache key: a new question set never reads an old record
)

# (code, lineno, name, names it may bind or None, (name, literal value) or None)
StatementFacts = tuple[types.CodeType, int, str, "frozenset[str] | None", "tuple[str, Any] | None"]

_dumps: dict[int, str] = {}  # per Facts.answering(): the same nodes are compared several times


def facts_key(old_digest: str, new_digest: str) -> str:
    """The cache digest of one module's facts: both sources and the question set.

    Not the file name: workers of one host with code paths of their own
    (a checkout each) share the answers too; :class:`Facts` gives the code
    objects among them this worker's file name.
    """
    return hashlib.sha256("\0".join((FORMAT, old_digest, new_digest)).encode()).hexdigest()


_CODE_BEARING = frozenset({"stmt", "docstring", "defaults"})  # questions answered with code


def _retargeted(value: Any, filename: str) -> Any:
    """``value`` with every code object in it (in tuples, at any depth) named ``filename``."""
    if isinstance(value, types.CodeType):
        return retarget(value, filename)
    if type(value) is tuple:
        return tuple(_retargeted(v, filename) for v in value)
    return value


def _dump(node: ast.AST) -> str:
    """Position-free text of a node, memoized while the trees are alive (keyed by ``id``)."""
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


def _is_def(stmt: ast.AST) -> bool:
    return isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)


def bound_names(body: Iterable[ast.stmt]) -> set[str]:
    """Names a block of statements binds at its own level (defs, assignments, imports)."""
    names: set[str] = set()
    for stmt in body:
        if _is_def(stmt):
            names.add(stmt.name)  # type: ignore[attr-defined]
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
    if _is_def(stmt) or isinstance(stmt, ast.Import):
        return False
    if isinstance(stmt, ast.ImportFrom):
        return any(a.name == "*" for a in stmt.names)
    if isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign):
        return any(isinstance(n, ast.NamedExpr) for n in ast.walk(stmt))
    return True  # expressions (a call may set globals), if/for/try/with blocks


def _defs(body: Iterable[ast.stmt]) -> dict[str, ast.stmt]:
    return {s.name: s for s in body if _is_def(s)}  # type: ignore[attr-defined]


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


def _decorators(node: ast.stmt) -> list[str]:
    return [_dump(d) for d in getattr(node, "decorator_list", ())]


def _body_only(old: ast.stmt, new: ast.stmt) -> bool:
    """Same decorators and same kind of function: the code object may be swapped."""
    return (
        type(old) is type(new)
        and isinstance(new, ast.FunctionDef | ast.AsyncFunctionDef)
        and _decorators(old) == _decorators(new)
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


def _plain_def(
    node: ast.stmt,
) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None] | None:
    """The default values of a ``def`` whose function prepare can make without running code.

    That is, a ``def`` with no decorators, annotations or type parameters
    (each of them is code a ``def`` statement runs) and literal defaults;
    ``None`` for anything else.
    """
    if (
        not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        or node.decorator_list
        or getattr(node, "type_params", None)
        or node.returns is not None
    ):
        return None
    a = node.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(p for p in (a.vararg, a.kwarg) if p)]
    if any(p.annotation is not None for p in params):
        return None
    return _literal_defaults(node)


# members whose assignment on a class is a setter of ``type`` itself, not a class attribute
_TYPE_DATA = frozenset(n for n, v in vars(type).items() if hasattr(v, "__set__"))


def _members(node: ast.ClassDef) -> dict[str, ast.stmt] | None:
    """A class body's members by name, if each statement is a ``def``, a
    ``NAME = <literal>``, the docstring or ``pass`` and binds a name of its own."""
    out: dict[str, ast.stmt] = {}
    for j, s in enumerate(node.body):
        if isinstance(s, ast.Pass):
            continue
        if j == 0 and _is_constant(s) and isinstance(s.value.value, str):  # type: ignore[attr-defined]
            name = "__doc__"
        elif isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef):
            name = s.name
        else:
            literal = _literal_binding(s)
            if literal is None:
                return None
            name = literal[0]
        if name in out or (name in _TYPE_DATA and name not in ("__doc__", "__slots__")):
            return None
        out[name] = s
    return out


# Members a class statement treats specially when it creates the class: ``__eq__``
# without ``__hash__`` sets ``__hash__ = None``, ``__new__`` becomes a staticmethod,
# ``__init_subclass__`` and ``__class_getitem__`` classmethods.  Adding, changing or
# removing one is left to the class statement and the merge.
_IMPLICIT = frozenset({"__eq__", "__hash__", "__new__", "__init_subclass__", "__class_getitem__"})


def class_key(class_name: str, name: str) -> str:
    """The key a class body binds ``name`` under (private names carry the class's)."""
    if not name.startswith("__") or name.endswith("__") or not class_name.strip("_"):
        return name
    return f"_{class_name.lstrip('_')}{name}"


def _class_edit(old: ast.ClassDef, new: ast.ClassDef) -> tuple[tuple[Any, ...], ...] | None:
    """See :meth:`Facts.class_edit`."""
    if old.decorator_list or new.decorator_list or getattr(new, "type_params", None):
        return None
    old_members, new_members = _members(old), _members(new)
    if old_members is None or new_members is None:
        return None
    entries: list[tuple[Any, ...]] = []
    for j, s in enumerate(new.body):
        name = getattr(s, "name", None)
        if name is not None:  # a def
            o = old_members.get(name)
            if isinstance(o, ast.FunctionDef | ast.AsyncFunctionDef):
                entries.append(("keep", name, j))
                continue
            defaults = _plain_def(s)
            if defaults is None or name in _IMPLICIT:
                return None
            entries.append(("new", class_key(new.name, name), j, *defaults, name))
            continue
        literal = _literal_binding(s)
        if literal is None:  # the docstring or pass
            if j == 0 and _is_constant(s):
                o = old_members.get("__doc__")
                if o is None or _dump(o) != _dump(s):
                    return None  # a changed docstring: its value is the compiler's to say
            continue
        o = old_members.get(literal[0])
        if o is None or _dump(o) != _dump(s):
            if literal[0] in _IMPLICIT:
                return None
            entries.append(("set", class_key(new.name, literal[0]), literal[1]))
    for name in sorted(old_members.keys() - new_members.keys()):
        if name == "__doc__" or name in _IMPLICIT:
            return None
        entries.append(("del", class_key(new.name, name)))
    return tuple(entries)


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


class Facts:
    """The answers about one module's two sources, computed from their trees or replayed.

    ``answers``: a record another process made (:meth:`record`) for the same
    two sources (its code objects are given this ``filename`` when handed
    out); questions it does not answer are answered here, from the trees,
    parsed on first need.
    """

    def __init__(
        self,
        old_source: bytes,
        new_source: bytes,
        filename: str,
        answers: dict[Any, Any] | None = None,
    ) -> None:
        self.old_source = old_source
        self.new_source = new_source
        self.filename = filename
        self._answers: dict[Any, Any] = dict(answers or {})
        # recorded code objects carry the recorder's file name: renamed when first
        # given out (a few answers hold code; walking all of them cost more)
        self._foreign = set(self._answers) if answers else set()
        self.replayed = 0  # answers taken from the record
        self.computed = 0  # answers worked out here
        self._trees: tuple[ast.Module, ast.Module] | None = None
        self._defs_of: dict[int, dict[str, ast.stmt]] = {}  # by id of a node of the trees

    def record(self) -> dict[Any, Any]:
        """Every answer given so far: marshallable, for the host cache."""
        return dict(self._answers)

    def done(self) -> None:
        """The planner is through: drop the memo of node dumps (keyed by ids of live trees)."""
        _dumps.clear()

    # ------------------------------------------------------------ questions
    def ask(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """The recorded answer to ``key``, else ``compute()`` (recorded for the siblings)."""
        if key in self._answers:
            self.replayed += 1
            if key in self._foreign:
                self._foreign.discard(key)
                if key[0] in _CODE_BEARING:
                    self._answers[key] = _retargeted(self._answers[key], self.filename)
            return self._answers[key]
        value = self._answers[key] = compute()
        self.computed += 1
        return value

    def top(self) -> tuple[tuple[int, str, str, bool], ...]:
        """The new module's statements: ``(index, kind, name, unchanged)``.

        ``kind``: ``def``, ``class``, ``const`` (a bare constant, never run)
        or ``stmt``; ``unchanged``: a plain statement the old source has too.
        """
        return self.ask(("top",), self._top)

    def old_kind(self, name: str) -> str:
        """``def``, ``class`` or ``""``: what the old source's top level defines as ``name``."""
        return self.ask(("old", name), lambda: _kind(self._defs(self._old()).get(name)))

    def same_text(self, *path: int) -> bool:
        """The definition at ``path`` (see :meth:`_pair`) is byte-identical to the old one."""

        def compute() -> bool:
            old, new = self._pair(path)
            text = _segment(_utf8_lines(self.new_source), new)
            return text is not None and text == _segment(_utf8_lines(self.old_source), old)

        return self.ask(("same_text", *path), compute)

    def body_only(self, *path: int) -> bool:
        """Only the body of the function at ``path`` changed (same kind, same decorators)."""
        return self.ask(("body_only", *path), lambda: _body_only(*self._pair(path)))

    def same_tree(self, *path: int) -> bool:
        """The definition at ``path`` differs in formatting only."""

        def compute() -> bool:
            old, new = self._pair(path)
            return _dump(old) == _dump(new)

        return self.ask(("same_tree", *path), compute)

    def class_shape(self, index: int) -> tuple[bool, bool, bool, bool]:
        """Of the class at top-level ``index``: same bases and metaclass, same
        ``__slots__``, same decorators, same statements apart from method bodies."""

        def compute() -> tuple[bool, bool, bool, bool]:
            old, new = self._pair((index,))
            assert isinstance(old, ast.ClassDef) and isinstance(new, ast.ClassDef)

            def keys(node: ast.ClassDef) -> list[str]:
                return [
                    s.name if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef) else _dump(s)
                    for s in node.body
                ]

            return (
                _header(new) == _header(old),
                _slots(new) == _slots(old),
                _decorators(new) == _decorators(old),
                keys(new) == keys(old),
            )

        return self.ask(("class_shape", index), compute)

    def class_edit(self, index: int) -> tuple[tuple[Any, ...], ...] | None:
        """The change of the class at top-level ``index`` member by member, if it can be
        made on the live class without running the class statement; else ``None``.

        Only for a class with no decorators whose bodies hold nothing but
        ``def`` statements, ``NAME = <literal>`` bindings, the docstring (unchanged)
        and ``pass``, each name bound once.  Entries: ``("keep", name, j)``, a
        ``def`` both have (its own questions decide); ``("new", name, j,
        defaults, kwdefaults, def_name)``, a ``def`` prepare can make a
        function of (:func:`_plain_def`); ``("set", name, value)``, a literal
        new or changed; ``("del", name)``, a member the new class no longer
        has.  Names are the keys the class body binds (:func:`class_key`:
        private names mangled); members a class statement treats specially
        (``__eq__``, ``__new__`` ...) are left to it.
        """

        def compute() -> tuple[tuple[Any, ...], ...] | None:
            old, new = self._pair((index,))
            assert isinstance(old, ast.ClassDef) and isinstance(new, ast.ClassDef)
            return _class_edit(old, new)

        return self.ask(("class_edit", index), compute)

    def plain_def(self, index: int) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None] | None:
        """Of the new top-level ``def`` at ``index``: its default values if prepare can
        make its function without running code (:func:`_plain_def`), else ``None``."""
        return self.ask(("plain_def", index), lambda: _plain_def(self._new().body[index]))

    def methods(self, index: int) -> tuple[tuple[int, str], ...]:
        """``(index, name)`` of the functions the class at top-level ``index`` defines."""

        def compute() -> tuple[tuple[int, str], ...]:
            return tuple(
                (j, s.name)
                for j, s in enumerate(self._new().body[index].body)  # type: ignore[attr-defined]
                if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef)
            )

        return self.ask(("methods", index), compute)

    def defaults(self, *path: int) -> tuple[Any, ...]:
        """How a swapped function's defaults come, and its new docstring: ``("same", doc)``,
        ``("literal", doc, values, kwvalues)``, or ``("late", doc, code)`` (code the
        switch evaluates)."""

        def compute() -> tuple[Any, ...]:
            old, new = self._pair(path)
            assert isinstance(old, ast.FunctionDef | ast.AsyncFunctionDef)
            assert isinstance(new, ast.FunctionDef | ast.AsyncFunctionDef)
            doc = _docstring(new)
            if _same_defaults(old, new):
                return ("same", doc)
            literal = _literal_defaults(new)
            if literal is not None:
                return ("literal", doc, *literal)
            return ("late", doc, _defaults_code(new, self.filename))

        return self.ask(("defaults", *path), compute)

    def statement(self, index: int) -> StatementFacts:
        """The new module's statement ``index`` compiled on its own, for the switch to run."""
        return self.ask(("stmt", index), lambda: _compiled(self._new().body[index], self.filename))

    def docstring(self) -> StatementFacts | None:
        """The assignment of a changed module docstring, compiled; None if unchanged.

        Run as a statement of its own, a bare string would be compiled as a
        docstring wherever it stood, so only this explicit assignment sets it.
        """

        def compute() -> StatementFacts | None:
            old, new = ast.get_docstring(self._old(), False), ast.get_docstring(self._new(), False)
            if old == new:
                return None
            assign = ast.Assign(
                targets=[ast.Name("__doc__", ast.Store())], value=ast.Constant(new), lineno=1
            )
            return _compiled(ast.fix_missing_locations(assign), self.filename)

        return self.ask(("docstring",), compute)

    def unbound(self) -> frozenset[str]:
        """Names the old source binds at its top level and the new one no longer does."""
        return self.ask(
            ("unbound",),
            lambda: frozenset(bound_names(self._old().body) - bound_names(self._new().body)),
        )

    # ------------------------------------------------------------ the trees
    def _old(self) -> ast.Module:
        return self._parsed()[0]

    def _new(self) -> ast.Module:
        return self._parsed()[1]

    def _parsed(self) -> tuple[ast.Module, ast.Module]:
        # one tree per source for the whole prepare (hotfleet.imports.shared_trees)
        if self._trees is None:
            self._trees = (parse_source(self.old_source), parse_source(self.new_source))
        return self._trees

    def _pair(self, path: tuple[int, ...]) -> tuple[ast.stmt, ast.stmt]:
        """The new definition at ``path`` (statement indexes: top level, then in a
        class body) and the old one of the same name at the same level (its last,
        as the name's final binding; the planner asks only when there is one)."""
        new: Any = self._new()
        old: Any = self._old()
        for index in path:
            new = new.body[index]
            old = self._defs(old)[new.name]
        return old, new

    def _defs(self, node: Any) -> dict[str, ast.stmt]:
        """The definitions of a module's or class's body by name, made once per node."""
        found = self._defs_of.get(id(node))
        if found is None:
            found = self._defs_of[id(node)] = _defs(node.body)
        return found

    def _top(self) -> tuple[tuple[int, str, str, bool], ...]:
        new_body = self._new().body
        unchanged = _unchanged_statements(
            self._old().body, new_body, _utf8_lines(self.old_source), _utf8_lines(self.new_source)
        )
        return tuple(
            (
                i,
                _kind(s) or ("const" if _is_constant(s) else "stmt"),
                getattr(s, "name", ""),
                id(s) in unchanged,
            )
            for i, s in enumerate(new_body)
        )


def _kind(node: ast.stmt | None) -> str:
    if isinstance(node, ast.ClassDef):
        return "class"
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return "def"
    return ""


def _compiled(stmt: ast.stmt, filename: str) -> StatementFacts:
    module_ast = ast.Module(body=[stmt], type_ignores=[])
    code = compile(module_ast, filename, "exec", dont_inherit=True)
    binds = None if _dynamic(stmt) else frozenset(bound_names([stmt]))
    return (code, stmt.lineno, getattr(stmt, "name", ""), binds, _literal_binding(stmt))


def _unchanged_statements(
    old_body: list[ast.stmt],
    new_body: list[ast.stmt],
    old_lines: list[bytes] | None,
    new_lines: list[bytes] | None,
) -> set[int]:
    """Ids of the new module-level statements (not definitions) the old source has too.

    Matched as multisets, by text first and by tree for the rest, so a
    reformatted ``CACHE = {}`` is not run again and state survives.
    """

    def plain(body: list[ast.stmt]) -> list[ast.stmt]:
        return [s for s in body if not _is_def(s) and not _is_constant(s)]

    old_texts: dict[bytes | None, list[ast.stmt]] = {}
    for s in plain(old_body):
        old_texts.setdefault(_segment(old_lines, s), []).append(s)
    same: set[int] = set()
    rest: list[ast.stmt] = []
    for s in plain(new_body):
        text = _segment(new_lines, s)
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
