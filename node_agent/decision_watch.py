"""The decision watch: a prepared node learns its rollout's decision from etcd by itself.

Why: the decision key is the 2PC's commit point.  A node that voted yes
must switch when the fleet committed even if the coordinator that prepared
it died before sending Finish, and must drop its prepared release on an
abort nobody delivered.  While a rollout is prepared, a thread owned by
:class:`DecisionWatches` watches ``<prefix>rollouts/<id>/decision`` from before the
vote is answered (the decision, written after every vote, is one of its
events; the watch rides the etcd client's one shared watch stream),
verifies the record against etcd's history
of the election (:mod:`hotfleet.decisions`) and hands it to the participant,
which acts through the same code paths as the Finish and Abort RPCs.  A
commit carries the fleet's commit instant, so every node switches at it
whenever the coordinator's Finish reaches it (issue 17: the skew is bounded
by clocks and etcd's push, not by the order of the Finish fan-out).

The watch is pushed, so a fleet of prepared nodes costs etcd one watch
each instead of N reads a second.  Without a word from the watch for
:data:`WATCH_SPAN_S` the key is read and watched anew (a watch that silently
stopped cannot hold a node for longer); a watch that ended (etcd away)
turns into a read every :data:`DECISION_POLL_S` until etcd answers again.  Used by the real agent and by the simulated agents of the
benchmarks alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import etcd3.events

from hotfleet import decisions, transient
from hotfleet.etcd_client import EtcdClient
from hotfleet.etcd_watch import repair_etcd3_watcher
from hotfleet.keys import Keys

__all__ = [
    "COMMIT_GRACE_S",
    "DECISION_POLL_S",
    "WATCH_SPAN_S",
    "DecisionWatch",
    "DecisionWatches",
]

log = logging.getLogger(__name__)

repair_etcd3_watcher()  # a watch whose stream ended must say so (hotfleet.etcd_watch)

DECISION_POLL_S = 0.5  # the pace of reads while etcd cannot be watched (an outage)
WATCH_SPAN_S = 10.0  # this long without an event: read the key again and watch anew

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
        self._wake = threading.Event()  # a watch event, the watch's end, or a stop
        self._lock = threading.Lock()
        self._pushed: list[Any] = []  # what the watch delivered: events, or its end (None)
        self._watch_id: Any = None
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
        """Open the watch, then start the thread that acts on what it delivers.

        Called before the node answers its yes vote: once etcd confirmed the
        watch, the decision (written after every vote) is one of its events,
        so the key needs no read first.  A watch that cannot be opened leaves
        the thread to read the key, then watch it.
        """
        try:
            self._watch_id = self.owner.client().add_watch_callback(self.key, self._delivered)
        except Exception as exc:  # etcd away: the thread rides it out (and says so)
            log.debug("rollout %s: decision watch not opened: %s", self.rollout_id, exc)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the thread wakes at once and cancels the watch); never waits."""
        self.stopped.set()
        self._wake.set()

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # a bug here must not go unnoticed, nor kill the worker
            log.exception("rollout %s: decision watch crashed", self.rollout_id)
        finally:
            self._unwatch()
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
                self._unwatch()  # read again once etcd answers
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
            self._unwatch()
            self.stopped.wait(self.interval)

    def _next(self) -> decisions.Decision | None:
        """The next verified decision: what the watch delivers (the key's value, unwatched).

        None when there is none yet (or it was deleted), the watch was quiet
        for :data:`WATCH_SPAN_S` or ended, or this was stopped.  Raises
        :class:`hotfleet.decisions.ForgedDecision` for a record no leader
        wrote (checked against etcd's history of the election), and whatever
        etcd raises while it cannot be read or verified.
        """
        client = self.owner.client()
        if self._watch_id is None:  # read, then watch from that revision on: nothing slips by
            response = client.get_response(self.key)
            self._watch_id = client.add_watch_callback(
                self.key, self._delivered, start_revision=int(response.header.revision) + 1
            )
            if response.kvs:
                kv = response.kvs[0]
                return decisions.verify(client, self.owner.keys, kv.value, int(kv.mod_revision))
        woke = self._wake.wait(WATCH_SPAN_S)
        if self.stopped.is_set():
            return None
        self._wake.clear()
        with self._lock:
            pushed, self._pushed = self._pushed, []
        if not woke or None in pushed:  # quiet for long, or the watch ended: read again
            self._unwatch()
        events = [e for e in pushed if e is not None]
        if not events or isinstance(events[-1], etcd3.events.DeleteEvent):
            return None
        last = events[-1]
        return decisions.verify(client, self.owner.keys, last.value, int(last.mod_revision))

    def _delivered(self, response: Any) -> None:
        """The watch's callback, on the client's watch thread: note it and wake ours, no I/O."""
        events = getattr(response, "events", None)
        with self._lock:
            self._pushed.extend(events if events is not None else [None])
        self._wake.set()

    def _unwatch(self) -> None:
        """Cancel the watch, if any (the next :meth:`_next` reads the key first)."""
        watch_id, self._watch_id = self._watch_id, None
        if watch_id is not None:
            try:
                self.owner.client().cancel_watch(watch_id)
            except Exception as exc:  # its stream is gone already
                log.debug("rollout %s: cancelling the decision watch: %s", self.rollout_id, exc)


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
