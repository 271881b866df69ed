"""Loader benchmark: how long guarded work is held by a finish, against ``importlib.reload``.

One process plays a worker:

* a generated application package (20 modules, ~300 module-level functions,
  ~440 with methods, 42 classes; modules import each other and each other's
  constants) is booted as v1 from a temp dir, with 1040 live instances and 4
  registered stateful objects whose class defines ``code_change``;
* the process has a realistic number of modules loaded (a sweep of the
  standard library is imported first);
* request threads loop ``with loader.guard(): <call into 3 modules>`` and
  check that every version they observe agrees (function bodies, methods of
  live instances, a constant and a ``from m import CONST`` binding, a class
  that gained a method, the shape of a migrated state);
* the main thread runs cycles of prepare v2 -> finish -> rollback and times
  each step from its own side (wall time, the barrier's gate-closed time, the
  loader's own ``pause_s``) and from the request threads' side (the slowest
  request overlapping the step, next to the same measure over equally long
  quiet windows, the control).

Every cycle prepares a new build of v2 (same code, a different trailing
comment), so prepare is measured cold, as a node meets a release; the warm
case (the same release prepared again) is timed apart.  The v2 release is a
realistic upgrade: changed function and method bodies
(some with comprehensions, one behind ``lru_cache``), a few changed
constants, two classes that gain a method, two new functions, and a state
migration.

The baseline is what people do without hotfleet: a twin package (same code,
other name) is upgraded by writing v2 to disk and ``importlib.reload``-ing
its 20 modules one by one while the same request threads run *unguarded*.
The mixed window is first reload start -> last reload end.  To be fair to
reload, the pycs are compiled beforehand and written (unchecked-hash, so a
stale pyc can never be picked up) with the threads parked; every sweep is
verified to have loaded the new code.  Going back to v1 happens with the
threads parked, so only v1 -> v2 windows are measured and counted.

Both mechanisms are also timed with no request threads at all, which is
their intrinsic cost, free of GIL scheduling.  A GC callback records every
collection, so a slow finish can be told apart from a collection that
happened to run inside it.  Last, tracemalloc measures the memory the
loader holds for its in-memory backup (what ``make_permanent`` or
``rollback`` releases).

Request latency is measured from when a request is *due* (the end of the
thread's previous request plus the think time) to its end, so time a
thread spends waiting for the GIL or at the closed gate counts.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import importlib
import importlib.util
import io
import marshal
import os
import pkgutil
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
import types
import warnings
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common

import node_agent
from hotfleet.release import Release
from node_agent import Loader, _cow
from node_agent.loader import Prepared

# ----------------------------------------------------------------- the workload
PKG = "hfbench_app"  # upgraded with the loader
RELOAD_PKG = "hfbench_reload"  # the same code, upgraded with importlib.reload
N_MODULES = 20
FUNCS_PER_MODULE = 12
INSTANCES_PER_CLASS = 26  # x 2 classes x 20 modules = 1040 live instances
CONST_CHANGED = frozenset({3, 8, 13, 17})  # LIMIT changes value in v2
STRUCTURAL = frozenset({4, 11})  # Model..A gains a method in v2
NEW_FUNCTION = frozenset({6, 15})  # v2 adds a module-level function
COUNTER_MODULES = (0, 10)  # define a stateful Counter with code_change
COUNTERS_PER_MODULE = 2
LRU_MODULES = frozenset(i for i in range(N_MODULES) if i % 5 == 2)

# Finish pause target and how much shorter than the reload window it must be.
TARGET_FINISH_P99_S = 0.002
TARGET_RATIO = 10.0


def _mod(i: int) -> str:
    return f"m{i:02d}"


def _deps(i: int) -> list[int]:
    """Modules ``m{i}`` imports as modules (lower index only: no cycles)."""
    return sorted({j for j in (i - 1, i // 2) if 0 <= j < i})


def _upstream(i: int) -> int | None:
    """The module whose ``LIMIT`` ``m{i}`` binds with ``from ... import`` (odd modules)."""
    if i % 2 == 0:
        return None
    below = [c for c in CONST_CHANGED if c < i]
    return max(below) if below else None


def _limit(i: int, v: int) -> int:
    return 100 + i if v == 2 and i in CONST_CHANGED else 10 + i


def module_source(pkg: str, i: int, v: int) -> str:
    """Source of module ``m{i}`` at version ``v`` (1 or 2)."""
    tag = f"v{v}"
    up = _upstream(i)
    out: list[str] = [
        f'"""Generated module {i:02d} of the hotfleet loader benchmark ({tag})."""',
        "",
        "import functools",
        "",
    ]
    out += [f"from {pkg} import {_mod(j)}" for j in _deps(i)]
    if up is not None:
        out.append(f"from {pkg}.{_mod(up)} import LIMIT as UPSTREAM_LIMIT")
    out += [
        "",
        f"LIMIT = {_limit(i, v)}",
        f"SCALE = {i % 7 + 2}",
        "_CALLS = {}",
        "",
        "",
        "def stamp():",
        f'    return "{tag}"',
        "",
        "",
    ]
    if i in CONST_CHANGED:
        out += [
            "def limit_version():",
            f'    return "v1" if LIMIT == {_limit(i, 1)} else "v2"',
            "",
            "",
        ]
    if up is not None:
        out += [
            "def upstream_version():",
            f'    return "v1" if UPSTREAM_LIMIT == {_limit(up, 1)} else "v2"',
            "",
            "",
        ]
    for n in range(FUNCS_PER_MODULE):
        changed = n % 3 == 0 or n % 4 == 1
        bump = 2 if v == 2 and changed else 1
        out.append(f"def f_{i}_{n}(x):")
        if n % 4 == 1:  # a comprehension: nested code object
            out += [
                f"    parts = [x * k + {n} for k in range(3)]",
                f"    return sum(parts) + LIMIT % {n + 2} + {bump}",
            ]
        else:
            out += [f"    y = x * {n + 1} + SCALE", f"    return y - {i} + {bump}"]
        out += ["", ""]
    if i in LRU_MODULES:
        extra = " + 1" if v == 2 else ""
        out += [
            "@functools.lru_cache(maxsize=256)",
            "def table(n):",
            f"    return tuple(range(n % 7{extra}))",
            "",
            "",
        ]
    if v == 2 and i in NEW_FUNCTION:
        out += [f"def audit_{i}(x):", "    return {'x': x, 'limit': LIMIT}", "", ""]
    pipeline = ", ".join(f"f_{i}_{n}" for n in range(FUNCS_PER_MODULE))
    out += [f"PIPELINE = ({pipeline})", "", ""]
    out += [
        "def work(x):",
        "    total = 0",
        "    for fn in PIPELINE:",
        "        total += fn(x)",
    ]
    if i in LRU_MODULES:
        out.append("    total += len(table(x))")
    out += [f"    total += {_mod(j)}.f_{j}_0(x)" for j in _deps(i)]
    out += ["    _CALLS[x & 7] = total", "    return total", "", ""]
    a, b = f"Model{i:02d}A", f"Model{i:02d}B"
    total_bump = 2 if v == 2 else 1
    out += [
        f"class {a}:",
        f'    """A plain model of module {i:02d}."""',
        "",
        "    def __init__(self, n):",
        "        self.n = n",
        "        self.values = [n, n + 1, n + 2]",
        "",
        "    def kind(self):",
        f'        return "{tag}"',
        "",
        "    def total(self):",
        f"        return sum(v * SCALE for v in self.values) + {total_bump}",
        "",
        "    def scaled(self, k=2):",
        "        return self.n * k",
        "",
        "    def __repr__(self):",
        f'        return f"{a}({{self.n}})"',
    ]
    if v == 2 and i in STRUCTURAL:
        out += [
            "",
            "    def describe(self):",
            '        return f"{self!r} total={self.total()}"',
        ]
    out += [
        "",
        "",
        f"class {b}({a}):",
        "    def __init__(self, n):",
        "        super().__init__(n)",
        "        self.extra = n * 2",
        "",
        "    def total(self):",
        "        return super().total() + self.extra",
        "",
        "",
    ]
    if i in COUNTER_MODULES:
        if v == 1:
            init, hit = "self.count = 0", "self.count += 1"
        else:
            init, hit = 'self.hits = {"total": 0}', 'self.hits["total"] += 1'
        out += [
            "class Counter:",
            '    """Stateful: v1 keeps `count`, v2 keeps `hits["total"]`."""',
            "",
            "    def __init__(self):",
            f"        {init}",
            "",
            "    def hit(self):",
            f"        {hit}",
            f'        return "{tag}"',
            "",
        ]
        if v == 1:
            out += [
                "    def code_change(self, old_vsn, state, extra):",
                '        if "hits" in state:  # loaded over v2 as a new release',
                '            return {"count": state["hits"]["total"]}',
                "        return dict(state)",
            ]
        else:
            out += [
                "    def code_change(self, old_vsn, state, extra):",
                "        if isinstance(old_vsn, tuple):  # ('down', vsn): rollback to v1",
                '            return {"count": state["hits"]["total"]}',
                '        if "count" in state:',
                '            return {"hits": {"total": state["count"]}}',
                "        return dict(state)",
            ]
        out += ["", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def sources(pkg: str, v: int, build: int | str | None = None) -> dict[str, str]:
    """``{module name: source}`` of the whole package at version ``v`` (``__init__`` excluded).

    ``build`` appends a comment: same code, new bytes, so nothing the loader
    cached for an earlier build (trees, code, import scans) is reused.
    :class:`Builds` makes it unique per run too: the host code cache
    (:mod:`node_agent._codecache`) outlives a run, and a build it has seen
    would not be cold.
    """
    tail = "" if build is None else f"# build {build}\n"
    return {f"{pkg}.{_mod(i)}": module_source(pkg, i, v) + tail for i in range(N_MODULES)}


class Builds:
    """Fresh releases of the loader's package: each one a distinct build.

    A real node prepares each release once, so prepare is measured *cold*;
    re-preparing the same release (a retry) is the warm case.
    """

    def __init__(self) -> None:
        self.count = 0
        self.run = os.urandom(6).hex()  # never a build an earlier run cached on this host

    def fresh(self, v: int) -> Release:
        self.count += 1
        return Release.from_sources(
            "hfbench", f"{v}.0.{self.count}", sources(PKG, v, build=f"{self.count} {self.run}")
        )


def count_defs(pkg: str, v: int) -> tuple[int, int]:
    """(functions incl. methods, classes) defined by the generated sources."""
    import ast

    funcs = classes = 0
    for src in sources(pkg, v).values():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef):
                funcs += 1
            elif isinstance(node, ast.ClassDef):
                classes += 1
    return funcs, classes


class App:
    """One booted copy of the generated package."""

    def __init__(self, root: Path, pkg: str) -> None:
        self.root = root
        self.pkg = pkg
        self.mods: list[types.ModuleType] = []
        self.instances: list[list[Any]] = []
        self.counters: list[Any] = []
        self._mtime = 1_600_000_000  # explicit, always increasing source mtimes
        self._files: dict[int, list[tuple[bytes, bytes]]] = {}  # v -> [(source, pyc)]

    def path(self, i: int) -> Path:
        return self.root / self.pkg / f"{_mod(i)}.py"

    def _compiled(self, v: int) -> list[tuple[bytes, bytes]]:
        """Source and *unchecked-hash* pyc bytes of every module at version ``v``.

        An unchecked pyc is loaded without looking at the source's mtime or
        size, so a reload cannot pick a stale one by accident (v1 and v2 have
        the same length and may be written within the same second); the
        compile itself stays off the clock, as the loader's does in prepare.
        """
        if v not in self._files:
            out = []
            for i in range(N_MODULES):
                source = module_source(self.pkg, i, v).encode("utf-8")
                code = compile(source, str(self.path(i)), "exec", dont_inherit=True)
                pyc = (
                    importlib.util.MAGIC_NUMBER
                    + (0b01).to_bytes(4, "little")  # hash-based, check_source off
                    + importlib.util.source_hash(source)
                    + marshal.dumps(code)
                )
                out.append((source, pyc))
            self._files[v] = out
        return self._files[v]

    def write(self, v: int, *, pyc: bool) -> None:
        """Write version ``v`` to disk (with its pycs when ``pyc``), mtimes bumped."""
        (self.root / self.pkg).mkdir(parents=True, exist_ok=True)
        init = self.root / self.pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated benchmark package."""\n', encoding="utf-8")
        self._mtime += 10
        for i, (source, code) in enumerate(self._compiled(v)):
            path = self.path(i)
            path.write_bytes(source)
            os.utime(path, (self._mtime, self._mtime))
            cached = Path(importlib.util.cache_from_source(str(path)))
            if pyc:
                cached.parent.mkdir(exist_ok=True)
                cached.write_bytes(code)
            else:
                cached.unlink(missing_ok=True)
        importlib.invalidate_caches()

    def boot(self) -> None:
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        self.mods = [importlib.import_module(f"{self.pkg}.{_mod(i)}") for i in range(N_MODULES)]
        self.instances = []
        for m in self.mods:
            a = getattr(m, f"Model{m.__name__[-2:]}A")
            b = getattr(m, f"Model{m.__name__[-2:]}B")
            row = [(a if k % 2 == 0 else b)(k) for k in range(INSTANCES_PER_CLASS * 2)]
            self.instances.append(row)

    def make_counters(self) -> None:
        for i in COUNTER_MODULES:
            for _ in range(COUNTERS_PER_MODULE):
                self.counters.append(node_agent.register(self.mods[i].Counter()))

    def versions(self) -> set[str]:
        """Every version the main thread can observe, checked exhaustively."""
        seen: set[str] = set()
        for i, m in enumerate(self.mods):
            seen.add(m.stamp())
            seen.update(x.kind() for x in self.instances[i])
            if i in STRUCTURAL:
                seen.update("v2" if hasattr(x, "describe") else "v1" for x in self.instances[i])
            if i in CONST_CHANGED:
                seen.add(m.limit_version())
            if _upstream(i) is not None:
                seen.add(m.upstream_version())
        for c in self.counters:
            seen.add("v2" if "hits" in vars(c) else "v1")
        return seen

    def unload(self) -> None:
        for name in [n for n in sys.modules if n == self.pkg or n.startswith(self.pkg + ".")]:
            del sys.modules[name]
        with contextlib.suppress(ValueError):
            sys.path.remove(str(self.root))


