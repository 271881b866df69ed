"""A daemon subprocess owned by a test: the base of agent and coordinator processes.

The launching itself (stdout pumped on a thread, the ready line, the log
tail, kill at close) is :class:`coordinator.launch.ChildProcess`, shared
with the benchmarks and the dev cluster; both daemons serve gRPC, so a
test's process also keeps the one channel its stubs use.
"""

from __future__ import annotations

import signal
import subprocess

import grpc

from coordinator.launch import ChildProcess, spawn

__all__ = ["ManagedProcess", "spawn"]


class ManagedProcess(ChildProcess):
    """A :class:`~coordinator.launch.ChildProcess` with the gRPC channel to it."""

    _channel: grpc.Channel | None = None

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

    def term(self, timeout: float = 40.0) -> None:
        """SIGTERM (a graceful stop) and reap; fails, with the log, unless it exits with 0
        within ``timeout`` (beyond the daemons' own stop budget of 25 s, after which a
        stuck stop writes its thread stacks to the log and exits with 1)."""
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"{self.label} still running {timeout:g}s after SIGTERM:\n{self.log(20000)}"
            ) from None
        assert code == 0, f"{self.label} exited with {code} on SIGTERM:\n{self.log(20000)}"

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        super().close()
