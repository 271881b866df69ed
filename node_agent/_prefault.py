"""Before the hold: touch what the switch will write, so the pause does not pay for it.

After the staging fork (:mod:`node_agent._rehearsal`) every page of the
process is copy-on-write, and the first write to each costs a page fault
inside the finish hold, where the pause is measured in microseconds.
:func:`prefault` reads (and so writes the reference counts of) what the
switch in :mod:`node_agent._finish` will touch, and runs the switch's own
edit machinery once on throw-away objects; :func:`warm_migration` does the
same for the migrations' worker.  Nothing here changes a live object.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

from node_agent._classmerge import merge_class
from node_agent._functions import functions_in
from node_agent._patch import Op, SetCode, SetItem, SetState, apply_staged, stage_inverses, undo
from node_agent._prepared import Prepared
from node_agent._statecopy import copy_state


def prefault(prepared: Prepared) -> None:
    """Touch, before the hold, the memory the switch will write.

    After the staging fork every page of this process is copy-on-write: the
    first write to each costs a page fault (~2 µs in a VM; ~200 of them in the
    benchmark's switch, measured per step with ``RUSAGE_THREAD``).  In
    CPython a read that takes a reference writes the object's reference
    count, so reading here what the switch will read or replace moves the
    fault out of the hold.  Measured sources, largest first: the type
    cache clear (the cache array and every cached name's reference count,
    ~110 faults: cleared here once, so the clear in the hold writes private
    pages), the classes a statement merges into (their members and code),
    the functions whose code, defaults and docstring are replaced, module
    dict entries the statements rebind, the state of migrated objects.
    """
    if hasattr(sys, "_clear_type_cache"):
        sys._clear_type_cache()
    _warm_switch_code()
    _warm_allocator()
    for plan in prepared._plans.values():
        for op in (*plan.ops, *plan.late_ops):
            for name in getattr(type(op), "__slots__", ()):
                getattr(op, name)
            func = getattr(op, "func", None)
            if isinstance(func, types.FunctionType):
                _touch_function(func)
        g = plan.module.__dict__
        for st in plan.statements:
            _touch_code(st.code)
            for key in st.binds or ():
                if key in g:
                    g[key] = g[key]
            if st.merge_class is not None:
                _touch_class(st.merge_class)
    for new in prepared._new.values():
        _touch_code(new.code)
    for bindings in prepared._bindings.values():
        for b in bindings:
            b.holder.get(b.local)
    for m in prepared._migrations:
        d = getattr(m.obj, "__dict__", None)
        if isinstance(d, dict):
            for value in list(d.values()):
                del value


def _warm_allocator() -> None:
    """Write the free blocks the switch's allocations will take, before the hold.

    The switch allocates (class bodies, statement frames, journal entries):
    after the fork those blocks sit in copy-on-write pages.  The allocator
    hands out the most recently freed block of a size class first, so
    allocating and freeing a spread of sizes here leaves written pages at
    the head of every free list.
    """
    warm: list[object] = [bytes(size) for size in range(0, 512, 16) for _ in range(32)]
    warm.extend({i: i for i in range(n)} for n in (1, 4, 8, 16, 32) for _ in range(16))
    del warm


class _WarmOld:
    """Merged into by :func:`_warm_switch_code`: runs the merge's own code before a hold."""

    def method(self) -> int:
        return 1

    @property
    def prop(self) -> int:
        return 1


class _WarmNew:
    def method(self) -> int:
        return 2

    @property
    def prop(self) -> int:
        return 2

    @staticmethod
    def added() -> int:
        return 3


def _warm_switch_code() -> None:
    """Run the switch's own functions once on throw-away objects, outside the hold.

    Calling a function writes its function and code objects (reference
    counts, the frame stack): after the staging fork, the first call of each
    costs page faults.  The edits are applied and undone on private objects.
    """
    journal: list[Op] = []
    ops: list[Op] = []
    merge_class(_WarmOld, _WarmNew, ops)
    journal.extend(op.apply() for op in ops)
    scratch: dict[str, Any] = {"x": 1}
    journal.append(SetItem(scratch, "x", 2).apply())
    f = _WarmOld.__dict__["method"]
    assert isinstance(f, types.FunctionType)
    code_ops: list[Op] = [SetCode(f, _WarmNew.method.__code__, None, None)]
    apply_staged(code_ops, stage_inverses(code_ops), journal)
    undo(journal)


def warm_migration() -> Any:
    """A throw-away migration on the worker, before the hold (see :func:`_warm_switch_code`)."""
    state, _ = copy_state({"n": [1], "lock": threading.Lock()}, "warm-up", stand_ins=False)
    return SetState(_WarmOld(), state).apply()


def _touch_function(f: types.FunctionType) -> None:
    f.__code__, f.__defaults__, f.__kwdefaults__, f.__doc__, f.__closure__  # noqa: B018


def _touch_class(cls: type, depth: int = 0) -> None:
    """What :func:`~node_agent._classmerge.merge_class` reads: members, their functions and code."""
    for value in list(cls.__dict__.values()):
        if isinstance(value, type):
            if depth < 4:
                _touch_class(value, depth + 1)
            continue
        for f in functions_in(value):
            _touch_function(f)
            f.__code__.co_qualname, f.__code__.co_freevars  # noqa: B018


def _touch_code(code: types.CodeType) -> None:
    """A code object and the code objects it will make functions of (referenced = touched)."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _touch_code(const)
