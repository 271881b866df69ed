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
  calls, scaled up and reported as estimates, see :class:`node_agent._counting.Prologue`):
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
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node_agent._counting import ChangedFunction, Twins
from node_agent._counting import backend as counting_backend
from node_agent._patch import MISSING, InstallModule, Op, SetClassAttr, SetCode, SetItem
from node_agent._prologue import Instrumented

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
#: :class:`node_agent._counting.Prologue`): that it ran is always exact (a function with fewer
#: calls is still counted on every call), and so are the first calls of its
#: error ratio; 0 counts every call until the cap.
EXACT_CALLS = 100
#: Seconds of each ``FOLD_S`` during which sampled functions count every call
#: (the rest of the time their quiet twin runs: exceptions counted, calls
#: not): 10 % of the time, so ~10 % of the counting cost.
BURST_S = 0.02


@dataclass(frozen=True)
class FunctionCoverage:
    name: str  # module:qualname
    kind: str
    calls: int  # exact, or an estimate when ``estimated`` (never below ``raised``)
    raised: int  # always exact
    estimated: bool = False  # calls past the first EXACT_CALLS sampled, see Prologue


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


def needs_prologue() -> bool:
    """Does this interpreter count through instrumented code (prepared in prepare)?

    Every interpreter does: the twins are an order of magnitude cheaper per
    counted call than ``sys.monitoring`` callbacks (see :class:`node_agent._counting.Twins`).
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
        self._backend: Twins | None = None
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
            backend = counting_backend(instrumented or {}, self.exact if self.fold_s > 0 else 0)
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

    def _fold_loop(self, stop: threading.Event, backend: Twins) -> None:
        """Every ``fold_s`` while ``backend`` counts: fold counts, retire functions past the cap.

        Then, while any function is sampled, a burst of ``burst_s`` in which
        the sampled functions count every call (see :class:`node_agent._counting.Prologue`).
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

    def _collect(self, backend: Twins) -> tuple[FunctionCoverage, ...]:
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
