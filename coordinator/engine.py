"""The leader's rollout engine: the façade of a cluster-wide two-phase commit.

:class:`Engine` serves reads on any coordinator (nodes, releases, the
rollout history) and, on the leader, owns what every part of a rollout
shares: the etcd client, the agents, the rollout records (every write
fenced and compare-and-swap, :meth:`Engine._save`), the threads that drive
rollouts and the hooks tests and fault drills use.  The work is done by
collaborators, one job each:

* :mod:`coordinator.commands` — the operator's upgrade, rollback, abort, promote;
* :mod:`coordinator.driver` — start a rollout, then run its waves;
* :mod:`coordinator.twophase` — one wave's protocol rounds (the 2PC itself);
* :mod:`coordinator.window` — the analysis window, and operator requests taken
  by its driver;
* :mod:`coordinator.endings` — permanent or rolled back;
* :mod:`coordinator.recovery` — a new leader settles its predecessor's rollout;
* :mod:`coordinator.fencing` — how etcd is written, and what stops a driver.

Names other modules import from here (``RolloutOptions``, ``Target``,
``Refused``, ``default_lead`` ...) stay importable from here.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import grpc

from coordinator.baseline import BaselineStore
from coordinator.commands import Commands
from coordinator.commitlead import CommitLead, default_lead
from coordinator.convergence import Convergence
from coordinator.driver import Driver
from coordinator.election import Leadership
from coordinator.endings import Endings
from coordinator.errors import Refused
from coordinator.fencing import AMEND_ATTEMPTS, TXN_OPS, Deposed, Superseded, retry
from coordinator.fleet import NodeInfo, Target, read_nodes
from coordinator.health import HealthSampler
from coordinator.model import Kind, Phase, Rollout
from coordinator.options import RolloutOptions
from coordinator.policy import AnalysisPolicy
from coordinator.prometheus import PrometheusProvider
from coordinator.recovery import recover
from coordinator.releases import ReleaseBook, ReleaseEntry
from coordinator.transport import Transport
from coordinator.twophase import TwoPhase, rpc_detail
from coordinator.unpack import UNPACK_TIMEOUT_S, NodeUnpack, unpack_on
from coordinator.window import OperatorRequest, Window
from hotfleet import transient
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.protocol import Refusal
from hotfleet.release import Release

log = logging.getLogger("hotfleet.coordinator")

__all__ = [
    "Engine",
    "NodeInfo",
    "Refused",
    "ReleaseEntry",
    "RolloutOptions",
    "Target",
    "default_lead",
]

ROLLOUT_HISTORY = 100  # rollout records kept (oldest terminal ones are removed)
HISTORY_PAGE = 64  # keys per read of the history

_Superseded = Superseded  # the name tests know the lost compare-and-swap by


class Engine:
    """Serves reads on any coordinator and drives rollouts on the leader."""

    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        agents: Transport,
        *,
        address: str = "",
        name: str = "",
    ) -> None:
        self.client = client
        self.keys = keys
        self.agents = agents
        self.address = address
        self.name = name or address
        self.book = ReleaseBook(
            client,
            keys,
            in_use=self._in_use,
            may_write=self.is_leader,
            permanent_raw=self._permanent_raw,
        )
        self.store = self.book.store
        self.baselines = BaselineStore(client, keys)
        self._leadership: Leadership | None = None
        self._lock = threading.RLock()
        self._drivers: list[threading.Thread] = []
        self._driving: dict[str, threading.Thread] = {}  # rollout id -> its live driver
        # (id, revision, phase, kind) of the record this engine wrote last: whoever asks
        # for a rollout's phase at that revision needs no read of a 1000-node record
        self.last_saved: tuple[str, int, Phase, Kind] | None = None
        # rollout id -> operator requests its window's driver takes in order (single writer)
        self._requests: dict[str, queue.SimpleQueue[OperatorRequest]] = {}
        self._stopping = threading.Event()
        self.hooks: dict[str, Callable[[Rollout], None]] = {}  # test and fault-injection points
        # held while a rollout starts and while a node is caught up: never both at once
        self._rollout_gate = threading.Lock()
        self.convergence = Convergence(self)
        self.sampler: HealthSampler | None = None
        self.prometheus: PrometheusProvider | None = None  # optional metric provider
        # how far ahead of a commit decision its instant is set, learned from the nodes
        self.commit_lead = CommitLead()
        # the collaborators, one job each, sharing this engine's state
        self.commands = Commands(self)
        self.driver = Driver(self)
        self.protocol = TwoPhase(self)
        self.window = Window(self)
        self.endings = Endings(self)

    # ------------------------------------------------------------ leadership
    def lead(self, leadership: Leadership) -> None:
        """Called by the daemon when it wins the election: recover, then accept work."""
        with self._lock:
            self._leadership = leadership
            if self.sampler is None:
                self.sampler = HealthSampler(
                    self.nodes, self.agents, interval_s=AnalysisPolicy().interval_s
                )
                self.sampler.start()
        self._spawn(functools.partial(recover, self), "recover")
        self.convergence.start()

    def step_down(self) -> None:
        self.convergence.stop()
        with self._lock:
            self._leadership = None
            sampler, self.sampler = self.sampler, None
        if sampler is not None:
            sampler.stop()

    def is_leader(self) -> bool:
        lead = self._leadership
        return lead is not None and lead.session.alive()

    def leader_address(self) -> str:
        try:
            items = sorted(
                self.client.get_prefix(self.keys.election), key=lambda kv: kv[1].create_revision
            )
        except Exception as exc:
            if not transient.from_etcd(exc):
                log.exception("reading the election prefix failed (a bug)")
            return ""  # unknown while etcd is away
        return items[0][0].decode() if items else ""

    def _require_leader(self) -> Leadership:
        lead = self._leadership
        if lead is None or not lead.session.alive():
            leader = self.leader_address()
            raise Refused(
                Refusal.NOT_LEADER,
                f"this coordinator ({self.address}) is not the leader"
                + (
                    f"; the leader is {leader}"
                    if leader
                    else "; no leader is elected right now, retry shortly"
                ),
                leader=leader,
            )
        return lead

    def begin_stop(self) -> None:
        """Tell every thread of the engine to end, without waiting (:meth:`close` waits).

        From now on nothing is written under this leadership (what a rollout
        was doing is left as a crash leaves it: the next leader recovers it)
        and etcd retries give up, so the threads' ends overlap instead of
        adding up.  The owner of the agent transport closes it next, which
        cancels the RPCs in flight: nothing they return is acted on any more.
        """
        self._stopping.set()
        lead = self._leadership
        if lead is not None:
            lead.relinquish()
        self.convergence.signal_stop()
        sampler = self.sampler
        if sampler is not None:
            sampler.signal_stop()

    def close(self) -> None:
        self.begin_stop()
        self.step_down()
        for t in list(self._drivers):
            t.join(timeout=10)

    # ----------------------------------------------------------------- reads
    def _get(self, key: str) -> tuple[bytes | None, Any]:
        """Every read on a rollout's path rides out a short etcd outage."""
        return retry(lambda: self.client.get(key))

    def nodes(self) -> list[NodeInfo]:
        return retry(lambda: read_nodes(self.client, self.keys))

    def fleet(self) -> list[NodeInfo]:
        """The nodes, each with its desired release and whether it has converged to it."""
        nodes = self.nodes()
        status = retry(lambda: self.convergence.status(nodes))
        for n in nodes:
            n.desired_release, n.convergence, n.convergence_detail = status[n.node_id]
        return nodes

    def releases(self) -> list[ReleaseEntry]:
        return self.book.releases()

    def release(self, ref: str) -> ReleaseEntry:
        return self.book.release(ref)

    def rollout(self, rollout_id: str | None = None) -> Rollout:
        if rollout_id:
            raw, meta = self._get(self.keys.rollout(rollout_id))
            if raw is None:
                raise Refused(Refusal.NOT_FOUND, f"no rollout {rollout_id}")
            return Rollout.loads(raw, int(meta.mod_revision))
        newest = self.rollouts(limit=1)
        if not newest:
            raise Refused(Refusal.NOT_FOUND, "no rollout has run in this cluster yet")
        return newest[0]

    def rollouts(self, limit: int = 50) -> list[Rollout]:
        """The newest ``limit`` rollouts, newest first, read a page at a time.

        Rollout ids start with their UTC creation time, so key order is
        creation order: pages of keys are read backwards from the newest and
        never the whole history (whose size :data:`ROLLOUT_HISTORY` bounds).
        """
        start, end = self._history_range()
        out: list[Rollout] = []
        while len(out) < limit:
            page = retry(functools.partial(self._history_page, start, end))
            for raw, meta in page:
                if not meta.key.decode().endswith("/decision") and len(out) < limit:
                    out.append(Rollout.loads(raw, int(meta.mod_revision)))
            if len(page) < HISTORY_PAGE:
                break
            end = page[-1][1].key.decode()  # the next page ends before the oldest key read
        out.sort(key=lambda r: r.created_at, reverse=True)
        return out

    def _history_page(self, start: str, end: str) -> list[tuple[bytes, Any]]:
        return list(
            self.client.get_range(
                start, end, sort_order="descend", sort_target="key", limit=HISTORY_PAGE
            )
        )

    def _history_range(self) -> tuple[str, str]:
        """Keys of rollout records and their decisions: ids start with a digit (a date)."""
        return f"{self.keys.rollouts}0", f"{self.keys.rollouts}:"

    def _trim_history(self, lead: Leadership) -> None:
        """Keep the newest :data:`ROLLOUT_HISTORY` rollouts (like ``revisionHistoryLimit``).

        The oldest terminal records go with their decision keys, and so do
        catch-up decisions beyond the same number; the active rollout stays.
        """
        start, end = self._history_range()
        keys = [m.key.decode() for _, m in self.client.get_range(start, end, keys_only=True)]
        ids = sorted({k[len(self.keys.rollouts) :].split("/")[0].split(".w")[0] for k in keys})
        active = self._active_id()
        tx = self.client.transactions
        doomed = [i for i in ids[: max(0, len(ids) - ROLLOUT_HISTORY)] if i != active]
        ops = [
            tx.delete(k)
            for k in keys
            if k[len(self.keys.rollouts) :].split("/")[0].split(".w")[0] in doomed
        ]
        catchups = sorted(
            (m.create_revision, m.key.decode())
            for _, m in self.client.get_prefix(f"{self.keys.rollouts}catchup-", keys_only=True)
        )
        ops += [tx.delete(k) for _, k in catchups[: max(0, len(catchups) - ROLLOUT_HISTORY)]]
        for i in range(0, len(ops), TXN_OPS):
            lead.guarded_txn(ops[i : i + TXN_OPS])
        if doomed:
            log.info(
                "history: removed %d rollout(s) past the limit of %d", len(doomed), ROLLOUT_HISTORY
            )

    def module_status(self, node: str | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for n in self.nodes():
            if node and n.node_id != node:
                continue
            try:
                reply = self.agents.stub(n.address).ModuleStatus(
                    agent_pb2.ModuleStatusRequest(), timeout=5
                )
            except grpc.RpcError as exc:
                rows.append(
                    {
                        "node": n.node_id,
                        "module": "*",
                        "state": "unreachable",
                        "release": "",
                        "loaded_digest": "",
                        "disk_digest": "",
                        "detail": rpc_detail(exc),
                    }
                )
                continue
            rows.extend(
                {
                    "node": n.node_id,
                    "module": m.module,
                    "state": m.state,
                    "release": m.release,
                    "loaded_digest": m.loaded_digest,
                    "disk_digest": m.disk_digest,
                }
                for m in reply.modules
            )
        if node and not rows:
            raise Refused(Refusal.NOT_FOUND, f"node {node} is not registered")
        return rows

    # --------------------------------------------------------------- releases
    def push_release(self, release: Release, signature: str = "", signer: str = "") -> ReleaseEntry:
        """Store the sources by digest and the manifest under name/version (idempotent)."""
        return self.book.push(release, signature, signer)

    def unpack_release(self, ref: str, *, timeout_s: float = UNPACK_TIMEOUT_S) -> list[NodeUnpack]:
        """Have every registered node unpack a pushed release ahead of its rollout
        (leader only; :mod:`coordinator.unpack`); each node's answer."""
        lead = self._require_leader()
        entry = self.book.release(ref)
        return unpack_on(self.nodes(), self.agents.stub, entry, lead.epoch, timeout_s=timeout_s)

    def remove_release(self, ref: str) -> list[str]:
        """Delete a pushed release no one uses and the blobs only it used (leader only)."""
        self._require_leader()
        return self.book.remove(ref)

    def collect_blobs(self) -> list[str]:
        return self.book.collect_blobs()

    def _in_use(self) -> dict[str, str]:
        """Release labels that must stay in the store, each with why.

        The permanent release (what restarted nodes boot), what any node
        runs, and every release a kept rollout record installed or replaced
        (a rollback may need it from the store).
        """
        why: dict[str, str] = {}
        for n in self.nodes():
            if n.current_release:
                why.setdefault(n.current_release, f"node {n.node_id} runs it")
        for r in self.rollouts(limit=10_000):
            why.setdefault(r.release, f"rollout {r.id} installed it")
            for node, label in r.previous.items():
                why.setdefault(label, f"rollout {r.id} may roll {node} back to it")
        permanent = self.book.permanent_manifest()
        if permanent.get("name") and permanent.get("version"):
            why[f"{permanent['name']}@{permanent['version']}"] = "it is the permanent release"
        return why

    # ----------------------------------------------------- operator commands
    def upgrade(self, ref: str, target: Target, options: RolloutOptions) -> Rollout:
        return self.commands.upgrade(ref, target, options)

    def rollback(
        self, target: Target, to_version: str | None, options: RolloutOptions, *, why: str = ""
    ) -> Rollout:
        """Back to the previous release: from every node's memory, or to a pushed version."""
        return self.commands.rollback(target, to_version, options, why=why)

    def abort(self, rollout_id: str | None = None) -> Rollout:
        return self.commands.abort(rollout_id)

    def promote(self, rollout_id: str | None = None) -> Rollout:
        """Make a provisional rollout permanent now (its analysis loop stops on its next write)."""
        return self.commands.promote(rollout_id)

    # ----------------------------------------------- records, threads, hooks
    def _entry_or_stub(self, label: str) -> ReleaseEntry:
        try:
            return self.release(label)
        except Refused:
            name, _, version = label.partition("@")
            return ReleaseEntry(label, name, version, "", 0.0, 0, False)

    def _permanent_raw(self) -> str:
        raw, _ = self._get(self.keys.permanent)
        return raw.decode() if raw else ""

    def _active_id(self) -> str:
        raw, _ = self._get(self.keys.active)
        return raw.decode() if raw else ""

    def _spawn(self, fn: Callable[[], None], name: str, rollout_id: str = "") -> None:
        """Run ``fn`` on a thread the engine owns; ``rollout_id``: the rollout it drives."""

        def run() -> None:
            failed = False
            try:
                with transient.cancelled_by(self._stopping):
                    fn()
            except Deposed:
                log.warning("%s: stopped, this coordinator is no longer the leader", name)
            except Superseded as exc:
                log.info("%s: stopped, rollout %s was changed by another writer", name, exc)
            except Exception as exc:
                if self._stopping.is_set():  # cut short by the stop (RPCs cancelled, etcd away)
                    log.warning(
                        "%s: ended by the stop (%s); the next leader takes it up", name, exc
                    )
                    return
                log.exception("%s failed", name)
                failed = True
            finally:
                with self._lock:
                    if self._driving.get(rollout_id) is threading.current_thread():
                        del self._driving[rollout_id]
            if failed and self.is_leader() and not self._stopping.wait(1.0):
                self._spawn(
                    functools.partial(recover, self), "recover"
                )  # settle what the driver left

        t = threading.Thread(target=run, name=f"hotfleet-{name}", daemon=True)
        with self._lock:
            self._drivers = [d for d in self._drivers if d.is_alive()] + [t]
            if rollout_id:
                self._driving[rollout_id] = t
        t.start()

    def _save(self, lead: Leadership, rollout: Rollout, *extra_ops: Any) -> None:
        """Write the record, fenced, if nobody wrote it since this copy was read or written.

        One writer at a time: an operator's promote or a rollback that ends
        the rollout and a driver still analysing it cannot overwrite each
        other; whoever loses raises :class:`Superseded` and stops.
        """
        rollout.epoch = lead.epoch
        key = self.keys.rollout(rollout.id)
        tx = self.client.transactions
        compare = [tx.mod(key) == rollout.revision] if rollout.revision else []
        payload = rollout.dumps()
        ops = [tx.put(key, payload), *extra_ops]
        if rollout.phase.terminal:  # only a window needs a baseline: it ends with the record
            ops.append(self.baselines.drop_op(rollout.id))
        ok, responses = retry(lambda: lead.transaction(ops, compare))
        if ok:
            rollout.revision = int(responses[0].response_put.header.revision)
        elif (landed := self._landed(key, payload)) is not None and lead.is_valid():
            rollout.revision = landed
        elif compare and lead.is_valid():
            raise Superseded(rollout.id)
        else:
            raise Deposed()
        self.last_saved = (rollout.id, rollout.revision, rollout.phase, rollout.kind)
        if rollout.phase.terminal:
            self._trim_history(lead)

    def _landed(self, key: str, payload: str) -> int | None:
        """The revision of our own write if an attempt that looked failed did land.

        An attempt that timed out (a slow etcd after a restart) may have been
        applied; its retry then fails the revision compare against our own
        write.  That is not another writer: the record holds exactly what we
        wrote (the transaction's other operations landed with it).
        """
        raw, meta = self._get(key)
        if raw is None or raw.decode() != payload:
            return None
        return int(meta.mod_revision)

    def _hook(self, point: str, rollout: Rollout) -> None:
        fn = self.hooks.get(point)
        if fn is not None:
            fn(rollout)

    def release_record(self, label: str) -> dict[str, Any] | None:
        """The record agents load for a pushed ``label`` (None if it was never pushed)."""
        try:
            entry = self.release(label)
        except Refused:
            return None
        return self._release_record(entry) if entry.manifest else None

    @staticmethod
    def _release_record(entry: ReleaseEntry) -> dict[str, Any]:
        return {
            "release": entry.label,
            "digest": entry.digest,
            "manifest": entry.manifest,
            "signature": entry.signature,
            "signer": entry.signer,
        }

    def _amend(self, lead: Leadership, rollout_id: str, change: Callable[[Rollout], bool]) -> None:
        """Read-modify-write another rollout's record (compare-and-swap, retried).

        Its own driver may be writing it at the same time (an analysis loop);
        the loser of each round re-reads.  ``change`` returns False when there
        is nothing to write after all.
        """
        for _ in range(AMEND_ATTEMPTS):
            record = self.rollout(rollout_id)
            if not change(record):
                return
            try:
                self._save(lead, record)
                return
            except Superseded:
                continue
        raise Superseded(rollout_id)
