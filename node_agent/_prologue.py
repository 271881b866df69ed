"""Counting variants of a module's functions, for changed-code coverage (every interpreter).

Python 3.11 has no ``sys.monitoring`` (3.12+ has, at ~600 ns a counted call
through a Python callback), and its global hooks (``sys.setprofile``,
``sys.settrace``) call back on *every* call of every function in the process,
which shows in request latency.  A wrapper would change the function's
identity (registries, ``is`` checks, pickling).  So, as OTP's ``cover`` does,
the function gets an instrumented body instead: the same function object, a
code object compiled from the same source with a two-statement prologue::

    def f(x):                       def f(x):
        return g(x)        ->           __hotfleet_c7__.append(None)
                                        try:
                                            return g(x)
                                        except Exception:
                                            __hotfleet_raised__[7] += 1
                                            raise

The whole module is compiled (once, in prepare) so methods keep their class
context (name mangling, the ``__class__`` cell of ``super()``) and closures
their free variables; each definition gets a slot.  A call is counted by
appending to the slot's own list (``len`` is the count; the owner folds and
empties it, :class:`node_agent.coverage.Coverage`): five bytecodes that
CPython specialises (a module-global load and ``list.append`` without a call
frame), ~17 ns in a tight loop but ~30-60 ns inside the small functions of
the loader benchmark (2026-12-01, 3.11-3.13), the cheapest of the forms
measured (``calls[slot] += 1``, a list held as a constant, a bound
``append``, a ``global`` flag store: all as dear or dearer).  The ``try``
costs nothing until something raises (zero-cost exception tables), so
:func:`quiet_twin` (the count jumped over) costs ~nothing: what
:class:`node_agent.coverage.Coverage` runs once a function's first calls
were counted, with short counting bursts.  A bare ``raise`` in the handler re-raises
without adding a traceback entry, and the added statements carry the line of
the ``def``, so tracebacks read as before.  The counters are lists bound in
the function's module globals under the two dunder names, by the caller.
"""

from __future__ import annotations

import ast
import hashlib
import opcode
import types
from dataclasses import dataclass
from typing import Any

from hotfleet.imports import take_tree
from node_agent._codecache import CodeCache, retarget

__all__ = [
    "CALLS",
    "RAISED",
    "Instrumented",
    "Parts",
    "calls_name",
    "instrument_module",
    "quiet_twin",
]

CALLS = "__hotfleet_c"  # prefix of the per-slot call lists' names, see calls_name
RAISED = "__hotfleet_raised__"
#: The host code cache's kind for counting twins; a new prologue format is a new kind
#: (a twin cached by an older agent must never run against this one's counters).
CACHE_KIND = "prologue-append"


def calls_name(slot: int) -> str:
    """The module global holding slot ``slot``'s call list (one ``None`` per call)."""
    return f"{CALLS}{slot}__"


@dataclass(frozen=True)
class Instrumented:
    """A module's counting code objects: (qualname, first line) -> (code, slot)."""

    module: str
    slots: int
    codes: dict[tuple[str, int], tuple[types.CodeType, int]]

    def variant(self, code: types.CodeType) -> tuple[types.CodeType, int] | None:
        """The counting twin of ``code``, if it has one of the same shape."""
        hit = self.codes.get((code.co_qualname, code.co_firstlineno))
        if hit is None:
            return None
        twin = hit[0]
        same = (
            twin.co_freevars == code.co_freevars
            and twin.co_cellvars == code.co_cellvars
            and twin.co_argcount == code.co_argcount
            and twin.co_kwonlyargcount == code.co_kwonlyargcount
            and twin.co_posonlyargcount == code.co_posonlyargcount
            and twin.co_flags == code.co_flags
            and twin.co_filename == code.co_filename
        )
        return hit if same else None


_JUMP_FORWARD = opcode.opmap["JUMP_FORWARD"]
_EXTENDED_ARG = opcode.opmap["EXTENDED_ARG"]
_LOAD_GLOBAL = opcode.opmap["LOAD_GLOBAL"]
_POP_TOP = opcode.opmap["POP_TOP"]
_CALL = opcode.opmap["CALL"]


