"""Prepare is background work on a serving host: sibling workers take turns, staging runs niced.

Every test drives real loaders (real staging forks, real ``flock`` slots);
the slot holder that dies is a real process killed with SIGKILL.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotfleet import Reason
from hotfleet.config import ConfigError
from node_agent import PrepareError
from node_agent._hostslots import PrepareSlots
from node_agent.embed import Settings
from tests.codebase import Codebase


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Codebase, Codebase]]:
    """Two sibling workers' code bases (each its own package), one host."""
    a, b = Codebase(tmp_path / "a"), Codebase(tmp_path / "b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _hold(slots: PrepareSlots) -> int:
    """Take every slot from outside the loaders (what busy siblings do)."""
    slots.directory.mkdir(parents=True, exist_ok=True)
    fds = []
    for i in range(slots.slots):
        fd = os.open(slots.directory / f"prepare.prepare.{i}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fds.append(fd)
    return fds[0]


def test_sibling_workers_prepare_one_at_a_time(
    two: tuple[Codebase, Codebase], tmp_path: Path
) -> None:
    a, b = two
    a.boot({"m": "X = 1\n"})
    b.boot({"m": "X = 1\n"})
    slots = PrepareSlots(tmp_path / "slots", 1)
    a.loader.prepare_slots = b.loader.prepare_slots = slots
    marker = tmp_path / "a-staging"
    slow = f"import pathlib, time\npathlib.Path({str(marker)!r}).write_text('x')\ntime.sleep(1.0)\n"
    done: list[str] = []

    def prepare_a() -> None:
        a.loader.prepare(a.release("2", {"m": "X = 1\n", "slow": slow}))
        done.append("a")

    first = threading.Thread(target=prepare_a)
    first.start()
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():  # a holds the slot: its staging process is running
            assert time.monotonic() < deadline, "a's staging process never ran"
            time.sleep(0.01)
        prepared = b.loader.prepare(b.release("2", {"m": "X = 2\n"}))
        done.append("b")
    finally:
        first.join(30)
    assert done == ["a", "b"], "b prepared while its sibling held the host's only slot"
    assert prepared.profile["slot_wait"] > 0.3


def test_no_slot_within_the_deadline_is_refused_timeout_and_changes_nothing(
    cb: Codebase, tmp_path: Path
) -> None:
    cb.boot({"m": "X = 1\n"})
    slots = PrepareSlots(tmp_path / "slots", 1)
    held = _hold(slots)
    try:
        cb.loader.prepare_slots = slots
        cb.loader.prepare_timeout = 0.5
        started = time.monotonic()
        with pytest.raises(PrepareError) as err:
            cb.loader.prepare(cb.release("2", {"m": "X = 2\n"}))
        assert 0.4 < time.monotonic() - started < 10
    finally:
        os.close(held)
    error = err.value.errors[0]
    assert error.reason is Reason.TIMEOUT
    assert "prepare slot" in error.detail and "other workers" in error.detail
    assert cb.module("m").X == 1 and cb.loader.current_release is None
    cb.loader.prepare(cb.release("3", {"m": "X = 3\n"}))  # the slot is free again


def test_abort_while_waiting_for_a_slot_returns_at_once(
    cb: Codebase, tmp_path: Path, no_fallback: None
) -> None:
    """The cancel rings the waiter out: its own next look at the slots is 30 s away."""
    cb.boot({"m": "X = 1\n"})
    slots = PrepareSlots(tmp_path / "slots", 1)
    held = _hold(slots)
    cb.loader.prepare_slots = slots
    cb.loader.prepare_timeout = 60.0
    try:
        refusal = cb.prepare_cancelled(cb.release("2", {"m": "X = 2\n"}), 0.3)
    finally:
        os.close(held)
    assert "prepare slot" in refusal.errors[0].detail
    assert cb.module("m").X == 1


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def test_a_worker_killed_holding_its_turn_frees_it(cb: Codebase, tmp_path: Path) -> None:
    cb.boot({"m": "X = 1\n"})
    slots = PrepareSlots(tmp_path / "slots", 1)
    slots.directory.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(slots.directory / "prepare.prepare.0.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cb.loader.prepare_slots = slots
        cb.loader.prepare_timeout = 30.0
        killer = threading.Timer(0.3, os.kill, (holder.pid, signal.SIGKILL))
        killer.start()
        prepared = cb.loader.prepare(cb.release("2", {"m": "X = 2\n"}))
        killer.join(10)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)
    assert 0.2 < prepared.profile["slot_wait"] < 10


def test_staging_process_runs_niced(cb: Codebase, tmp_path: Path) -> None:
    cb.boot({"m": "X = 1\n"})
    out = tmp_path / "nice"
    cb.loader.staging_nice = 5
    probe = f"import os, pathlib\npathlib.Path({str(out)!r}).write_text(str(os.nice(0)))\n"
    prepared = cb.loader.prepare(cb.release("2", {"m": "X = 1\n", "probe": probe}))
    cb.loader.abort(prepared)
    assert int(out.read_text()) == min(19, os.nice(0) + 5)


def test_settings_read_the_host_prepare_turns(tmp_path: Path) -> None:
    env = {
        "HOTFLEET_PREPARE_SLOTS": "3",
        "HOTFLEET_STAGING_NICE": "7",
        "HOTFLEET_SLOT_DIR": str(tmp_path),
    }
    settings = Settings.from_env(env)
    slots = settings.host_prepare_slots()
    assert slots is not None and slots.slots == 3 and str(tmp_path) in str(slots.directory)
    assert settings.staging_nice == 7
    assert Settings.from_env({"HOTFLEET_PREPARE_SLOTS": "0"}).host_prepare_slots() is None
    assert Settings.from_env({}).prepare_slots >= 1
    for bad in ({"HOTFLEET_PREPARE_SLOTS": "-1"}, {"HOTFLEET_STAGING_NICE": "many"}):
        with pytest.raises(ConfigError, match="HOTFLEET_"):
            Settings.from_env(bad)


def test_prepare_hands_the_gil_back_often_and_restores_the_interval(
    cb: Codebase, tmp_path: Path
) -> None:
    """Request threads wait ~0.5 ms, not 5 ms, for the GIL while a prepare computes."""
    from node_agent._courtesy import PREPARE_SWITCH_INTERVAL_S, yielding_gil

    cb.boot({"m": "X = 1\n"})
    out = tmp_path / "interval"
    probe = f"import pathlib, sys\npathlib.Path({str(out)!r}).write_text(repr(sys.getswitchinterval()))\n"
    before = sys.getswitchinterval()
    prepared = cb.loader.prepare(cb.release("2", {"m": "X = 1\n", "probe": probe}))
    cb.loader.abort(prepared)
    # the staging process is a copy of the node during its prepare
    assert float(out.read_text()) == pytest.approx(min(before, PREPARE_SWITCH_INTERVAL_S))
    assert sys.getswitchinterval() == before
    # an interval someone else sets meanwhile is theirs, and stands
    try:
        with yielding_gil():
            sys.setswitchinterval(0.002)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


# ------------------------------------------------------------------ the bell
_SIBLING = """
import sys, time
from node_agent._hostslots import PrepareSlots
slots = PrepareSlots(sys.argv[1], 1)
with slots.turn(time.perf_counter() + 30):
    print("holding", flush=True)
    sys.stdin.readline()
    given_back = time.time()
print(repr(given_back), flush=True)
"""


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters look again on their own only every 30 s: a wait that ends sooner was rung."""
    from node_agent import _hostslots

    monkeypatch.setattr(_hostslots, "_FALLBACK_S", 30.0)


def _counting_looks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    looks = [0]
    real = PrepareSlots._try

    def counted(self: PrepareSlots) -> int | None:
        looks[0] += 1
        return real(self)

    monkeypatch.setattr(PrepareSlots, "_try", counted)
    return looks


def test_a_slot_given_back_by_a_sibling_process_wakes_the_waiter_at_once(
    tmp_path: Path, no_fallback: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real sibling process gives its turn back: the waiter here has it within
    milliseconds, having looked at the slots a handful of times (not every few ms)."""
    looks = _counting_looks(monkeypatch)
    slots = PrepareSlots(tmp_path / "slots", 1)
    sibling = subprocess.Popen(
        [sys.executable, "-c", _SIBLING, str(slots.directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert sibling.stdout is not None and sibling.stdin is not None
        assert sibling.stdout.readline().strip() == "holding"
        got: list[float] = []

        def wait_turn() -> None:
            with slots.turn(time.perf_counter() + 60):
                got.append(time.time())

        waiter = threading.Thread(target=wait_turn)
        waiter.start()
        time.sleep(1.0)  # the waiter waits a second: polling would look ~200 times
        assert not got, "the waiter took a slot the sibling held"
        sibling.stdin.write("\n")
        sibling.stdin.flush()
        given_back = float(sibling.stdout.readline())
        waiter.join(20)
        assert got, "the waiter never got the slot"
    finally:
        if sibling.poll() is None:
            sibling.kill()
        sibling.wait(10)
    assert got[0] - given_back < 5.0, "the waiter was not rung: it waited for its fallback"
    assert looks[0] <= 6, f"the waiter looked at the slots {looks[0]} times while it waited"


def test_without_a_bell_waiting_still_works_by_looking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something that is not a FIFO has the bell's name: waiters fall back to
    looking every few ms, and a slot given back is still taken; nothing is
    written into the impostor."""
    slots = PrepareSlots(tmp_path / "slots", 1)
    slots.directory.mkdir(parents=True)
    impostor = slots.directory / "prepare.prepare.bell"
    impostor.write_bytes(b"not a fifo")
    looks = _counting_looks(monkeypatch)
    held = _hold(slots)
    threading.Timer(0.3, os.close, (held,)).start()
    with slots.turn(time.perf_counter() + 30) as waited:
        pass
    assert 0.2 < waited < 10
    assert looks[0] > 10  # it looked, as it must without a bell
    assert impostor.read_bytes() == b"not a fifo"


def test_many_waiters_each_get_a_turn_one_at_a_time(tmp_path: Path, no_fallback: None) -> None:
    """Eight waiters, one slot: every ring lets exactly one in (the flock decides),
    nobody holds it beside another, and nobody is left waiting for a fallback."""
    slots = PrepareSlots(tmp_path / "slots", 1)
    inside = [0]
    most = [0]
    order: list[int] = []
    guard = threading.Lock()

    def worker(i: int) -> None:
        with slots.turn(time.perf_counter() + 60):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                order.append(i)
            time.sleep(0.02)
            with guard:
                inside[0] -= 1

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(order) == list(range(8))
    assert most[0] == 1
    assert time.monotonic() - started < 10, "a waiter was not rung when the slot came free"
