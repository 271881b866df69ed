"""Prepare changes nothing, every step has a deadline.

Each test boots a small package whose ``reg`` module records every side
effect in ``EVENTS``, then prepares (and aborts, or finishes) a release that
would have an effect if any of its code ran in this process before the
decision.  The rehearsal in the staging process must still catch what only
running the code can find, and finish must run each statement exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotfleet import Reason
from node_agent import FinishError, PrepareError
from node_agent.drain import DrainBarrier, HoldInfo
from tests.codebase import Codebase

REG = """\
EVENTS = []

def mark(what):
    EVENTS.append(what)
    return what

def tag(label):
    def deco(fn):
        fn.label = label
        return fn
    return deco
"""


def _events(cb: Codebase) -> list[str]:
    return list(cb.module("reg").EVENTS)


def _prepare_then_abort(cb: Codebase, files: dict[str, str]) -> None:
    before = _events(cb)
    prepared = cb.loader.prepare(cb.release("2", files))
    assert _events(cb) == before, "prepare ran release code in the live process"
    cb.loader.abort(prepared)
    assert _events(cb) == before, "abort left an effect behind"


def test_new_module_appending_to_a_registry_runs_only_at_finish(cb: Codebase) -> None:
    cb.boot({"reg": REG})
    plugin = "from . import reg\nreg.EVENTS.append('plugin loaded')\n"
    _prepare_then_abort(cb, {"plugin": plugin})
    assert f"{cb.pkg}.plugin" not in __import__("sys").modules
    cb.upgrade("2", {"plugin": plugin})
    assert _events(cb) == ["plugin loaded"]  # exactly once


def test_changed_call_statement_runs_once_at_finish(cb: Codebase) -> None:
    mods = cb.boot({"reg": REG, "cfg": "from . import reg\nCONFIG = reg.mark('v1')\n"})
    v2 = {"cfg": "from . import reg\nCONFIG = reg.mark('v2')\n"}
    _prepare_then_abort(cb, v2)
    assert mods["cfg"].CONFIG == "v1"
    cb.upgrade("2", v2)
    assert mods["cfg"].CONFIG == "v2"
    assert _events(cb) == ["v1", "v2"]  # boot, then finish: never twice


def test_monkeypatch_in_a_new_module_is_not_applied_by_prepare(cb: Codebase) -> None:
    cb.boot({"reg": REG})
    original = json.dumps
    patch = "import json\njson.dumps = lambda *a, **k: 'patched'\n"
    try:
        _prepare_then_abort(cb, {"patch": patch})
        assert json.dumps is original
        assert json.dumps({"a": 1}) == '{"a": 1}'
    finally:
        json.dumps = original


def test_changed_decorator_argument_is_not_evaluated_by_prepare(cb: Codebase) -> None:
    src = "from . import reg\n\n@reg.tag(reg.mark('a'))\ndef f():\n    return 1\n"
    mods = cb.boot({"reg": REG, "m": src})
    v2 = {"m": src.replace("'a'", "'b'")}
    _prepare_then_abort(cb, v2)
    assert mods["m"].f.label == "a"
    cb.upgrade("2", v2)
    assert mods["m"].f.label == "b"
    assert _events(cb) == ["a", "b"]


def test_changed_default_value_is_evaluated_once_at_finish(cb: Codebase) -> None:
    src = "from . import reg\n\ndef f(x=reg.mark('d1')):\n    return ('one', x)\n"
    mods = cb.boot({"reg": REG, "m": src})
    f = mods["m"].f
    v2 = {"m": "from . import reg\n\ndef f(x=reg.mark('d2')):\n    return ('two', x)\n"}
    _prepare_then_abort(cb, v2)
    assert f() == ("one", "d1")
    cb.upgrade("2", v2)
    assert f() == ("two", "d2") and mods["m"].f is f  # same object, new body and default
    assert _events(cb) == ["d1", "d2"]
    cb.loader.rollback()
    assert f() == ("one", "d1")


def test_unchanged_and_literal_defaults_run_no_code(cb: Codebase) -> None:
    src = (
        "from . import reg\n\ndef f(x=reg.mark('kept')):\n    return x\n\n"
        "def g(y=1, *, z=(1, 'a')):\n    return (y, z)\n"
    )
    mods = cb.boot({"reg": REG, "m": src})
    v2 = src.replace("return x", "return ('new', x)").replace("y=1", "y=2")
    prepared = cb.loader.prepare(cb.release("2", {"m": v2}))
    assert prepared.rehearsal_s == 0  # pure patching: no staging process needed
    cb.loader.finish(prepared)
    assert mods["m"].f() == ("new", "kept") and mods["m"].g() == (2, (1, "a"))
    assert _events(cb) == ["kept"]  # the unchanged default expression never ran again


def test_changed_constants_and_bodies_need_no_staging_process(cb: Codebase) -> None:
    src = "from . import reg\n\nVERSION = '1'\nLIMITS = {'a': 1}\n\ndef f():\n    return VERSION\n"
    mods = cb.boot({"reg": REG, "m": src})
    v2 = src.replace("'1'", "'2'").replace("{'a': 1}", "{'a': 2, 'b': (3,)}")
    prepared = cb.loader.prepare(
        cb.release("2", {"m": v2.replace("return VERSION", "return 'v' + VERSION")})
    )
    assert not prepared.runs_code and prepared.rehearsal_s == 0  # nothing of it runs: no fork
    assert mods["m"].VERSION == "1" and mods["m"].f() == "1"  # prepare bound nothing
    cb.loader.finish(prepared)
    assert (mods["m"].VERSION, mods["m"].LIMITS, mods["m"].f()) == ("2", {"a": 2, "b": (3,)}, "v2")
    cb.loader.rollback()
    assert (mods["m"].VERSION, mods["m"].LIMITS, mods["m"].f()) == ("1", {"a": 1}, "1")
    # a statement that calls something still runs in the staging process first
    called = cb.loader.prepare(cb.release("3", {"m": src.replace("'1'", "reg.mark('1')")}))
    assert called.runs_code and called.rehearsal_s > 0
    cb.loader.abort(called)


STATEFUL = """\
import threading
from node_agent import register
from . import reg

