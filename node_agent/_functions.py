"""Finding the live function objects that run a module's code.

In-place patching needs every function object whose ``__code__`` belongs to a
module: the ones bound in the module, the methods of its classes, and the raw
functions hidden inside decorators (``__wrapped__``, ``staticmethod``,
``property``, closures of hand-written wrappers).  A walk from the module
namespace finds them without scanning the whole heap; only closures created at
run time (``<locals>`` functions) need :func:`scan_heap`, one ``gc``
pass done in prepare, never in finish.
"""

from __future__ import annotations

import functools
import gc
import inspect
import operator
import types
from collections.abc import Iterable, Iterator
from itertools import compress
from typing import Any

FunctionType = types.FunctionType


def unwrap_members(obj: Any) -> Iterator[Any]:
    """Objects directly wrapped by ``obj`` (one level)."""
    if isinstance(obj, (staticmethod, classmethod)):
        yield obj.__func__
    elif isinstance(obj, property):
        yield from (f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
    elif isinstance(obj, functools.partial | functools.cached_property):
        yield obj.func
    wrapped = getattr(obj, "__wrapped__", None) if not isinstance(obj, type) else None
    if wrapped is not None:
        yield wrapped
    if isinstance(obj, FunctionType) and obj.__closure__:
        for cell in obj.__closure__:
            try:
                content = cell.cell_contents
            except ValueError:
                continue
            if isinstance(content, FunctionType):
                yield content
    registry = getattr(obj, "registry", None)
    if hasattr(obj, "dispatch") and isinstance(registry, types.MappingProxyType):
        yield from registry.values()


def _bare(obj: Any) -> bool:
    """A function that wraps nothing: no closure, no attributes (``__wrapped__``,
    ``registry``, ``cache_clear`` would live in its ``__dict__``); most methods are."""
    return type(obj) is FunctionType and not obj.__closure__ and not obj.__dict__


def reachable(obj: Any) -> Iterator[Any]:
    """``obj`` and everything it wraps, through any depth of decorators."""
    if _bare(obj):  # the walk below would find it alone, at several times the cost
        yield obj
        return
    stack, seen = [obj], set()
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        stack.extend(unwrap_members(cur))


def functions_in(obj: Any) -> Iterator[FunctionType]:
    """Every function object reachable from ``obj``, whatever module defined it."""
    return (f for f in reachable(obj) if isinstance(f, FunctionType))


def raw_functions(obj: Any, module_globals: dict[str, Any]) -> Iterator[FunctionType]:
    """Functions defined by the module's source reachable from one binding.

    Looks through wrappers defined elsewhere (a decorator library's wrapper
    wraps ours) and keeps only functions whose globals are the module's.
    """
    return (f for f in functions_in(obj) if f.__globals__ is module_globals)


def caches_of(obj: Any) -> Iterator[Any]:
    """``cache_clear``-style callables of memoizing wrappers around ``obj``."""
    if _bare(obj):
        return
    for cur in reachable(obj):
        clear = getattr(cur, "cache_clear", None) or getattr(cur, "_clear_cache", None)
        if callable(clear):
            yield clear


def class_functions(cls: type, module_globals: dict[str, Any]) -> Iterator[FunctionType]:
    """Every raw function defined in ``cls``'s body, nested classes included."""
    for value in list(cls.__dict__.values()):
        if isinstance(value, type) and value.__qualname__.startswith(cls.__qualname__ + "."):
            yield from class_functions(value, module_globals)
        else:
            yield from raw_functions(value, module_globals)


def module_functions(
    module_globals: dict[str, Any], module_name: str
) -> dict[str, list[FunctionType]]:
    """``co_qualname -> functions`` for everything the module's namespace reaches."""
    index: dict[str, list[FunctionType]] = {}
    seen: set[int] = set()

    def add(f: FunctionType) -> None:
        if id(f) not in seen:
            seen.add(id(f))
            index.setdefault(f.__code__.co_qualname, []).append(f)

    for value in list(module_globals.values()):
        if isinstance(value, type):
            if value.__module__ == module_name:
                for f in class_functions(value, module_globals):
                    add(f)
        else:
            for f in raw_functions(value, module_globals):
                add(f)
    return index


def code_index(code: types.CodeType) -> dict[str, types.CodeType | None]:
    """``co_qualname -> code`` for every code object nested in a compiled module.

    A qualname that occurs twice (two lambdas, a conditional ``def``) maps to
    ``None``: such code is never patched by name, only rebound by statement.
    """
    out: dict[str, types.CodeType | None] = {}
    stack = [code]
    while stack:
        c = stack.pop()
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                out[const.co_qualname] = None if const.co_qualname in out else const
                stack.append(const)
    return out


_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
# Comprehensions and generator expressions are code objects too, but their
# function objects are called once, where they are made: never worth patching.
_CALLED_ONCE = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"})


def callable_again(code: types.CodeType) -> bool:
    """Could a live function object of ``code`` be called again (so worth patching)?

    A generator expression's function object may outlive the enclosing call
    inside its generator's frame, but it is never called again: giving it a
    new body would change nothing.
    """
    return code.co_name not in _CALLED_ONCE


def suspendable(code: types.CodeType) -> bool:
    """Generators and coroutines keep a frame (and so their code) alive between calls."""
    return bool(code.co_flags & _SUSPENDABLE)


class Codes:
    """A set of code objects by identity.

    Code objects compare (and hash) by value: the same ``lambda: 1`` or
    generator expression at the same line of two modules are ``==``, so a
    plain set or dict would take one module's code for another's and patch
    the wrong functions.  Membership here is identity; the set keeps the
    objects alive so their ids stay theirs.
    """

    def __init__(self, codes: Iterable[types.CodeType] = ()) -> None:
        self._by_id: dict[int, types.CodeType] = {id(c): c for c in codes}

    def add(self, code: types.CodeType) -> None:
        self._by_id[id(code)] = code

    def __contains__(self, code: object) -> bool:
        return id(code) in self._by_id

    def __iter__(self) -> Iterator[types.CodeType]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def ids(self) -> frozenset[int]:
        return frozenset(self._by_id)


def scan_heap(
    function_codes: Codes, frame_codes: Codes
) -> tuple[dict[int, list[FunctionType]], list[str]]:
    """One ``gc`` walk for both questions prepare asks of the heap.

    Returns, by ``id`` of the code, the live function objects running one of
    ``function_codes``, and a description of every suspended generator or
    coroutine whose frame runs one of ``frame_codes``.  Skipped entirely when
    there is nothing to look for, which is the common case: the walk is the
    most expensive step of prepare on a large heap.
    """
    wanted: dict[int, list[FunctionType]] = {i: [] for i in function_codes.ids()}
    frames = frozenset(id(c) for c in frame_codes if suspendable(c))
    suspended: list[str] = []
    if not wanted and not frames:
        return wanted, suspended
    # The heap holds hundreds of thousands of objects: the filtering by type and
    # by code runs in C (map/compress), Python only sees the few that match.
    kinds = _GENERATOR_TYPES | {FunctionType} if frames else frozenset({FunctionType})
    objects = gc.get_objects()
    picked = list(compress(objects, map(kinds.__contains__, map(type, objects))))
    del objects
    funcs = [o for o in picked if type(o) is FunctionType]
    for func in compress(funcs, map(wanted.__contains__, map(id, map(_CODE_OF, funcs)))):
        wanted[id(func.__code__)].append(func)
    for obj in picked if frames else ():
        if type(obj) is not FunctionType:
            code, frame = _code_and_frame(obj)
            if id(code) in frames and frame is not None:
                suspended.append(
                    f"{code.co_qualname} ({type(obj).__name__} at line {frame.f_lineno})"
                )
    return wanted, suspended


def _code_and_frame(obj: Any) -> tuple[Any, Any]:
    for prefix in ("gi", "cr", "ag"):
        code = getattr(obj, f"{prefix}_code", None)
        if code is not None:
            return code, getattr(obj, f"{prefix}_frame", None)
    return None, None


_GENERATOR_TYPES = frozenset({types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType})
_CODE_OF = operator.attrgetter("__code__")
