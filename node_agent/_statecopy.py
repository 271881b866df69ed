"""Faithful copies of migrated state: what ``code_change`` is handed.

``copy.deepcopy`` refuses the usual state of a long-lived object (it holds a
lock), and a shallow copy shares every nested container with the live object,
so a migration that fails half-way would leave live state half-migrated.
:func:`copy_state` deep-copies anyway: the object graph is walked first, and
``deepcopy``'s memo is seeded with a *fresh* lock for every lock (a copy must
not share, nor inherit the held state of, the original's lock) and with the
object itself, or a stand-in, for what cannot be copied (sockets, files,
threads).  Modules, classes and functions are shared, as deepcopy does.
"""

from __future__ import annotations

import copy
import io
import socket
import threading
import types
from collections import deque
from collections.abc import Callable
from typing import Any

_LOCK = type(threading.Lock())
_RLOCK = type(threading.RLock())
_ATOMIC = (
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.ModuleType,
    types.CodeType,
)
# immutable values a copy may share (exact types: a subclass may carry mutable state)
_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None)})
_UNCOPYABLE = (socket.socket, io.IOBase, threading.Thread)
_WALK_BUDGET = 200_000  # objects; state graphs beyond this are left to deepcopy alone


class StateNotCopyable(Exception):
    """The state holds something no copy can stand for; ``detail`` names it."""


class StandIn:
    """Takes the place of a socket, file or thread in a dry run's copy of the state.

    Any use raises, so a dry-run migration that touches it fails visibly
    (and the vote says why) instead of writing to the live process's socket.
    """

    def __init__(self, path: str, kind: str) -> None:
        object.__setattr__(self, "_hf_what", f"{path} ({kind})")

    def __getattr__(self, name: str) -> Any:
        raise StateNotCopyable(
            f"{object.__getattribute__(self, '_hf_what')} is not copied into the staging process"
        )

    def __repr__(self) -> str:
        return f"<stand-in for {object.__getattribute__(self, '_hf_what')}>"


def _fresh(obj: Any) -> Any:
    """A new synchronization object of the same kind, never held."""
    if isinstance(obj, _LOCK):
        return threading.Lock()
    if isinstance(obj, _RLOCK):
        return threading.RLock()
    if isinstance(obj, threading.Condition):
        inner = getattr(obj, "_lock", None)
        return threading.Condition(threading.Lock() if isinstance(inner, _LOCK) else None)
    if isinstance(obj, threading.Semaphore):  # BoundedSemaphore too
        return type(obj)(getattr(obj, "_value", 1))
    if isinstance(obj, threading.Event):
        event = threading.Event()
        if obj.is_set():
            event.set()
        return event
    return None


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, list | tuple | set | frozenset | deque):
        return list(obj)
    try:
        d = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return []
    return [d] if isinstance(d, dict) else []


def _seed(root: Any, path: str, memo: dict[int, Any], notes: list[str], stand_in: bool) -> None:
    stack = [root]
    seen: set[int] = set()
    while stack and len(seen) < _WALK_BUDGET:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _ATOMIC):
            continue
        seen.add(id(obj))
        fresh = _fresh(obj)
        if fresh is not None:
            memo[id(obj)] = fresh
            continue
        if isinstance(obj, _UNCOPYABLE):
            kind = type(obj).__name__
            memo[id(obj)] = StandIn(path, kind) if stand_in else obj
            notes.append(
                f"{path}: a {kind} cannot be copied; the dry run used a stand-in"
                if stand_in
                else f"{path}: a {kind} cannot be copied; code_change gets the live one"
            )
            continue
        stack.extend(_children(obj))


def copy_state(
    state: dict[str, Any], owner: str, *, stand_ins: bool
) -> tuple[dict[str, Any], list[str]]:
    """A deep copy of ``state`` with fresh locks; notes name what could not be copied.

    ``stand_ins``: replace sockets, files and threads with :class:`StandIn`
    (the dry run), else share them (the real migration).  Raises
    :class:`StateNotCopyable` if ``deepcopy`` still fails.
    """
    for v in state.values():
        if type(v) not in _PLAIN:
            break
    else:  # nothing shared, nothing to replace: the usual small state
        return dict(state), []
    memo: dict[int, Any] = {}
    notes: list[str] = []
    for key, value in state.items():
        _seed(value, f"{owner}.{key}", memo, notes, stand_ins)
    try:
        return copy.deepcopy(state, memo), notes
    except Exception as exc:
        raise StateNotCopyable(f"{owner}: {type(exc).__name__}: {exc}") from exc


def fresh_locks_in_place(
    obj: Any,
    owner: str,
    set_state: Callable[[Any, dict[str, Any]], None],
    get_state: Callable[[Any], dict[str, Any]],
) -> list[str]:
    """In the staging process: give ``obj`` a copy of its state with fresh locks and stand-ins.

    The object there is already a private copy (a fork); only what the fork
    shares with the live process (descriptors) or froze (locks held by threads
    that do not exist in the child) is replaced.
    """
    try:
        state, notes = copy_state(get_state(obj), owner, stand_ins=True)
    except StateNotCopyable as exc:
        return [f"{exc}; the dry run used the state as forked"]
    set_state(obj, state)
    return notes
