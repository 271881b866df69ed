"""Changed-code coverage: the loader counts calls and exceptions of what a release changed.

Runs under whatever interpreter runs pytest (3.11: counting twins of the code;
3.12+: ``sys.monitoring``), and spawns python3.12 / python3.13 when they are
installed to run the same scenario on their backend.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from node_agent.coverage import changed_functions, prometheus_lines
from tests.agents import wait_for
from tests.codebase import Codebase
from tests.coverage_scenario import BOOT, V2, check, scenario


def test_changed_code_counted_under_this_interpreter(cb: Codebase) -> None:
    out = scenario(cb)
    check(out)
    assert out["backend"] == "prologue"  # twins on every interpreter: the cheapest count


def test_counting_off_after_rollback_and_old_code_back(cb: Codebase) -> None:
    mods = cb.boot(BOOT)
    price = mods["svc"].price
    plain = price.__code__
    cb.upgrade("2", V2)
    price(1)
    cb.loader.rollback()
    assert price(2) == 4 and price.__code__ is plain  # the original code object itself
    report = cb.loader.coverage.report()
    assert not report.active and cb.loader.changed_code() == []
    assert {f.name.split(".", 1)[1]: f.calls for f in report.functions}["svc:price"] == 1


def test_tracebacks_and_identity_unchanged_while_counting(cb: Codebase) -> None:
    mods = cb.boot(BOOT)
    price = mods["svc"].price
    cb.upgrade("2", V2)
    try:
        price(-5)
    except ValueError as exc:
        tb = exc.__traceback__
        assert tb is not None
        while tb.tb_next is not None:
            tb = tb.tb_next
        line = textwrap.dedent(V2["svc"]).splitlines()[tb.tb_lineno - 1]
        assert "raise ValueError" in line  # the raising line, not the counter's
    assert price.__name__ == "price" and price.__qualname__ == "price"


def test_reformatting_alone_is_not_a_change() -> None:
    import types

    from node_agent._patch import SetCode

    def code_of(source: str) -> types.CodeType:
        module = compile(source, "<t>", "exec")
        return next(c for c in module.co_consts if isinstance(c, types.CodeType))

    before = code_of("def f(x):\n    return x + 1\n")
    moved = types.FunctionType(
        code_of("\n\ndef f(x):\n    return x+1  # same\n"), {"__name__": "m"}
    )
    assert changed_functions([SetCode(moved, before, None, None)]) == []  # other lines only
    edited = types.FunctionType(code_of("def f(x):\n    return x + 2\n"), {"__name__": "m"})
    assert [c.name for c in changed_functions([SetCode(edited, before, None, None)])] == ["m:f"]


_SPAWN = """
import json, sys, types
sys.path.insert(0, {repo!r})
# node_agent's package imports the agent (grpc, etcd); the loader needs none of it,
# so a bare interpreter runs the scenario with the package's __init__ left out
pkg = types.ModuleType("node_agent")
pkg.__path__ = [{repo!r} + "/node_agent"]
sys.modules["node_agent"] = pkg
import node_agent.loader
pkg.Loader = node_agent.loader.Loader
from pathlib import Path
from tests.codebase import Codebase
from tests.coverage_scenario import check, scenario
cb = Codebase(Path({root!r}))
try:
    out = scenario(cb)
    check(out)
    print(json.dumps(out))
finally:
    cb.close()