def _probes(i: int) -> tuple[str, ...]:
    names = ["stamp"]
    if i in CONST_CHANGED:
        names.append("limit_version")
    if _upstream(i) is not None:
        names.append("upstream_version")
    return tuple(names)


Request = Callable[[int], tuple[str, ...]]


def make_request(app: App, *, live: bool) -> Request:
    """One unit of guarded work: call into 3 modules, return every version seen.

    ``live``: use the long-lived instances and registered counters (the
    loader keeps them current); otherwise build fresh instances from the
    module's current class, which is the best ``importlib.reload`` can offer.
    """
    mods = app.mods
    instances = app.instances
    counters = app.counters
    probes = [_probes(i) for i in range(N_MODULES)]
    class_a = [f"Model{i:02d}A" for i in range(N_MODULES)]
    n = N_MODULES

    def request(seq: int) -> tuple[str, ...]:
        i = seq % n
        seen: list[str] = []
        for k in (i, (i + 7) % n, (i + 13) % n):
            m = mods[k]
            for probe in probes[k]:
                seen.append(getattr(m, probe)())
            m.work(seq & 1023)
            if live:
                row = instances[k]
                obj = row[seq % len(row)]
            else:
                obj = getattr(m, class_a[k])(seq)
            seen.append(obj.kind())
            obj.total()
            if k in STRUCTURAL:
                seen.append("v2" if hasattr(obj, "describe") else "v1")
        if live and counters:
            seen.append(counters[seq % len(counters)].hit())
        return tuple(seen)

    return request


