"""Leader election against a real etcd: hand-over, fencing, expiry, crashes, etcd restarts."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.election import (
    CampaignTimeout,
    Election,
    Leadership,
    NotLeaderError,
    Session,
    SessionExpiredError,
)
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from tests.agents import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[1]
OUR_THREADS = ("hotfleet-session-", "hotfleet-election-observer")


class Fleet:
    """Clients and sessions of one test, closed (sessions first) at teardown."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.clients: list[EtcdClient] = []
        self.sessions: list[Session] = []

    def client(self, timeout: float = 2) -> EtcdClient:
        client = connect(self.endpoint, timeout=timeout)
        self.clients.append(client)
        return client

    def candidate(self, prefix: str, ttl: int = 5, client: EtcdClient | None = None) -> Election:
        client = client or self.client()
        session = Session(client, ttl=ttl)
        self.sessions.append(session)
        return Election(client, prefix, session, poll_interval=1.0)

    def close(self) -> None:
        for session in self.sessions:
            session.close()
        for client in self.clients:
            client.close()


class Campaign:
    """``election.campaign`` on a thread of the test, joined by the test."""

    def __init__(self, election: Election, value: str, timeout: float) -> None:
        self.result: Leadership | None = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._thread = threading.Thread(
            target=self._run, args=(election, value, timeout), name=f"campaign {value}"
        )
        self._thread.start()

    def _run(self, election: Election, value: str, timeout: float) -> None:
        try:
            self.result = election.campaign(value, timeout=timeout)
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> Leadership:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "campaign still blocked"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _our_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(OUR_THREADS)}


def _queued(client: Any, prefix: str, candidates: int) -> None:
    """Until ``candidates`` keys stand in the election: the newest candidate is waiting.

    Replaces a fixed sleep after starting a campaign: a candidate that must
    wait has written its key, so from here on "still running" is a fact, not
    a guess about how long a thread takes to start.
    """
    wait_for(lambda: len(list(client.get_prefix(prefix, keys_only=True))) >= candidates, 5)


@pytest.fixture
def fleet(etcd_endpoint: str) -> Iterator[Fleet]:
    before = _our_threads()
    f = Fleet(etcd_endpoint)
    try:
        yield f
    finally:
        f.close()
    leftover = _our_threads() - before
    assert not leftover, f"threads left running: {leftover}"


# ------------------------------------------------------------------ hand-over
def test_first_leads_second_waits_until_resign(fleet: Fleet, etcd_prefix: str) -> None:
    prefix = etcd_prefix + "election/"
    a = fleet.candidate(prefix)
    b = fleet.candidate(prefix)  # own client and session

    lead_a = a.campaign("a", timeout=5)
    assert a.leader() == ("a", lead_a.epoch)
    assert lead_a.is_valid()

    waiting = Campaign(b, "b", timeout=10)
    _queued(fleet.clients[0], prefix, 2)
    assert waiting.running(), "second candidate must wait while the first leads"
    assert b.leader() == ("a", lead_a.epoch)

    resigned_at = time.monotonic()
    a.resign()
    lead_b = waiting.join(5)
    assert waiting.finished_at is not None and waiting.finished_at - resigned_at < 2.0
    assert lead_b.epoch > lead_a.epoch
    assert b.leader() == ("b", lead_b.epoch)
    assert lead_b.is_valid()
    assert not lead_a.is_valid()
    tx = a.client.transactions
    assert not lead_a.guarded_txn([tx.put(etcd_prefix + "data", "stale")])
    assert lead_b.guarded_txn([tx.put(etcd_prefix + "data", "fresh")])
    assert fleet.clients[0].get(etcd_prefix + "data")[0] == b"fresh"


