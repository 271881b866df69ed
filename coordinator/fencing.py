"""How the rollout engine writes etcd, and the two ways a driver learns to stop.

Every write of the engine is a transaction fenced by the leader key's create
revision (the epoch), and every write of a rollout record is also a
compare-and-swap against the revision it was read at.  A failed fence means
this coordinator is no longer the leader (:class:`Deposed`); a failed
compare-and-swap means another writer (an operator's promote, a rollback)
changed the record first (:class:`Superseded`).  Either stops the thread
that drives the rollout.  Reads and idempotent writes ride out a short etcd
outage (:func:`retry`), never a lost fence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hotfleet import transient

__all__ = ["AMEND_ATTEMPTS", "TXN_OPS", "Deposed", "Superseded", "retry"]

T = TypeVar("T")

TXN_OPS = 100  # writes per etcd transaction (etcd refuses more than 128 by default)
AMEND_ATTEMPTS = 20  # compare-and-swap rounds against a record's own driver
ETCD_RETRY_S = 30.0  # how long an etcd outage is ridden out (transient errors only)


class Deposed(Exception):
    """This coordinator lost leadership mid-rollout: stop touching anything."""


class Superseded(Exception):
    """Someone else wrote the rollout record since this copy was read: stop driving it."""


def retry(fn: Callable[[], T]) -> T:
    """Retry an idempotent etcd call through a short outage (an etcd restart, a leader change).

    Only transient failures (etcd unreachable or timing out) are retried, with
    jitter, for at most 30 s or what is left of the API request being answered
    (:mod:`hotfleet.transient`); a lost fence (:class:`Deposed`), a programming
    error or etcd's quota is raised at once, naming its real cause.
    """
    return transient.retrying(ETCD_RETRY_S, "etcd call")(fn)
