"""The decision watch: a prepared node learns its rollout's decision from etcd by itself.

Why: the decision key is the 2PC's commit point.  A node that voted yes
must switch when the fleet committed even if the coordinator that prepared
it died before sending Finish, and must drop its prepared release on an
abort nobody delivered.  While a rollout is prepared, a thread owned by
:class:`DecisionWatches` reads ``<prefix>rollouts/<id>/decision`` once and then
watches it from the revision of that read (so no write can slip between
the two), verifies the record against etcd's history
of the election (:mod:`hotfleet.decisions`) and hands it to the participant,
which acts through the same code paths as the Finish and Abort RPCs.  A
commit carries the fleet's commit instant, so every node switches at it
whenever the coordinator's Finish reaches it (issue 17: the skew is bounded
by clocks and etcd's push, not by the order of the Finish fan-out).

The watch is pushed, so a fleet of prepared nodes costs etcd one read and
one watch stream each instead of N reads a second.  A stream lives
:data:`WATCH_SPAN_S` and is reopened from the last revision seen (a stream
that silently stopped cannot hold a node for longer); a stream that failed
(etcd away) turns into a read every :data:`DECISION_POLL_S` until etcd
answers again.  Used by the real agent and by the simulated agents of the
benchmarks alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from etcd3.etcdrpc import kv_pb2

from hotfleet import decisions, transient
from hotfleet.etcd_client import EtcdClient
from hotfleet.etcd_watch import WatchStream
from hotfleet.keys import Keys

__all__ = [
    "COMMIT_GRACE_S",
    "DECISION_POLL_S",
    "WATCH_SPAN_S",
    "DecisionWatch",
    "DecisionWatches",
]

log = logging.getLogger(__name__)

_PUT = kv_pb2.Event.PUT  # an event's type; the other one is DELETE

DECISION_POLL_S = 0.5  # the pace of reads while etcd cannot be watched (an outage)
WATCH_SPAN_S = 10.0  # one watch stream's deadline; the next one starts where it ended

COMMIT_GRACE_S = 1.0  # how long a commit naming no instant is left to the coordinator


class DecisionWatch:
    """Watches one prepared rollout's decision key and has the agent act on it.

    Started when the rollout is prepared, stopped when it is finished,
    aborted or superseded (by whoever: an RPC or this watch) and joined when
    the agent stops.  etcd errors are retried every ``interval``; the client
    from :mod:`hotfleet.etcd_client` never locks an endpoint out.
    ``commit_at`` is the commit instant of the verified decision handed to
    the participant (0: the record names none).
    """

    def __init__(self, owner: DecisionWatches, rollout_id: str, interval: float) -> None:
        self.owner = owner
        self.rollout_id = rollout_id
        self.interval = interval
        self.key = owner.keys.decision(rollout_id)
        self.stopped = threading.Event()
        self.commit_at = 0.0
        self._commit_seen = 0.0
        self._revision = 0  # etcd revision seen up to: watch from the next one (0: read first)
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"hotfleet-decision {rollout_id}", daemon=True
        )

    def grace_over(self) -> bool:
        """Finish by ourselves only if the coordinator has not within a grace period.

        For a commit that names no instant: the coordinator's Finish carries
        it, and a node that switched on its own the moment it read the
        decision would spread the commit over the fleet's reading times.
        """
        now = time.monotonic()
        if not self._commit_seen:
            self._commit_seen = now
        return now - self._commit_seen >= COMMIT_GRACE_S

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (a blocked stream is closed at once); never waits."""
        with self._lock:
            self.stopped.set()
            stream = self._stream
        if stream is not None:
            stream.close()

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # a bug here must not go unnoticed, nor kill the worker
            log.exception("rollout %s: decision watch crashed", self.rollout_id)
        finally:
            self.owner._ended(self)

    def _watch(self) -> None:
        failing = False
        odd = ""
        while not self.stopped.is_set():
            try:
                decision = self._next()
            except decisions.ForgedDecision as exc:
                if str(exc) != odd:
                    odd = str(exc)
                    log.error(
                        "rollout %s: not acting on the decision record at %s: %s; still "
                        "waiting for the coordinator",
                        self.rollout_id,
                        self.key,
                        exc,
                    )
                continue
            except Exception as exc:
                self._revision = 0  # read again once etcd answers
                if not transient.from_etcd(exc):  # not an outage: say it is a bug, once
                    if not failing:
                        log.exception(
                            "rollout %s: reading the decision failed (a bug)", self.rollout_id
                        )
                elif not failing:
                    log.warning(
                        "rollout %s: cannot read decision %s (%s: %s); retrying every %.1fs",
                        self.rollout_id,
                        self.key,
                        type(exc).__name__,
                        exc,
                        self.interval,
                    )
                failing = True
                self.stopped.wait(self.interval)
                continue
            if failing:
                log.info("rollout %s: decision key readable again", self.rollout_id)
                failing = False
            if decision is None:
                continue
            self.commit_at = decision.commit_at
            if self.owner.apply(self.rollout_id, decision.decision, self, decision.participants):
                return
            # a commit left to the coordinator's Finish for now: read it again later
            self._revision = 0
            self.stopped.wait(self.interval)

    def _next(self) -> decisions.Decision | None:
        """The next verified decision: the key's value at first, then each change of it.

        None when there is none yet (or it was deleted), a stream reached its
        deadline or the watch was stopped.  Raises
        :class:`hotfleet.decisions.ForgedDecision` for a record no leader
        wrote (checked against etcd's history of the election), and whatever
        etcd raises while it cannot be read or verified.
        """
        client = self.owner.client()
        if not self._revision:
            response = client.get_response(self.key)
            self._revision = int(response.header.revision)
            if not response.kvs:
                return None
            kv = response.kvs[0]
        else:
            kv = self._pushed(client)
            if kv is None:
                return None
        return decisions.verify(client, self.owner.keys, kv.value, int(kv.mod_revision))

    def _pushed(self, client: EtcdClient) -> Any:
        """The key-value of the next write of the key (None: deleted, deadline or stopped)."""
        stream = WatchStream(
            client,
            self.key.encode(),
            range_end=None,
            start_revision=self._revision + 1,
            timeout=WATCH_SPAN_S,
        )
        with self._lock:
            if self.stopped.is_set():
                stream.close()
                return None
            self._stream = stream
        try:
            for response in stream:
                if response.compact_revision or response.canceled:
                    self._revision = 0  # history gone: read the key again
                    return None
                if response.events:
                    event = response.events[-1]
                    self._revision = int(event.kv.mod_revision)
                    return event.kv if event.type == _PUT else None
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise
        finally:
            with self._lock:
                self._stream = None
            stream.close()
        return None


