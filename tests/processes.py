"""A daemon subprocess owned by a test: the base of agent and coordinator processes.

The launching itself (stdout pumped on a thread, the ready line, the log
tail, kill at close) is :class:`coordinator.launch.ChildProcess`, shared
with the benchmarks and the dev cluster; both daemons serve gRPC, so a
test's process also keeps the one channel its stubs use.
"""

from __future__ import annotations

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

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        super().close()
