"""One raw etcd watch stream, read on the calling thread, with a deadline.

Why not etcd3's ``add_watch_callback``: its watcher multiplexes every watch
of a client on one stream and one thread, and when that stream ends (a
closed client, an etcd restart) it fails with a ``NameError`` instead of
telling the callbacks, so a dead watch goes unnoticed.  A stream of our own
ends visibly: its iteration raises the ``grpc.RpcError`` (or just stops at
its deadline), and :meth:`WatchStream.close` from another thread ends it
at once.  Used by the coordinator's election and the agents' decision watch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from etcd3 import etcdrpc

from hotfleet.etcd_client import EtcdClient

__all__ = ["WatchStream"]


class WatchStream:
    """One raw etcd watch stream with a deadline, read on the calling thread."""

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        *,
        range_end: bytes | None,
        start_revision: int,
        timeout: float,
    ) -> None:
        self._closed = threading.Event()
        create = etcdrpc.WatchCreateRequest(key=key, start_revision=start_revision)
        if range_end is not None:
            create.range_end = range_end
        first = etcdrpc.WatchRequest(create_request=create)

        def requests() -> Iterator[Any]:
            yield first
            # Keep our side open: etcd ends the stream when the client half-closes.
            self._closed.wait()

        stub = etcdrpc.WatchStub(client.channel)
        self._call = stub.Watch(
            requests(),
            timeout=max(timeout, 0.001),
            credentials=client.call_credentials,
            metadata=client.metadata,
        )

    def __iter__(self) -> Iterator[Any]:
        return iter(self._call)

    def close(self) -> None:
        self._closed.set()
        self._call.cancel()
