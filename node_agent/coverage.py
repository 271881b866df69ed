"""Changed-code coverage: did the functions a release changed or added run, and did they raise?

OTP's ``cover`` counts calls of freshly loaded code; a rollout can use the
same question before promoting: a release whose new code never ran has not
been tested by the window, and a changed function that raises on most of its
calls is broken even when the app's overall error rate hides it (5 % of
traffic).  The loader knows exactly which functions a release touched
(:func:`changed_functions` reads them off the finish journal), so only those
are counted, from finish until the release becomes permanent or is rolled
back.

Two ways to count, both keeping every function's identity (no wrappers):

* ``prologue`` (every interpreter): the function's ``__code__`` is swapped
  for a twin compiled in prepare with a counting prologue
  (:mod:`node_agent._prologue`); ``stop`` swaps the plain code back.  Each
  function is counted one by one for its first :data:`EXACT_CALLS` calls,
  then sampled (its quiet twin counts exceptions only; short bursts count
  calls, scaled up and reported as estimates, see :class:`_Prologue`):
  every call counted cost +6.6 % per request of the loader benchmark's
  loop (34 counted calls of tiny functions, ~50 ns each), sampled ~10 % of that.
* ``sys.monitoring`` (3.12+), for a changed function without a twin:
  ``PY_START`` enabled per changed code object with ``set_local_events`` (no
  other function pays anything) and ``PY_UNWIND`` (global by nature, so it
  costs a dict lookup per exception that leaves any Python frame, only while
  counting).  Each counted call is a Python callback, ~10x a twin's count
  (measured: +110 % against +6 % per request of the loader benchmark's loop
  while counted), so it is the fallback, not the first choice.

``sys.setprofile`` was not an option: it calls back on every call in the process.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node_agent._patch import MISSING, InstallModule, Op, SetClassAttr, SetCode, SetItem
from node_agent._prologue import RAISED, Instrumented, calls_name, quiet_twin

if TYPE_CHECKING:  # the loader imports this module in a bare interpreter (no grpc)
    from node_agent.metrics import HostCpu

__all__ = [
    "ChangedFunction",
    "Coverage",
    "CoverageReport",
    "FunctionCoverage",
    "changed_functions",
    "health_fields",
    "prometheus_lines",
]

#: Calls after which a function is no longer counted (its counts freeze): a
#: hot function reaches it within a second of the window and then costs
#: nothing at all; the judge's error ratio of the changed code rests on the
#: first CALLS_CAP calls of each function, far more than its Wilson bound needs.
CALLS_CAP = 500
#: Seconds between two folds of the counts while counting (retiring functions
#: past the cap, and emptying the 3.11 prologue's call lists), whether or not
#: anyone asks for a report: a hot function stops costing anything within
#: this long of reaching the cap, and a call list never holds more than this
#: long's calls.
FOLD_S = 0.2
#: Calls a function is counted one by one before it is sampled (see
#: :class:`_Prologue`): that it ran is always exact (a function with fewer
#: calls is still counted on every call), and so are the first calls of its
#: error ratio; 0 counts every call until the cap.
EXACT_CALLS = 100
#: Seconds of each ``FOLD_S`` during which sampled functions count every call
#: (the rest of the time their quiet twin runs: exceptions counted, calls
#: not): 10 % of the time, so ~10 % of the counting cost.
BURST_S = 0.02

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


@dataclass(frozen=True)
class FunctionCoverage:
    name: str  # module:qualname
    kind: str
    calls: int  # exact, or an estimate when ``estimated`` (never below ``raised``)
    raised: int  # always exact
    estimated: bool = False  # calls past the first EXACT_CALLS sampled, see _Prologue


@dataclass(frozen=True)
class CoverageReport:
    """Counts since finish of every changed function of ``release``."""

    release: str
    active: bool
    backend: str
    functions: tuple[FunctionCoverage, ...] = ()

    @property
    def calls(self) -> int:
        return sum(f.calls for f in self.functions)

    @property
    def raised(self) -> int:
        return sum(f.raised for f in self.functions)

    @property
    def estimated(self) -> bool:
        """Is any function's call count an estimate (sampled past its first exact calls)?"""
        return any(f.estimated for f in self.functions)

    @property
    def never_ran(self) -> list[str]:
        return [f.name for f in self.functions if f.calls == 0]

    @property
    def raising(self) -> list[str]:
        return [f.name for f in self.functions if f.raised > 0]


