"""SIGTERM stops the daemons for sure, and a stop cannot hang.

CI once waited 20 s for a coordinator that had been sent SIGTERM and never
stopped.  The attacks here: a stop signal the kernel hands to a thread other
than the main one (the usual ``Event.set()``-from-a-handler idiom never wakes
its main thread then, shown by the control case), a stop that hangs (it must
end by itself, with every thread's stack in the log), and a stop while etcd
does not answer (each daemon must still exit 0, well within its budget).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from coordinator.daemon import STOP_BUDGET_S as COORDINATOR_BUDGET_S
from hotfleet.etcd_server import EtcdServer
from node_agent.cli import STOP_BUDGET_S as AGENT_BUDGET_S
from tests.agents import ROOT, Agents, wait_for
from tests.coordinators import Coordinators

# A process whose main thread waits for SIGTERM while another thread is made to
# take it (pthread_kill): what the kernel may do with a process-directed signal.
_OTHER_THREAD_TAKES_IT = """
import signal, sys, threading, time
sys.path.insert(0, {root!r})
{wait_setup}
taker_ready = threading.Event()
def taker():
    taker_ready.set()
    time.sleep(60)
taker_thread = threading.Thread(target=taker, daemon=True)
taker_thread.start()
taker_ready.wait()
threading.Timer(0.2, signal.pthread_kill, (taker_thread.ident, signal.SIGTERM)).start()
started = time.monotonic()
{wait}
print("stopped after %.2f s" % (time.monotonic() - started), flush=True)
"""


def _run(setup: str, wait: str, timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run the script; ``None`` when it is still waiting after ``timeout`` (then killed)."""
    script = _OTHER_THREAD_TAKES_IT.format(root=str(ROOT), wait_setup=setup, wait=wait)
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None


def test_event_idiom_misses_a_signal_another_thread_takes() -> None:
    """The control: with the old idiom the main thread sleeps on, so the attack is real."""
    done = _run(
        "stop = threading.Event()\nsignal.signal(signal.SIGTERM, lambda *_: stop.set())",
        "stop.wait()",
        timeout=3,
    )
    assert done is None, f"the main thread woke up after all: {done}"


def test_stop_signals_act_on_a_signal_another_thread_takes() -> None:
    done = _run(
        "from hotfleet.stopsignals import StopSignals\nstops = StopSignals()",
        "stops.wait()\nprint('received', stops.received.name)",
        timeout=10,
    )
    assert done is not None, "SIGTERM taken by another thread was never acted on"
    assert done.returncode == 0, done.stderr
    assert "received SIGTERM" in done.stdout
    seconds = float(done.stdout.split("stopped after ")[1].split()[0])
    assert seconds < 0.2 + 1.0, done.stdout  # the signal at 0.2 s, one poll after it


def test_a_stop_that_hangs_writes_every_stack_and_exits_1() -> None:
    """Past its budget a stuck stop ends the process itself, showing where it was stuck."""
    script = f"""
import sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
from hotfleet.stopsignals import bound_stop
def stuck_in_shutdown():
    time.sleep(60)
threading.Thread(target=stuck_in_shutdown, name="not-a-daemon").start()
bound_stop(0.5, "test-daemon")
"""  # the interpreter's exit joins the non-daemon thread: it hangs there
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1, done
    assert time.monotonic() - started < 10
    assert "test-daemon: stopping; if not stopped within 0.5s" in done.stderr
    assert "stuck_in_shutdown" in done.stderr, done.stderr  # the stuck thread's stack


def _signal_etcd(server: EtcdServer, sig: signal.Signals) -> None:
    if server.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, sig)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_leader_stops_cleanly_while_etcd_is_frozen(etcd_server: EtcdServer, tmp_path: Path) -> None:
    """It cannot resign; it says so, and exits 0 in well under its budget, although its
    threads were inside etcd retries (30 s each, had they run out one after the other)."""
    coordinators = Coordinators(tmp_path, etcd_server.endpoint, f"/stop/{uuid.uuid4().hex}/")
    try:
        leader = coordinators.start("a")
        leader.wait_leader()
        _signal_etcd(etcd_server, signal.SIGSTOP)
        wait_for(lambda: "; retrying" in leader.log(), timeout=30)  # a thread rides it out
        started = time.monotonic()
        leader.term()
        took = time.monotonic() - started
        log = leader.log(20000)
        print(f"leader stopped {took:.2f}s after SIGTERM with etcd frozen")
        assert took < COORDINATOR_BUDGET_S / 2, log
        assert "could not resign" in log or "not resigning" in log, log
        assert "Traceback" not in log, log
    finally:
        coordinators.close()


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_agent_stops_cleanly_while_etcd_is_frozen(etcd_server: EtcdServer, tmp_path: Path) -> None:
    """It cannot revoke its lease (the record expires by itself); it exits 0 all the same."""
    agents = Agents(tmp_path, etcd_server.endpoint, f"/stop/{uuid.uuid4().hex}/")
    try:
        agent = agents.start("n-frozen", lease_ttl=2)
        _signal_etcd(etcd_server, signal.SIGSTOP)
        started = time.monotonic()
        agent.term()
        took = time.monotonic() - started
        print(f"agent stopped {took:.2f}s after SIGTERM with etcd frozen")
        assert took < AGENT_BUDGET_S / 2, agent.log(20000)
        assert "Traceback" not in agent.log(20000), agent.log(20000)
    finally:
        agents.close()
