"""How changed functions are counted: the counting twins, and ``sys.monitoring`` as a fallback.

:mod:`node_agent.coverage` decides *what* is counted and when (from finish
until the release is permanent or rolled back, a fold every ``FOLD_S``, the
call cap); this module is the *how*, per function:

* :class:`Prologue` swaps a function's ``__code__`` for its counting twin
  (:mod:`node_agent._prologue`), exact for the first calls, then its quiet
  twin (exceptions only) with short counting bursts, the calls between
  bursts estimated;
* :class:`Monitoring` (3.12+) counts a changed function that has no twin
  through ``sys.monitoring`` callbacks (~10x a twin's cost per call);
* :class:`Twins` puts the two together: twins where prepare made them.

The counting runs lock-free in the calling threads; the owner
(:class:`node_agent.coverage.Coverage`) starts, folds and stops it.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from node_agent._prologue import RAISED, Instrumented, calls_name, quiet_twin

__all__ = ["ChangedFunction", "Monitoring", "Prologue", "Twins", "backend"]

_TOOL_IDS = (4, 3)  # 1 is coverage.py's, 2 profilers', 0 debuggers', 5 optimizers'
_TOOL_NAME = "hotfleet-coverage"


@dataclass(frozen=True)
class ChangedFunction:
    """A function (or method) a release changed or added, with its live objects."""

    module: str
    qualname: str
    kind: str  # "changed" | "added"
    code: types.CodeType
    functions: tuple[types.FunctionType, ...]

    @property
    def name(self) -> str:
        return f"{self.module}:{self.qualname}"


class Monitoring:
    """``sys.monitoring``: PY_START on the changed code objects only, PY_UNWIND globally."""

    name = "sys.monitoring"

    def __init__(self) -> None:
        self.tool: int | None = None
        self.calls: dict[int, int] = {}
        self.raised: dict[int, int] = {}
        self.codes: list[types.CodeType] = []

    def start(self, targets: Sequence[ChangedFunction]) -> None:
        mon: Any = getattr(sys, "monitoring")  # noqa: B009 - absent before 3.12
        tool = None
        for candidate in _TOOL_IDS:
            if mon.get_tool(candidate) is None:
                mon.use_tool_id(candidate, _TOOL_NAME)
                tool = candidate
                break
        if tool is None:
            raise RuntimeError(f"no free sys.monitoring tool id among {_TOOL_IDS}")
        self.tool = tool
        self.codes = [t.code for t in targets]
        # keyed by identity: code objects compare (and hash) by value, and two
        # modules' ``def stamp(): return "v2"`` on the same line are equal
        calls = self.calls = dict.fromkeys(map(id, self.codes), 0)
        raised = self.raised = dict.fromkeys(map(id, self.codes), 0)

        def on_start(code: types.CodeType, offset: int) -> None:
            key = id(code)
            if key in calls:
                calls[key] += 1

        def on_unwind(code: types.CodeType, offset: int, exc: BaseException) -> None:
            key = id(code)
            if key in raised and isinstance(exc, Exception):
                raised[key] += 1

        ev = mon.events
        mon.register_callback(tool, ev.PY_START, on_start)
        mon.register_callback(tool, ev.PY_UNWIND, on_unwind)
        mon.set_events(tool, ev.PY_UNWIND)
        for code in self.codes:
            mon.set_local_events(tool, code, ev.PY_START)

    def counts(self, target: ChangedFunction) -> tuple[int, int]:
        key = id(target.code)
        return self.calls.get(key, 0), self.raised.get(key, 0)

    def retire(self, target: ChangedFunction) -> None:
        """Stop counting one function: its PY_START off, its unwinds no longer looked up."""
        if self.tool is None:
            return
        mon: Any = getattr(sys, "monitoring")  # noqa: B009
        mon.set_local_events(self.tool, target.code, mon.events.NO_EVENTS)
        self.raised.pop(id(target.code), None)  # the PY_UNWIND callback skips it from now on

    def stop(self) -> None:
        if self.tool is None:
            return
        mon: Any = getattr(sys, "monitoring")  # noqa: B009
        ev = mon.events
        for code in self.codes:
            mon.set_local_events(self.tool, code, ev.NO_EVENTS)
        mon.set_events(self.tool, ev.NO_EVENTS)
        mon.register_callback(self.tool, ev.PY_START, None)
        mon.register_callback(self.tool, ev.PY_UNWIND, None)
        mon.free_tool_id(self.tool)
        self.tool = None


class Slot:
    """One counted code object of the twins backend (see :class:`Prologue`)."""

    __slots__ = (
        "burst_at", "burst_hits", "exact", "functions", "hits", "mode",
        "plain", "quiet", "raised", "since", "slot", "twin",
    )  # fmt: skip

    def __init__(
        self,
        hits: list[None],
        raised: list[int],
        slot: int,
        plain: types.CodeType,
        twin: types.CodeType,
        quiet: types.CodeType | None,
    ) -> None:
        self.hits, self.raised, self.slot = hits, raised, slot
        self.plain, self.twin, self.quiet = plain, twin, quiet
        self.functions: list[types.FunctionType] = []
        self.mode = "exact"  # "exact" -> "sampled" (or "exact-only") -> "retired"
        self.exact = 0  # calls counted one by one while exact
        self.burst_hits = 0  # calls counted during bursts since sampled
        self.since = 0.0  # monotonic time it became sampled
        self.burst_at = 0.0  # the backend's burst seconds when it became sampled

    def install(self, code: types.CodeType) -> None:
        for fn in self.functions:
            now = fn.__code__
            if now is self.plain or now is self.twin or now is self.quiet:
                fn.__code__ = code


class Prologue:
    """Swap each changed function's code for its counting twin (same function object).

    A counted call appends ``None`` to its slot's list (the cheapest count
    CPython runs, see :mod:`node_agent._prologue`); :meth:`counts` folds a
    list's length into the function's count and empties it (``del l[:n]``
    is one C operation: calls appended meanwhile stay for the next fold), so
    a list holds at most the calls between two folds (the owner folds every
    :data:`FOLD_S`).

    Exact, then sampled: a function is counted on every call until a fold
    finds it has ``exact`` calls (it ran: known exactly; the first calls of
    its error ratio: exact).  From then on its *quiet twin* runs
    (:func:`node_agent._prologue.quiet_twin`: the same code with the count
    jumped over, exceptions still counted on every call, ~0 cost), and the
    counting twin only during short *bursts* (:meth:`burst`, ``BURST_S`` of
    every ``FOLD_S``).  Its calls since then are estimated as the calls
    counted in bursts x (seconds sampled / seconds of bursts), a ratio
    estimator that is unbiased for traffic steady over a fold period, and
    reported as an estimate (``estimated``).  A function without a quiet
    twin stays exact.
    """

    name = "prologue"

    def __init__(self, instrumented: Mapping[str, Instrumented], exact: int = 0) -> None:
        self.instrumented = instrumented
        self.exact = exact  # 0: every call counted, never sampled
        self.slot: dict[int, Slot] = {}  # id(plain code) -> its slot
        self.bursting = False
        self.burst_s = 0.0  # seconds of bursts so far
        self._burst_t0 = 0.0

    def start(self, targets: Sequence[ChangedFunction]) -> None:
        raised_lists: dict[str, list[int]] = {}
        for t in targets:
            inst = self.instrumented.get(t.module)
            hit = inst.variant(t.code) if inst is not None else None
            if inst is None or hit is None:
                continue  # not counted: reported with zero calls, see Coverage.report
            twin, slot = hit
            raised = raised_lists.get(t.module)
            if raised is None:
                raised = raised_lists[t.module] = [0] * inst.slots
            entry = self.slot[id(t.code)] = Slot([], raised, slot, t.code, twin, None)
            for fn in t.functions:
                if fn.__code__ is t.code:
                    # the lists stay bound after stop: a closure made meanwhile by a
                    # counting body keeps counting harmlessly instead of failing
                    fn.__globals__[calls_name(slot)] = entry.hits
                    fn.__globals__[RAISED] = raised
                    fn.__code__ = twin
                    entry.functions.append(fn)

    def _burst_seconds(self, now: float) -> float:
        return self.burst_s + (now - self._burst_t0 if self.bursting else 0.0)

    def counts(self, target: ChangedFunction) -> tuple[int, int]:
        entry = self.slot.get(id(target.code))
        if entry is None:
            return 0, 0
        hits = entry.hits
        n = len(hits)
        if n:
            del hits[:n]
        raised = entry.raised[entry.slot]
        if entry.mode != "sampled":
            entry.exact += n
            if entry.mode == "exact" and 0 < self.exact <= entry.exact:
                # it ran, and its first calls are exact: sample from now on (the
                # quiet twin is made here, by the fold, not in start: a few µs each)
                entry.quiet = quiet_twin(entry.twin, entry.slot)
                if entry.quiet is None:  # an unexpected shape: stays exact
                    entry.mode = "exact-only"
                    return entry.exact, raised
                entry.mode = "sampled"
                entry.since = time.monotonic()
                entry.burst_at = self._burst_seconds(entry.since)
                if not self.bursting:
                    entry.install(entry.quiet)
            return entry.exact, raised
        entry.burst_hits += n
        now = time.monotonic()
        bursts = self._burst_seconds(now) - entry.burst_at
        estimate = entry.burst_hits * (now - entry.since) / bursts if bursts > 0 else 0.0
        return max(entry.exact + round(estimate), raised), raised

    def estimated(self, target: ChangedFunction) -> bool:
        entry = self.slot.get(id(target.code))
        return entry is not None and (entry.mode == "sampled" or entry.burst_hits > 0)

    @property
    def sampling(self) -> bool:
        return any(e.mode == "sampled" for e in self.slot.values())

    def burst(self, on: bool) -> None:
        """Begin (``on``) or end a burst: the sampled functions count every call meanwhile."""
        if on == self.bursting:
            return
        now = time.monotonic()
        if on:
            self._burst_t0 = now
        else:
            self.burst_s += now - self._burst_t0
        self.bursting = on
        for entry in self.slot.values():
            if entry.mode == "sampled" and entry.quiet is not None:
                entry.install(entry.twin if on else entry.quiet)

    def retire(self, target: ChangedFunction) -> None:
        """Stop counting one function: the plain code goes back into its function objects."""
        entry = self.slot.get(id(target.code))
        if entry is not None:
            entry.mode = "retired"
            entry.install(entry.plain)

    def stop(self) -> None:
        for entry in self.slot.values():
            entry.install(entry.plain)


class Twins:
    """Counting twins where the prepare made them, ``sys.monitoring`` (3.12+) for the rest.

    Measured on the loader benchmark's request loop (34 counted calls per
    request): a twin's count costs ~50 ns a call on a busy host, a
    ``sys.monitoring`` ``PY_START`` callback ~600 ns (a Python call per
    event): +6 % against +110 % per request while counted.  So the twins
    are used on every interpreter, and monitoring only counts what has no
    twin (source unavailable, a shape the twin does not match).
    """

    def __init__(self, instrumented: Mapping[str, Instrumented], exact: int = 0) -> None:
        self.prologue = Prologue(instrumented, exact)
        self.monitoring: Monitoring | None = None
        self.name = "prologue"

    def start(self, targets: Sequence[ChangedFunction]) -> None:
        self.prologue.start(targets)
        rest = [t for t in targets if id(t.code) not in self.prologue.slot]
        if rest and hasattr(sys, "monitoring"):
            monitoring = Monitoring()
            monitoring.start(rest)
            self.monitoring = monitoring
            self.name = "prologue+sys.monitoring" if self.prologue.slot else "sys.monitoring"

    def _of(self, target: ChangedFunction) -> Monitoring | Prologue | None:
        if id(target.code) in self.prologue.slot:
            return self.prologue
        return self.monitoring

    def counts(self, target: ChangedFunction) -> tuple[int, int]:
        backend = self._of(target)
        return backend.counts(target) if backend is not None else (0, 0)

    def estimated(self, target: ChangedFunction) -> bool:
        """Is ``target``'s call count an estimate (sampled, see :class:`Prologue`)?"""
        return self.prologue.estimated(target)

    def retire(self, target: ChangedFunction) -> None:
        backend = self._of(target)
        if backend is not None:
            backend.retire(target)

    def stop(self) -> None:
        self.prologue.stop()
        if self.monitoring is not None:
            self.monitoring.stop()


def backend(instrumented: Mapping[str, Instrumented], exact: int = 0) -> Twins:
    return Twins(instrumented, exact)