Apply = Callable[[str, str, "DecisionWatch", "Sequence[str] | None"], bool]


class DecisionWatches:
    """Makes, owns and stops the decision watches of one participant.

    Called with a rollout id (the participant's ``watch`` factory) it
    returns an unstarted watch; ``apply(rollout_id, decision, watch,
    participants)`` is called with every verified decision and returns True
    once nothing is left to do.
    """

    def __init__(
        self,
        keys: Keys,
        client: Callable[[], EtcdClient],
        apply: Apply,
        interval: float = DECISION_POLL_S,
    ) -> None:
        self.keys = keys
        self.client = client
        self.apply = apply
        self.interval = interval
        self._lock = threading.Lock()
        self._live: set[DecisionWatch] = set()

    def __call__(self, rollout_id: str) -> DecisionWatch:
        watch = DecisionWatch(self, rollout_id, self.interval)
        with self._lock:
            self._live.add(watch)
        return watch

    def _ended(self, watch: DecisionWatch) -> None:
        with self._lock:
            self._live.discard(watch)

    def stop(self, timeout: float) -> None:
        """Stop every watch and join each for up to ``timeout`` seconds."""
        with self._lock:
            watches = list(self._live)
        for watch in watches:
            watch.stop()
        for watch in watches:
            watch.join(timeout)
