"""A daemon subprocess owned by a test: the base of agent and coordinator processes.

:class:`ManagedProcess` reads the child's stdout line by line on a thread (so
the pipe never fills), waits for the line the daemon prints once it serves,
reads the tail of its log (stderr, written to a file by :func:`spawn`), and at
:meth:`~ManagedProcess.close` kills the child if it still runs.  Both daemons
serve gRPC, so it also keeps the one channel its stubs use.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc


def spawn(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Start ``cmd`` with stdout piped (text) and stderr written to ``log_path``."""
    with open(log_path, "w") as log_file:
        return subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=env,
            cwd=cwd,
        )


class ManagedProcess:
    """One subprocess: stdout pumped to a queue, stderr in ``log_path``.

    ``label`` names the process in failure messages (``"agent"``,
    ``"coordinator c1"``).
    """

    def __init__(self, proc: subprocess.Popen[str], log_path: Path, label: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.label = label
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._channel: grpc.Channel | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready_line(self, prefix: str, timeout: float) -> dict[str, str]:
        """Block until a stdout line starts with ``prefix``; its ``key=value`` fields.

        The fields are the words after the prefix's words.  Fails (with the log
        tail) when the process exits first or ``timeout`` seconds pass.
        """
        skip = len(prefix.split())
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{self.label} not ready in {timeout}s:\n{self.log()}"
                ) from None
            if line is None:
                raise AssertionError(f"{self.label} exited with {self.proc.wait()}:\n{self.log()}")
            if line.startswith(prefix):
                return dict(f.split("=", 1) for f in line.split()[skip:])

    def log(self) -> str:
        """The tail of the process's log (stderr); empty when it cannot be read."""
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""

    def channel(
        self, address: str, credentials: grpc.ChannelCredentials | None = None
    ) -> grpc.Channel:
        """The gRPC channel to ``address`` (opened on first use, closed by :meth:`close`)."""
        if self._channel is None:
            self._channel = (
                grpc.insecure_channel(address)
                if credentials is None
                else grpc.secure_channel(address, credentials)
            )
        return self._channel

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL also ends a SIGSTOPped process
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