# --------------------------------------------------------------- request threads
@dataclass
class ThreadLog:
    """What one request thread saw; arrays are in time order (perf_counter_ns).

    A request starts when it is due (the previous one's end plus the think
    time), so a thread kept off the GIL, or parked at a closed gate, before
    the request body runs is charged for it.
    """

    starts: array[int] = field(default_factory=lambda: array("q"))
    ends: array[int] = field(default_factory=lambda: array("q"))
    mixed_at: array[int] = field(default_factory=lambda: array("q"))  # start of mixed requests
    errors: int = 0
    examples: list[str] = field(default_factory=list)


class RequestThreads:
    """``n`` threads looping on ``request``, inside ``guard()`` if one is given."""

    def __init__(
        self,
        n: int,
        request: Request,
        guard: Callable[[], contextlib.AbstractContextManager[Any]] | None,
        think_s: float = 0.0,
    ) -> None:
        self.logs = [ThreadLog() for _ in range(n)]
        self._stop = threading.Event()
        self._go = threading.Event()  # cleared by pause()
        self._go.set()
        self._parked = 0
        self._parked_changed = threading.Condition()
        self._threads = [
            threading.Thread(
                target=self._loop,
                args=(log, request, guard, think_s, k * 7919),
                name=f"request-{k}",
                daemon=True,
            )
            for k, log in enumerate(self.logs)
        ]

    def __enter__(self) -> RequestThreads:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._go.set()
        for t in self._threads:
            t.join()

    def pause(self) -> None:
        """Park every thread between two requests (frees the GIL for unmeasured chores)."""
        self._go.clear()
        with self._parked_changed:
            self._parked_changed.wait_for(lambda: self._parked == len(self._threads))

    def resume(self) -> None:
        self._go.set()

    def _park(self) -> None:
        with self._parked_changed:
            self._parked += 1
            self._parked_changed.notify_all()
        self._go.wait()
        with self._parked_changed:
            self._parked -= 1

    def _loop(
        self,
        log: ThreadLog,
        request: Request,
        guard: Callable[[], contextlib.AbstractContextManager[Any]] | None,
        think_s: float,
        seq: int,
    ) -> None:
        clock = time.perf_counter_ns
        stop, go = self._stop.is_set, self._go.is_set
        add_start, add_end, add_mixed = log.starts.append, log.ends.append, log.mixed_at.append
        think_ns = int(think_s * 1e9)
        ready = clock()
        while not stop():
            if not go():
                self._park()
                ready = clock()
                continue
            # A request is due when the previous one ended (plus the think time),
            # not when this thread next gets the GIL: time spent waiting for the
            # interpreter before the request body starts is latency too.
            t0 = ready
            seen: tuple[str, ...] | None
            try:
                if guard is None:
                    seen = request(seq)
                else:
                    with guard():
                        seen = request(seq)
            except Exception as exc:
                seen = None
                log.errors += 1
                if len(log.examples) < 5:
                    log.examples.append(f"{type(exc).__name__}: {exc}")
            t1 = clock()
            add_start(t0)
            add_end(t1)
            if seen is None or len(set(seen)) > 1:
                add_mixed(t0)
                if seen is not None and len(log.examples) < 5:
                    log.examples.append(f"mixed {seen}")
            seq += 1
            ready = t1 + think_ns
            if think_s:
                time.sleep(think_s)

    # ------------------------------------------------------------ analysis
    @property
    def total(self) -> int:
        return sum(len(log.starts) for log in self.logs)

    @property
    def mixed(self) -> int:
        return sum(len(log.mixed_at) for log in self.logs)

    @property
    def errors(self) -> int:
        return sum(log.errors for log in self.logs)

    def examples(self) -> list[str]:
        return [e for log in self.logs for e in log.examples][:5]

    def overlapping(self, lo: int, hi: int) -> list[int]:
        """Latencies (ns) of the requests that were running at some point in [lo, hi]."""
        out: list[int] = []
        for log in self.logs:
            a = bisect.bisect_left(log.ends, lo)  # first request ending at/after lo
            b = bisect.bisect_right(log.starts, hi)  # first request starting after hi
            out.extend(log.ends[j] - log.starts[j] for j in range(a, b))
        return out

    def inside(self, lo: int, hi: int) -> list[int]:
        """Latencies (ns) of the requests that ran entirely within [lo, hi]."""
        out: list[int] = []
        for log in self.logs:
            a = bisect.bisect_left(log.starts, lo)
            b = bisect.bisect_right(log.ends, hi)
            out.extend(log.ends[j] - log.starts[j] for j in range(a, b))
        return out

    def mixed_between(self, lo: int, hi: int) -> int:
        return sum(
            bisect.bisect_right(log.mixed_at, hi) - bisect.bisect_left(log.mixed_at, lo)
            for log in self.logs
        )


# ------------------------------------------------------------ a loaded process
_SKIP_TOP = frozenset(
    {
        "antigravity",  # opens a web browser
        "this",  # prints the Zen
        "tkinter",  # needs a display
        "turtle",
        "turtledemo",
        "idlelib",
        "test",  # the regression test suite
        "lib2to3",  # may write grammar pickles next to the stdlib
        "ensurepip",
        "distutils",  # shimmed by setuptools; deprecated
        "readline",  # touches the terminal
        "__hello__",
        "__phello__",
        "xxlimited",
        "xxlimited_35",
    }
)
_SKIP_PARTS = frozenset({"__main__", "test", "tests", "idle_test"})


def import_stdlib() -> tuple[int, int]:
    """Import (almost) every standard library module and submodule; return (ok, failed)."""
    ok = failed = 0
    queue = sorted(n for n in sys.stdlib_module_names if n not in _SKIP_TOP)
    seen: set[str] = set()
    sink = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("ignore")
        while queue:
            name = queue.pop()
            if name in seen or _SKIP_PARTS.intersection(name.split(".")):
                continue
            seen.add(name)
            try:
                module = importlib.import_module(name)
            except (Exception, SystemExit):
                failed += 1
                continue
            ok += 1
            path = getattr(module, "__path__", None)
            if path:
                queue.extend(info.name for info in pkgutil.iter_modules(path, name + "."))
    return ok, failed


