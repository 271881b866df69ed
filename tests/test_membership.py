"""Membership against a real etcd: a slow etcd does not make a node start over.

A membership write that times out while the node's lease is alive is tried
again on the same lease.  Tearing the session down instead (a new lease, the
key rewritten) is what turned a busy etcd into a storm of lease grants when
1000 simulated nodes all timed out at once (issue 17).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from etcd3.exceptions import ConnectionTimeoutError

from hotfleet.etcd_client import EtcdClient
from node_agent.membership import PUBLISH_DEBOUNCE_S, Membership
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


@contextlib.contextmanager
def _recorded(
    etcd_client: EtcdClient, key: str, payload: dict[str, Any]
) -> Iterator[tuple[Membership, list[str]]]:
    """A started membership on ``key`` whose first record (``idle``) is written, and every
    state written to ``key`` from then on (an etcd watch)."""
    seen: list[str] = []

    def note(response: Any) -> None:
        for event in getattr(response, "events", None) or ():
            if event.value:
                seen.append(json.loads(event.value)["state"])

    watch = etcd_client.add_watch_callback(key, note)
    shared = _SlowPuts(etcd_client)  # never failing: the fixture's client, kept open
    membership = Membership(key, lambda: dict(payload), lambda: shared, ttl=5)  # type: ignore[arg-type,return-value]
    membership.start()
    try:
        wait_for(lambda: seen == ["idle"])
        yield membership, seen
    finally:
        membership.stop()
        etcd_client.cancel_watch(watch)


def test_a_transient_state_is_written_once_it_outlasts_the_hold(
    etcd_client: EtcdClient, etcd_prefix: str, monkeypatch: Any
) -> None:
    """A node stuck in ``prepared`` (its coordinator died) still says so, after the hold."""
    monkeypatch.setattr("node_agent.membership.TRANSIENT_HOLD_S", 0.5)
    payload: dict[str, Any] = {"node_id": "n-stuck", "state": "idle"}
    with _recorded(etcd_client, f"{etcd_prefix}nodes/n-stuck", payload) as (membership, seen):
        payload["state"] = "prepared"
        membership.publish()
        wait_for(lambda: seen == ["idle", "prepared"], timeout=5)


def test_a_scheduled_switch_is_not_announced_before_its_instant(
    etcd_client: EtcdClient, etcd_prefix: str, monkeypatch: Any
) -> None:
    """A node that will leave ``finishing`` at a known instant writes only where it lands.

    The fleet's commit instant is seconds away on a large fleet: every node
    writing its transient state in that lead would be N etcd writes while
    the fleet gets ready to switch (issue 17).
    """
    monkeypatch.setattr("node_agent.membership.TRANSIENT_HOLD_S", 0.3)
    payload: dict[str, Any] = {"node_id": "n-scheduled", "state": "idle", "switch_at": 0.0}
    key = f"{etcd_prefix}nodes/n-scheduled"
    with _recorded(etcd_client, key, payload) as (membership, seen):
        instant = time.time() + 1.5  # five holds away
        payload.update(state="finishing", switch_at=instant)
        membership.publish()
        while time.time() < instant:  # the participant switches at the instant
            time.sleep(0.05)
        payload.update(state="provisional", switch_at=0.0)
        membership.publish()
        wait_for(lambda: seen == ["idle", "provisional"], timeout=5)
        time.sleep(0.5)  # nothing written after it either
        assert seen == ["idle", "provisional"]


def test_a_state_that_settles_during_the_hold_is_written_after_the_debounce(
    etcd_client: EtcdClient, etcd_prefix: str, monkeypatch: Any
) -> None:
    """The write of a node that just switched waits out the debounce, like any change.

    At a fleet's commit every node leaves its transient state at one
    instant; a write at that instant competes for the CPU with the nodes
    still switching (it tripled the commit skew of 1000 simulated nodes).
    """
    monkeypatch.setattr("node_agent.membership.TRANSIENT_HOLD_S", 5.0)
    payload: dict[str, Any] = {"node_id": "n-settles", "state": "idle"}
    arrived: list[float] = []
    with _recorded(etcd_client, f"{etcd_prefix}nodes/n-settles", payload) as (membership, seen):
        payload["state"] = "finishing"
        membership.publish()
        time.sleep(PUBLISH_DEBOUNCE_S * 2)  # held: the hold is 5 s
        payload["state"] = "provisional"
        switched = time.monotonic()
        membership.publish()
        wait_for(lambda: seen == ["idle", "provisional"] and not arrived.append(time.monotonic()))
        assert arrived[0] - switched >= PUBLISH_DEBOUNCE_S