def _cache_sizes() -> list[int]:
    """Inline cache entries after each opcode (a list until 3.12, a dict by name in 3.13)."""
    table: Any = getattr(opcode, "_inline_cache_entries", {})
    if isinstance(table, dict):
        return [int(table.get(opcode.opname[op], 0)) for op in range(256)]
    return [int(n) for n in table] + [0] * (256 - len(table))


_CACHES = _cache_sizes()


def quiet_twin(twin: types.CodeType, slot: int) -> types.CodeType | None:
    """``twin`` with its count statement jumped over: exceptions counted, calls not.

    The count (``__hotfleet_cN__.append(None)``, five instructions and their
    inline caches) is what a counted call pays, ~30-60 ns inside a small
    function on the benchmark host; the ``try`` costs nothing until something
    raises.  The quiet twin is the same bytes with the statement's first
    instruction replaced by a ``JUMP_FORWARD`` past it (one dispatch), so the
    exception table, line table and every offset stay as compiled.  It is
    derived from the compiled twin (no second compile, nothing more in the
    host code cache) by a scan of its first instructions (a few µs;
    :mod:`dis` would take ~1 ms).  ``None`` when the count statement is not
    the expected sequence (then the function is simply counted on every call).
    """
    try:
        index = twin.co_names.index(calls_name(slot))
    except ValueError:
        return None
    raw = bytearray(twin.co_code)
    at = end = -1
    ops: list[int] = []
    i, prev = 0, -1
    while i < len(raw) and len(ops) < 16:
        op, arg = raw[i], raw[i + 1]
        if at < 0:
            if op == _LOAD_GLOBAL and arg >> 1 == index and prev != _EXTENDED_ARG:
                at = i
        else:
            ops.append(op)
            if op == _POP_TOP:
                end = i + 2
                break
        prev = op
        i += 2 + 2 * _CACHES[op]
    # LOAD_GLOBAL, LOAD_METHOD (3.12+: LOAD_ATTR), LOAD_CONST, [PRECALL (3.11),] CALL, POP_TOP
    if at < 0 or end < 0 or _CALL not in ops or len(ops) > 6:
        return None
    delta = (end - (at + 2)) // 2  # in code units, from the next instruction
    if not 0 <= delta < 256:
        return None
    raw[at], raw[at + 1] = _JUMP_FORWARD, delta
    return twin.replace(co_code=bytes(raw))


def _instrument_def(node: ast.FunctionDef | ast.AsyncFunctionDef, slot: int) -> None:
    """Give ``node`` the counting prologue (in place; positions fixed by the caller)."""
    body = list(node.body)
    doc: list[ast.stmt] = []
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        doc = [body.pop(0)]
    at: dict[str, Any] = {"lineno": node.lineno, "col_offset": node.col_offset}
    if not body:  # a docstring only
        body = [ast.Pass(**at)]

    def count_call() -> ast.stmt:
        call = ast.Call(
            func=ast.Attribute(
                value=ast.Name(id=calls_name(slot), ctx=ast.Load(), **at),
                attr="append",
                ctx=ast.Load(),
                **at,
            ),
            args=[ast.Constant(value=None, **at)],
            keywords=[],
            **at,
        )
        return ast.Expr(value=call, **at)

    def bump(name: str) -> ast.stmt:
        return ast.AugAssign(
            target=ast.Subscript(
                value=ast.Name(id=name, ctx=ast.Load(), **at),
                slice=ast.Constant(value=slot, **at),
                ctx=ast.Store(),
                **at,
            ),
            op=ast.Add(),
            value=ast.Constant(value=1, **at),
            **at,
        )

    handler = ast.ExceptHandler(
        type=ast.Name(id="Exception", ctx=ast.Load(), **at),
        name=None,
        body=[bump(RAISED), ast.Raise(exc=None, cause=None, **at)],
        **at,
    )
    guarded = ast.Try(body=body, handlers=[handler], orelse=[], finalbody=[], **at)
    node.body = [*doc, count_call(), guarded]