"""


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_changed_code_counted_under_other_interpreters(version: str, tmp_path: Path) -> None:
    """The same scenario under python3.12 / python3.13 (a venv with hotfleet, or skip)."""
    if sys.version_info[:2] == tuple(int(p) for p in version.split(".")):
        pytest.skip(f"python{version} runs this test session already")
    exe = _interpreter(version)
    if exe is None:
        pytest.skip(f"python{version} is not installed (looked on PATH and in pyenv)")
    repo = str(Path(__file__).resolve().parent.parent)
    script = _SPAWN.format(repo=repo, root=str(tmp_path))
    proc = subprocess.run(
        [exe, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "prologue"  # the twins there too (sys.monitoring: the fallback)
    check(out)


def _interpreter(version: str) -> str | None:
    """A working python{version}: pyenv's newest build of it, else one on PATH.

    A pyenv shim on PATH exists for every installed version but fails unless
    that version is selected, so each candidate is run once.
    """
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [str(p) for p in sorted(root.glob(f"{version}.*/bin/python{version}"))][::-1]
    found = shutil.which(f"python{version}")
    if found:
        candidates.append(found)
    for exe in candidates:
        probe = subprocess.run([exe, "-c", "pass"], capture_output=True, timeout=60, check=False)
        if probe.returncode == 0:
            return exe
    return None


def test_a_function_stops_costing_once_it_has_enough_calls(cb: Codebase) -> None:
    """Past ``cap`` calls its counts freeze and its plain code (or no event) runs again."""
    mods = cb.boot(BOOT)
    price = mods["svc"].price
    cb.loader.coverage.cap = 5
    cb.upgrade("2", V2)
    for x in range(3):
        price(x)
    counts = {f.name.split(".", 1)[1]: f.calls for f in cb.loader.coverage.report().functions}
    assert counts["svc:price"] == 3
    for x in range(7):
        price(x)
    assert {f.name.split(".", 1)[1]: f.calls for f in cb.loader.coverage.report().functions}[
        "svc:price"
    ] == 10  # reached the cap: retired at this report
    for x in range(5):
        price(x)
    after = {f.name.split(".", 1)[1]: f.calls for f in cb.loader.coverage.report().functions}
    assert after["svc:price"] == 10  # frozen: no longer counted
    assert cb.loader.coverage.active  # the other functions still are
    if sys.version_info < (3, 12):
        names = price.__code__.co_names
        assert not [n for n in names if n.startswith("__hotfleet_")]  # the plain code is back


def test_counts_fold_and_retire_without_anyone_asking(cb: Codebase) -> None:
    """The fold thread retires a function past the cap even when no Health RPC reports."""
    mods = cb.boot(BOOT)
    price = mods["svc"].price
    cb.loader.coverage.cap = 5
    cb.loader.coverage.fold_s = 0.02
    cb.upgrade("2", V2)
    for x in range(6):
        price(x)
    coverage = cb.loader.coverage
    target = next(t for t in coverage._targets if t.name.endswith("svc:price"))
    wait_for(lambda: id(target.code) in coverage._retired, timeout=10)  # by the fold thread
    if sys.version_info < (3, 12):
        assert not [n for n in price.__code__.co_names if n.startswith("__hotfleet_")]
    for x in range(4):
        price(x)
    counts = {f.name.split(".", 1)[1]: f.calls for f in cb.loader.coverage.report().functions}
    assert counts["svc:price"] == 6  # retired by the fold before the last 4 calls


_MONITORING_CHECK = """
import sys, types
sys.path.insert(0, {root!r})
from node_agent._counting import ChangedFunction, Twins

src = "def stamp():\\n    return 'v2'\\n"
a, b = {{}}, {{}}
exec(compile(src, "a.py", "exec"), a)
exec(compile(src, "b.py", "exec"), b)
fa, fb = a["stamp"], b["stamp"]
assert fa.__code__ == fb.__code__ and fa.__code__ is not fb.__code__  # equal, not the same
targets = [ChangedFunction(m, "stamp", "changed", f.__code__, (f,)) for m, f in (("a", fa), ("b", fb))]
backend = Twins({{}})  # no twins: everything falls back to sys.monitoring
backend.start(targets)
for _ in range(3):
    fa()
