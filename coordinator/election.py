"""Leader election over etcd: a port of etcd's ``client/v3/concurrency`` recipe.

* :class:`Session` owns one lease and the thread that keeps it alive.  When a
  keepalive has not succeeded for a whole TTL, or etcd says the lease is gone,
  the session is *expired* (:attr:`Session.expired`, sticky).  The local
  deadline is conservative: it counts the TTL from the moment a successful
  keepalive was *sent*, so it passes no later than etcd expires the lease.
* :class:`Election` campaigns under a key prefix.  A candidate writes
  ``<prefix><lease id in hex>`` on its session's lease (create-only
  transaction, an existing own key is reused) and leads once every key under
  the prefix with a lower create revision is gone.  Candidates queue in
  create-revision order; each one watches only the key just ahead of it.
* :class:`Leadership` is the fencing token that :meth:`Election.campaign`
  returns.  Its :attr:`~Leadership.epoch` is the create revision of the leader
  key: etcd revisions only grow, so every later leader has a higher epoch.
  Every write of a leader goes through :meth:`Leadership.guarded_txn`, which
  succeeds only while the leader key still exists with that create revision,
  so a deposed leader (expired lease, GC pause, partition) cannot write, and
  agents reject RPCs carrying an epoch lower than one they already saw.

A lease alone does not give mutual exclusion, and a campaign can return after
its session expired (etcd issue #19597): :meth:`Election.campaign` checks the
session again before it returns, :meth:`Leadership.is_valid` and
:meth:`Leadership.guarded_txn` check it on every call, and the owner should
watch :attr:`Session.done` and step down when it is set.

Watches are raw etcd watch streams read on the waiting thread, not etcd3's
``Watcher``: in python3-etcd3 0.13 that watcher's thread dies with a
``NameError`` when its stream ends (e.g. etcd restarted), so its callbacks
never learn that the watch is gone.  Every wait here is bounded: a stream is
re-created after each event, error or ``poll_interval``, and the state is
re-read from etcd each time, so a lost watch costs latency, never liveness.
Transient etcd errors while campaigning are retried with backoff until the
campaign's timeout (or the session's expiry, whichever comes first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
from etcd3.exceptions import Etcd3Exception

from hotfleet.etcd_client import EtcdClient
from hotfleet.etcd_session import Backoff, Session, SessionExpiredError
from hotfleet.etcd_watch import WatchStream as _WatchStream

log = logging.getLogger(__name__)

__all__ = [
    "CampaignTimeout",
    "Election",
    "ElectionError",
    "Leadership",
    "NotLeaderError",
    "Observer",
    "Session",
    "SessionExpiredError",
]

# Errors that mean "etcd did not answer this time": retried while campaigning.
_TRANSIENT: tuple[type[BaseException], ...] = (Etcd3Exception, grpc.RpcError)
_DELETE = 1  # mvccpb.Event.EventType.DELETE


class ElectionError(RuntimeError):
    """Base class of the election's own failures."""


class NotLeaderError(ElectionError):
    """The operation needs leadership (or candidacy) that this election does not hold."""


class CampaignTimeout(TimeoutError):
    """:meth:`Election.campaign` did not win within its timeout; the candidacy was withdrawn."""


