"""etcd watches: one raw stream read on the calling thread, and etcd3's shared watcher repaired.

:class:`WatchStream` is one watch on a stream of its own, with a deadline:
its iteration raises the ``grpc.RpcError`` (or just stops at the deadline),
and :meth:`WatchStream.close` from another thread ends it at once (the
coordinator's election waits on it).  Its reading thread wakes ten times a
second (gRPC's polling of a blocked stream), which is nothing for one
election and a lot for a thousand simulated nodes.

etcd3's ``add_watch_callback`` multiplexes every watch of a client on one
stream and one thread: what the agents' decision watches use (100
simulated nodes in a process: one reading thread, not 100).  etcd3 0.13.0
breaks it where that stream ends (a closed client, an etcd restart): it
names ``six`` without importing it, so a ``NameError`` kills its thread
instead of telling the callbacks that their watch is gone.
:func:`repair_etcd3_watcher` gives that module the one function it wants;
it runs when this module is imported.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from typing import Any

import etcd3.watch
from etcd3 import etcdrpc

from hotfleet.etcd_client import EtcdClient

__all__ = ["WatchStream", "repair_etcd3_watcher"]


def repair_etcd3_watcher() -> None:
    """Let etcd3's watcher tell its callbacks that their stream ended (see the module doc)."""
    if not hasattr(etcd3.watch, "six"):
        etcd3.watch.six = types.SimpleNamespace(itervalues=lambda d: iter(list(d.values())))


repair_etcd3_watcher()


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
