"""Fleet membership: one etcd key per node, alive as long as its lease is.

A thread owned by :class:`Membership` opens a session (a lease kept alive by
:class:`hotfleet.etcd_session.Session`, the same keepalive the coordinator's
election uses) and puts the node's key on it.  Whenever the payload changes
(:meth:`Membership.publish`) the key is rewritten on the same lease.  A lost
lease or any etcd error ends the session: the thread says so in the log and
in :attr:`Membership.connected`, then establishes a fresh session (new lease,
key rewritten) with exponential backoff (tenacity) until etcd answers again.
The worker itself never waits for etcd.

A SIGKILLed process stops refreshing, so its key disappears when the lease
expires; :meth:`Membership.stop` revokes the lease, which deletes the key at
once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from hotfleet import transient
from hotfleet.etcd_client import EtcdClient
from hotfleet.etcd_session import Session

log = logging.getLogger(__name__)

__all__ = ["LeaseLost", "Membership"]


PUBLISH_DEBOUNCE_S = 0.2
PUT_RETRY_S = 1.0  # a record write that timed out is tried again this much later
# A record in one of these states is written only if it still is after this long: a
# 2PC passes through them in a second or two, and writing each of 1000 nodes' records
# two or three times per rollout would be most of the fleet's etcd traffic (issue 17).
# A node that stays in one (stuck, or its coordinator died) still says so.
TRANSIENT_HOLD_S = 2.0
TRANSIENT_STATES = frozenset({"preparing", "prepared", "finishing", "rolling_back"})


class LeaseLost(RuntimeError):
    """etcd answered but no longer knows the lease (it expired while we were cut off)."""


class Membership:
    """Keeps ``key`` = JSON ``payload()`` alive in etcd on a lease of ``ttl`` seconds.

    ``client_factory`` builds a client (it is called again after errors, so a
    broken channel is never reused forever); ``on_session`` runs on the
    membership thread each time a session is being established, before the
    key is written (the agent reconciles there); if it raises, the attempt
    counts as failed and is retried with backoff.
    """

    def __init__(
        self,
        key: str,
        payload: Callable[[], dict[str, Any]],
        client_factory: Callable[[], EtcdClient],
        *,
        ttl: int = 10,
        on_session: Callable[[EtcdClient], None] | None = None,
        max_backoff_s: float = 5.0,
    ) -> None:
        if ttl < 1:
            raise ValueError("lease ttl must be at least 1 s")
        self.key = key
        self.ttl = ttl
        self._payload = payload
        self._client_factory = client_factory
        self._on_session = on_session
        self._max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._first_attempt = threading.Event()
        self._lock = threading.Lock()
        self._client: EtcdClient | None = None
        self._session: Session | None = None
        self._thread: threading.Thread | None = None
        self.connected = False
        self.last_error = ""
        self.sessions = 0
        self._written = ""  # the value last put on the current session's lease
        # pid of the process that held this key before us and said it was stopping
        # (a worker its server recycled): published as ``replaces``, so the
        # coordinator knows the new pid is no crash even if it never saw "stopping"
        self.replaces = 0

    # ------------------------------------------------------------- control
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"hotfleet-membership {self.key}", daemon=True
        )
        self._thread.start()

    def wait_first_attempt(self, timeout: float | None = None) -> bool:
        """Block until the first session succeeded or failed once."""
        return self._first_attempt.wait(timeout)

    def publish(self) -> None:
        """Rewrite the key soon with a fresh payload (cheap; coalesced)."""
        self._dirty.set()

    @property
    def client(self) -> EtcdClient | None:
        """The client of the current session, if any (for reads by the agent)."""
        return self._client

    def write_now(self) -> bool:
        """Write the current payload at once, bypassing the debounce; True if it was written.

        For a last word before stopping (``state: stopping``): the coordinator
        then knows the process ended on purpose, not by a crash.
        """
        with self._lock:
            client, session = self._client, self._session
        if client is None or session is None or not session.alive():
            return False
        try:
            client.put(self.key, self._encode(), lease=session.lease_id)
        except Exception as exc:  # etcd away: the lease tells the rest
            log.warning("could not write the last membership record of %s: %s", self.key, exc)
            return False
        return True

    def stop(self, revoke: bool = True, timeout: float = 2.0) -> None:
        """Stop the thread and, with ``revoke``, delete the key at once by revoking the lease."""
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            client, session = self._client, self._session
            self._client, self._session = None, None
        if session is not None:
            session.close(revoke=revoke)  # etcd down: the lease expires by itself
        if client is not None:
            client.close()
        self.connected = False

    # ------------------------------------------------------------- thread
    def _run(self) -> None:
        while not self._stop.is_set():
            retrying = Retrying(
                # (wait_exponential_jitter's ``initial`` is deprecated in tenacity 9.2, and its
                # ``multiplier`` missing before it: the same backoff from long-standing parts)
                wait=wait_exponential(multiplier=0.1, max=self._max_backoff_s)
                + wait_random(0, 0.2),
                stop=stop_when_event_set(self._stop),
                retry=retry_if_exception_type(Exception),
                sleep=self._sleep,
                before_sleep=self._note_failure,
                reraise=True,
            )
            try:
                for attempt in retrying:
                    with attempt:
                        self._establish()
            except Exception:
                if self._stop.is_set():
                    break
                continue  # the stop check above is the only way out
            self._first_attempt.set()
            try:
                self._keepalive()
            except Exception as exc:
                self._fail(exc)

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)  # a stop interrupts the backoff

    def _note_failure(self, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        self._fail(exc)
        wait = state.next_action.sleep if state.next_action else 0.0
        if exc is None or transient.from_etcd(exc):
            log.warning(
                "etcd unreachable for membership of %s (attempt %d, retrying in %.1fs): %s",
                self.key,
                state.attempt_number,
                wait,
                self.last_error,
            )
            return
        # not an outage: a bug (ours or a malformed record we failed to refuse);
        # still retried, but said for what it is, with its traceback
        log.error(
            "membership of %s failed with an error that is not an etcd outage (attempt %d, "
            "retrying in %.1fs); please report it: %s",
            self.key,
            state.attempt_number,
            wait,
            self.last_error,
            exc_info=exc,
        )

    def _fail(self, exc: BaseException | None) -> None:
        was = self.connected
        self.connected = False
        self.last_error = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
        self._first_attempt.set()
        if was:
            log.error("lost etcd membership session for %s: %s", self.key, self.last_error)
        with self._lock:
            client, self._client = self._client, None
            session, self._session = self._session, None
        if session is not None:
            session.close(revoke=False)  # we give it up because etcd failed us
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken channel
                client.close()

    def _establish(self) -> None:
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            client = self._client
        if self.sessions == 0:
            self._note_predecessor(client)
        if self._on_session is not None:
            self._on_session(client)
        session = Session(client, self.ttl)
        with self._lock:
            self._session = session
        session._add_done_callback(self._dirty.set)  # a lost lease wakes the thread
        self._dirty.clear()
        self._written = self._encode()
        client.put(self.key, self._written, lease=session.lease_id)
        self.sessions += 1
        if not self.connected and self.sessions > 1:
            log.warning("etcd reachable again: %s re-registered", self.key)
        self.connected = True
        self.last_error = ""

    def _keepalive(self) -> None:
        """Rewrite the key when the payload changes, until the session ends (the Session
        keeps the lease alive on its own thread)."""
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            with self._lock:
                client, session = self._client, self._session
            if client is None or session is None:
                raise LeaseLost("session closed")
            if not session.alive():
                raise LeaseLost(session.reason or f"lease {session.lease_id:x} expired")
            # Coalesce a burst of changes, and keep the etcd write out of the instant
            # when the whole fleet switches (it would compete for the CPU with
            # nodes that have not switched yet).
            if self._stop.wait(PUBLISH_DEBOUNCE_S):
                return
            self._dirty.clear()
            value = self._settled(TRANSIENT_HOLD_S)
            if value is None:
                return
            if session.alive() and value != self._written:
                try:
                    client.put(self.key, value, lease=session.lease_id)
                except Exception as exc:
                    if not transient.is_transient(exc) or not session.alive():
                        raise
                    # etcd slow or briefly away while the lease lives: write again soon on
                    # the same lease rather than start a new session (a fleet that did so
                    # at once would grant N leases and rewrite N keys into a busy etcd)
                    log.warning("membership record of %s not written (%s); retrying", self.key, exc)
                    self._dirty.set()
                    self._stop.wait(PUT_RETRY_S)
                    continue
                self._written = value

    def _settled(self, hold: float) -> str | None:
        """The payload to write once it is out of a transient state, or after ``hold`` s.

        None when stopped meanwhile.
        """
        deadline = time.monotonic() + hold
        held = False  # waited here for the state to settle
        while True:
            payload = self._payload()
            left = deadline - time.monotonic()
            switch_at = payload.get("switch_at") or 0.0
            if switch_at:
                # a scheduled finish leaves the transient state at a known instant (a
                # fleet's commit): hold until just after it rather than write the state
                # it is about to leave while the whole fleet gets ready to switch
                left = max(left, switch_at - time.time() + PUBLISH_DEBOUNCE_S)
            settled = payload.get("state") not in TRANSIENT_STATES
            if settled and held:
                # It has just left the transient state: most often at a fleet's commit
                # instant, when every node switches.  The write waits out the same
                # debounce as any change (see _keepalive), so that it does not compete
                # for the CPU with nodes still switching.
                held = False
                if self._stop.wait(PUBLISH_DEBOUNCE_S):
                    return None
                self._dirty.clear()
                continue
            if settled or left <= 0:
                return json.dumps(payload, sort_keys=True)
            self._dirty.wait(left)
            if self._stop.is_set():
                return None
            self._dirty.clear()
            held = True

    def _note_predecessor(self, client: EtcdClient) -> None:
        """Before our first write: did the process before us on this key stop on purpose?"""
        raw, _ = client.get(self.key)
        try:
            before = json.loads(raw) if raw else None
        except ValueError:
            before = None
        if not isinstance(before, dict) or before.get("state") != "stopping":
            return
        pid = before.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            self.replaces = pid

    def _encode(self) -> str:
        payload = self._payload()
        if self.replaces:
            payload = {**payload, "replaces": self.replaces}
        return json.dumps(payload, sort_keys=True)
