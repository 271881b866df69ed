"""An etcd lease kept alive by a thread: the one keepalive loop of the project.

Used by the coordinator's election (:mod:`coordinator.election`: a leader's
session) and by every node's membership (:mod:`node_agent.membership`: the
key that says the node is up), so both ride out etcd hiccups and notice a
lost lease the same way.  A port of etcd's ``concurrency.Session``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from types import TracebackType

from hotfleet.etcd_client import EtcdClient

__all__ = ["Backoff", "Session", "SessionExpiredError"]

log = logging.getLogger(__name__)

_BACKOFF_INITIAL_S = 0.1
_BACKOFF_MAX_S = 1.0


class SessionExpiredError(RuntimeError):
    """The session's lease expired, was revoked, or the session was closed."""


class Session:
    """One lease kept alive by a thread this object owns (stopped by :meth:`close`).

    ``ttl`` is what is asked of etcd; :attr:`ttl` is what etcd granted (it may
    raise it to its minimum).  The keepalive runs every third of the TTL and
    retries failures quickly until the TTL is used up.  A keepalive call can
    block for up to the client's RPC timeout, so :attr:`expired` may be set
    that much late; :meth:`alive` compares with the deadline directly and is
    never late.

    :attr:`expired` is set when the lease is lost (never cleared);
    :attr:`done` is set when the session ends for any reason (expiry or close).
    """

    def __init__(self, client: EtcdClient, ttl: int = 10) -> None:
        if ttl < 1:
            raise ValueError("session ttl must be at least 1 s")
        self.client = client
        sent = time.monotonic()
        lease = client.lease(ttl)
        self.lease_id: int = int(lease.id)
        self.ttl: int = int(lease.ttl) or ttl
        self.expired = threading.Event()
        self.done = threading.Event()
        self.reason = ""
        self._deadline = sent + self.ttl
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_done: list[Callable[[], None]] = []
        self._thread = threading.Thread(
            target=self._keepalive, name=f"hotfleet-session-{self.lease_id:x}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------ queries
    def alive(self) -> bool:
        """True while the lease is known to be held: not closed, not expired, deadline ahead."""
        if self.done.is_set():
            return False
        if time.monotonic() >= self._deadline:
            self._expire(
                f"no successful keepalive for lease {self.lease_id:x} within its {self.ttl}s TTL"
            )
            return False
        return True

    def remaining(self) -> float:
        """Seconds until the lease may expire (0 once the session is over)."""
        return max(0.0, self._deadline - time.monotonic()) if self.alive() else 0.0

    def check(self) -> None:
        """Raise :class:`SessionExpiredError` unless :meth:`alive`."""
        if not self.alive():
            raise SessionExpiredError(self.reason or f"session for lease {self.lease_id:x} is over")

    # ------------------------------------------------------------ control
    def close(self, *, revoke: bool = True) -> None:
        """Stop the keepalive thread and revoke the lease (deleting its keys); idempotent.

        ``revoke=False`` leaves the lease to expire by itself (its keys stay
        for up to the TTL): for an owner that gives the session up because
        etcd is unreachable, where a revoke would only wait for a timeout.
        """
        with self._lock:
            closing = not self._stop.is_set()
            self._stop.set()
        self._thread.join()
        if not closing:
            return
        was_alive = self.alive()
        self._finish("session closed", expired=False)
        if was_alive and revoke:
            try:
                self.client.revoke_lease(self.lease_id)
            except Exception as exc:  # etcd down: the lease expires by itself
                log.warning("could not revoke session lease %x: %s", self.lease_id, exc)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "alive" if self.alive() else (self.reason or "over")
        return f"Session(lease={self.lease_id:x}, ttl={self.ttl}, {state})"

    # ------------------------------------------------------------ internals
    def _add_done_callback(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` (once) when the session ends; returns a function that unregisters it."""
        with self._lock:
            if not self.done.is_set():
                self._on_done.append(fn)

                def remove() -> None:
                    with self._lock, contextlib.suppress(ValueError):
                        self._on_done.remove(fn)

                return remove
        fn()
        return lambda: None

    def _expire(self, reason: str) -> None:
        self._finish(reason, expired=True)

    def _finish(self, reason: str, *, expired: bool) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.reason = reason
            if expired:
                self.expired.set()
            self.done.set()
            callbacks, self._on_done = self._on_done, []
        if expired:
            log.error("etcd session expired: %s", reason)
        for fn in callbacks:
            try:
                fn()
            except Exception:  # pragma: no cover - our callbacks only cancel streams
                log.exception("session done callback failed")

    def _keepalive(self) -> None:
        interval = max(self.ttl / 3.0, 0.2)
        # the first renewal at a random point of the interval: sessions opened together
        # (a fleet started at once, 100 simulated nodes in a process) do not renew in a
        # burst every interval for ever (issue 17)
        wait = interval * random.uniform(0.5, 1.0)
        backoff = Backoff()
        while not self._stop.wait(wait):
            if not self.alive():
                return
            sent = time.monotonic()
            try:
                replies = list(self.client.refresh_lease(self.lease_id))
            except Exception as exc:
                if not self.alive():
                    return
                left = self._deadline - time.monotonic()
                log.warning(
                    "keepalive of lease %x failed (%.1fs left of its TTL): %s",
                    self.lease_id,
                    left,
                    exc,
                )
                wait = min(backoff.next(), max(left, 0.0))
                continue
            if not replies or replies[0].TTL <= 0:
                self._expire(f"etcd no longer knows lease {self.lease_id:x} (expired or revoked)")
                return
            with self._lock:
                if not self.done.is_set():
                    self._deadline = sent + int(replies[0].TTL)
            backoff.reset()
            wait = interval


class Backoff:
    """Doubling pauses from 0.1 s up to 1 s, reset after a success."""

    def __init__(self) -> None:
        self._next = _BACKOFF_INITIAL_S

    def next(self) -> float:
        value, self._next = self._next, min(self._next * 2, _BACKOFF_MAX_S)
        return value

    def reset(self) -> None:
        self._next = _BACKOFF_INITIAL_S