class GcLog:
    """Every cyclic-GC collection of the process: (start ns, end ns, generation)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, int]] = []
        self._started: dict[int, int] = {}

    def __enter__(self) -> GcLog:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        now, me = time.perf_counter_ns(), threading.get_ident()
        if phase == "start":
            self._started[me] = now
        else:
            t0 = self._started.pop(me, None)
            if t0 is not None:
                self.events.append((t0, now, info["generation"]))

    def inside(self, w: Window) -> tuple[int, int]:
        """(ns spent collecting within ``w``, highest generation collected, -1 if none)."""
        spent, gen = 0, -1
        for t0, t1, g in self.events:
            if t1 >= w.lo and t0 <= w.hi:
                spent += min(t1, w.hi) - max(t0, w.lo)
                gen = max(gen, g)
        return spent, gen


# --------------------------------------------------------------------- phases
@dataclass
class Window:
    lo: int  # perf_counter_ns
    hi: int

    @property
    def seconds(self) -> float:
        return (self.hi - self.lo) / 1e9


@dataclass
class LoaderCycle:
    prepare: Window
    finish: Window
    rollback: Window
    prepare_s: float  # Prepared.prepare_s
    finish_swap_s: float  # FinishReport.pause_s: the swap itself, inside the hold
    finish_hold_s: float  # barrier stats: gate closed -> reopened (drain + swap)
    rollback_swap_s: float
    rollback_hold_s: float


def _ns() -> int:
    return time.perf_counter_ns()


def _idle(seconds: float) -> Window:
    lo = _ns()
    time.sleep(seconds)
    return Window(lo, _ns())


def _expect(app: App, version: str, when: str) -> None:
    seen = app.versions()
    if seen != {version}:
        raise AssertionError(f"{when}: the main thread sees versions {sorted(seen)}")


def loader_cycle(
    app: App, loader: Loader, v2: Release, idle_s: float, quiet: list[Window], verify: bool
) -> LoaderCycle:
    """prepare v2 -> finish -> rollback, with quiet gaps in between."""
    quiet.append(_idle(idle_s))
    p0 = _ns()
    prepared = loader.prepare(v2)
    p1 = _ns()
    quiet.append(_idle(idle_s))
    f0 = _ns()
    report = loader.finish(prepared)
    f1 = _ns()
    finish_hold = loader.barrier.stats().last_hold_s
    if verify:
        _expect(app, "v2", "after finish")
    quiet.append(_idle(idle_s))
    r0 = _ns()
    back = loader.rollback()
    r1 = _ns()
    rollback_hold = loader.barrier.stats().last_hold_s
    if verify:
        _expect(app, "v1", "after rollback")
    if not (report.drained and back.drained):
        raise AssertionError("a hold timed out before the guarded work in flight drained")
    return LoaderCycle(
        prepare=Window(p0, p1),
        finish=Window(f0, f1),
        rollback=Window(r0, r1),
        prepare_s=prepared.prepare_s,
        finish_swap_s=report.pause_s,
        finish_hold_s=finish_hold,
        rollback_swap_s=back.pause_s,
        rollback_hold_s=rollback_hold,
    )


def run_loader_phase(
    app: App,
    loader: Loader,
    builds: Builds,
    cycles: int,
    threads: int,
    think_s: float,
    idle_s: float,
    progress: Callable[[str], None],
) -> tuple[list[LoaderCycle], RequestThreads, list[Window]]:
    """Cycles of prepare v2 -> finish -> rollback under guarded request threads."""
    out: list[LoaderCycle] = []
    quiet: list[Window] = []
    with RequestThreads(threads, make_request(app, live=True), loader.guard, think_s) as rt:
        _idle(max(0.05, idle_s * 5))  # warm-up, not measured
        for c in range(cycles):
            verify = c in (0, cycles - 1) or c % 10 == 0
            release = builds.fresh(2)
            out.append(loader_cycle(app, loader, release, idle_s, quiet, verify))
            if (c + 1) % max(1, cycles // 10) == 0:
                last = out[-1]
                progress(
                    f"  loader cycle {c + 1}/{cycles}: prepare {last.prepare.seconds * 1e3:.0f} ms,"
                    f" finish hold {last.finish_hold_s * 1e3:.2f} ms"
                )
        quiet.append(_idle(idle_s))
    return out, rt, quiet


@dataclass
class ReloadCycle:
    up: Window  # first reload start -> last reload end, v1 -> v2, under the threads
    down: Window  # v2 -> v1, threads parked (not a window anyone can see)


def reload_sweep(
    app: App, v: int, idle_s: float, quiet: list[Window], *, write: bool = True
) -> Window:
    """Write version ``v`` (sources + pycs, off the clock), then reload module by module."""
    if write:
        app.write(v, pyc=True)
    quiet.append(_idle(idle_s))
    lo = _ns()
    for m in app.mods:
        importlib.reload(m)
    hi = _ns()
    got = {m.stamp() for m in app.mods}
    if got != {f"v{v}"}:
        raise AssertionError(f"reload to v{v} did not load the new code: {sorted(got)}")
    return Window(lo, hi)


def run_reload_phase(
    app: App,
    cycles: int,
    threads: int,
    think_s: float,
    idle_s: float,
    progress: Callable[[str], None],
) -> tuple[list[ReloadCycle], RequestThreads, list[Window]]:
    """The baseline: write the new version, then ``importlib.reload`` module by module."""
    out: list[ReloadCycle] = []
    quiet: list[Window] = []
    with RequestThreads(threads, make_request(app, live=False), None, think_s) as rt:
        _idle(max(0.05, idle_s * 5))
        for c in range(cycles):
            rt.pause()  # writing files is I/O the threads would slow down: off the clock
            app.write(2, pyc=True)
            rt.resume()
            up = reload_sweep(app, 2, idle_s, quiet, write=False)
            rt.pause()  # back to v1 with the threads parked: nobody sees it
            down = reload_sweep(app, 1, 0.0, [])
            rt.resume()
            out.append(ReloadCycle(up, down))
            if (c + 1) % max(1, cycles // 10) == 0:
                progress(
                    f"  reload cycle {c + 1}/{cycles}: window {out[-1].up.seconds * 1e3:.2f} ms"
                )
        quiet.append(_idle(idle_s))
    return out, rt, quiet


def unloaded_reload(twin: App, n: int) -> list[ReloadCycle]:
    """Reload sweeps with no request threads: the intrinsic cost of ``importlib.reload``."""
    return [
        ReloadCycle(reload_sweep(twin, 2, 0.0, []), reload_sweep(twin, 1, 0.0, []))
        for _ in range(n)
    ]


def unloaded_loader(
    app: App, loader: Loader, builds: Builds, n: int
) -> tuple[list[LoaderCycle], list[float]]:
    """Loader cycles with no request threads, plus a warm prepare (same release again)."""
    lcycles: list[LoaderCycle] = []
    warm: list[float] = []
    for _ in range(n):
        release = builds.fresh(2)
        lcycles.append(loader_cycle(app, loader, release, 0.0, [], verify=False))
        t0 = _ns()
        again = loader.prepare(release)
        warm.append((_ns() - t0) / 1e9)
        loader.abort(again)
    return lcycles, warm


def _sibling_prepare(loader: Loader, release: Release) -> float:
    """A sibling worker of the host prepares ``release`` first (a forked child, which
    fills the host code cache and exits); the seconds its prepare took."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sibling: prepare, report, leave without running any cleanup
        code = 1
        try:
            os.close(r)
            t0 = time.perf_counter()
            loader.abort(loader.prepare(release))
            os.write(w, f"{time.perf_counter() - t0:.9f}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not got:
        raise RuntimeError(f"the sibling's prepare failed (status {status})")
    return float(got)


def _timed_prepare(
    loader: Loader, release: Release, seconds: list[float], profiles: list[dict[str, float]]
) -> Prepared:
    """One timed prepare of ``release``, its time and profile kept.

    What the previous round left running in the background (taking the pages
    of its staging fork back) is done first, as it is long before the next
    rollout.
    """
    _cow.settled()
    t0 = _ns()
    prepared = loader.prepare(release)
    seconds.append((_ns() - t0) / 1e9)
    profiles.append(dict(prepared.profile))
    return prepared


def prepare_rounds(
    app: App, twin: App, loader: Loader, builds: Builds, rounds: int
) -> dict[str, Any]:
    """Issue 18's ratios, the sides interleaved round by round, no request threads.

    Each round: one ``importlib.reload`` sweep of the twin (v1 -> v2, pycs
    ready) and back; a *first worker* prepare of a new build (no process of
    the host has seen it: host code cache cold) -> finish -> rollback; then a
    *second worker* prepare: a forked sibling prepares another new build first
    (filling the host cache), then this process prepares it.  Each prepare's
    own profile (:attr:`Prepared.profile`) is kept.  Then the product's path
    for a pushed release: this process *unpacks* another new build (what
    ``coordctl release push`` has the nodes do, off the rollout's clock) and
    then prepares it.  No timed prepare
    pays for an artefact of this loop: the previous staging fork's pages are
    taken back before it (rollouts are seconds apart, not back to back), and
    so are those the simulated sibling's fork made copy-on-write.
    """
    reload_s: list[float] = []
    first: list[float] = []
    second: list[float] = []
    sibling: list[float] = []
    pause: list[float] = []
    prof_first: list[dict[str, float]] = []
    prof_second: list[dict[str, float]] = []
    unpack_s: list[float] = []
    unpacked: list[float] = []
    prof_unpacked: list[dict[str, float]] = []
    loads: list[float] = []
    for _ in range(rounds):
        loads.append(_common.load_average())
        up = reload_sweep(twin, 2, 0.0, [])
        reload_sweep(twin, 1, 0.0, [])
        reload_s.append(up.seconds)
        prepared = _timed_prepare(loader, builds.fresh(2), first, prof_first)
        loader.finish(prepared)
        pause.append(loader.barrier.stats().last_hold_s)
        loader.rollback()
        rel = builds.fresh(2)
        sibling.append(_sibling_prepare(loader, rel))
        # The simulated sibling is a fork of this process: its fork left every page
        # here copy-on-write, which a real sibling (its own process) does not do to
        # this worker.  Taken back, as the loader does after its own staging forks.
        _cow.take_back()
        loader.abort(_timed_prepare(loader, rel, second, prof_second))
        # the product's path for a pushed release: the nodes unpacked it at push time
        # (`coordctl release push`), so the rollout's prepare of the worker that
        # unpacked it (a single-worker node) finds its sources' work done
        rel = builds.fresh(2)
        unpacked_by = loader.unpack(rel)
        if not unpacked_by.done:
            raise RuntimeError(f"unpack: {unpacked_by.detail} {unpacked_by.errors}")
        unpack_s.append(unpacked_by.seconds)
        loader.abort(_timed_prepare(loader, rel, unpacked, prof_unpacked))

    def prof(rows: list[dict[str, float]]) -> dict[str, float]:
        keys = sorted({k for r in rows for k in r})
        return {
            k: _common.percentile([r.get(k, 0.0) for r in rows], 50)
            * (1.0 if k.startswith("cache_") and not k.endswith("_s") else 1e3)
            for k in keys
        }

    r50 = _common.percentile(reload_s, 50)
    p50 = _common.percentile(pause, 50)
    out = {
        "rounds": rounds,
        "load_per_round": loads,
        "reload_ms": _ms(reload_s),
        "prepare_first_ms": _ms(first),
        "prepare_sibling_first_ms": _ms(sibling),
        "prepare_second_ms": _ms(second),
        "finish_hold_ms": _ms(pause),
        "profile_first_ms": prof(prof_first),
        "profile_second_ms": prof(prof_second),
        "unpack_ms": _ms(unpack_s),
        "prepare_unpacked_ms": _ms(unpacked),
        "profile_unpacked_ms": prof(prof_unpacked),
        "ratio_unpacked": _common.percentile(unpacked, 50) / r50 if r50 else None,
        "ratio_first": _common.percentile(first, 50) / r50 if r50 else None,
        "ratio_second": _common.percentile(second, 50) / r50 if r50 else None,
        "pause_ratio": r50 / p50 if p50 else None,
    }
    return out


def summarize_unloaded(
    lcycles: list[LoaderCycle], warm: list[float], rcycles: list[ReloadCycle]
) -> dict[str, Any]:
    hold = [c.finish_hold_s for c in lcycles]
    up = [c.up.seconds for c in rcycles]
    h50 = _common.percentile(hold, 50)
    return {
        "cycles": len(lcycles),
        "prepare_wall_ms": _ms([c.prepare.seconds for c in lcycles]),
        "prepare_warm_ms": _ms(warm),
        "finish_hold_ms": _ms(hold),
        "finish_swap_ms": _ms([c.finish_swap_s for c in lcycles]),
        "rollback_hold_ms": _ms([c.rollback_hold_s for c in lcycles]),
        "reload_window_up_ms": _ms(up),
        "reload_window_down_ms": _ms([c.down.seconds for c in rcycles]),
        "ratio_p50": _common.percentile(up, 50) / h50 if h50 else None,
    }


def timed_full_gc() -> float:
    """Seconds one full collection takes now: the stop-the-world pause the heap costs."""
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0


def stale_instances_after_reload(app: App) -> tuple[int, int]:
    """After a reload to v2, how many of the live instances still run v1 methods."""
    reload_sweep(app, 2, 0.0, [])
    stale = sum(1 for row in app.instances for x in row if x.kind() != "v2")
    total = sum(len(row) for row in app.instances)
    reload_sweep(app, 1, 0.0, [])
    return stale, total


def loader_caches() -> dict[str, dict[str, int]]:
    """The memoizing caches of hotfleet and node_agent, with their fill."""
    out: dict[str, dict[str, int]] = {}
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] not in ("hotfleet", "node_agent"):
            continue
        for attr, obj in list(vars(module).items()):
            info = getattr(obj, "cache_info", None)
            if callable(info) and getattr(obj, "__module__", None) == name:
                ci = info()
                out[f"{name}.{attr}"] = {"currsize": ci.currsize, "maxsize": ci.maxsize or 0}
    return out