def _count_defs(tree: ast.Module) -> tuple[int, dict[tuple[str, int], int]]:
    """Instrument every function of ``tree`` in place: (slots, (name, first line) -> slot).

    A definition is a statement, so only statement lists are walked (bodies,
    ``else``/``finally`` blocks, handlers, match cases), never expressions:
    most of a tree's nodes are expressions.  Every added node carries its
    ``def``'s position, so no location pass is needed.
    """
    by_def: dict[tuple[str, int], int] = {}
    slots = 0
    todo: list[list[ast.stmt]] = [tree.body]
    while todo:
        for node in todo.pop():
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                todo.append(node.body)  # nested definitions, reached inside the new try
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                by_def[(node.name, first)] = slots
                _instrument_def(node, slots)
                slots += 1
                continue
            for name in ("body", "orelse", "finalbody"):
                block = getattr(node, name, None)
                if isinstance(block, list):
                    todo.append(block)
            for part in (*getattr(node, "handlers", ()), *getattr(node, "cases", ())):
                todo.append(part.body)
    return slots, by_def


def _codes(code: types.CodeType, out: dict[tuple[str, int], types.CodeType]) -> None:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out.setdefault((const.co_qualname, const.co_firstlineno), const)
            _codes(const, out)


@dataclass(frozen=True)
class Parts:
    """The parts of a module whose functions need twins: what a release changed.

    ``paths``: definitions by qualified-name path (``("f",)``, ``("K", "m")``;
    a class path keeps the whole class); ``lines``: other top-level
    statements, by first line.  Everything else is left out of the
    instrumented compile: a one-function fix of a large module compiles one
    function, and positions are kept, so the twins are those of a whole-module
    compile.
    """

    paths: frozenset[tuple[str, ...]]
    lines: frozenset[int]

    def key(self) -> str:
        """Part of the host cache digest: another set of parts is another twin."""
        return repr((sorted(self.paths), sorted(self.lines)))


def _keep_parts(body: list[ast.stmt], parts: Parts, prefix: tuple[str, ...]) -> list[ast.stmt]:
    kept: list[ast.stmt] = []
    for node in body:
        name = getattr(node, "name", None)
        if name is None:  # not a definition
            if not prefix and (
                node.lineno in parts.lines
                or (isinstance(node, ast.ImportFrom) and node.module == "__future__")
            ):
                kept.append(node)
            continue
        path = (*prefix, name)
        if path in parts.paths:
            kept.append(node)
        elif isinstance(node, ast.ClassDef) and any(p[: len(path)] == path for p in parts.paths):
            node.body = _keep_parts(node.body, parts, path) or [ast.Pass(**_at(node))]
            kept.append(node)
    return kept


def _at(node: ast.stmt) -> dict[str, int]:
    return {"lineno": node.lineno, "col_offset": node.col_offset + 4}


def instrument_module(
    module: str,
    source: bytes,
    filename: str,
    cache: CodeCache | None = None,
    digest: str = "",
    parts: Parts | None = None,
) -> Instrumented:
    """Compile ``source`` with a counting prologue in every function; raises SyntaxError.

    With a host ``cache`` (and the source's sha256 as ``digest``) the
    compiled twin is made once per host (:mod:`node_agent._codecache`).
    With ``parts``, only the functions in them get twins.
    """

    def make() -> tuple[int, types.CodeType, tuple[tuple[str, int, int], ...]]:
        tree = take_tree(source)  # the prepare's own tree if it has one: changed here
        if parts is not None:
            tree.body = _keep_parts(tree.body, parts, ())
        slots, by_def = _count_defs(tree)
        code = compile(tree, filename, "exec", dont_inherit=True)
        return slots, code, tuple((name, line, slot) for (name, line), slot in by_def.items())

    if cache is not None and digest:
        if parts is not None:
            digest = hashlib.sha256(f"{digest}\0{parts.key()}".encode()).hexdigest()
        slots, code, defs = cache.get(CACHE_KIND, digest, make)
        code = retarget(code, filename)
    else:
        slots, code, defs = make()
    by_def = {(name, line): slot for name, line, slot in defs}
    found: dict[tuple[str, int], types.CodeType] = {}
    _codes(code, found)
    out: dict[tuple[str, int], tuple[types.CodeType, int]] = {}
    for key, c in found.items():
        slot = by_def.get((c.co_name, c.co_firstlineno))
        if slot is not None and calls_name(slot) in c.co_names:
            out[key] = (c, slot)
    return Instrumented(module, slots, out)