# ------------------------------------------------------------------- election
class Election:
    """Campaign for leadership under ``prefix`` with the lease of ``session``.

    Several :class:`Election` objects may share a client; one election object
    holds at most one candidacy (its key is derived from the session's lease).
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        session: Session,
        *,
        poll_interval: float = 2.0,
    ) -> None:
        if not prefix:
            raise ValueError("election prefix must not be empty")
        self.client = client
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.session = session
        self.poll_interval = poll_interval
        self.key = f"{self.prefix}{session.lease_id:x}"
        self._lock = threading.Lock()
        self._rev: int | None = None  # create revision of our key while a candidate or leader
        self._leadership: Leadership | None = None
        self._last_seen: tuple[str, int, int] | None = None  # leader value, epoch, candidates ahead
        self._last_error = ""  # of the latest etcd call while campaigning, "" after a success

    # ------------------------------------------------------------ campaign
    def campaign(self, value: str, timeout: float | None = None) -> Leadership:
        """Block until this candidate leads, then return its fencing token.

        Raises :class:`CampaignTimeout` (a :class:`TimeoutError`) when
        ``timeout`` seconds pass first, :class:`SessionExpiredError` when the
        session ends first, and :class:`NotLeaderError` when the candidate key
        was deleted by someone else.  In every failure case the candidacy is
        withdrawn (best effort).  With ``timeout=None`` the wait is still
        bounded by the session: while etcd is unreachable for longer than the
        TTL the session expires and the campaign ends.  A single etcd call in
        progress at the deadline may overrun it by the client's RPC timeout.

        Campaigning again on the same election reuses the key (and so the
        epoch) while it exists, updating its value.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.session.check()
        self._last_seen, self._last_error = None, ""
        try:
            rev = self._enter(value, deadline, timeout)
            self._wait_for_turn(rev, deadline, timeout)
        except BaseException:
            self._withdraw()
            raise
        leadership = Leadership(self, self.key, rev, value)
        with self._lock:
            previous, self._leadership = self._leadership, leadership
        if previous is not None and previous.epoch != rev:  # pragma: no cover - defensive
            previous._lost = True
        log.info("leading %s as %s (epoch %d)", self.prefix, self.key, rev)
        return leadership

    def _enter(self, value: str, deadline: float | None, timeout: float | None) -> int:
        """Create our key (or reuse it) with ``value``; its create revision. Retries transient errors."""
        tx = self.client.transactions
        backoff = Backoff()
        while True:
            self.session.check()
            try:
                ok, responses = self.client.transaction(
                    compare=[tx.create(self.key) == 0],
                    success=[
                        tx.put(self.key, value, lease=self.session.lease_id),
                        tx.get(self.key),
                    ],
                    failure=[tx.get(self.key)],
                )
                kvs = responses[1] if ok else responses[0]
                if not kvs:  # pragma: no cover - the txn read its own key
                    continue
                current, meta = kvs[0]
                rev = int(meta.create_revision)
                with self._lock:
                    self._rev = rev
                if ok or current == value.encode():
                    return rev
                # Our key from an earlier campaign, with another value: update it in place.
                updated, _ = self.client.transaction(
                    compare=[tx.create(self.key) == rev],
                    success=[tx.put(self.key, value, lease=self.session.lease_id)],
                    failure=[],
                )
                if updated:
                    return rev
            except _TRANSIENT as exc:
                self._retry_pause(exc, backoff, deadline, timeout, "entering the election")

    def _wait_for_turn(self, rev: int, deadline: float | None, timeout: float | None) -> None:
        """Return once no key under the prefix has a create revision below ``rev``."""
        backoff = Backoff()
        while True:
            self.session.check()
            remaining = _remaining(deadline)
            if remaining <= 0:
                raise CampaignTimeout(self._timeout_message(timeout))
            try:
                resp = self.client.get_prefix_response(
                    self.prefix, sort_order="ascend", sort_target="create"
                )
                mine = [kv for kv in resp.kvs if kv.key.decode() == self.key]
                if not mine or mine[0].create_revision != rev:
                    self.session.check()
                    raise NotLeaderError(
                        f"candidate key {self.key} (create revision {rev}) was deleted "
                        "while campaigning"
                    )
                ahead = [kv for kv in resp.kvs if kv.create_revision < rev]
                if not ahead:
                    # etcd #19597: winning must not outlive the session.
                    self.session.check()
                    return
                self._last_seen = (
                    ahead[0].value.decode(errors="replace"),
                    int(ahead[0].create_revision),
                    len(ahead),
                )
                wait = remaining if self.poll_interval <= 0 else min(remaining, self.poll_interval)
                _wait_for_event(
                    self.client,
                    ahead[-1].key,
                    range_end=None,
                    start_revision=resp.header.revision + 1,
                    timeout=wait,
                    session=self.session,
                    matches=lambda event: event.type == _DELETE,
                )
                backoff.reset()
                self._last_error = ""
            except _TRANSIENT as exc:
                self._retry_pause(exc, backoff, deadline, timeout, "waiting for leadership")

    def _retry_pause(
        self,
        exc: BaseException,
        backoff: Backoff,
        deadline: float | None,
        timeout: float | None,
        doing: str,
    ) -> None:
        self._last_error = _describe(exc)
        remaining = _remaining(deadline)
        if remaining <= 0:
            raise CampaignTimeout(self._timeout_message(timeout)) from exc
        pause = min(backoff.next(), remaining)
        log.warning(
            "etcd error %s under %s (retrying in %.1fs): %s",
            doing,
            self.prefix,
            pause,
            _describe(exc),
        )
        self.session.done.wait(pause)

    def _timeout_message(self, timeout: float | None) -> str:
        seen = self._last_seen
        if seen is None:
            who = "unknown"
        else:
            value, epoch, ahead = seen
            who = f"{value!r} (epoch {epoch}), {ahead} candidate(s) ahead of {self.key}"
        message = (
            f"not elected under {self.prefix} within {timeout or 0:g}s; last seen leader: {who}"
        )
        if self._last_error:
            message += f"; etcd unreachable, last error: {self._last_error}"
        return message

    def _withdraw(self) -> None:
        """Best-effort delete of our candidate key after a failed campaign."""
        with self._lock:
            rev, self._rev = self._rev, None
            leadership, self._leadership = self._leadership, None
        if leadership is not None:
            leadership._lost = True
        if not self.session.alive():
            return  # the key went (or goes) with the lease
        try:
            if rev is None:
                # The create may have happened with its reply lost; the key is ours alone.
                self.client.delete(self.key)
            else:
                self._delete_own(rev)
        except Exception as exc:  # the key goes with the lease anyway
            log.warning("could not withdraw candidate key %s: %s", self.key, _describe(exc))

    def _delete_own(self, rev: int) -> None:
        tx = self.client.transactions
        self.client.transaction(
            compare=[tx.create(self.key) == rev], success=[tx.delete(self.key)], failure=[]
        )

    # ------------------------------------------------------------ leader ops
    def resign(self) -> None:
        """Give up leadership: delete our key if its create revision still matches.

        A no-op when not a leader.  etcd errors propagate (retry, or let the
        session's lease expire).
        """
        with self._lock:
            rev, leadership = self._rev, self._leadership
        if rev is None:
            return
        if leadership is not None:
            leadership.relinquish()  # stop writing before the key is gone
        self._delete_own(rev)
        with self._lock:
            if self._rev == rev:
                self._rev, self._leadership = None, None
        log.info("resigned %s (epoch %d)", self.key, rev)

    def proclaim(self, value: str) -> None:
        """Change the leader value without a new election (guarded by the leader key's revision)."""
        leadership = self._leadership
        if leadership is None:
            raise NotLeaderError(f"not leading {self.prefix}: campaign first")
        tx = self.client.transactions
        if not leadership.guarded_txn([tx.put(self.key, value, lease=self.session.lease_id)]):
            raise NotLeaderError(f"lost leadership of {self.prefix} (epoch {leadership.epoch})")
        leadership.value = value

    # ------------------------------------------------------------ queries
    def leader(self) -> tuple[str, int] | None:
        """``(value, epoch)`` of the current leader (lowest create revision), None if none."""
        resp = self.client.get_prefix_response(
            self.prefix, sort_order="ascend", sort_target="create", limit=1
        )
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return kv.value.decode(), int(kv.create_revision)

    @property
    def leadership(self) -> Leadership | None:
        """The token of the last won campaign, until :meth:`resign`."""
        return self._leadership

    def observe(
        self, callback: Callable[[tuple[str, int] | None], None], *, poll_interval: float = 5.0
    ) -> Observer:
        """Call ``callback((value, epoch) or None)`` on every leader change, on a thread.

        The returned :class:`Observer` owns that thread: stop it (or use it as
        a context manager).  The first call reports the current leader.
        """
        return Observer(self.client, self.prefix, callback, poll_interval=poll_interval)