def measure_memory(loader: Loader, builds: Builds, retained_rounds: int = 4) -> dict[str, Any]:
    """tracemalloc, in KiB: what the loader holds for its backup, and what it keeps for good.

    tracemalloc only sees allocations made while it traces, so a first round
    (a fresh v2 in, made permanent) makes the *current* code traced; the
    following finishes push traced code into the backup, and what
    ``make_permanent`` or ``rollback`` frees afterwards is what the backup
    held.  Then a few more fresh releases are loaded and made permanent: what
    stays allocated after that, per release, is kept by the loader for good
    (caches), not by any backup.
    """

    def traced() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        loader.finish(loader.prepare(builds.fresh(2)))
        loader.make_permanent()  # v2 current and traced, no backup
        m0 = traced()
        tracemalloc.reset_peak()
        prepared = loader.prepare(builds.fresh(1))
        prepare_peak = tracemalloc.get_traced_memory()[1] - m0
        m_prepared = traced()
        loader.finish(prepared)
        del prepared
        m1 = traced()  # v1 current, v2 held as the backup
        loader.make_permanent()
        m2 = traced()
        loader.finish(loader.prepare(builds.fresh(2)))
        m3 = traced()  # v2 current, v1 held as the backup
        loader.rollback()
        m4 = traced()  # v1 current again
        loader.make_permanent()
        m5 = traced()
        for k in range(retained_rounds):
            loader.finish(loader.prepare(builds.fresh(2 if k % 2 == 0 else 1)))
            loader.make_permanent()
        m6 = traced()
    finally:
        tracemalloc.stop()
    kib = 1024.0
    return {
        "prepare_peak_kib": prepare_peak / kib,
        "prepared_held_kib": (m_prepared - m0) / kib,
        "finish_growth_kib": (m1 - m0) / kib,
        "backup_released_by_make_permanent_kib": (m1 - m2) / kib,
        "backup_released_by_rollback_kib": (m3 - m4) / kib,
        "still_held_after_rollback_kib": (m4 - m5) / kib,
        "retained_per_release_kib": (m6 - m5) / retained_rounds / kib,
        "caches": loader_caches(),
    }


# ------------------------------------------------------------------- reporting
def _ms(values: Sequence[float]) -> dict[str, float]:
    """Summary of a sample in seconds, converted to ms."""
    return {k: (v * 1e3 if k != "n" else v) for k, v in _common.summary(values).items()}


def _ns_ms(values: Sequence[int]) -> dict[str, float]:
    return _ms([v / 1e9 for v in values])


def _worst(rt: RequestThreads, w: Window) -> int:
    return max(rt.overlapping(w.lo, w.hi), default=0)


