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


class _Counting(ast.NodeTransformer):
    def __init__(self) -> None:
        self.slots = 0
        self.by_def: dict[tuple[str, int], int] = {}  # (name, first line) -> slot

    def _count(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        self.generic_visit(node)  # nested definitions first: they count too
        slot = self.slots
        self.slots += 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        self.by_def[(node.name, first)] = slot
        body = list(node.body)
        doc: list[ast.stmt] = []
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            doc = [body.pop(0)]
        if not body:  # a docstring only
            body = [ast.Pass()]
        at: dict[str, Any] = {"lineno": node.lineno, "col_offset": node.col_offset}

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
        ast.fix_missing_locations(node)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        return self._count(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        return self._count(node)


def _codes(code: types.CodeType, out: dict[tuple[str, int], types.CodeType]) -> None:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out.setdefault((const.co_qualname, const.co_firstlineno), const)
            _codes(const, out)


def instrument_module(module: str, source: bytes, filename: str) -> Instrumented:
    """Compile ``source`` with a counting prologue in every function; raises SyntaxError."""
    tree = ast.parse(source, filename)
    counting = _Counting()
    tree = counting.visit(tree)
    code = compile(tree, filename, "exec", dont_inherit=True)
    found: dict[tuple[str, int], types.CodeType] = {}
    _codes(code, found)
    out: dict[tuple[str, int], tuple[types.CodeType, int]] = {}
    for key, c in found.items():
        slot = counting.by_def.get((c.co_name, c.co_firstlineno))
        if slot is not None and CALLS in c.co_names:
            out[key] = (c, slot)
    return Instrumented(module, counting.slots, out)
