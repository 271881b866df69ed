"""Membership against a real etcd: a slow etcd does not make a node start over.

A membership write that times out while the node's lease is alive is tried
again on the same lease.  Tearing the session down instead (a new lease, the
key rewritten) is what turned a busy etcd into a storm of lease grants when
1000 simulated nodes all timed out at once (issue 17).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from etcd3.exceptions import ConnectionTimeoutError

from hotfleet.etcd_client import EtcdClient
from node_agent.membership import Membership
from tests.agents import wait_for


class _SlowPuts:
    """The real client, except that the next ``fail`` puts time out as a busy etcd's do."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self.fail = 0
        self.failed = 0
        self._lock = threading.Lock()

    def put(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self.fail:
                self.fail -= 1
                self.failed += 1
                raise ConnectionTimeoutError()
        return self._client.put(*args, **kwargs)

    def close(self) -> None:
        pass  # the fixture's client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_timed_out_record_write_is_retried_on_the_same_lease(
    etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    key = f"{etcd_prefix}nodes/n-slow"
    payload = {"node_id": "n-slow", "state": "idle", "current_release": "app@1"}
    client = _SlowPuts(etcd_client)
    membership = Membership(key, lambda: dict(payload), lambda: client, ttl=5)  # type: ignore[arg-type,return-value]
    membership.start()
    try:
        _, first = wait_for(lambda: (raw := etcd_client.get(key))[0] is not None and raw)
        client.fail = 1
        payload["current_release"] = "app@2"
        membership.publish()
        _, meta = wait_for(
            lambda: (
                (r := etcd_client.get(key))[0] is not None
                and json.loads(r[0])["current_release"] == "app@2"
                and r
            ),
            timeout=10,
        )
        assert client.failed == 1
        assert membership.sessions == 1 and membership.connected
        assert meta.lease_id == first.lease_id  # the same lease: no new session, no re-register
    finally:
        membership.stop()


def _first_record_after(
    etcd_client: EtcdClient, key: str, before: dict[str, Any]
) -> dict[str, Any]:
    """Our first membership record on ``key``, whose last record was ``before``."""
    etcd_client.put(key, json.dumps(before))
    payload = {"node_id": before["node_id"], "state": "idle", "pid": os.getpid()}
    shared = _SlowPuts(etcd_client)  # never failing: the fixture's client, kept open
    membership = Membership(key, lambda: dict(payload), lambda: shared, ttl=5)  # type: ignore[arg-type,return-value]
    membership.start()
    try:
        record: dict[str, Any] = wait_for(
            lambda: (
                (r := etcd_client.get(key))[0] is not None
                and (d := json.loads(r[0]))["pid"] == os.getpid()
                and d
            )
        )
        return record
    finally:
        membership.stop(revoke=True)


def test_a_successor_on_the_key_of_a_stopped_process_says_whom_it_replaces(
    etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    """A recycled worker's successor reads the last word on its key before writing its own."""
    key = f"{etcd_prefix}nodes/n-recycled"
    stopped = {"node_id": "n-recycled", "state": "stopping", "pid": 4199}
    assert _first_record_after(etcd_client, key, stopped)["replaces"] == 4199
    # a key whose last holder did not say it was stopping (a crash): no claim
    crashed = {"node_id": "n-recycled", "state": "idle", "pid": 4200}
    assert "replaces" not in _first_record_after(etcd_client, key, crashed)