def _controls(rt: RequestThreads, quiet: list[Window], length_ns: int) -> list[int]:
    """Worst request overlapping a window of ``length_ns`` centred in each quiet gap."""
    out = []
    for w in quiet:
        mid = (w.lo + w.hi) // 2
        out.append(_worst(rt, Window(mid - length_ns // 2, mid + length_ns // 2)))
    return out


def analyse(
    cycles: list[LoaderCycle],
    rt: RequestThreads,
    quiet: list[Window],
    rcycles: list[ReloadCycle],
    rrt: RequestThreads,
    rquiet: list[Window],
    gclog: GcLog,
) -> dict[str, Any]:
    finish_wall = [c.finish.hi - c.finish.lo for c in cycles]
    median_finish_ns = int(_common.percentile(finish_wall, 50))
    up = [c.up.seconds for c in rcycles]
    finish_hold = [c.finish_hold_s for c in cycles]
    in_prepare = [x for c in cycles for x in rt.inside(c.prepare.lo, c.prepare.hi)]
    in_quiet = [x for w in quiet for x in rt.inside(w.lo, w.hi)]
    prepare_time = sum(c.prepare.seconds for c in cycles)
    quiet_time = sum(w.seconds for w in quiet)
    gc_in_finish = [gclog.inside(c.finish) for c in cycles]
    gc_in_prepare = [gclog.inside(c.prepare)[0] for c in cycles]
    gc_in_rollback = [gclog.inside(c.rollback) for c in cycles]
    slow_rollbacks = [
        g
        for c, g in zip(cycles, gc_in_rollback, strict=True)
        if c.rollback_hold_s > TARGET_FINISH_P99_S
    ]
    slow = [
        (c, g)
        for c, g in zip(cycles, gc_in_finish, strict=True)
        if c.finish_hold_s > TARGET_FINISH_P99_S
    ]
    result: dict[str, Any] = {
        "loader": {
            "cycles": len(cycles),
            "requests": rt.total,
            "mixed_version_requests": rt.mixed,
            "request_errors": rt.errors,
            "examples": rt.examples(),
            "prepare_wall_ms": _ms([c.prepare.seconds for c in cycles]),
            "prepare_s_reported_ms": _ms([c.prepare_s for c in cycles]),
            "finish_hold_ms": _ms(finish_hold),
            "finish_swap_ms": _ms([c.finish_swap_s for c in cycles]),
            "finish_wall_ms": _ns_ms(finish_wall),
            "finish_worst_request_ms": _ns_ms([_worst(rt, c.finish) for c in cycles]),
            "finish_requests_overlapping": _common.summary(
                [float(len(rt.overlapping(c.finish.lo, c.finish.hi))) for c in cycles]
            ),
            "control_worst_request_ms": _ns_ms(_controls(rt, quiet, median_finish_ns)),
            "rollback_hold_ms": _ms([c.rollback_hold_s for c in cycles]),
            "rollback_swap_ms": _ms([c.rollback_swap_s for c in cycles]),
            "rollback_wall_ms": _ms([c.rollback.seconds for c in cycles]),
            "rollback_worst_request_ms": _ns_ms([_worst(rt, c.rollback) for c in cycles]),
            "prepare_worst_request_ms": _ns_ms([_worst(rt, c.prepare) for c in cycles]),
            "gc_collections": len(gclog.events),
            "gc_full_collections_ms": _ns_ms([t1 - t0 for t0, t1, g in gclog.events if g == 2]),
            "finish_gc_ms": _ns_ms([spent for spent, _ in gc_in_finish]),
            "prepare_gc_ms": _ns_ms(gc_in_prepare),
            "rollback_gc_ms": _ns_ms([spent for spent, _ in gc_in_rollback]),
            "rollbacks_over_target": len(slow_rollbacks),
            "rollbacks_over_target_with_gc": sum(1 for spent, _ in slow_rollbacks if spent),
            "finishes_with_gc": sum(1 for spent, _ in gc_in_finish if spent),
            "finishes_with_full_gc": sum(1 for _, gen in gc_in_finish if gen == 2),
            "finishes_over_target": len(slow),
            "finishes_over_target_with_gc": sum(1 for _, (spent, _g) in slow if spent),
            "prepare_request_ms": _ns_ms(in_prepare),
            "quiet_request_ms": _ns_ms(in_quiet),
            "requests_per_s_during_prepare": len(in_prepare) / prepare_time if prepare_time else 0,
            "requests_per_s_quiet": len(in_quiet) / quiet_time if quiet_time else 0,
        },
        "reload": {
            "cycles": len(rcycles),
            "requests": rrt.total,
            "mixed_version_requests": rrt.mixed,
            "mixed_in_windows": sum(rrt.mixed_between(c.up.lo, c.up.hi) for c in rcycles),
            "requests_overlapping_windows": sum(
                len(rrt.overlapping(c.up.lo, c.up.hi)) for c in rcycles
            ),
            "request_errors": rrt.errors,
            "examples": rrt.examples(),
            "window_up_ms": _ms(up),
            "window_down_parked_ms": _ms([c.down.seconds for c in rcycles]),
            "quiet_request_ms": _ns_ms([x for w in rquiet for x in rrt.inside(w.lo, w.hi)]),
        },
        "per_cycle": {
            "prepare_ms": [round(c.prepare.seconds * 1e3, 3) for c in cycles],
            "finish_hold_ms": [round(c.finish_hold_s * 1e3, 4) for c in cycles],
            "finish_swap_ms": [round(c.finish_swap_s * 1e3, 4) for c in cycles],
            "finish_gc_ms": [round(spent / 1e6, 4) for spent, _ in gc_in_finish],
            "finish_gc_generation": [gen for _, gen in gc_in_finish],
            "rollback_hold_ms": [round(c.rollback_hold_s * 1e3, 4) for c in cycles],
            "rollback_swap_ms": [round(c.rollback_swap_s * 1e3, 4) for c in cycles],
            "rollback_gc_ms": [round(spent / 1e6, 4) for spent, _ in gc_in_rollback],
            "reload_window_ms": [round(c.up.seconds * 1e3, 3) for c in rcycles],
        },
    }
    hold_p50 = _common.percentile(finish_hold, 50)
    hold_p99 = _common.percentile(finish_hold, 99)
    result["ratio"] = {
        "p50": _common.percentile(up, 50) / hold_p50 if hold_p50 else None,
        "p99": _common.percentile(up, 99) / hold_p99 if hold_p99 else None,
    }
    return result


def _f(d: dict[str, float], key: str, digits: int = 2) -> str:
    v = d.get(key)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}x"


def print_prepare_cost(res: dict[str, Any]) -> None:
    """Issue 18's ratios and where prepare time goes (p50 of each step, ms)."""
    pc = res["prepare_cost"]

    def pm(d: dict[str, float]) -> str:
        return f"{d['p50']:.2f} / {d['p99']:.2f}"

    print(
        f"\nprepare cost, no threads, {pc['rounds']} interleaved rounds "
        f"(1-min load per round: {' / '.join(f'{x:.1f}' for x in pc['load_per_round'])}):"
    )
    print(f"  importlib.reload of the 20 modules  p50/p99 {pm(pc['reload_ms'])} ms")
    print(
        f"  prepare, first worker of the host   p50/p99 {pm(pc['prepare_first_ms'])} ms "
        f"= {pc['ratio_first']:.1f}x reload (target <= 10x)"
    )
    print(
        f"  prepare, second worker of the host  p50/p99 {pm(pc['prepare_second_ms'])} ms "
        f"= {pc['ratio_second']:.1f}x reload (target <= 2x)"
    )
    if "prepare_unpacked_ms" in pc:
        print(
            f"  prepare after an unpack at push     p50/p99 {pm(pc['prepare_unpacked_ms'])} ms "
            f"= {pc['ratio_unpacked']:.1f}x reload (the unpack: p50 {pc['unpack_ms']['p50']:.1f} "
            "ms, off the rollout's clock)"
        )
    print(
        f"  finish pause (gate closed)          p50/p99 {pm(pc['finish_hold_ms'])} ms: reload "
        f"window / pause = {pc['pause_ratio']:.1f}x (target >= 10x)"
    )
    for label, key in (
        ("first", "profile_first_ms"),
        ("second", "profile_second_ms"),
        ("unpacked", "profile_unpacked_ms"),
    ):
        prof = pc.get(key) or {}
        steps = ", ".join(
            f"{k} {v:.1f}" if not k.startswith("cache_") or k.endswith("_s") else f"{k} {v:.0f}"
            for k, v in prof.items()
        )
        print(f"  profile, {label} worker (p50 per step, ms; cache counts): {steps}")


def print_report(res: dict[str, Any]) -> None:
    lo, rl, un = res["loader"], res["reload"], res["unloaded"]
    threads = res["config"]["threads"]
    rows = [["ms", "p50", "p99", "max"]]
    for label, d in (
        ("prepare v2, a new build (wall)", lo["prepare_wall_ms"]),
        ("finish pause: gate closed (barrier)", lo["finish_hold_ms"]),
        ("  of which the swap (report.pause_s)", lo["finish_swap_ms"]),
        ("  finish() wall time", lo["finish_wall_ms"]),
        ("  worst request overlapping finish", lo["finish_worst_request_ms"]),
        ("  control: worst request, quiet window", lo["control_worst_request_ms"]),
        ("rollback pause: gate closed", lo["rollback_hold_ms"]),
        ("  worst request overlapping rollback", lo["rollback_worst_request_ms"]),
        ("worst request overlapping prepare", lo["prepare_worst_request_ms"]),
        ("request latency during prepare", lo["prepare_request_ms"]),
        ("request latency, quiet (guarded)", lo["quiet_request_ms"]),
        ("reload: mixed window v1->v2", rl["window_up_ms"]),
        ("request latency, quiet (unguarded)", rl["quiet_request_ms"]),
        (f"no threads: prepare (x{un['cycles']})", un["prepare_wall_ms"]),
        ("no threads: prepare again (warm)", un["prepare_warm_ms"]),
        ("no threads: finish pause", un["finish_hold_ms"]),
        ("no threads: rollback pause", un["rollback_hold_ms"]),
        ("no threads: reload window v1->v2", un["reload_window_up_ms"]),
    ):
        rows.append([label, _f(d, "p50", 3), _f(d, "p99", 3), _f(d, "max", 3)])
    print(
        f"{lo['cycles']} cycles, {threads} request threads, {res['process']['sys_modules']} modules"
    )
    _common.print_table(rows)
    print()
    print(
        f"mixed-version requests: loader {lo['mixed_version_requests']} of {lo['requests']} "
        f"(errors {lo['request_errors']}); reload {rl['mixed_version_requests']} of "
        f"{rl['requests']} (errors {rl['request_errors']}; "
        f"{rl['requests_overlapping_windows']} requests overlapped a reload window)"
    )
    print(
        f"finish pauses over {TARGET_FINISH_P99_S * 1e3:.0f} ms: {lo['finishes_over_target']} of "
        f"{lo['cycles']}, {lo['finishes_over_target_with_gc']} of them with a GC collection "
        f"inside finish(); a collection ran in {lo['finishes_with_gc']} finishes "
        f"({lo['finishes_with_full_gc']} full), GC time in finish p99 "
        f"{lo['finish_gc_ms']['p99']:.3f} ms; GC time per prepare p50 "
        f"{lo['prepare_gc_ms']['p50']:.1f} ms, full collections p50 "
        f"{lo['gc_full_collections_ms']['p50']:.1f} ms / max {lo['gc_full_collections_ms']['max']:.1f} ms"
    )
    print(
        f"rollback pauses over {TARGET_FINISH_P99_S * 1e3:.0f} ms: {lo['rollbacks_over_target']}, "
        f"{lo['rollbacks_over_target_with_gc']} of them with a GC collection inside rollback()"
    )
    proc = res["process"]
    print(
        f"heap: {proc['gc_objects']} gc objects at start, {proc['gc_objects_end']} after "
        f"{proc['builds_prepared']} builds prepared; a full collection takes "
        f"{proc['full_gc_ms_start']:.0f} ms -> {proc['full_gc_ms_end']:.0f} ms"
    )
    print(
        f"guarded throughput: {lo['requests_per_s_quiet']:.0f} req/s quiet, "
        f"{lo['requests_per_s_during_prepare']:.0f} req/s during prepare"
    )
    mem = res["memory"]
    print(
        f"backup memory after finish: {mem['backup_released_by_make_permanent_kib']:.0f} KiB "
        f"(freed by make_permanent); rollback frees {mem['backup_released_by_rollback_kib']:.0f}"
        f" KiB at once, {mem['still_held_after_rollback_kib']:.0f} KiB more only at the next "
        f"make_permanent; prepare peak {mem['prepare_peak_kib']:.0f} KiB"
    )
    caches = ", ".join(
        f"{name.rpartition('.')[2]} {c['currsize']}/{c['maxsize']}"
        for name, c in mem["caches"].items()
    )
    print(
        f"kept for good by the loader per release made permanent: "
        f"{mem['retained_per_release_kib']:.0f} KiB (caches: {caches})"
    )
    stale = res["reload_stale_instances"]
    print(
        f"importlib.reload leaves {stale['stale']}/{stale['total']} live instances on v1 "
        "methods (loader: all current)"
    )
    t = res["targets"]
    print(
        f"target finish pause p99 {lo['finish_hold_ms']['p99']:.3f} ms <= "
        f"{TARGET_FINISH_P99_S * 1e3:.0f} ms: {'PASS' if t['finish_p99'] else 'FAIL'}"
    )
    print(
        f"target reload window / finish pause >= {TARGET_RATIO:.0f}x: p99 "
        f"{_x(res['ratio']['p99'])}, p50 {_x(res['ratio']['p50'])}: "
        f"{'PASS' if t['ratio'] else 'FAIL'} (no threads, p50: {_x(un['ratio_p50'])})"
    )
    print(f"target no mixed versions under the guard: {'PASS' if t['no_mixed'] else 'FAIL'}")


MD_HEADER = [
    "date (UTC)",
    "rev",
    "machine",
    "Python",
    "sys.modules",
    "cycles x threads",
    "prepare p50/p99",
    "finish pause p50/p99",
    "worst req in finish p50/p99 (quiet control)",
    "rollback pause p50/p99",
    "reload window p50/p99",
    "ratio p99 (no threads p50)",
    "mixed loader/reload",
    "guarded req/s quiet / in prepare",
    "backup KiB (kept/release)",
    "targets",
]
MD_PREAMBLE = (
    "`python benchmarks/run.py loader`: a 20-module release (~440 functions and methods, "
    "42 classes, 1040 live instances, 4 registered `code_change` objects) cycled "
    "prepare v2 → finish → rollback while request threads loop on guarded calls into 3 "
    "modules, against `importlib.reload` of the same code under the same threads, "
    "unguarded. Times in ms; every cycle prepares a new build (cold caches). *finish/rollback pause* = the barrier's gate-closed time "
    "(target p99 ≤ 2 ms); *worst req* = the slowest request overlapping each finish, with "
    "the same measure over equally long quiet windows in brackets; *reload window* = first "
    "reload start → last reload end, pycs written off the clock (target ≥ 10x the finish "
    "pause, p99); *backup* = tracemalloc bytes freed by `make_permanent` after a finish, "
    "*kept* = bytes still allocated per release after `make_permanent` (the loader's caches)."
)


def markdown_row(res: dict[str, Any]) -> list[str]:
    lo, rl, un, m = res["loader"], res["reload"], res["unloaded"], res["machine"]

    def pair(d: dict[str, float], digits: int = 2) -> str:
        return f"{_f(d, 'p50', digits)} / {_f(d, 'p99', digits)}"

    cfg = res["config"]
    think = f" (+{cfg['think_us']} µs think)" if cfg["think_us"] else ""
    return [
        res["date"],
        res["revision"],
        f"{m['platform']}; {m['cpu']}; {m['cores']} cores; other processes used "
        f"{_f(res, 'other_processes_cpu_cores')} cores",
        m["python"],
        str(res["process"]["sys_modules"]),
        f"{lo['cycles']} x {cfg['threads']}{think}",
        pair(lo["prepare_wall_ms"], 0),
        pair(lo["finish_hold_ms"], 3),
        f"{pair(lo['finish_worst_request_ms'], 1)} ({pair(lo['control_worst_request_ms'], 1)})",
        pair(lo["rollback_hold_ms"], 3),
        pair(rl["window_up_ms"], 1),
        f"{_x(res['ratio']['p99'])} ({_x(un['ratio_p50'])})",
        f"{lo['mixed_version_requests']} / {rl['mixed_version_requests']}",
        f"{lo['requests_per_s_quiet']:.0f} / {lo['requests_per_s_during_prepare']:.0f}",
        f"{res['memory']['backup_released_by_make_permanent_kib']:.0f} "
        f"({res['memory']['retained_per_release_kib']:.0f})",
        ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in res["targets"].items()),
    ]


# ------------------------------------------------------------------------- main
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cycles", type=int, default=None, help="cycles per phase (default 100; 10 with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 10 cycles, results kept out of RESULTS.md"
    )
    parser.add_argument("--threads", type=int, default=4, help="request threads (default 4)")
    parser.add_argument(
        "--think-us",
        type=int,
        default=0,
        help="sleep between a thread's requests, simulating I/O (default 0: CPU-bound loop)",
    )
    parser.add_argument(
        "--idle-ms",
        type=float,
        default=10.0,
        help="quiet gap between steps, where control latencies are taken (default 10)",
    )
    parser.add_argument(
        "--no-stdlib", action="store_true", help="skip importing the standard library sweep"
    )
    _common.add_output_arguments(parser)


_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="hotfleet-bench-loader-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    cycles = args.cycles if args.cycles is not None else (10 if args.quick else 100)
    if cycles < 1:
        raise SystemExit("--cycles must be >= 1")
    started = time.perf_counter()
    date = _common.now_utc()
    load_before = _common.warn_if_busy()
    foreign = _common.ForeignCpu()
    if not args.no_stdlib:
        t = time.perf_counter()
        ok, failed = import_stdlib()
        _progress(
            f"imported {ok} stdlib modules ({failed} refused) in {time.perf_counter() - t:.1f} s"
        )
    funcs, classes = count_defs(PKG, 1)
    idle, think = args.idle_ms / 1e3, args.think_us / 1e6
    with _workdir() as tmp:
        app = App(tmp / "loader_root", PKG)
        twin = App(tmp / "reload_root", RELOAD_PKG)
        try:
            app.write(1, pyc=False)
            app.boot()
            app.make_counters()
            twin.write(1, pyc=True)
            twin.boot()
            loader = Loader([app.root], drain_timeout=5.0)
            builds = Builds()
            probe = loader.prepare(builds.fresh(2))  # the release is the upgrade described
            kinds = [c.kind for c in probe.changes]
            changes = sum(len(c.details) for c in probe.changes)
            loader.abort(probe)
            del probe
            gc.collect()
            process = {
                "sys_modules": len(sys.modules),
                "gc_objects": len(gc.get_objects()),
                "functions": funcs,
                "classes": classes,
                "live_instances": sum(len(r) for r in app.instances),
                "registered_stateful": len(app.counters),
                "modules_updated": kinds.count("updated"),
                "changes_planned": changes,
                "switch_interval_ms": sys.getswitchinterval() * 1e3,
            }
            _progress(
                f"process: {process['sys_modules']} modules in sys.modules, "
                f"{process['gc_objects']} gc objects; release: {N_MODULES} modules, {funcs} "
                f"functions+methods, {classes} classes, {process['live_instances']} live "
                f"instances, {changes} planned changes; {cycles} cycles x {args.threads} threads"
            )
            full_gc_start = timed_full_gc()
            n_unloaded = max(3, cycles // 10)
            # The baseline runs first: the loader's caches grow the heap with
            # every new build, which would slow reload down (GC) if it ran after.
            _progress(f"baseline, no threads: {n_unloaded} reload sweeps")
            un_reload = unloaded_reload(twin, n_unloaded)
            _progress("baseline phase: write + importlib.reload module by module, unguarded")
            rcycles, rrt, rquiet = run_reload_phase(
                twin, cycles, args.threads, think, idle, _progress
            )
            stale, total = stale_instances_after_reload(twin)
            _progress(f"loader, no threads: {n_unloaded} cycles")
            un_loader, un_warm = unloaded_loader(app, loader, builds, n_unloaded)
            _progress(f"prepare cost, no threads: {n_unloaded} interleaved rounds")
            prep = prepare_rounds(app, twin, loader, builds, n_unloaded)
            _progress("loader phase: prepare v2 -> finish -> rollback, guarded requests")
            with GcLog() as gclog:
                lcycles, lrt, lquiet = run_loader_phase(
                    app, loader, builds, cycles, args.threads, think, idle, _progress
                )
            process["builds_prepared"] = builds.count
            process["gc_objects_end"] = len(gc.get_objects())
            process["full_gc_ms_start"] = full_gc_start * 1e3
            process["full_gc_ms_end"] = timed_full_gc() * 1e3
            unloaded = summarize_unloaded(un_loader, un_warm, un_reload)
            _progress("memory phase (tracemalloc)")
            memory = measure_memory(loader, builds)
            _progress("analysing")
            res = analyse(lcycles, lrt, lquiet, rcycles, rrt, rquiet, gclog)
        finally:
            app.unload()
            twin.unload()
    lo = res["loader"]
    res = {
        **_common.result_header("loader", date),
        "config": {
            "cycles": cycles,
            "threads": args.threads,
            "think_us": args.think_us,
            "idle_ms": args.idle_ms,
            "quick": bool(args.quick),
            "stdlib_sweep": not args.no_stdlib,
        },
        "process": process,
        **res,
        "unloaded": unloaded,
        "prepare_cost": prep,
        "memory": memory,
        "reload_stale_instances": {"stale": stale, "total": total},
        "targets": {
            "finish_p99": lo["finish_hold_ms"]["p99"] <= TARGET_FINISH_P99_S * 1e3,
            "ratio": (res["ratio"]["p99"] or 0.0) >= TARGET_RATIO,
            "no_mixed": lo["mixed_version_requests"] == 0 and lo["request_errors"] == 0,
            "prepare_10x_reload": (prep["ratio_first"] or 99.0) <= 10.0,
            "prepare_10x_reload_unpacked": (prep["ratio_unpacked"] or 99.0) <= 10.0,
            "second_worker_2x_reload": (prep["ratio_second"] or 99.0) <= 2.0,
            "pause_10x_below_reload": (prep["pause_ratio"] or 0.0) >= 10.0,
            "pause_p99_p50_under_threads_2": lo["finish_hold_ms"]["p99"]
            <= 2.0 * lo["finish_hold_ms"]["p50"],
        },
        "load_average": {"start": load_before, "end": _common.warn_if_busy()},
        "other_processes_cpu_cores": foreign.cores(),
        "elapsed_s": time.perf_counter() - started,
    }
    print()
    print_report(res)
    print_prepare_cost(res)
    _common.save_results(args, res, date, lambda r: [markdown_row(r)], MD_HEADER, MD_PREAMBLE)
    other = res["other_processes_cpu_cores"]
    if other is not None:
        print(f"other processes kept {other:.2f} of {res['machine']['cores']} cores busy meanwhile")
    print(f"elapsed {time.perf_counter() - started:.0f} s")
    # Mixed versions under the guard are a correctness failure, not just a slow run.
    return 0 if res["targets"]["no_mixed"] else 1
