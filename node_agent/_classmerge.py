"""Merging a redefined class into the live class object, at the switch.

Why a module of its own: planning (:mod:`node_agent._update`) decides *that*
a class statement is re-run; what the re-run class then does to the live one
happens in finish (and in the staging rehearsal), member by member, so that
the class keeps its identity: instances, ``isinstance`` checks, registries and
subclasses all keep pointing at the same object.  Every change is an
:class:`~node_agent._patch.Op`, so the switch can undo it.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Iterator
from typing import Any

from hotfleet.errors import Reason
from node_agent import _functions as fx
from node_agent._patch import MISSING, ClearCache, Op, SetClassAttr, SetCode
from node_agent._update import Refused

__all__ = ["merge_class"]

_CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__", "__slots__"})


class _LazyDefault:
    """Class-level default for a dataclass field added by an upgrade.

    Instances created before the upgrade lack the field; reading it computes
    the default once and stores it on the instance, like ``__init__`` would
    have.  New instances set the field in ``__init__`` and never reach this.
    """

    def __init__(self, name: str, factory: Any) -> None:
        self.name = name
        self.factory = factory

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = self.factory()
        obj.__dict__[self.name] = value
        return value


def merge_class(old: type, new: type, ops_out: list[Op]) -> None:
    """Turn ``old`` into ``new`` member by member; ``old`` keeps its identity.

    Functions that exist in both with the same closure shape keep their object
    (only the code moves); everything else is set on ``old``, with the implicit
    ``__class__`` cell of new methods pointed at ``old`` so ``super()`` works.
    """
    g_funcs = {f.__code__.co_qualname: f for f in _all_functions(old)}
    is_enum = isinstance(old, enum.EnumMeta)
    members = set(old.__members__) if is_enum else set()  # type: ignore[attr-defined]
    if is_enum:
        before = [(m.name, m.value) for m in old.__members__.values()]  # type: ignore[attr-defined]
        after = [(m.name, m.value) for m in new.__members__.values()]  # type: ignore[attr-defined]
        if before != after:
            raise Refused(
                Reason.INCOMPATIBLE_CHANGE,
                f"enum {old.__qualname__}: members changed {before} -> {after}",
            )
    for name, value in list(new.__dict__.items()):
        if name in _CLASS_SKIP or name in members or (is_enum and not _is_callable_member(value)):
            continue
        current = old.__dict__.get(name, MISSING)
        if (
            isinstance(value, type)
            and isinstance(current, type)
            and value.__qualname__ == current.__qualname__
        ):
            merge_class(current, value, ops_out)
            continue
        if _same_shape(current, value, g_funcs, ops_out):
            continue
        for f in fx.functions_in(value):
            _retarget_class_cell(f, new, old)
        ops_out.append(SetClassAttr(old, name, value))
    for name in list(old.__dict__):
        if (
            name not in new.__dict__
            and name not in _CLASS_SKIP
            and name not in members
            and not _is_runtime_attr(old, name)
        ):
            ops_out.append(SetClassAttr(old, name, MISSING))
    _add_field_defaults(old, new, ops_out)


def _is_callable_member(value: Any) -> bool:
    return isinstance(value, types.FunctionType | staticmethod | classmethod | property)


def _is_runtime_attr(cls: type, name: str) -> bool:
    # keep caches and registries the class or its metaclass attached at run time
    return name.startswith("_abc_") or name in {"__abstractmethods__", "__parameters__"}


def _all_functions(cls: type) -> Iterator[types.FunctionType]:
    for value in list(cls.__dict__.values()):
        if not isinstance(value, type):
            yield from fx.functions_in(value)


def _same_shape(
    current: Any, value: Any, old_funcs: dict[str, types.FunctionType], ops_out: list[Op]
) -> bool:
    """Patch code into the existing member when both wrap the same functions."""
    if current is MISSING or type(current) is not type(value):
        return False
    new_funcs = list(fx.functions_in(value))
    if not new_funcs:
        return False
    pairs = []
    for f in new_funcs:
        target = old_funcs.get(f.__code__.co_qualname)
        if target is None or target.__code__.co_freevars != f.__code__.co_freevars:
            return False
        pairs.append((target, f))
    for target, f in pairs:
        if target.__code__ is not f.__code__:
            ops_out.append(SetCode(target, f.__code__, f.__defaults__, f.__kwdefaults__, f.__doc__))
    ops_out.extend(ClearCache(c) for c in fx.caches_of(current))
    return True


def _retarget_class_cell(f: types.FunctionType, new: type, old: type) -> None:
    if f.__closure__ and "__class__" in f.__code__.co_freevars:
        cell = f.__closure__[f.__code__.co_freevars.index("__class__")]
        if cell.cell_contents is new:
            cell.cell_contents = old


def _add_field_defaults(old: type, new: type, ops_out: list[Op]) -> None:
    old_fields = getattr(old, "__dataclass_fields__", None)
    new_fields = getattr(new, "__dataclass_fields__", None)
    if not (old_fields and new_fields):
        return
    for name, f in new_fields.items():
        if name in old_fields:
            continue
        if f.default_factory is not dataclasses.MISSING:
            ops_out.append(SetClassAttr(old, name, _LazyDefault(name, f.default_factory)))
