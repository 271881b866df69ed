"""The fence: only the coordinator etcd says leads may change this node's code.

Why its own module: every mutating RPC carries the coordinator's epoch, and
whether to obey it is one decision with its own state (the highest verified
epoch, persisted across restarts) and its own lock, separate from what the
RPC then does (:mod:`node_agent.participant`).

:meth:`Fence.check` accepts an epoch only if it is the current leader's as
etcd says (the create revision of the lowest key under
``<prefix>election/``, read through :class:`hotfleet.fencing.LeaderEpochs`
and cached for a second); anything else gets a refusal message, which the
gRPC face turns into ``FAILED_PRECONDITION``.  The highest *verified* epoch
is persisted (atomic write) as ``epoch-<node_id>-<hash of prefix>.json`` =
``{"epoch": 7, ...}`` in the cache directory, and is what the node obeys
while etcd is unreachable.  Without etcd (or without a leader, in dev mode)
the fence is only monotonic: never lower than the highest epoch seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from hotfleet.fencing import LeaderEpochs
from hotfleet.keys import Keys

__all__ = ["Fence"]

log = logging.getLogger("node_agent.agent")


class Fence:
    """``node_id``'s fence for the cluster under ``keys``, persisted in ``directory``.

    ``leaders`` is None without etcd (only the monotonic fence); ``dev``
    falls back to it when no coordinator leads; ``on_raise`` runs when a
    higher epoch is accepted (the agent republishes its membership record).
    """

    def __init__(
        self,
        node_id: str,
        keys: Keys,
        directory: Path,
        leaders: LeaderEpochs | None,
        *,
        dev: bool = False,
        on_raise: Callable[[], None] = lambda: None,
    ) -> None:
        self.node_id = node_id
        self.keys = keys
        self.dev = dev
        self._directory = directory
        self._leaders = leaders
        self._on_raise = on_raise
        self._lock = threading.Lock()
        self._epoch = self._load()

    @property
    def epoch(self) -> int:
        """The highest epoch obeyed (persisted, so it survives a restart)."""
        return self._epoch

    @property
    def path(self) -> Path:
        """Where the highest epoch seen survives a restart (per node and cluster prefix)."""
        tag = hashlib.sha256(self.keys.prefix.encode()).hexdigest()[:8]
        return self._directory / f"epoch-{self.node_id}-{tag}.json"

    def check(self, epoch: int) -> str | None:
        """Accept ``epoch`` only if etcd says it leads; the refusal message otherwise.

        The caller's number is a claim, not a fact: it is accepted when it is
        the current leader key's revision read from etcd (cached for a
        moment, re-read when a higher epoch arrives), so nothing a client
        sends can raise the persisted fence beyond what etcd says.  With
        etcd unreachable only the last verified leader epoch is accepted.
        Without any leader in etcd a secure agent refuses; a dev agent (no
        authentication anyway), or one without etcd, falls back to
        "never lower than the highest seen".
        """
        with self._lock:
            if self._leaders is None:
                return self._monotonic(epoch)
            try:
                leader = self._leaders.current(epoch)
            except Exception as exc:
                if epoch == self._epoch and epoch > 0:
                    return None  # the last leader etcd confirmed: keep obeying it
                return (
                    f"node {self.node_id}: cannot verify epoch {epoch} against etcd"
                    f" ({type(exc).__name__}: {exc}); the last verified leader epoch is"
                    f" {self._epoch}"
                )
            if leader is None:
                if self.dev:
                    return self._monotonic(epoch)
                return (
                    f"node {self.node_id}: epoch {epoch} refused: no coordinator leads in etcd"
                    f" ({self.keys.election} is empty)"
                )
            if epoch != leader:
                relation = "lower than" if epoch < leader else "not"
                return (
                    f"node {self.node_id}: epoch {epoch} is {relation} the current leader's"
                    f" epoch {leader} in etcd; only the leader drives this node"
                )
            self._raise(epoch)
            return None

    def _monotonic(self, epoch: int) -> str | None:
        if epoch < self._epoch:
            return (
                f"node {self.node_id}: epoch {epoch} is lower than {self._epoch} already seen; "
                "a newer coordinator leads"
            )
        self._raise(epoch)
        return None

    def _raise(self, epoch: int) -> None:
        if epoch > self._epoch:
            self._epoch = epoch
            self._save(epoch)
            self._on_raise()

    def _load(self) -> int:
        path = self.path
        try:
            epoch = json.loads(path.read_text())["epoch"]
            if not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"not an epoch: {epoch!r}")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("unreadable epoch file %s, starting from epoch 0: %s", path, exc)
            return 0
        log.info("highest coordinator epoch seen before the restart: %d (from %s)", epoch, path)
        return epoch

    def _save(self, epoch: int) -> None:
        """Atomically replace the epoch file (temp file, fsync, rename)."""
        path = self.path
        tmp = ""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as out:
                json.dump(
                    {"epoch": epoch, "node_id": self.node_id, "prefix": self.keys.prefix}, out
                )
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            tmp = ""
        except OSError as exc:  # the fence still holds in memory
            log.error("cannot persist epoch %d to %s: %s", epoch, path, exc)
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