class Counter:
    def __init__(self):
        self._lock = threading.Lock()
        self.count = 5
        self.items = ["a"]

    def bump(self):
        with self._lock:
            self.count += 1

COUNTER = register(Counter())
"""

STATEFUL_V2 = STATEFUL.replace(
    "    def bump(self):",
    """    def code_change(self, old_vsn, state, extra):
        with self._lock:  # a lock the live object may hold right now
            reg.EVENTS.append("migrated")
            self.count = 999  # a write through self: never reaches the live object in prepare
            state["items"].append("x")  # nested state: a copy, never the live list
            state["count"] = state["count"] * 10
            return state

    def bump(self):""",
)


def test_code_change_dry_run_never_touches_live_lock_holding_state(cb: Codebase) -> None:
    mods = cb.boot({"reg": REG, "state": STATEFUL})
    counter = mods["state"].COUNTER
    held = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:  # a request thread inside the object while the node prepares
        with counter._lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold_lock)
    t.start()
    try:
        assert held.wait(5)
        prepared = cb.loader.prepare(cb.release("2", {"state": STATEFUL_V2}))
    finally:
        release.set()
        t.join()
    assert counter.count == 5 and counter.items == ["a"]  # live state untouched
    assert _events(cb) == []  # code_change did not run here
    assert prepared.rehearsal_s > 0
    cb.loader.finish(prepared)
    assert counter.count == 50  # migrated exactly once (not 500)
    assert counter.items == ["a", "x"]
    assert _events(cb) == ["migrated"]
    counter.bump()  # the live lock still works
    assert counter.count == 51


def test_code_change_that_fails_in_the_dry_run_is_refused_and_changes_nothing(
    cb: Codebase,
) -> None:
    mods = cb.boot({"reg": REG, "state": STATEFUL})
    counter = mods["state"].COUNTER
    bad = STATEFUL_V2.replace('state["count"] * 10', 'state["missing"]')
    with pytest.raises(PrepareError) as err:
        cb.loader.prepare(cb.release("2", {"state": bad}))
    (e,) = err.value.errors
    assert e.reason is Reason.CODE_CHANGE_FAILED and "KeyError" in e.detail
    assert e.module == f"{cb.pkg}.state"
    assert counter.count == 5 and counter.items == ["a"] and _events(cb) == []


def test_state_holding_a_socket_gets_a_stand_in_and_a_named_warning(cb: Codebase) -> None:
    src = STATEFUL.replace(
        '        self.items = ["a"]',
        '        self.items = ["a"]\n        import socket\n        self.sock = socket.socket()',
    )
    mods = cb.boot({"reg": REG, "state": src})
    try:
        v2 = src.replace(
            "    def bump(self):",
            "    def code_change(self, old_vsn, state, extra):\n        return state\n\n    def bump(self):",
        )
        prepared = cb.loader.prepare(cb.release("2", {"state": v2}))
        assert any("Counter.sock" in w and "socket" in w for w in prepared.warnings)
        cb.loader.finish(prepared)
        assert mods["state"].COUNTER.sock.fileno() >= 0  # the live socket, untouched
    finally:
        mods["state"].COUNTER.sock.close()


def test_module_that_loops_forever_is_refused_timeout_and_the_next_release_loads(
    cb: Codebase,
) -> None:
    mods = cb.boot({"reg": REG, "m": "def f():\n    return 1\n"})
    cb.loader.prepare_timeout, cb.loader.switch_timeout = 4.0, 1.0
    started = time.monotonic()
    with pytest.raises(PrepareError) as err:
        cb.loader.prepare(cb.release("2", {"spin": "while True:\n    pass\n"}))
    assert time.monotonic() - started < 4.0
    (e,) = err.value.errors
    assert e.reason is Reason.TIMEOUT and e.module == f"{cb.pkg}.spin"
    cb.upgrade("3", {"m": "def f():\n    return 3\n"})
    assert mods["m"].f() == 3


def test_a_cancel_that_comes_before_the_prepare_takes_the_loader_stops_it(cb: Codebase) -> None:
    """An Abort can reach the loader between the participant announcing a prepare and
    the loader starting it: that prepare must still stop at once (it used to clear the
    cancel on its way in and run to its deadline), and the next one is not cancelled."""
    mods = cb.boot({"reg": REG, "m": "def f():\n    return 1\n"})
    cb.loader.prepare_timeout, cb.loader.switch_timeout = 30.0, 30.0
    cb.loader.cancel_prepare()
    started = time.monotonic()
    with pytest.raises(PrepareError) as err:
        cb.loader.prepare(cb.release("2", {"spin": "while True:\n    pass\n"}))
    assert time.monotonic() - started < 5.0
    (e,) = err.value.errors
    assert e.reason is Reason.TIMEOUT and "cancelled" in e.detail
    cb.upgrade("3", {"m": "def f():\n    return 3\n"})  # the cancel was spent
    assert mods["m"].f() == 3


def test_module_blocked_in_c_is_killed_at_prepare_timeout(cb: Codebase) -> None:
    cb.boot({"reg": REG})
    cb.loader.prepare_timeout, cb.loader.switch_timeout = 1.5, 30.0
    started = time.monotonic()
    with pytest.raises(PrepareError) as err:
        cb.loader.prepare(cb.release("2", {"wait": "import threading\nthreading.Event().wait()\n"}))
    assert 1.4 < time.monotonic() - started < 5.0
    assert err.value.errors[0].reason is Reason.TIMEOUT
    assert "killed" in err.value.errors[0].detail


def test_cancel_prepare_kills_the_staging_process_at_once(cb: Codebase) -> None:
    cb.boot({"reg": REG})
    cb.loader.prepare_timeout = 60.0
    cb.prepare_cancelled(cb.release("2", {"spin": "while True:\n    pass\n"}), 0.5)


def test_new_module_that_raises_is_refused_import_error_naming_its_line(cb: Codebase) -> None:
    cb.boot({"reg": REG})
    with pytest.raises(PrepareError) as err:
        cb.loader.prepare(cb.release("2", {"bad": "from . import reg\nreg.mark('x')\n1 / 0\n"}))
    (e,) = err.value.errors
    assert e.reason is Reason.IMPORT_ERROR and e.module == f"{cb.pkg}.bad"
    assert "ZeroDivisionError" in e.detail and "line 3" in e.detail
    assert _events(cb) == []


def test_changed_enum_members_are_still_refused(cb: Codebase) -> None:
    src = "import enum\n\nclass Color(enum.Enum):\n    RED = 1\n"
    cb.boot({"reg": REG, "e": src})
    with pytest.raises(PrepareError) as err:
        cb.loader.prepare(cb.release("2", {"e": src + "    BLUE = 2\n"}))
    assert err.value.errors[0].reason is Reason.INCOMPATIBLE_CHANGE


LIVE_ONLY_HANG = """\
import os, threading
from node_agent import register
BOOT_PID = {pid}

