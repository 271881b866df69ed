"""Leader epochs as etcd says they are, for readers that must not trust a caller's word.

A coordinator's *epoch* is the create revision of its key under
``<prefix>election/`` (:mod:`coordinator.election`); the leader is the key
with the lowest create revision.  An RPC or a record that merely *claims* an
epoch proves nothing: any certificate holder can send ``epoch=2**64-1``.
So readers check the claim against etcd:

* :class:`LeaderEpochs` answers "which epoch leads now?", cached for a
  moment (one etcd read per ``ttl`` at most, and again at once when a caller
  claims an epoch higher than the cached leader's: a new leader's first RPC).
* :func:`leader_epoch_at` answers "which epoch led when revision R was
  written?", to verify a record (a 2PC decision, the permanent release)
  written in a transaction guarded by the leader key: at that revision the
  leader key existed, so reading the election prefix *as of* R names it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys

__all__ = ["LeaderEpochs", "leader_epoch", "leader_epoch_at"]

DEFAULT_TTL_S = 1.0


def _lowest_create_revision(client: EtcdClient, keys: Keys, revision: int | None) -> int | None:
    kwargs: dict[str, Any] = {"sort_target": "create", "sort_order": "ascend", "limit": 1}
    if revision is not None:
        kwargs["revision"] = revision
    resp = client.get_prefix_response(keys.election, keys_only=True, **kwargs)
    if not resp.kvs:
        return None
    return int(resp.kvs[0].create_revision)


def leader_epoch(client: EtcdClient, keys: Keys) -> int | None:
    """The current leader's epoch, None when no coordinator leads."""
    return _lowest_create_revision(client, keys, None)


def leader_epoch_at(client: EtcdClient, keys: Keys, revision: int) -> int | None:
    """The epoch that led at etcd ``revision`` (None: nobody led then).

    Raises what the etcd client raises when the revision was compacted away;
    callers treat that as "cannot verify", never as "verified".
    """
    return _lowest_create_revision(client, keys, revision)


class LeaderEpochs:
    """The current leader's epoch read from etcd, cached for ``ttl`` seconds.

    :meth:`current` re-reads when the cache is older than ``ttl`` or when
    ``claimed`` is higher than the cached epoch (epochs only grow, so a
    claim below the cached one is stale without asking etcd again).  Errors
    of the etcd read propagate: the caller decides what an unverifiable
    claim is worth.
    """

    def __init__(
        self,
        client: Callable[[], EtcdClient],
        keys: Keys,
        ttl: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: int | None = None
        self._read_at = float("-inf")

    def current(self, claimed: int = 0) -> int | None:
        with self._lock:
            now = self._clock()
            fresh = now - self._read_at < self._ttl
            if fresh and self._cached is not None and claimed <= self._cached:
                return self._cached
            self._cached = leader_epoch(self._client(), self._keys)
            self._read_at = now
            return self._cached