def test_revoked_lease_loses_leadership_and_fencing(fleet: Fleet, etcd_prefix: str) -> None:
    prefix = etcd_prefix + "election/"
    a = fleet.candidate(prefix, ttl=5)
    b = fleet.candidate(prefix, ttl=5)
    data = etcd_prefix + "data"
    lead_a = a.campaign("a", timeout=5)
    tx = a.client.transactions
    assert lead_a.guarded_txn([tx.put(data, "a-1")])
    waiting = Campaign(b, "b", timeout=10)
    _queued(fleet.clients[0], prefix, 2)
    assert waiting.running()

    # Simulate expiry (GC pause, partition): etcd drops A's lease and leader key.
    fleet.clients[0].revoke_lease(a.session.lease_id)

    lead_b = waiting.join(5)
    assert lead_b.epoch > lead_a.epoch
    # A still holds its token, but every fenced write now fails.
    assert not lead_a.guarded_txn([tx.put(data, "a-2")])
    assert not lead_a.is_valid()
    assert fleet.clients[0].get(data)[0] == b"a-1"
    assert lead_b.guarded_txn([tx.put(data, "b-1")])
    # A's keepalive learns that the lease is gone well before the TTL runs out.
    assert a.session.expired.wait(4), "session must notice the revoked lease"
    assert a.session.done.is_set() and not a.session.alive()
    with pytest.raises(SessionExpiredError):
        a.campaign("a", timeout=1)
    with pytest.raises(NotLeaderError):
        a.proclaim("a again")


def test_epochs_strictly_increase(fleet: Fleet, etcd_prefix: str) -> None:
    prefix = etcd_prefix + "election/"
    client = fleet.client()
    epochs = []
    for i in range(4):
        candidate = fleet.candidate(prefix, client=client)
        lead = candidate.campaign(f"c{i}", timeout=5)
        assert candidate.campaign(f"c{i}", timeout=5).epoch == lead.epoch  # reuses its key
        epochs.append(lead.epoch)
        if i % 2:
            candidate.resign()
        else:
            candidate.session.close()  # revokes the lease: the key goes with it
    assert epochs == sorted(set(epochs)), epochs
    assert fleet.candidate(prefix, client=client).leader() is None


def test_proclaim_and_extra_compares(fleet: Fleet, etcd_prefix: str) -> None:
    prefix = etcd_prefix + "election/"
    a = fleet.candidate(prefix)
    lead = a.campaign("addr-1", timeout=5)
    a.proclaim("addr-2")
    assert a.leader() == ("addr-2", lead.epoch)
    # Re-campaigning with a new value keeps the key and the epoch.
    assert a.campaign("addr-3", timeout=5).epoch == lead.epoch
    assert a.leader() == ("addr-3", lead.epoch)

    tx = a.client.transactions
    key = etcd_prefix + "rollout"
    ok, responses = lead.transaction([tx.put(key, "v1"), tx.get(key)], [tx.version(key) == 0])
    assert ok and responses[1][0][0] == b"v1"
    # A failing extra compare fails the txn but leadership stands.
    assert not lead.guarded_txn([tx.put(key, "v2")], [tx.version(key) == 0])
    assert lead.is_valid()
    assert a.client.get(key)[0] == b"v1"

    a.resign()
    assert not lead.is_valid()
    assert a.leader() is None
    with pytest.raises(NotLeaderError):
        a.proclaim("addr-4")
    a.resign()  # no-op when not leading


def test_campaign_timeout_is_clear_and_withdraws(fleet: Fleet, etcd_prefix: str) -> None:
    prefix = etcd_prefix + "election/"
    a = fleet.candidate(prefix)
    b = fleet.candidate(prefix)
    lead_a = a.campaign("a", timeout=5)
    started = time.monotonic()
    with pytest.raises(CampaignTimeout) as info:
        b.campaign("b", timeout=0.5)
    assert isinstance(info.value, TimeoutError)
    assert 0.5 <= time.monotonic() - started < 2.5
    message = str(info.value)
    assert prefix in message and "'a'" in message and str(lead_a.epoch) in message
    # The timed-out candidate left no key behind.
    keys = [meta.key.decode() for _, meta in fleet.clients[0].get_prefix(prefix)]
    assert keys == [a.key]
    assert b.leadership is None