class Box:
    def __init__(self):
        self.n = 1

BOX = register(Box())
"""


def test_migration_that_hangs_only_on_the_live_object_restores_within_its_deadline(
    cb: Codebase,
) -> None:
    v1 = LIVE_ONLY_HANG.format(pid=os.getpid()) + "\ndef f():\n    return 1\n"
    mods = cb.boot({"reg": REG, "box": v1})
    v2 = v1.replace("return 1", "return 2").replace(
        "        self.n = 1\n",
        "        self.n = 1\n\n    def code_change(self, old_vsn, state, extra):\n"
        "        if os.getpid() == BOOT_PID:  # only here, never in the staging process\n"
        "            threading.Event().wait()\n"
        "        return state\n",
    )
    cb.loader.migration_timeout = 1.0
    prepared = cb.loader.prepare(cb.release("2", {"box": v2}))  # the dry run passes
    started = time.monotonic()
    with pytest.raises(FinishError) as err:
        cb.loader.finish(prepared)
    assert time.monotonic() - started < 4.0
    assert err.value.restored
    assert err.value.errors[0].reason is Reason.TIMEOUT
    assert mods["box"].f() == 1  # the old version serves
    with cb.loader.guard():  # and the gate is open again
        pass


def test_statement_blocked_in_c_only_in_the_live_process_restores_within_its_deadline(
    cb: Codebase,
) -> None:
    """The watchdog cannot interrupt a C call; the caller walks away from the switch."""
    import gc

    v1 = f"import os, threading\nBOOT_PID = {os.getpid()}\nX = 1\n\ndef f():\n    return X\n"
    mods = cb.boot({"reg": REG, "m": v1})
    v2 = v1.replace("X = 1", "X = 2\nif os.getpid() == BOOT_PID:\n    threading.Event().wait()")
    cb.loader.switch_timeout = 1.0
    prepared = cb.loader.prepare(cb.release("2", {"m": v2}))  # the rehearsal passes
    gc.enable()  # process-wide: whatever earlier tests left, it is on when the finish begins
    started = time.monotonic()
    with pytest.raises(FinishError) as err:
        cb.loader.finish(prepared)
    assert time.monotonic() - started < 4.0
    error = err.value.errors[0]
    assert err.value.restored and error.reason is Reason.TIMEOUT
    assert "blocked outside Python" in error.detail and "left behind" in error.detail
    assert mods["m"].X == 1 and mods["m"].f() == 1  # the statement's X = 2 is undone
    # the stuck hold paused the collector and will never resume it: the caller did.
    # (Another thread of this test process may pause it for a moment, e.g. a parse:
    # what must not happen is that it stays off.)
    deadline = time.monotonic() + 5.0
    while not gc.isenabled():
        assert time.monotonic() < deadline, "the collector stayed off after the take-over"
        time.sleep(0.01)
    with cb.loader.guard():  # the gate is open again
        pass
    # the stuck thread keeps neither the gate nor the loader: the next release switches
    cb.upgrade("3", {"m": v1.replace("X = 1", "X = 3")})
    assert mods["m"].f() == 3


def test_down_migration_blocked_in_c_restores_within_its_deadline(cb: Codebase) -> None:
    v1 = LIVE_ONLY_HANG.format(pid=os.getpid()) + "\ndef f():\n    return 1\n"
    mods = cb.boot({"reg": REG, "box": v1})
    v2 = v1.replace("return 1", "return 2").replace(
        "        self.n = 1\n",
        "        self.n = 1\n\n    def code_change(self, old_vsn, state, extra):\n"
        "        if isinstance(old_vsn, tuple):  # ('down', vsn): only on the way back\n"
        "            threading.Event().wait()\n"
        "        return {**state, 'n': state['n'] + 1}\n",
    )
    cb.upgrade("2", {"box": v2})
    assert mods["box"].f() == 2 and mods["box"].BOX.n == 2
    cb.loader.migration_timeout = 1.0
    started = time.monotonic()
    with pytest.raises(FinishError) as err:
        cb.loader.rollback()
    assert time.monotonic() - started < 4.0
    error = err.value.errors[0]
    assert err.value.restored and error.reason is Reason.TIMEOUT and error.module.endswith("box")
    assert "code_change(('down'," in error.detail
    assert mods["box"].f() == 2 and mods["box"].BOX.n == 2  # nothing went back half-way
    with cb.loader.guard():
        pass


def test_statement_that_loops_only_in_the_live_process_is_interrupted_and_restored(
    cb: Codebase,
) -> None:
    v1 = f"import os\nBOOT_PID = {os.getpid()}\nX = 1\n\ndef f():\n    return X\n"
    mods = cb.boot({"reg": REG, "m": v1})
    v2 = v1.replace("X = 1", "X = 2\nwhile os.getpid() == BOOT_PID:\n    pass")
    cb.loader.switch_timeout = 1.0
    prepared = cb.loader.prepare(cb.release("2", {"m": v2}))
    started = time.monotonic()
    with pytest.raises(FinishError) as err:
        cb.loader.finish(prepared)
    assert time.monotonic() - started < 4.0
    assert err.value.restored and err.value.errors[0].reason is Reason.TIMEOUT
    assert mods["m"].X == 1 and mods["m"].f() == 1


def test_a_scheduled_finish_switches_at_its_instant_and_not_before(cb: Codebase) -> None:
    """A fleet's commit instant: all but the hold happens first, the switch at the instant."""
    src = "import os\nX = 1\n\ndef f():\n    return X\n"
    mods = cb.boot({"m": src})
    prepared = cb.loader.prepare(
        cb.release("2", {"m": src.replace("X = 1", "X = len(os.sep) + 1")})
    )
    at = time.time() + 0.5
    seen: list[tuple[float, int]] = []  # (when, what f returned), read under the guard
    finished = threading.Event()

    def look() -> None:  # until the finish returns: which code serves, when
        while not finished.is_set():
            with cb.loader.guard():
                seen.append((time.time(), mods["m"].f()))
            time.sleep(0.01)

    looker = threading.Thread(target=look)
    looker.start()
    try:
        report = cb.loader.finish(prepared, at=at)
    finally:
        finished.set()
        looker.join()
    assert [v for t, v in seen if t < at], "nothing read before the instant"
    assert {v for t, v in seen if t < at} == {1}, seen  # the old code serves up to the instant
    assert mods["m"].f() == 2
    assert report.switched_at >= at


