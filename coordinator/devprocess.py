"""Supervising the dev cluster's processes: detached start, identity, reaping, stop.

A member of a dev cluster outlives ``coordctl dev up``: it is started in its
own session with no terminal, its output appended to its log file, and only
its pid and start time are kept (:class:`coordinator.devstate.Member`).
This module starts such a process in hotfleet's child environment
(:func:`coordinator.launch.child_environment`), reaps the ones that die
while we still run (so a dead member is never a zombie we think alive),
reads its ready line and log tail from the log, picks free ports, and stops
members in order (agents, then the coordinator, then etcd; SIGTERM, then
SIGKILL), signalling only a pid that still belongs to the process started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TextIO

from coordinator.devstate import Member, proc_start_time
from coordinator.launch import LOOPBACK, child_environment
from coordinator.render import Style

__all__ = ["STOP_TIMEOUT_S", "free_port", "port_free", "spawn_detached", "stop_members"]

STOP_TIMEOUT_S = 10.0


# ---------------------------------------------------------------- ports
# ---------------------------------------------------------------- ports
def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Nothing listens on ``port`` (connections in TIME_WAIT do not count: the
    servers of the cluster all bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK, avoid: Collection[int] = ()) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def pick_port(preferred: int, taken: set[int]) -> int:
    """``preferred`` when it is free, else any free port; never one in ``taken``."""
    port = preferred if preferred not in taken and port_free(preferred) else free_port(avoid=taken)
    taken.add(port)
    return port


def with_port(address: str, port: int) -> str:
    return f"{address.rpartition(':')[0]}:{port}"


# ---------------------------------------------------------------- output
# ---------------------------------------------------------------- output
class Say:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.style = Style.for_stream(out)
        self.started = time.monotonic()

    def __call__(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, text: str) -> None:
        self(f"  [{time.monotonic() - self.started:5.1f}s] {text}")


# ---------------------------------------------------------------- starting
def spawn_detached(member: Member, cwd: Path) -> None:
    """Start ``member`` detached (own session, no terminal), output to its log."""
    Path(member.log).parent.mkdir(parents=True, exist_ok=True)
    with open(member.log, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(member.cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            member.cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=child_environment(member.env, dev=True),
            start_new_session=True,
            close_fds=True,
        )
    member.pid = proc.pid
    member.start_time = proc_start_time(proc.pid) or ""
    # The Popen object is dropped: the process outlives this command.  Popen
    # reaps it if it dies while we still run (subprocess._cleanup).
    _detached.append(proc)


# Keeps the Popen objects of processes started by this interpreter, so that
# a member that exits while we wait is reaped (and not a zombie we think alive).
_detached: list[subprocess.Popen[bytes]] = []


def reap() -> None:
    for proc in list(_detached):
        if proc.poll() is not None:
            _detached.remove(proc)


def log_tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"


def ready_line(member: Member, offset: int) -> str | None:
    """The member's ready line if it printed one after ``offset`` in its log."""
    try:
        with open(member.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if member.ready_line and line.startswith(member.ready_line):
            return line
    return None


def log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# ---------------------------------------------------------------- stopping
# ---------------------------------------------------------------- stopping
def signal_member(member: Member, sig: signal.Signals) -> bool:
    """Send ``sig`` to the member's pid if it is still the process that was started."""
    if not member.alive():
        return False
    try:
        os.kill(member.pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def stop_members(
    members: Sequence[Member], *, say: Say | None, timeout: float = STOP_TIMEOUT_S
) -> dict[str, str]:
    """Agents first, then the coordinator, then etcd; SIGTERM, SIGKILL after ``timeout``.

    Returns what happened to each member: ``stopped``, ``killed``, ``not running``
    or ``pid reused, left alone``.
    """
    outcome: dict[str, str] = {}
    order = {"agent": 0, "coordinator": 1, "etcd": 2}
    groups: dict[int, list[Member]] = {}
    for m in members:
        groups.setdefault(order.get(m.role, 0), []).append(m)
    for _, group in sorted(groups.items()):
        signalled = []
        for m in group:
            state = m.state()
            if state == "replaced":
                outcome[m.name] = f"pid {m.pid} now belongs to another process: left alone"
            elif state == "dead":
                outcome[m.name] = "was not running"
            elif signal_member(m, signal.SIGTERM):
                signalled.append(m)
            else:
                outcome[m.name] = "was not running"
        deadline = time.monotonic() + timeout
        while signalled and time.monotonic() < deadline:
            reap()
            for m in list(signalled):
                if not m.alive():
                    signalled.remove(m)
                    outcome[m.name] = "stopped"
            if signalled:
                time.sleep(0.05)
        for m in signalled:
            if signal_member(m, signal.SIGKILL):
                end = time.monotonic() + 5
                while m.alive() and time.monotonic() < end:
                    reap()
                    time.sleep(0.05)
                outcome[m.name] = f"killed (did not stop within {timeout:g}s of SIGTERM)"
            else:
                outcome[m.name] = "stopped"
        if say is not None:
            for m in group:
                say.step(f"{m.name:<12} {outcome.get(m.name, '')}  (pid {m.pid})")
    return outcome