def test_observe_reports_leader_changes(fleet: Fleet, etcd_prefix: str) -> None:
    prefix = etcd_prefix + "election/"
    a = fleet.candidate(prefix)
    b = fleet.candidate(prefix)
    seen: list[tuple[str, int] | None] = []
    with a.observe(seen.append, poll_interval=1.0):
        wait_for(lambda: seen == [None], 3, 0.02)
        lead_a = a.campaign("a", timeout=5)
        wait_for(lambda: seen[-1] == ("a", lead_a.epoch), 3, 0.02)
        waiting = Campaign(b, "b", timeout=10)
        _queued(fleet.clients[0], prefix, 2)
        a.resign()
        lead_b = waiting.join(5)
        wait_for(lambda: seen[-1] == ("b", lead_b.epoch), 3, 0.02)
    assert seen[0] is None and ("a", lead_a.epoch) in seen


# ------------------------------------------------------------------- crashes
CHILD = """
import sys, time
from coordinator.election import Election, Session
from hotfleet.etcd_client import connect
client = connect(sys.argv[1])
lead = Election(client, sys.argv[2], Session(client, ttl=2)).campaign("child", timeout=10)
print(lead.epoch, flush=True)
time.sleep(60)
"""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"child printed nothing within {timeout}s")
    return proc.stdout.readline()


def test_sigkilled_leader_is_replaced_after_ttl(fleet: Fleet, etcd_prefix: str) -> None:
    prefix = etcd_prefix + "election/"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, fleet.endpoint, prefix],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = _read_line(proc, 15)
        assert line.strip().isdigit(), f"child failed: {line!r}, exit {proc.poll()}"
        child_epoch = int(line)
        b = fleet.candidate(prefix, ttl=2)
        assert b.leader() == ("child", child_epoch)
        waiting = Campaign(b, "b", timeout=10)
        _queued(b.client, prefix, 2)
        assert waiting.running()
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        lead_b = waiting.join(8)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert waiting.finished_at is not None
    took = waiting.finished_at - killed_at
    # The child's lease (TTL 2 s, refreshed every 2/3 s) had to run out first.
    assert 0.8 < took < 5, took
    assert lead_b.epoch > child_epoch
    assert b.leader() == ("b", lead_b.epoch)


# -------------------------------------------------------------- etcd failure
def test_etcd_restart_while_waiting(etcd_server: EtcdServer) -> None:
    prefix = "/hotfleet-test/restart/election/"
    fleet = Fleet(etcd_server.endpoint)
    before = _our_threads()
    try:
        a = fleet.candidate(prefix, ttl=5, client=fleet.client(timeout=1))
        b = fleet.candidate(prefix, ttl=5, client=fleet.client(timeout=1))
        lead_a = a.campaign("a", timeout=5)
        waiting = Campaign(b, "b", timeout=15)
        _queued(a.client, prefix, 2)
        etcd_server.kill()
        # a non-event (the waiting candidate neither wins nor fails while etcd
        # is down) can only be shown over a stretch of time
        time.sleep(1.0)
        assert waiting.running()
        etcd_server.start()
        _retry(a.resign, 5)
        lead_b = waiting.join(10)
        assert lead_b.epoch > lead_a.epoch
        assert lead_b.is_valid()
        assert a.session.alive() and b.session.alive()  # both leases outlived the outage
    finally:
        fleet.close()
    assert not (_our_threads() - before)


def test_etcd_gone_while_waiting_raises(etcd_server: EtcdServer) -> None:
    prefix = "/hotfleet-test/gone/election/"
    fleet = Fleet(etcd_server.endpoint)
    before = _our_threads()
    try:
        a = fleet.candidate(prefix, ttl=3, client=fleet.client(timeout=1))
        b = fleet.candidate(prefix, ttl=3, client=fleet.client(timeout=1))
        a.campaign("a", timeout=5)
        waiting = Campaign(b, "b", timeout=2)
        _queued(a.client, prefix, 2)
        etcd_server.kill()
        with pytest.raises((CampaignTimeout, SessionExpiredError)) as info:
            waiting.join(2 + 1 + 2)  # timeout + one RPC timeout + slack
        assert "etcd" in str(info.value) or isinstance(info.value, SessionExpiredError)
        # Without etcd, the session expires within its TTL (and says so).
        assert b.session.expired.wait(5)
        assert not b.session.alive()
        with pytest.raises(SessionExpiredError):
            b.campaign("b", timeout=1)
    finally:
        fleet.close()
    assert not (_our_threads() - before)


def _retry(fn: Callable[[], None], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
