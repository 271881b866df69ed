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

import pytest

from node_agent.coverage import changed_functions
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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if sys.version_info >= (3, 12):
            break  # no code to look at: the counts below say it
        if not [n for n in price.__code__.co_names if n.startswith("__hotfleet_")]:
            break
    time.sleep(0.1)
    for x in range(4):
        price(x)
    counts = {f.name.split(".", 1)[1]: f.calls for f in cb.loader.coverage.report().functions}
    assert counts["svc:price"] == 6  # retired by the fold before the last 4 calls


_MONITORING_CHECK = """
import sys, types
sys.path.insert(0, {root!r})
from node_agent.coverage import ChangedFunction, _Twins

src = "def stamp():\\n    return 'v2'\\n"
a, b = {{}}, {{}}
exec(compile(src, "a.py", "exec"), a)
exec(compile(src, "b.py", "exec"), b)
fa, fb = a["stamp"], b["stamp"]
assert fa.__code__ == fb.__code__ and fa.__code__ is not fb.__code__  # equal, not the same
targets = [ChangedFunction(m, "stamp", "changed", f.__code__, (f,)) for m, f in (("a", fa), ("b", fb))]
backend = _Twins({{}})  # no twins: everything falls back to sys.monitoring
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
