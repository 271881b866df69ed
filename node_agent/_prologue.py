"""Counting variants of a module's functions, for changed-code coverage on Python 3.11.

Python 3.11 has no ``sys.monitoring``, and its global hooks (``sys.setprofile``,
``sys.settrace``) call back on *every* call of every function in the process,
which shows in request latency.  A wrapper would change the function's
identity (registries, ``is`` checks, pickling).  So, as OTP's ``cover`` does,
the function gets an instrumented body instead: the same function object, a
code object compiled from the same source with a two-statement prologue::

    def f(x):                       def f(x):
        return g(x)        ->           __hotfleet_calls__[7] += 1
                                        try:
                                            return g(x)
                                        except Exception:
                                            __hotfleet_raised__[7] += 1
                                            raise

The whole module is compiled (once, in prepare) so methods keep their class
context (name mangling, the ``__class__`` cell of ``super()``) and closures
their free variables; each definition gets a slot.  The prologue costs a few
bytecodes per call; the ``try`` costs nothing until something raises (3.11's
zero-cost exception tables).  A bare ``raise`` in the handler re-raises
without adding a traceback entry, and the added statements carry the line of
the ``def``, so tracebacks read as before.  The counters are lists bound in
the function's module globals under the two dunder names, by the caller.
"""

from __future__ import annotations

import ast
import types
from dataclasses import dataclass
from typing import Any

from node_agent._codecache import CodeCache, retarget

__all__ = ["CALLS", "RAISED", "Instrumented", "instrument_module"]

CALLS = "__hotfleet_calls__"
RAISED = "__hotfleet_raised__"


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
    node.body = [*doc, bump(CALLS), guarded]


def _count_defs(tree: ast.Module) -> tuple[int, dict[tuple[str, int], int]]:
    """Instrument every function of ``tree`` in place: (slots, (name, first line) -> slot).

    One walk (``ast.walk`` queues a node's children before it is edited, so
    nested definitions are reached inside the new ``try``); every added node
    carries its ``def``'s position, so no location pass is needed.
    """
    by_def: dict[tuple[str, int], int] = {}
    slots = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            by_def[(node.name, first)] = slots
            _instrument_def(node, slots)
            slots += 1
    return slots, by_def


def _codes(code: types.CodeType, out: dict[tuple[str, int], types.CodeType]) -> None:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out.setdefault((const.co_qualname, const.co_firstlineno), const)
            _codes(const, out)


def instrument_module(
    module: str,
    source: bytes,
    filename: str,
    cache: CodeCache | None = None,
    digest: str = "",
) -> Instrumented:
    """Compile ``source`` with a counting prologue in every function; raises SyntaxError.

    With a host ``cache`` (and the source's sha256 as ``digest``) the
    compiled twin is made once per host (:mod:`node_agent._codecache`).
    """

    def make() -> tuple[int, types.CodeType, tuple[tuple[str, int, int], ...]]:
        tree = ast.parse(source, filename)
        slots, by_def = _count_defs(tree)
        code = compile(tree, filename, "exec", dont_inherit=True)
        return slots, code, tuple((name, line, slot) for (name, line), slot in by_def.items())

    if cache is not None and digest:
        slots, code, defs = cache.get("prologue", digest, make)
        code = retarget(code, filename)
    else:
        slots, code, defs = make()
    by_def = {(name, line): slot for name, line, slot in defs}
    found: dict[tuple[str, int], types.CodeType] = {}
    _codes(code, found)
    out: dict[tuple[str, int], tuple[types.CodeType, int]] = {}
    for key, c in found.items():
        slot = by_def.get((c.co_name, c.co_firstlineno))
        if slot is not None and CALLS in c.co_names:
            out[key] = (c, slot)
    return Instrumented(module, slots, out)
