"""Registry of long-lived stateful objects, the analogue of OTP's gen_servers.

Objects whose state must survive an upgrade in a new shape register here.  On
``finish`` the loader calls the *new* code's ``code_change(self, old_vsn,
state, extra)`` for each registered object whose class belongs to a module of
the release, and installs the state it returns.  On rollback it calls the same
(newer) method with ``("down", vsn)`` before the old code comes back, as OTP
does for downgrades.

The registry holds weak references only: registering must never keep an
object alive that the application dropped.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_objects: weakref.WeakSet[Any] = weakref.WeakSet()


def register(obj: T) -> T:
    """Register ``obj`` for state migration and return it (usable as a decorator on factories)."""
    try:
        with _lock:
            _objects.add(obj)
    except TypeError as exc:  # pragma: no cover - depends on the user's class
        raise TypeError(
            f"cannot register {type(obj).__qualname__}: it does not support weak references "
            "(add '__weakref__' to its __slots__)"
        ) from exc
    return obj


def unregister(obj: object) -> None:
    with _lock:
        _objects.discard(obj)


def registered() -> Iterator[Any]:
    """A snapshot of the registered objects that are still alive."""
    with _lock:
        snapshot = list(_objects)
    return iter(snapshot)


def get_state(obj: object) -> dict[str, Any]:
    """The state handed to ``code_change``: a shallow copy of the instance dict."""
    return dict(vars(obj))


def set_state(obj: object, state: dict[str, Any]) -> None:
    """Install a migrated state in place, so the object keeps its identity."""
    d = vars(obj)
    d.clear()
    d.update(state)