# ------------------------------------------------------------- what changed
def _shape(code: types.CodeType) -> tuple[Any, ...]:
    """A code object without its positions: equal for a mere reformatting."""
    consts = tuple(_shape(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return (code.co_code, consts, code.co_names, code.co_varnames, code.co_freevars, code.co_flags)


def _module_of(fn: types.FunctionType) -> str:
    return str(fn.__globals__.get("__name__") or getattr(fn, "__module__", "") or "")


def _functions_in(value: Any, module: str) -> Iterable[types.FunctionType]:
    """``value`` if it is a function of ``module``, the methods if it is a class of it."""
    if isinstance(value, types.FunctionType):
        if _module_of(value) == module:
            yield value
    elif isinstance(value, staticmethod | classmethod):
        yield from _functions_in(value.__func__, module)
    elif isinstance(value, property):
        for f in (value.fget, value.fset, value.fdel):
            yield from _functions_in(f, module)
    elif isinstance(value, type) and getattr(value, "__module__", None) == module:
        for member in list(vars(value).values()):
            if member is not value:
                yield from _functions_in(member, module)


def changed_functions(journal: Sequence[Op]) -> list[ChangedFunction]:
    """The functions a finish changed or added, from its journal of inverses.

    ``SetCode`` inverses are functions whose body moved (a reformatting, whose
    code differs only in positions, is left out); ``SetItem`` and
    ``SetClassAttr`` inverses are names a statement (re)bound, counted when the
    new value is a function, or a class with methods, of that module;
    ``InstallModule`` inverses are new modules, all their functions added.
    """
    found: dict[int, tuple[str, str, types.CodeType, list[types.FunctionType]]] = {}

    def add(fn: types.FunctionType, kind: str) -> None:
        code = fn.__code__
        hit = found.get(id(code))
        if hit is None:
            found[id(code)] = (_module_of(fn), kind, code, [fn])
        elif all(f is not fn for f in hit[3]):
            hit[3].append(fn)

    for op in journal:
        if isinstance(op, SetCode):
            fn = op.func
            if fn.__code__ is not op.code and _shape(fn.__code__) != _shape(op.code):
                add(fn, "changed")
        elif isinstance(op, SetItem):
            module = str(op.mapping.get("__name__", ""))
            new = op.mapping.get(op.key, MISSING)
            kind = "added" if op.value is MISSING else "changed"
            if new is not op.value:
                for fn in _functions_in(new, module):
                    add(fn, kind)
        elif isinstance(op, SetClassAttr):
            new = op.cls.__dict__.get(op.name, MISSING)
            kind = "added" if op.value is MISSING else "changed"
            if new is not op.value:
                for fn in _functions_in(new, op.cls.__module__):
                    add(fn, kind)
        elif isinstance(op, InstallModule) and op.module is None:
            installed = sys.modules.get(op.name)
            if installed is not None:
                for value in list(vars(installed).values()):
                    for fn in _functions_in(value, op.name):
                        add(fn, "added")
    out = [
        ChangedFunction(module, code.co_qualname, kind, code, tuple(fns))
        for module, kind, code, fns in found.values()
    ]
    out.sort(key=lambda c: c.name)
    return out


# ----------------------------------------------------------------- backends
class _Monitoring:
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


class _Slot:
    """One counted code object of the twins backend (see :class:`_Prologue`)."""

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


class _Prologue:
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
        self.slot: dict[int, _Slot] = {}  # id(plain code) -> its slot
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
            entry = self.slot[id(t.code)] = _Slot([], raised, slot, t.code, twin, None)
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


class _Twins:
    """Counting twins where the prepare made them, ``sys.monitoring`` (3.12+) for the rest.

    Measured on the loader benchmark's request loop (34 counted calls per
    request): a twin's count costs ~50 ns a call on a busy host, a
    ``sys.monitoring`` ``PY_START`` callback ~600 ns (a Python call per
    event): +6 % against +110 % per request while counted.  So the twins
    are used on every interpreter, and monitoring only counts what has no
    twin (source unavailable, a shape the twin does not match).
    """

    def __init__(self, instrumented: Mapping[str, Instrumented], exact: int = 0) -> None:
        self.prologue = _Prologue(instrumented, exact)
        self.monitoring: _Monitoring | None = None
        self.name = "prologue"

    def start(self, targets: Sequence[ChangedFunction]) -> None:
        self.prologue.start(targets)
        rest = [t for t in targets if id(t.code) not in self.prologue.slot]
        if rest and hasattr(sys, "monitoring"):
            monitoring = _Monitoring()
            monitoring.start(rest)
            self.monitoring = monitoring
            self.name = "prologue+sys.monitoring" if self.prologue.slot else "sys.monitoring"

    def _of(self, target: ChangedFunction) -> _Monitoring | _Prologue | None:
        if id(target.code) in self.prologue.slot:
            return self.prologue
        return self.monitoring

    def counts(self, target: ChangedFunction) -> tuple[int, int]:
        backend = self._of(target)
        return backend.counts(target) if backend is not None else (0, 0)

    def estimated(self, target: ChangedFunction) -> bool:
        """Is ``target``'s call count an estimate (sampled, see :class:`_Prologue`)?"""
        return self.prologue.estimated(target)

    def retire(self, target: ChangedFunction) -> None:
        backend = self._of(target)
        if backend is not None:
            backend.retire(target)

    def stop(self) -> None:
        self.prologue.stop()
        if self.monitoring is not None:
            self.monitoring.stop()


def _backend(instrumented: Mapping[str, Instrumented], exact: int = 0) -> _Twins:
    return _Twins(instrumented, exact)


def needs_prologue() -> bool:
    """Does this interpreter count through instrumented code (prepared in prepare)?

    Every interpreter does: the twins are an order of magnitude cheaper per
    counted call than ``sys.monitoring`` callbacks (see :class:`_Twins`).
    """
    return True


class Coverage:
    """Counts calls and exceptions of one release's changed functions; one per loader.

    ``start`` after finish, ``stop`` at make_permanent, rollback or the next
    finish; ``report`` any time (after ``stop`` it keeps the last counts,
    ``active`` false).  Each report, and a fold every ``fold_s`` while
    counting (a thread of its own, so it does not depend on anyone polling
    Health), retires the functions that reached ``cap`` calls (see
    :data:`CALLS_CAP`): a hot path stops paying for counting within
    ``fold_s`` of its cap.  Thread-safe for
    start/stop/report; the counting itself
    runs lock-free in the calling threads (a lost increment under a data race
    is acceptable for a health signal; no lock may sit on the request path).
    """

    def __init__(
        self,
        cap: int = CALLS_CAP,
        fold_s: float = FOLD_S,
        exact: int = EXACT_CALLS,
        burst_s: float = BURST_S,
    ) -> None:
        self.cap = cap
        self.fold_s = fold_s
        self.exact = exact  # calls counted one by one before sampling; 0: never sample
        self.burst_s = burst_s  # of every fold_s, counting for the sampled functions
        self._folder: threading.Thread | None = None
        self._folding = threading.Event()
        # id(code) -> counts when retired (calls, raised, estimated)
        self._retired: dict[int, tuple[int, int, bool]] = {}
        self._lock = threading.Lock()
        self._release = ""
        self._targets: list[ChangedFunction] = []
        self._backend: _Twins | None = None
        self._final: tuple[FunctionCoverage, ...] = ()
        self._backend_name = "prologue"
        self.error = ""  # why counting could not start, if it could not

    def start(
        self,
        release: str,
        targets: Sequence[ChangedFunction],
        instrumented: Mapping[str, Instrumented] | None = None,
    ) -> None:
        with self._lock:
            self._stop_locked()
            self._release, self._targets, self._final, self.error = release, list(targets), (), ""
            self._retired = {}
            if not targets:
                return
            backend = _backend(instrumented or {}, self.exact if self.fold_s > 0 else 0)
            try:
                backend.start(self._targets)
            except (RuntimeError, ValueError) as exc:
                backend.stop()
                self.error = f"changed-code coverage off: {exc}"
                return
            self._backend = backend
            self._backend_name = backend.name
            if self.fold_s > 0:
                self._folding = threading.Event()
                self._folder = threading.Thread(
                    target=self._fold_loop,
                    args=(self._folding, backend),
                    name="hotfleet-coverage-fold",
                    daemon=True,
                )
                self._folder.start()

    def _fold_loop(self, stop: threading.Event, backend: _Twins) -> None:
        """Every ``fold_s`` while ``backend`` counts: fold counts, retire functions past the cap.

        Then, while any function is sampled, a burst of ``burst_s`` in which
        the sampled functions count every call (see :class:`_Prologue`).
        """
        burst = min(max(self.burst_s, 0.0), self.fold_s)
        rest = self.fold_s
        while not stop.wait(rest):
            rest = self.fold_s
            with self._lock:
                if self._backend is not backend:
                    return
                self._collect(backend)
                if all(id(t.code) in self._retired for t in self._targets):
                    return  # everything retired: nothing left to fold
                sampling = burst > 0 and backend.prologue.sampling
                if sampling:
                    backend.prologue.burst(True)
            if sampling:
                ended = stop.wait(burst)
                with self._lock:
                    if self._backend is backend:  # after stop the plain code is back: leave it
                        backend.prologue.burst(False)
                if ended:
                    return
                rest = self.fold_s - burst

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()
            folder, self._folder = self._folder, None
        if folder is not None and folder is not threading.current_thread():
            folder.join(5)

    def _stop_locked(self) -> None:
        self._folding.set()
        if self._backend is not None:
            self._final = self._collect(self._backend)
            self._backend.stop()
            self._backend = None

    def _collect(self, backend: _Twins) -> tuple[FunctionCoverage, ...]:
        out = []
        for t in self._targets:
            frozen = self._retired.get(id(t.code))
            if frozen is None:
                calls, raised = backend.counts(t)
                estimated = backend.estimated(t)
                if calls >= self.cap:  # enough evidence: this function stops costing anything
                    backend.retire(t)
                    self._retired[id(t.code)] = (calls, raised, estimated)
            else:
                calls, raised, estimated = frozen
            out.append(FunctionCoverage(t.name, t.kind, calls, raised, estimated))
        return tuple(out)

    @property
    def active(self) -> bool:
        return self._backend is not None

    def report(self) -> CoverageReport:
        with self._lock:
            backend = self._backend
            functions = self._collect(backend) if backend is not None else self._final
            if backend is None and not functions and self._targets:
                functions = tuple(FunctionCoverage(t.name, t.kind, 0, 0) for t in self._targets)
            return CoverageReport(self._release, backend is not None, self._backend_name, functions)


def prometheus_lines(report: CoverageReport, labels: Mapping[str, str]) -> str:
    """Prometheus text for a coverage report; ``labels`` (e.g. node) go on every sample."""
    from node_agent.metrics import _labels  # not at the top: see TYPE_CHECKING above

    def lbl(more: Mapping[str, str]) -> str:
        return _labels({**labels, **more})

    out = [
        "# HELP hotfleet_changed_code_active 1 while the changed functions of the provisional release are counted.",
        "# TYPE hotfleet_changed_code_active gauge",
        f"hotfleet_changed_code_active{lbl({'release': report.release})} {int(report.active)}",
        "# HELP hotfleet_changed_code_functions Functions the current release changed or added.",
        "# TYPE hotfleet_changed_code_functions gauge",
        f"hotfleet_changed_code_functions{lbl({})} {len(report.functions)}",
        "# HELP hotfleet_changed_code_calls_total Calls of a changed function since finish "
        "(an estimate where hotfleet_changed_code_calls_estimated is 1).",
        "# TYPE hotfleet_changed_code_calls_total counter",
    ]
    out += [
        f"hotfleet_changed_code_calls_total{lbl({'function': f.name, 'kind': f.kind})} {f.calls}"
        for f in report.functions
    ]
    out += [
        "# HELP hotfleet_changed_code_calls_estimated 1 when a changed function's calls_total is an "
        "estimate (sampled past its first exact calls; raised_total is always exact).",
        "# TYPE hotfleet_changed_code_calls_estimated gauge",
    ]
    out += [
        f"hotfleet_changed_code_calls_estimated{lbl({'function': f.name, 'kind': f.kind})} "
        f"{int(f.estimated)}"
        for f in report.functions
    ]
    out += [
        "# HELP hotfleet_changed_code_raised_total Calls of a changed function that ended in an exception.",
        "# TYPE hotfleet_changed_code_raised_total counter",
    ]
    out += [
        f"hotfleet_changed_code_raised_total{lbl({'function': f.name, 'kind': f.kind})} {f.raised}"
        for f in report.functions
    ]
    return "\n".join(out) + "\n"


def health_fields(report: CoverageReport, host: HostCpu) -> dict[str, Any]:
    """The HealthReply fields of changed-code coverage and host CPU (keyword arguments).

    The stubs are imported here, not at the top: the loader imports this
    module and must not need protobuf (a bare interpreter runs it).
    """
    from hotfleet._proto.hotfleet.v1 import agent_pb2

    return {
        "host_cpu_busy_s": host.busy_s,
        "host_cpu_total_s": host.total_s,
        "host_cpu_steal_s": host.steal_s,
        "changed_code": [
            agent_pb2.ChangedFunction(
                name=f.name,
                kind=f.kind,
                calls=f.calls,
                raised=f.raised,
                calls_estimated=f.estimated,
            )
            for f in report.functions
        ],
        "changed_code_active": report.active,
        "changed_code_release": report.release,
    }