# ----------------------------------------------------------------- leadership
class Leadership:
    """A fencing token: the leader key and its create revision (:attr:`epoch`)."""

    def __init__(self, election: Election, key: str, epoch: int, value: str) -> None:
        self.key = key
        self.epoch = epoch
        self.value = value
        self.session = election.session
        self._client = election.client
        self._lost = False

    def fence(self) -> Any:
        """The compare that holds only while we lead; for callers composing their own txn."""
        return self._client.transactions.create(self.key) == self.epoch

    def transaction(
        self, success_ops: Sequence[Any], extra_compares: Sequence[Any] = ()
    ) -> tuple[bool, list[Any]]:
        """Run ``success_ops`` iff we still lead and ``extra_compares`` hold: ``(ok, responses)``.

        Never writes once the session is over or leadership was seen lost.
        etcd errors propagate: the write may or may not have happened, so the
        caller retries an idempotent write or re-reads.
        """
        if self._lost or not self.session.alive():
            return False, []
        tx = self._client.transactions
        ok, responses = self._client.transaction(
            compare=[self.fence(), *extra_compares],
            success=list(success_ops),
            failure=[tx.get(self.key)],
        )
        if ok:
            return True, list(responses)
        kvs = responses[0] if responses else []
        if not kvs or int(kvs[0][1].create_revision) != self.epoch:
            self._lost = True  # a create revision never comes back
        return False, []

    def relinquish(self) -> None:
        """Write nothing more under this leadership (a coordinator that is stopping).

        What its threads were doing is left as a crash would leave it, and for
        the same reason: the next leader recovers it from the records.  A
        write racing the stop could otherwise act on results the stop itself
        caused (RPCs cancelled on the way out read as nodes that failed).
        """
        self._lost = True

    def guarded_txn(self, success_ops: Sequence[Any], extra_compares: Sequence[Any] = ()) -> bool:
        """:meth:`transaction` without the responses: did the fenced write happen?"""
        ok, _ = self.transaction(success_ops, extra_compares)
        return ok

    def is_valid(self) -> bool:
        """True iff the session is alive and etcd still holds our key with our epoch.

        False also when etcd cannot be asked: leadership that cannot be proven
        must not be acted on.
        """
        if self._lost or not self.session.alive():
            return False
        try:
            _, meta = self._client.get(self.key)
        except _TRANSIENT:
            return False
        if meta is None or int(meta.create_revision) != self.epoch:
            self._lost = True
            return False
        return self.session.alive()

    def __repr__(self) -> str:
        return f"Leadership(key={self.key!r}, epoch={self.epoch}, value={self.value!r})"