def test_a_scheduled_finish_serves_the_new_code_at_once_and_settles_after_its_siblings(
    cb: Codebase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the instant the new code serves at once, but what the finish does next
    (its bookkeeping, the reply) waits until the host's other workers, switching at
    the same instant, have had the CPU: it returns SETTLE_AFTER_INSTANT_S after it.
    An unscheduled finish (a single node's) does not wait."""
    from node_agent import loader as loader_module
    from node_agent.loader import SETTLE_AFTER_INSTANT_S

    src = "X = 1\n\ndef f():\n    return X\n"
    mods = cb.boot({"m": src})
    prepared = cb.loader.prepare(cb.release("2", {"m": src.replace("X = 1", "X = 2")}))
    at = time.time() + 0.3
    first_new: list[float] = []
    finished = threading.Event()

    def look() -> None:
        while not finished.is_set() and not first_new:
            with cb.loader.guard():
                if mods["m"].f() == 2:
                    first_new.append(time.time())
            time.sleep(0.002)

    looker = threading.Thread(target=look)
    looker.start()
    try:
        report = cb.loader.finish(prepared, at=at)
        returned = time.time()
    finally:
        finished.set()
        looker.join()
    assert returned >= at + SETTLE_AFTER_INSTANT_S
    assert first_new and first_new[0] < at + SETTLE_AFTER_INSTANT_S, (
        "the new code waited for the bookkeeping"
    )
    assert at <= report.switched_at < at + SETTLE_AFTER_INSTANT_S
    cb.loader.rollback()
    again = cb.loader.prepare(cb.release("3", {"m": src.replace("X = 1", "X = 3")}))
    monkeypatch.setattr(loader_module, "SETTLE_AFTER_INSTANT_S", 5.0)  # were it to wait: 5 s
    started = time.monotonic()
    cb.loader.finish(again)
    assert time.monotonic() - started < 2.5 and mods["m"].f() == 3


class _SlowDrain(DrainBarrier):
    """A drain that outlasts its deadline in Python (a guard's own bookkeeping, say)."""

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[HoldInfo]:
        until = time.monotonic() + 3.0
        while time.monotonic() < until:  # interruptible: the watchdog ends it
            pass
        with super().hold(timeout) as info:
            yield info


@pytest.mark.parametrize("step", ["finish", "rollback"])
def test_a_drain_that_outlasts_its_deadline_is_a_timeout_refusal(cb: Codebase, step: str) -> None:
    v1 = "X = 1\n\ndef f():\n    return X\n"
    mods = cb.boot({"m": v1})
    if step == "rollback":
        cb.upgrade("2", {"m": v1.replace("X = 1", "X = 2")})
    before = mods["m"].f()
    prepared = cb.loader.prepare(cb.release("3", {"m": v1.replace("X = 1", "X = 3")}))
    cb.loader.barrier = _SlowDrain()
    cb.loader.drain_timeout, cb.loader.switch_timeout = 0.2, 0.3
    cb.loader.migration_timeout = 0.3
    with pytest.raises(FinishError) as err:  # a refusal, never a bare Overrun
        cb.loader.finish(prepared) if step == "finish" else cb.loader.rollback()
    error = err.value.errors[0]
    assert err.value.restored and error.reason is Reason.TIMEOUT
    assert "drain" in error.detail and "previous version restored" in error.detail
    assert mods["m"].f() == before  # nothing switched


def test_statement_that_raises_half_way_at_finish_is_fully_undone(cb: Codebase) -> None:
    v1 = f"import os\nBOOT_PID = {os.getpid()}\nA = 1\n"
    mods = cb.boot({"reg": REG, "m": v1})
    # binds A, then fails, but only in the live process
    v2 = v1.replace(
        "A = 1",
        "if True:\n    A = 2\n    if os.getpid() == BOOT_PID:\n        raise RuntimeError('live only')",
    )
    prepared = cb.loader.prepare(cb.release("2", {"m": v2}))
    with pytest.raises(FinishError) as err:
        cb.loader.finish(prepared)
    assert err.value.restored and "live only" in err.value.errors[0].detail
    assert mods["m"].A == 1


def test_new_modules_in_an_import_cycle_are_all_removed_when_finish_fails(cb: Codebase) -> None:
    import sys

    v1 = f"import os\nBOOT_PID = {os.getpid()}\nX = 1\n"
    mods = cb.boot({"reg": REG, "m": v1})
    release = cb.release(
        "2",
        {
            "ca": "from . import cb\nA = 1\n",
            "cb": "from . import ca\nB = 2\n",
            "m": v1.replace(
                "X = 1",
                "from . import ca\nX = 2\nif os.getpid() == BOOT_PID:\n    raise RuntimeError('live only')",
            ),
        },
    )
    prepared = cb.loader.prepare(release)  # the staging process ran all of it cleanly
    with pytest.raises(FinishError) as err:
        cb.loader.finish(prepared)
    assert err.value.restored
    assert f"{cb.pkg}.ca" not in sys.modules and f"{cb.pkg}.cb" not in sys.modules
    assert mods["m"].X == 1 and not hasattr(mods["m"], "ca")


_ORPHAN_PARENT = """
import os, sys, time
from node_agent import _rehearsal

def work():
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)  # a release whose top level blocks: only a kill ends it
    return [], []

_rehearsal.rehearse(work, 600)
"""


def test_staging_process_dies_when_its_agent_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the agent leaves no staging process running release code behind."""
    import signal
    import subprocess
    import sys

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_PARENT, str(pid_file)])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert parent.poll() is None, "the agent stand-in exited early"
            assert time.monotonic() < deadline, "the staging child never started"
            time.sleep(0.01)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, f"staging child {child} outlived its agent"
            time.sleep(0.01)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def _alive(pid: int) -> bool:
    """Running (a zombie reaped by init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_prepare_profile_says_where_the_staging_process_spent_its_time(
    cb: Codebase,
) -> None:
    """The rehearsal is the floor of a sibling worker's prepare (issue 18): its profile
    splits it into the fork, the child's start, the release's code and the report (none
    negative: parent and child read one clock); a release with nothing to run has none."""
    cb.boot({"m": "X = 1\n"})
    slow = "import time\ntime.sleep(0.2)\nX = 2\n"
    prepared = cb.loader.prepare(cb.release("2", {"m": slow}))
    profile = prepared.profile
    cb.loader.abort(prepared)
    parts = {k: profile[f"rehearse_{k}"] for k in ("fork", "child_start", "work", "report")}
    assert all(v >= 0 for v in parts.values()), parts
    assert 0.2 <= parts["work"] < 5.0, parts  # the module body ran in the child, not here
    assert prepared.rehearsal_s <= profile["rehearse"]
    assert cb.module("m").X == 1
    # a function body only: nothing to rehearse, no staging process
    cb.boot({"f": "def f():\n    return 1\n"})
    quiet = cb.loader.prepare(cb.release("3", {"f": "def f():\n    return 2\n"}))
    cb.loader.abort(quiet)
    assert not [k for k in quiet.profile if k.startswith("rehearse_")], quiet.profile