fb()
print(backend.name, [backend.counts(t) for t in targets])
backend.stop()
"""


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_monitoring_fallback_counts_equal_code_objects_apart(version: str) -> None:
    """Two modules' identical ``def`` are equal code objects: each keeps its own count."""
    exe = _interpreter(version)
    if exe is None:
        pytest.skip(f"no python{version} on this host")
    root = str(Path(__file__).resolve().parent.parent)
    code = _MONITORING_CHECK.format(root=root)
    done = subprocess.run(
        [exe, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sys.monitoring [(3, 0), (1, 0)]"


_QUIET_CHECK = """
import sys, traceback
sys.path.insert(0, {root!r})
from node_agent._prologue import RAISED, calls_name, instrument_module, quiet_twin

src = b'''
class Base:
    def go(self, x):
        return x

class C(Base):
    def go(self, x):
        \\"\\"\\"doc\\"\\"\\"
        if x < 0:
            raise ValueError(x)
        return super().go(x) + 1

def outer(n):
    def inner(x):
        return x + n
    return inner

def gen(n):
    yield from range(n)
'''
inst = instrument_module("qm", src, "/x/qm.py")
ns = {{"__name__": "qm"}}
exec(compile(src, "/x/qm.py", "exec"), ns)
for s in range(inst.slots):
    ns[calls_name(s)] = []
ns[RAISED] = [0] * inst.slots
slots = {{}}
for name, fn in (("go", ns["C"].go), ("outer", ns["outer"]), ("gen", ns["gen"])):
    twin, slot = inst.variant(fn.__code__)
    quiet = quiet_twin(twin, slot)
    assert quiet is not None and quiet.co_code != twin.co_code, name
    fn.__code__ = quiet
    slots[name] = slot
c = ns["C"]()
assert c.go(1) == 2 and ns["outer"](3)(4) == 7 and list(ns["gen"](3)) == [0, 1, 2]
try:
    c.go(-1)
except ValueError as exc:
    last = traceback.extract_tb(exc.__traceback__)[-1]
    assert last.lineno == 10, last  # the raising line, not the count's
print(sorted((k, len(ns[calls_name(s)]), ns[RAISED][s]) for k, s in slots.items()))
"""


@pytest.mark.parametrize("version", ["this", "3.12", "3.13"])
def test_quiet_twin_counts_exceptions_not_calls(version: str) -> None:
    """The quiet twin jumps over the count (no call counted) and still counts what raises."""
    exe = sys.executable if version == "this" else _interpreter(version)
    if exe is None:
        pytest.skip(f"no python{version} on this host")
    code = _QUIET_CHECK.format(root=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run(
        [exe, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('gen', 0, 0), ('go', 0, 1), ('outer', 0, 0)]"


def _hammer(price: object, seconds: float) -> tuple[int, int]:
    """Call ``price`` for ``seconds``, every 10th call raising: (calls, raised)."""
    calls = raised = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for x in range(-1, 9):
            calls += 1
            try:
                price(x)  # type: ignore[operator]
            except ValueError:
                raised += 1
    return calls, raised


def _upgraded(cb: Codebase, exact: int, fold_s: float, burst_s: float) -> dict[str, Any]:
    """Boot, set the coverage knobs (uncapped), upgrade to V2: the modules."""
    mods = cb.boot(BOOT)
    coverage = cb.loader.coverage
    coverage.cap = 10**12
    coverage.exact, coverage.fold_s, coverage.burst_s = exact, fold_s, burst_s
    cb.upgrade("2", V2)
    return mods


def test_hot_function_is_sampled_past_its_exact_calls(cb: Codebase) -> None:
    """Past ``exact`` calls: quiet twin plus bursts; calls estimated and said so, raises exact."""
    mods = _upgraded(cb, 20, 0.05, 0.01)
    price = mods["svc"].price
    coverage = cb.loader.coverage
    Cart = mods["svc"].Cart
    for _ in range(3):
        Cart().total([1])  # a few calls: stays exact
    calls, raised = _hammer(price, 1.0)
    report = coverage.report()
    by = {f.name.split(".", 1)[1]: f for f in report.functions}
    hot, cold = by["svc:price"], by["svc:Cart.total"]
    assert hot.estimated and report.estimated and not cold.estimated
    assert cold.calls == 3
    assert hot.raised == raised  # every exception, bursts or not
    assert 0.4 * calls < hot.calls < 2.5 * calls, (hot.calls, calls)
    backend = coverage._backend
    assert backend is not None
    with coverage._lock:  # no burst begins or ends meanwhile
        entry = backend.prologue.slot[
            id(next(t.code for t in coverage._targets if t.name == hot.name))
        ]
        assert entry.quiet is not None
        assert price.__code__ is (entry.twin if backend.prologue.bursting else entry.quiet)
    lines = prometheus_lines(report, {"node": "n1"}).splitlines()
    gauge = "hotfleet_changed_code_calls_estimated{"
    assert f'{gauge}node="n1",function="{hot.name}",kind="changed"}} 1' in lines
    assert f'{gauge}node="n1",function="{cold.name}",kind="changed"}} 0' in lines


def test_health_says_which_counts_are_estimates() -> None:
    from node_agent.coverage import CoverageReport, FunctionCoverage, health_fields
    from node_agent.metrics import HostCpu

    report = CoverageReport(
        "r", True, "prologue",
        (FunctionCoverage("m:f", "changed", 900, 3, True), FunctionCoverage("m:g", "added", 2, 0)),
    )  # fmt: skip
    fields = health_fields(report, HostCpu(1.0, 2.0, 0.0))
    assert [(f.name, f.calls, f.calls_estimated) for f in fields["changed_code"]] == [
        ("m:f", 900, True),
        ("m:g", 2, False),
    ]


def test_exact_zero_counts_every_call(cb: Codebase) -> None:
    """``exact=0``: never sampled, the old behaviour (every call counted, nothing estimated)."""
    price = _upgraded(cb, 0, 0.02, 0.01)["svc"].price
    coverage = cb.loader.coverage
    calls, raised = _hammer(price, 0.3)
    f = {f.name.split(".", 1)[1]: f for f in coverage.report().functions}["svc:price"]
    assert (f.calls, f.raised, f.estimated) == (calls, raised, False)


def test_stop_during_a_burst_leaves_the_plain_code(cb: Codebase) -> None:
    price = _upgraded(cb, 5, 0.02, 0.015)["svc"].price
    coverage = cb.loader.coverage
    _hammer(price, 0.2)
    deadline = time.monotonic() + 5
    backend = coverage._backend
    assert backend is not None
    while not backend.prologue.bursting and time.monotonic() < deadline:
        _hammer(price, 0.005)
    cb.loader.rollback()  # stops counting, mid-burst or not

    def counting() -> list[str]:
        return [n for n in price.__code__.co_names if n.startswith("__hotfleet_")]

    assert price(2) == 4 and not counting()  # v1's plain code
    time.sleep(0.1)  # the fold thread's burst end must not put a twin back
    assert not counting()


def test_twins_are_made_for_what_changed_and_for_all_of_it(cb: Codebase) -> None:
    """The counting twins compile only the changed parts of a module (a one-function
    fix of a large module compiles one function), yet every function the switch
    changed or added, by any kind of change the planner knows, has its twin."""
    from tests.test_plan_facts import NEW, OLD

    mods = cb.boot({"m": OLD.decode()})
    prepared = cb.loader.prepare(cb.release("2", {"m": NEW.decode()}))
    cb.loader.finish(prepared)
    inst = prepared._instrumented[f"{cb.pkg}.m"]
    changed = cb.loader.changed_code()
    assert {c.qualname for c in changed} >= {"plain", "added", "Grows.grow", "Shape.area"}
    untwinned = [c.qualname for c in changed if inst.variant(c.code) is None]
    assert untwinned == []
    twinned = {name for name, _ in inst.codes}
    assert "Box.label" not in twinned  # unchanged, in a class whose other method changed
    assert mods["m"].plain(1) == 3
    cb.loader.rollback()


def test_a_one_function_fix_twins_one_function(cb: Codebase) -> None:
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(60))
    m = cb.boot({"big": body + "class K:\n    def m(self):\n        return 1\n"})["big"]
    fixed = body.replace("return x + 7\n", "return x + 700\n")
    prepared = cb.loader.prepare(cb.release("2", {"big": fixed + "class K:\n    pass\n"}))
    cb.loader.finish(prepared)
    inst = prepared._instrumented[f"{cb.pkg}.big"]
    assert {name for name, _ in inst.codes} == {"f7"} and inst.slots == 1
    assert m.f7(1) == 701 and not hasattr(m.K, "m")
    cb.loader.rollback()
    calls = {f.name.split(":", 1)[1]: f.calls for f in cb.loader.coverage.report().functions}
    assert calls == {"f7": 1}  # counted through its twin
