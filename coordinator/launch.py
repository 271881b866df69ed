"""Launching hotfleet's own processes: the one place that knows their command lines.

The dev cluster, the tests and the benchmarks all start ``node-agent`` and
coordinator daemons as child processes of the checkout they run from.  What
they share lives here:

* :func:`child_environment`: the environment of such a child (the checkout
  on ``PYTHONPATH``, unbuffered output, nothing from the caller's shell that
  would change what the child does: ``ETCD_*``, ``HOTFLEET_COORDINATOR``,
  ``HOTFLEET_FAULT``, ``HOTFLEET_DEV``);
* :func:`agent_command` / :func:`coordinator_command`: their command lines;
* :func:`ready_fields`: the ``key=value`` words of a daemon's ready line
  (:data:`hotfleet.protocol.AGENT_READY`, ``COORDINATOR_READY``);
* :func:`copy_code`: a node's private copy of its boot code (an agent writes
  permanent releases into its code path);
* :class:`ChildProcess`: an attached child whose stdout is read on a thread
  (so the pipe never fills) until its ready line, with its log in a file.

The dev cluster's members are detached instead (they outlive ``coordctl dev
up``, see :mod:`coordinator.devprocess`), but run the same command lines in
the same environment.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EXAMPLES",
    "LOOPBACK",
    "ROOT",
    "SHOP_APP",
    "ChildProcess",
    "LaunchError",
    "agent_command",
    "child_environment",
    "coordinator_command",
    "copy_code",
    "ready_fields",
    "spawn",
    "stop_all",
]

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
SHOP_APP = "shop.app:application"
#: Variables of the caller's shell that would change what a child does.
_NOT_INHERITED = ("HOTFLEET_COORDINATOR", "HOTFLEET_FAULT", "HOTFLEET_DEV")


def _examples() -> Path:
    """The example shop and its releases.

    Installed from a wheel they are package data (``coordinator/examples``,
    see pyproject.toml); in a source checkout (editable install) they are the
    repository's ``examples/``.
    """
    for candidate in (Path(__file__).resolve().parent / "examples", ROOT / "examples"):
        if (candidate / "shop").is_dir() and (candidate / "releases").is_dir():
            return candidate
    return ROOT / "examples"


EXAMPLES = _examples()


class LaunchError(RuntimeError):
    """A child exited or stayed silent before its ready line; the message has its log."""


def child_environment(
    extra: Mapping[str, str] | None = None, *, dev: bool | None = None
) -> dict[str, str]:
    """The environment of a hotfleet child process started from this checkout.

    ``dev`` sets ``HOTFLEET_DEV`` (``1``/``0``; unset when None); ``extra``
    comes last and wins.
    """
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("ETCD_") and k not in _NOT_INHERITED
    }
    # The checkout first, so that `python -m node_agent.cli` works from a
    # source tree too; an installed hotfleet is the same code.
    python_path = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(dict.fromkeys(python_path)),
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if dev is not None:
        env["HOTFLEET_DEV"] = "1" if dev else "0"
    env.update(extra or {})
    return env


def agent_command(
    node_id: str,
    *,
    code_path: Path | str,
    etcd: str,
    cache_dir: Path | str,
    security: Sequence[str] = ("--dev",),
    prefix: str | None = None,
    http: str = f"{LOOPBACK}:0",
    listen: str = f"{LOOPBACK}:0",
    lease_ttl: int | None = None,
    labels: str = "",
    app: str = SHOP_APP,
) -> list[str]:
    """``python -m node_agent.cli`` serving ``app`` from ``code_path``.

    ``security``: ``--dev``, or the TLS, etcd-auth and ``--trust-key`` flags.
    """
    cmd = [
        sys.executable, "-m", "node_agent.cli", *security,
        "--node-id", node_id,
        "--code-path", str(code_path),
        "--app", app,
        "--http", http,
        "--listen", listen,
        "--etcd", etcd,
    ]  # fmt: skip
    if prefix is not None:
        cmd += ["--prefix", prefix]
    if lease_ttl is not None:
        cmd += ["--lease-ttl", str(lease_ttl)]
    if labels:
        cmd += ["--labels", labels]
    return [*cmd, "--cache-dir", str(cache_dir)]


def coordinator_command(
    *,
    etcd: str,
    listen: str,
    security: Sequence[str] = ("--dev",),
    prefix: str | None = None,
    lease_ttl: int | None = None,
    advertise_host: str | None = None,
) -> list[str]:
    """``python -m coordinator.daemon`` (``security``: ``--dev`` or the TLS flags)."""
    cmd = [sys.executable, "-m", "coordinator.daemon", *security, "--listen", listen]
    cmd += ["--etcd", etcd]
    if prefix is not None:
        cmd += ["--prefix", prefix]
    if lease_ttl is not None:
        cmd += ["--lease-ttl", str(lease_ttl)]
    if advertise_host:
        cmd += ["--advertise-host", advertise_host]
    return cmd


def ready_fields(line: str, prefix: str) -> dict[str, str] | None:
    """The ``key=value`` words after ``prefix`` in a ready line; None for another line."""
    if not line.startswith(prefix):
        return None
    words = line.split()[len(prefix.split()) :]
    return dict(w.split("=", 1) for w in words if "=" in w)


def copy_code(source: Path, target: Path) -> Path:
    """``target``: a private copy of the boot code in ``source`` (kept when it exists)."""
    if not target.exists():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def spawn(
    cmd: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen[str]:
    """Start ``cmd`` with stdout piped (text), stdin closed, stderr written to ``log_path``."""
    with open(log_path, "w") as log_file:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=dict(env),
            cwd=cwd,
        )


class ChildProcess:
    """One attached child: stdout pumped to a queue, stderr in ``log_path``.

    ``label`` names the process in failure messages (``"agent n1"``,
    ``"coordinator c1"``).
    """

    def __init__(self, proc: subprocess.Popen[str], log_path: Path, label: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.label = label
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True, name=f"pump-{label}").start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed under us by close()
            for line in self.proc.stdout:
                self._lines.put(line)
        self._lines.put(None)

    def wait_ready_line(self, prefix: str, timeout: float) -> dict[str, str]:
        """Block until a stdout line starts with ``prefix``; its ``key=value`` fields.

        Raises :class:`LaunchError` (with the log tail) when the process exits
        first or ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise LaunchError(
                    f"{self.label} not ready in {timeout:g}s:\n{self.log()}"
                ) from None
            if line is None:
                raise LaunchError(f"{self.label} exited with {self.proc.wait()}:\n{self.log()}")
            fields = ready_fields(line, prefix)
            if fields is not None:
                return fields

    def log(self, limit: int = 6000) -> str:
        """The tail of the process's log (stderr); empty when it cannot be read."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (see :func:`stop_all`)."""
        stop_all([self], grace)

    def close(self) -> None:
        """Kill the child if it still runs (SIGKILL also ends a SIGSTOPped process)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


def stop_all(children: Sequence[ChildProcess], grace: float = 10.0) -> None:
    """SIGTERM every child at once (an agent then revokes its lease), SIGKILL the slow."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        child.close()


def stop_group(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """SIGTERM a process started with ``start_new_session``, then SIGKILL its whole group.

    For a server whose children outlive their parent's exit (gunicorn's
    workers, their staging processes): after ``grace`` seconds, or at once
    if the leader is gone, whatever is left of the group is killed.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(5)