# ------------------------------------------------------------------- observer
class Observer:
    """A thread reporting leader changes of one election prefix; :meth:`stop` ends it."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        callback: Callable[[tuple[str, int] | None], None],
        *,
        poll_interval: float = 5.0,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._callback = callback
        self._poll_interval = poll_interval
        self._stop = threading.Event()
        self._cancel = _Canceller()
        self.current: tuple[str, int] | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"hotfleet-election-observer {prefix}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the thread; idempotent."""
        self._stop.set()
        self._cancel.cancel()
        self._thread.join()

    def __enter__(self) -> Observer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        backoff = Backoff()
        first = True
        while not self._stop.is_set():
            try:
                resp = self._client.get_prefix_response(
                    self._prefix, sort_order="ascend", sort_target="create", limit=1
                )
                now = (
                    (resp.kvs[0].value.decode(), int(resp.kvs[0].create_revision))
                    if resp.kvs
                    else None
                )
                if first or now != self.current:
                    first = False
                    self.current = now
                    try:
                        self._callback(now)
                    except Exception:
                        log.exception("election observer callback failed")
                _watch_prefix_change(
                    self._client,
                    self._prefix,
                    resp.header.revision + 1,
                    self._poll_interval,
                    self._cancel,
                )
                backoff.reset()
            except _TRANSIENT as exc:
                if self._stop.is_set():
                    return
                log.warning("election observer on %s: etcd error: %s", self._prefix, _describe(exc))
                self._stop.wait(backoff.next())


# -------------------------------------------------------------------- helpers
class _Canceller:
    """Lets another thread close the stream the owner is currently reading."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fn: Callable[[], None] | None = None
        self._cancelled = False

    def set(self, fn: Callable[[], None] | None) -> None:
        with self._lock:
            self._fn = fn
            cancelled = self._cancelled
        if cancelled and fn is not None:
            fn()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            fn = self._fn
        if fn is not None:
            fn()


def _read_until(stream: _WatchStream, matches: Callable[[Any], bool]) -> None:
    """Read ``stream`` until a matching event, a cancel by etcd, or the stream's end/deadline."""
    try:
        for resp in stream:
            if resp.canceled or resp.compact_revision:
                return  # the caller re-reads the state and watches again
            if any(matches(event) for event in resp.events):
                return
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED) or (
            exc.code() is grpc.StatusCode.UNKNOWN and "deadline exceeded" in (exc.details() or "")
        ):  # etcd reports a watch's own deadline as UNKNOWN
            return
        raise


def _wait_for_event(
    client: EtcdClient,
    key: bytes,
    *,
    range_end: bytes | None,
    start_revision: int,
    timeout: float,
    session: Session,
    matches: Callable[[Any], bool],
) -> None:
    """Wait (at most ``timeout``) for a matching event on ``key``; ends early when the session does."""
    stream = _WatchStream(
        client, key, range_end=range_end, start_revision=start_revision, timeout=timeout
    )
    unregister = session._add_done_callback(stream.close)
    try:
        _read_until(stream, matches)
    finally:
        unregister()
        stream.close()


def _watch_prefix_change(
    client: EtcdClient, prefix: str, start_revision: int, timeout: float, cancel: _Canceller
) -> None:
    key = prefix.encode()
    stream = _WatchStream(
        client, key, range_end=_prefix_end(key), start_revision=start_revision, timeout=timeout
    )
    cancel.set(stream.close)
    try:
        _read_until(stream, lambda event: True)
    finally:
        cancel.set(None)
        stream.close()


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _remaining(deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - time.monotonic()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        details = exc.details() if hasattr(exc, "details") else ""
        return f"{getattr(code, 'name', code)}: {details}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
