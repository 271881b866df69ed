"""The decision watch: a prepared node reads its rollout's decision from etcd by itself.

Why: the decision key is the 2PC's commit point.  A node that voted yes
must switch when the fleet committed even if the coordinator that prepared
it died before sending Finish, and must drop its prepared release on an
abort nobody delivered.  While a rollout is prepared, a thread owned by
:class:`DecisionWatches` polls ``<prefix>rollouts/<id>/decision`` every
0.5 s from about 2 s after the prepare on, verifies the record against etcd's history of the election
(:mod:`hotfleet.decisions`) and hands it to the participant, which acts
through the same code paths as the Finish and Abort RPCs.  Used by the real
agent and by the simulated agents of the benchmarks alike.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from hotfleet import decisions, transient
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys

__all__ = [
    "COMMIT_GRACE_S",
    "DECISION_POLL_S",
    "FIRST_POLL_INTERVALS",
    "DecisionWatch",
    "DecisionWatches",
]

log = logging.getLogger(__name__)

DECISION_POLL_S = 0.5  # only matters when the coordinator died: keep etcd and CPU load low

COMMIT_GRACE_S = 1.0  # how long the decision watch leaves the switch to the coordinator

# The first read waits this many poll intervals (plus a random part of one, so a fleet
# prepared at one instant does not read in lockstep): a live coordinator delivers its
# Finish or Abort within that, and 1000 prepared nodes polling from the start would be
# 2000+ etcd reads a second for nothing (issue 17).  Recovery from a dead coordinator
# is this much later, far less than its lease takes to expire anyway.
FIRST_POLL_INTERVALS = 4


class DecisionWatch:
    """Polls one prepared rollout's decision key and has the agent act on it.

    Started when the rollout is prepared, stopped when it is finished,
    aborted or superseded (by whoever: an RPC or this watch) and joined when
    the agent stops.  etcd errors are retried at the same pace; the client
    from :mod:`hotfleet.etcd_client` never locks an endpoint out.
    """

    def __init__(self, owner: DecisionWatches, rollout_id: str, interval: float) -> None:
        self.owner = owner
        self.rollout_id = rollout_id
        self.interval = interval
        self.key = owner.keys.decision(rollout_id)
        self.stopped = threading.Event()
        self._commit_seen = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"hotfleet-decision {rollout_id}", daemon=True
        )

    def grace_over(self) -> bool:
        """Finish by ourselves only if the coordinator has not within a grace period.

        The coordinator's Finish carries the fleet's common commit instant; a
        node that switched on its own the moment it read the decision would
        spread the commit over the polling period.
        """
        now = time.monotonic()
        if not self._commit_seen:
            self._commit_seen = now
        return now - self._commit_seen >= COMMIT_GRACE_S

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._poll()
        except Exception:  # a bug here must not go unnoticed, nor kill the worker
            log.exception("rollout %s: decision watch crashed", self.rollout_id)
        finally:
            self.owner._ended(self)

    def _poll(self) -> None:
        failing = False
        odd = ""
        if self.stopped.wait(self.interval * (FIRST_POLL_INTERVALS - 1 + random.random())):
            return
        while not self.stopped.wait(self.interval):
            try:
                decision = self._read()
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
                if not transient.from_etcd(exc):  # not an outage: say it is a bug, once
                    if not failing:
                        log.exception(
                            "rollout %s: reading the decision failed (a bug)", self.rollout_id
                        )
                    failing = True
                    continue
                if not failing:
                    log.warning(
                        "rollout %s: cannot read decision %s (%s: %s); retrying every %.1fs",
                        self.rollout_id,
                        self.key,
                        type(exc).__name__,
                        exc,
                        self.interval,
                    )
                failing = True
                continue
            if failing:
                log.info("rollout %s: decision key readable again", self.rollout_id)
                failing = False
            if decision is not None and self.owner.apply(
                self.rollout_id, decision.decision, self, decision.participants
            ):
                return

    def _read(self) -> decisions.Decision | None:
        """The decision a leader wrote for this rollout, None while there is none.

        Raises :class:`hotfleet.decisions.ForgedDecision` for a record no
        leader wrote (checked against etcd's history of the election), and
        whatever etcd raises while it cannot be read or verified.
        """
        client = self.owner.client()
        raw, meta = client.get(self.key)
        if raw is None:
            return None
        return decisions.verify(client, self.owner.keys, raw, int(meta.mod_revision))


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
