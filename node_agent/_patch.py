"""Reversible in-place edits: the only way the loader changes running code.

``prepare`` turns a release into a list of :class:`Op`; ``finish`` applies them
behind the drain barrier.  Applying an op never fails for a valid plan and
returns its exact inverse, captured at the moment of application, so the
backup of a version is simply the reversed list of inverses: the old code
objects, defaults, class members and dict entries themselves, never a copy of
anything on disk.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Op:
    """One reversible edit."""

    __slots__ = ()

    def apply(self) -> Op:
        raise NotImplementedError

    def codes(self) -> Iterable[types.CodeType]:
        """Code objects this op installs (used by the purge check)."""
        return ()


@dataclass(slots=True)
class SetCode(Op):
    """Give an existing function object another body, keeping its identity.

    Everything that holds the function (registries, decorators, ``from m import
    f`` bindings, bound methods) runs the new body from the next call on.
    """

    func: types.FunctionType
    code: types.CodeType
    defaults: tuple[Any, ...] | None
    kwdefaults: dict[str, Any] | None
    doc: Any = MISSING

    def apply(self) -> Op:
        f = self.func
        inverse = SetCode(f, f.__code__, f.__defaults__, f.__kwdefaults__, f.__doc__)
        f.__code__ = self.code
        # a function attribute's setter costs several times its read: most ops
        # (and every undo of one) leave defaults and docstring as they are
        if self.defaults is not inverse.defaults:
            f.__defaults__ = self.defaults
        if self.kwdefaults is not inverse.kwdefaults:
            f.__kwdefaults__ = self.kwdefaults
        if self.doc is not MISSING and self.doc is not inverse.doc:
            f.__doc__ = self.doc
        return inverse

    def codes(self) -> Iterable[types.CodeType]:
        return (self.code,)


# A code swap staged before the hold: its inverse, and whether anything but the
# code changes (defaults, keyword defaults, docstring)
StagedCode = tuple[SetCode, bool]


def stage_inverses(ops: Sequence[Op]) -> list[StagedCode | None]:
    """The inverse of every :class:`SetCode` in ``ops`` (``None`` for other ops), built now.

    Built before the hold, so that the switch allocates nothing for the bulk
    of its edits and sets only the code where nothing else changes (the usual
    case: a body edit keeps the defaults and the docstring; setting a function
    attribute costs several times reading it, see :func:`apply_staged`).  A
    function named by two ops is staged once: the second op sees the first's
    result, so it is applied afresh.
    """
    staged: list[StagedCode | None] = []
    seen: set[int] = set()
    for op in ops:
        if not isinstance(op, SetCode) or id(op.func) in seen:
            staged.append(None)
            continue
        f = op.func
        seen.add(id(f))
        inverse = SetCode(f, f.__code__, f.__defaults__, f.__kwdefaults__, f.__doc__)
        rest = (
            op.defaults is not inverse.defaults
            or op.kwdefaults is not inverse.kwdefaults
            or (op.doc is not MISSING and op.doc is not inverse.doc and op.doc != inverse.doc)
        )
        staged.append((inverse, rest))
    return staged


def apply_staged(ops: Sequence[Op], staged: Sequence[StagedCode | None], journal: list[Op]) -> None:
    """Apply ``ops`` in order, journaling the inverses staged by :func:`stage_inverses`.

    A staged inverse is used only if the function still has the code it was
    staged with; otherwise (something swapped it since) the op is applied
    afresh, as :meth:`SetCode.apply` does.
    """
    for op, st in zip(ops, staged, strict=True):
        if st is None:
            journal.append(op.apply())
            continue
        inv, rest = st
        f = inv.func
        if f.__code__ is not inv.code:
            journal.append(op.apply())
            continue
        assert isinstance(op, SetCode)
        f.__code__ = op.code
        if rest:
            f.__defaults__ = op.defaults
            f.__kwdefaults__ = op.kwdefaults
            if op.doc is not MISSING:
                f.__doc__ = op.doc
        journal.append(inv)


@dataclass(slots=True)
class SetDefaults(Op):
    """Evaluate a patched function's changed default values, in the switch.

    ``code`` evaluates to ``(__defaults__, __kwdefaults__)`` in the function's
    module, after the module's changed statements ran (so a default naming a
    changed constant sees its new value), as a ``def`` statement would.
    """

    func: types.FunctionType
    code: types.CodeType

    def apply(self) -> Op:
        f = self.func
        inverse = SetCode(f, f.__code__, f.__defaults__, f.__kwdefaults__)
        f.__defaults__, f.__kwdefaults__ = eval(self.code, f.__globals__)
        return inverse


@dataclass(slots=True)
class SetItem(Op):
    """Bind or unbind a name in a module dict (``value is MISSING`` unbinds)."""

    mapping: dict[str, Any]
    key: str
    value: Any

    def apply(self) -> Op:
        inverse = SetItem(self.mapping, self.key, self.mapping.get(self.key, MISSING))
        if self.value is MISSING:
            self.mapping.pop(self.key, None)
        else:
            self.mapping[self.key] = self.value
        return inverse


@dataclass(slots=True)
class SetClassAttr(Op):
    """Bind or unbind a member of a class, keeping the class object itself."""

    cls: type
    name: str
    value: Any

    def apply(self) -> Op:
        inverse = SetClassAttr(self.cls, self.name, self.cls.__dict__.get(self.name, MISSING))
        if self.value is MISSING:
            if self.name in self.cls.__dict__:
                delattr(self.cls, self.name)
        else:
            setattr(self.cls, self.name, self.value)
        return inverse


@dataclass(slots=True)
class InstallModule(Op):
    """Make a staged module importable: ``sys.modules`` and its parent's attribute."""

    name: str
    module: types.ModuleType | None  # None removes it

    def apply(self) -> Op:
        inverse = InstallModule(self.name, sys.modules.get(self.name))
        parent_name, _, child = self.name.rpartition(".")
        parent = sys.modules.get(parent_name) if parent_name else None
        if self.module is None:
            sys.modules.pop(self.name, None)
            if parent is not None and child in parent.__dict__:
                delattr(parent, child)
        else:
            sys.modules[self.name] = self.module
            if parent is not None:
                setattr(parent, child, self.module)
        return inverse


@dataclass(slots=True)
class ClearCache(Op):
    """Empty a memoizing wrapper (``lru_cache``, ``singledispatch``), in both directions."""

    clear: Any

    def apply(self) -> Op:
        self.clear()
        return self


def apply_all(ops: Sequence[Op]) -> list[Op]:
    """Apply ``ops`` in order and return the plan that undoes them (already reversed)."""
    inverses = [op.apply() for op in ops]
    inverses.reverse()
    if hasattr(sys, "_clear_type_cache"):
        sys._clear_type_cache()
    return inverses


@dataclass(slots=True)
class SetState(Op):
    """Replace a registered object's state (its instance dict) in place."""

    obj: Any
    state: dict[str, Any]

    def apply(self) -> Op:
        d = vars(self.obj)
        inverse = SetState(self.obj, dict(d))
        d.clear()
        d.update(self.state)
        return inverse


def undo(journal: Sequence[Op]) -> list[Op]:
    """Apply a journal of inverses newest first; returns the journal that redoes it."""
    redo = [op.apply() for op in reversed(journal)]
    if hasattr(sys, "_clear_type_cache"):
        sys._clear_type_cache()
    return redo
