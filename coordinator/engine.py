"""The leader's rollout engine: a cluster-wide two-phase commit over the node agents.

Protocol (presumed abort, cooperative termination):

1. the rollout is recorded in etcd and claims the cluster's ``active`` key,
   in one fenced transaction, before any node hears of it;
2. every target node prepares in parallel (bounded concurrency, deadline);
3. the decision is written once, fenced, to ``rollouts/<id>/decision`` — the
   commit point; no decision means abort;
4. Finish (or Abort) is driven to every node, idempotently, with retries;
   agents also poll the decision key, so a prepared node never waits on a dead
   coordinator; a yes voter that does not switch (its finish raised and it
   restored itself, it overran, died or never answered) makes the whole
   rollout go back (``finish_failed``): a commit is never permanent while a
   participant serves other code;
5. the outcome is recorded and ``active`` released.

Every write is a transaction guarded by the leader key's create revision (the
epoch, also sent with every agent RPC), so a deposed leader can neither write
records nor drive agents that have seen its successor.  A new leader reads
``active``: no decision → abort; commit → re-drive Finish to the nodes that
have not acknowledged it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import grpc

from coordinator.analysis import RESUMES, Judge, Outcome, Sample, paused_record
from coordinator.baseline import BaselineStore
from coordinator.convergence import Convergence
from coordinator.election import Leadership
from coordinator.errors import Refused
from coordinator.fleet import NodeInfo, Target, read_nodes, select
from coordinator.health import HealthSampler, run_smoke_checks
from coordinator.model import NodeResult, Phase, Rollout, Vote
from coordinator.policy import AnalysisPolicy, PolicyError
from coordinator.prometheus import PrometheusProvider
from coordinator.releases import ReleaseBook, ReleaseEntry, entry_manifest_health
from coordinator.transport import Transport
from hotfleet import decisions, transient
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.errors import ModuleError, Reason
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.protocol import Refusal
from hotfleet.release import Release
from hotfleet.wire import errors_from_proto, manifest_to_proto

log = logging.getLogger("hotfleet.coordinator")
T = TypeVar("T")

__all__ = ["Engine", "NodeInfo", "Refused", "ReleaseEntry", "RolloutOptions", "Target"]


COMMIT_LEAD_S = 0.05  # how far ahead the commit instant is set ...
TXN_OPS = 100  # writes per etcd transaction (etcd refuses more than 128 by default)
ROLLOUT_HISTORY = 100  # rollout records kept (oldest terminal ones are removed)
HISTORY_PAGE = 64  # keys per read of the history
AMEND_ATTEMPTS = 20  # compare-and-swap rounds against a record's own driver
REQUEST_TIMEOUT_S = 60.0  # how long an operator's promote/rollback waits for the window's driver
ETCD_RETRY_S = 30.0  # how long an etcd outage is ridden out (transient errors only)
ALL_NODES = Target(all=True).describe()  # how a rollout for the whole fleet records its target
COMMIT_LEAD_PER_NODE_S = 0.004  # ... plus this much per node of the wave (Finish fan-out)
# ... for its first COMMIT_LEAD_PACKED nodes (agents packed on a host wake up one after the
# other), and this much for each further one: a large fleet is many hosts, what takes time
# is the coordinator sending the Finish RPCs (~0.3 ms each), not the nodes waking up
COMMIT_LEAD_PACKED = 100
COMMIT_LEAD_PER_EXTRA_NODE_S = 0.001
COMMIT_QUIET_S = 0.1  # no health sampling from the decision until this long after the instant


class _Deposed(Exception):
    """This coordinator lost leadership mid-rollout: stop touching anything."""


class _Superseded(Exception):
    """Someone else wrote the rollout record since this copy was read: stop driving it."""


class _WindowClosed(Exception):
    """The window's driver ended before it took an operator request: act directly."""


@dataclass
class _Request:
    """An operator's promote or rollback of a rollout in its window, for its driver to run."""

    what: str
    run: Callable[[Rollout], Rollout]
    done: Future[Rollout] = field(default_factory=Future)


@dataclass
class RolloutOptions:
    dry_run: bool = False
    allow_missing: bool = False
    timeout_s: float = 30.0
    concurrency: int = 32
    force: bool = False
    window_s: float | None = None  # rollback window; None = the policy's; 0 = permanent at once
    health: dict[str, Any] = field(default_factory=dict)  # analysis policy overrides (flags)
    waves: list[str] = field(default_factory=list)  # cumulative sizes: ["1", "25%", "100%"]
    allow_downgrade: bool = False  # asked for explicitly, recorded with the rollout


def _new_id() -> str:
    """``20261130-201637123-e3fce1``: UTC time to the millisecond first, so ids sort by age."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"


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
        # rollout id -> operator requests its window's driver takes in order (single writer)
        self._requests: dict[str, queue.SimpleQueue[_Request]] = {}
        self._stopping = threading.Event()
        self.hooks: dict[str, Callable[[Rollout], None]] = {}  # test and fault-injection points
        # held while a rollout starts and while a node is caught up: never both at once
        self._rollout_gate = threading.Lock()
        self.convergence = Convergence(self)
        self.sampler: HealthSampler | None = None
        self.prometheus: PrometheusProvider | None = None  # optional metric provider

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
        self._spawn(self._recover, "recover")
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

    def close(self) -> None:
        self._stopping.set()
        self.step_down()
        for t in list(self._drivers):
            t.join(timeout=10)

    # ----------------------------------------------------------------- reads
    def _get(self, key: str) -> tuple[bytes | None, Any]:
        """Every read on a rollout's path rides out a short etcd outage."""
        return _retry(lambda: self.client.get(key))

    def nodes(self) -> list[NodeInfo]:
        return _retry(lambda: read_nodes(self.client, self.keys))

    def fleet(self) -> list[NodeInfo]:
        """The nodes, each with its desired release and whether it has converged to it."""
        nodes = self.nodes()
        status = _retry(lambda: self.convergence.status(nodes))
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
            page = _retry(functools.partial(self._history_page, start, end))
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
                        "detail": _rpc_detail(exc),
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

    # ------------------------------------------------------------- rollouts
    def upgrade(self, ref: str, target: Target, options: RolloutOptions) -> Rollout:
        lead = self._require_leader()
        entry = self.release(ref)
        self._policy(
            entry_manifest_health(entry), options
        )  # refuse a bad policy before anything starts
        self._refuse_unknown(target, options)
        if not options.allow_downgrade:
            self._refuse_downgrade(entry)
        return self._start("upgrade", entry, target, options, lead)

    def _refuse_downgrade(self, entry: ReleaseEntry) -> None:
        """An upgrade never takes a node to an older version unless asked (``--allow-downgrade``).

        An old release stays validly signed for ever; without this rule anyone
        who may push could replay it (a known-bad build) as an "upgrade".
        """
        older = {
            n.node_id: n.current_release
            for n in self.nodes()
            if n.current_release.partition("@")[0] == entry.name
            and _version_key(entry.version) < _version_key(n.current_release.partition("@")[2])
        }
        if older:
            runs = ", ".join(f"{node} runs {label}" for node, label in sorted(older.items()))
            raise Refused(
                Refusal.DOWNGRADE,
                f"{entry.label} is older than what the fleet runs ({runs}): a downgrade must be "
                "asked for with --allow-downgrade (recorded in the rollout), or use "
                "`coordctl rollback --to VERSION`",
            )

    def _refuse_unknown(self, target: Target, options: RolloutOptions) -> None:
        """A named node that is not registered is refused up front, as an unmatched selector is.

        Starting a rollout that can only abort wastes a prepare on every other
        node and hides a typo behind an abort; ``--allow-missing`` still goes
        ahead without a node that is down.
        """
        if options.allow_missing or not target.nodes:
            return
        registered = self.nodes()
        _, missing = select(registered, target)
        if missing:
            known = ", ".join(n.node_id for n in registered) or "none"
            raise Refused(
                Refusal.NO_TARGETS,
                f"node(s) not registered (unknown, or down): {', '.join(missing)}; "
                f"registered: {known} (--allow-missing goes ahead without them)",
            )

    def rollback(
        self, target: Target, to_version: str | None, options: RolloutOptions, *, why: str = ""
    ) -> Rollout:
        """Back to the previous release: from every node's memory, or to a pushed version."""
        lead = self._require_leader()
        if why:
            options.health = {**options.health, "why": why}
        if to_version:
            # --to VERSION, or --to NAME@VERSION as every other verb spells a release
            ref = (
                to_version if "@" in to_version else f"{self._current_release_name()}@{to_version}"
            )
            return self._start("rollback", self.release(ref), target, options, lead)
        last = self._last_applied()
        if last is None:
            raise Refused(
                Refusal.NOT_FOUND,
                "nothing to roll back: no change that is still in place has finished in this "
                "cluster (see `coordctl rollouts`; --to VERSION picks a pushed release)",
            )
        previous = sorted(set(last.previous.values()))
        if len(previous) != 1:
            ran = ", ".join(p or "boot code" for p in previous)
            raise Refused(
                Refusal.INVALID,
                f"nodes ran different releases before {last.release} ({ran}); use --to VERSION",
            )
        options.window_s = 0.0  # a rollback is not analysed: it is the way out
        target = target if (target.nodes or target.selector) else Target(nodes=sorted(last.nodes))
        if last.phase is Phase.PROVISIONAL:  # the nodes still hold the old code in memory
            entry = (
                self._entry_or_stub(previous[0])
                if previous[0]
                else ReleaseEntry("", "", "", "", 0.0, 0, False)
            )

            def revert(_window: Rollout) -> Rollout:
                return self._start(
                    "rollback", entry, target, options, lead, from_memory=True, reverts=last.id
                )

            # taken by the window's driver if it has one: never raced with its judge
            return self._through_driver(last.id, "rollback", revert) or revert(last)
        # permanent: the in-memory backup is gone; go back through the pushed release
        if not previous[0]:
            raise Refused(
                Refusal.INVALID,
                f"{last.release} is permanent and the nodes ran unversioned boot code before it; "
                "push the old code as a release and use --to VERSION",
            )
        return self._start(
            "rollback", self.release(previous[0]), target, options, lead, reverts=last.id
        )

    def abort(self, rollout_id: str | None = None) -> Rollout:
        lead = self._require_leader()
        rollout = self.rollout(rollout_id or self._active_id() or None)
        if rollout.phase.terminal:
            raise Refused(
                Refusal.INVALID, f"rollout {rollout.id} already ended {rollout.phase.value}"
            )
        if rollout.phase is Phase.PROVISIONAL:
            return self.rollback(Target(nodes=sorted(rollout.nodes)), None, RolloutOptions())
        if self._decide(lead, rollout.id, "abort") != "abort":
            raise Refused(
                Refusal.INVALID,
                f"rollout {rollout.id} is already committed; wait for it and roll back",
            )
        return self.rollout(rollout.id)

    def promote(self, rollout_id: str | None = None) -> Rollout:
        """Make a provisional rollout permanent now (its analysis loop stops on its next write)."""
        lead = self._require_leader()
        rid = rollout_id or self._active_id() or self.rollout().id
        taken = self._through_driver(rid, "promote", lambda r: self._promote_now(lead, r))
        if taken is not None:
            return taken
        for _ in range(AMEND_ATTEMPTS):
            rollout = self.rollout(rid)
            if rollout.phase is not Phase.PROVISIONAL:
                raise Refused(
                    Refusal.INVALID,
                    f"rollout {rollout.id} is {rollout.phase.value}, only a provisional rollout can be promoted",
                )
            try:
                self._make_permanent(lead, rollout, "promoted by the operator")
            except _Superseded:
                continue  # its driver wrote the record meanwhile: read it again
            return self.rollout(rollout.id)
        raise Refused(Refusal.BUSY, f"rollout {rollout_id} changes too fast to promote; retry")

    def _promote_now(self, lead: Leadership, rollout: Rollout) -> Rollout:
        """Promote, on the window's driver thread (its record is current there)."""
        if rollout.phase is not Phase.PROVISIONAL:
            raise Refused(
                Refusal.INVALID,
                f"rollout {rollout.id} is {rollout.phase.value}, only a provisional rollout can be promoted",
            )
        self._make_permanent(lead, rollout, "promoted by the operator")
        return self.rollout(rollout.id)

    def _through_driver(
        self, rollout_id: str, what: str, run: Callable[[Rollout], Rollout]
    ) -> Rollout | None:
        """Have the live driver of ``rollout_id``'s window run ``run``; None if it has none.

        One writer per rollout record: while a window is judged, its driver
        is the only thread that ends it, so an operator's promote and the
        judge's automatic rollback are taken in order, never raced.
        """
        with self._lock:
            inbox = self._requests.get(rollout_id)
        if inbox is None:
            return None
        request = _Request(what, run)
        inbox.put(request)
        try:
            return request.done.result(timeout=REQUEST_TIMEOUT_S)
        except _WindowClosed:
            return None  # the window ended meanwhile: the caller acts on the record as it is
        except FutureTimeout:
            raise Refused(
                Refusal.BUSY,
                f"rollout {rollout_id}: its driver did not take the {what} in time; retry",
            ) from None

    # -------------------------------------------------------------- internals
    def _current_release_name(self) -> str:
        names = {n.current_release.partition("@")[0] for n in self.nodes() if n.current_release}
        if len(names) != 1:
            raise Refused(
                Refusal.INVALID,
                f"cannot tell which release to roll back: nodes run {sorted(names) or 'nothing known'}",
            )
        return names.pop()

    def _last_applied(self) -> Rollout | None:
        """The newest change that stuck: what ``rollback`` without ``--to`` undoes.

        A rollback and the change it reverted cancel each other and are
        skipped, so each ``coordctl rollback`` goes one release further back,
        and after an automatic rollback the next one goes to what ran before
        the current release.  A ``rollback --to`` is a change of its own.
        """
        history = self.rollouts(limit=200)
        # a rollback that reverted X went through: both are skipped (read from the
        # rollback itself, so no race with X's record being marked rolled_back)
        undone = {
            str(r.options.get("reverts"))
            for r in history
            if r.kind == "rollback" and r.options.get("reverts") and r.phase is Phase.PERMANENT
        }
        for r in history:
            if r.phase not in {Phase.PROVISIONAL, Phase.PERMANENT} or r.id in undone:
                continue
            if r.kind == "rollback" and r.options.get("reverts"):
                continue
            return r
        return None

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

    def _start(
        self,
        kind: str,
        entry: ReleaseEntry,
        target: Target,
        options: RolloutOptions,
        lead: Leadership,
        *,
        from_memory: bool = False,
        reverts: str = "",
    ) -> Rollout:
        """Record a rollout, claim ``active`` and spawn its driver (never under a catch-up)."""
        with self._rollout_gate:
            nodes, missing = select(self.nodes(), target)
            if not nodes and not missing:
                raise Refused(Refusal.NO_TARGETS, f"no registered node matches {target.describe()}")
            rollout = Rollout(
                _new_id(),
                kind,
                entry.label,
                entry.digest,
                sorted([n.node_id for n in nodes] + missing),
                options={
                    **asdict(options),
                    "target": target.describe(),
                    "from_memory": from_memory,
                    "reverts": reverts,
                    "previous_permanent": self._permanent_raw(),
                },
                epoch=lead.epoch,
                leader=self.address,
                nodes={n.node_id: NodeResult(n.node_id, n.address) for n in nodes},
                previous={n.node_id: n.current_release for n in nodes},
            )
            rollout.waves = _assign_waves(rollout, options.waves)
            for name in missing:
                rollout.nodes[name] = NodeResult(
                    name, vote=Vote.UNREACHABLE, detail="not registered (down or unknown)"
                )
            tx = self.client.transactions
            # a rollback makes the release it restores the target again from its start
            undesired = [tx.delete(self.keys.current)] if kind == "rollback" else []
            ok, created = lead.transaction(
                [
                    tx.put(self.keys.active, rollout.id),
                    tx.put(self.keys.rollout(rollout.id), rollout.dumps()),
                    *undesired,
                ],
                [tx.value(self.keys.active) == reverts]
                if reverts and self._active_id() == reverts
                else [tx.version(self.keys.active) == 0],
            )
            if not ok:
                if not lead.is_valid():
                    raise Refused(
                        Refusal.NOT_LEADER,
                        "leadership was lost while starting the rollout",
                        leader=self.leader_address(),
                    )
                raise Refused(
                    Refusal.BUSY,
                    f"rollout {self._active_id()} is in progress; one rollout at a time per cluster (watch it with `coordctl status`, or `coordctl abort`)",
                )
            rollout.revision = int(created[1].response_put.header.revision)
            log.info(
                "rollout %s: %s %s on %s", rollout.id, kind, entry.label, ", ".join(rollout.targets)
            )
            manifest = dict(entry.manifest)
            self._spawn(
                lambda: self._drive(lead, rollout, manifest, entry, options),
                f"rollout-{rollout.id}",
                rollout.id,
            )
            return rollout

    def _spawn(self, fn: Callable[[], None], name: str, rollout_id: str = "") -> None:
        """Run ``fn`` on a thread the engine owns; ``rollout_id``: the rollout it drives."""

        def run() -> None:
            failed = False
            try:
                fn()
            except _Deposed:
                log.warning("%s: stopped, this coordinator is no longer the leader", name)
            except _Superseded as exc:
                log.info("%s: stopped, rollout %s was changed by another writer", name, exc)
            except Exception:
                log.exception("%s failed", name)
                failed = True
            finally:
                with self._lock:
                    if self._driving.get(rollout_id) is threading.current_thread():
                        del self._driving[rollout_id]
            if failed and self.is_leader() and not self._stopping.wait(1.0):
                self._spawn(self._recover, "recover")  # settle what the driver left

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
        other; whoever loses raises :class:`_Superseded` and stops.
        """
        rollout.epoch = lead.epoch
        key = self.keys.rollout(rollout.id)
        tx = self.client.transactions
        compare = [tx.mod(key) == rollout.revision] if rollout.revision else []
        ok, responses = _retry(
            lambda: lead.transaction([tx.put(key, rollout.dumps()), *extra_ops], compare)
        )
        if not ok:
            if compare and lead.is_valid():
                raise _Superseded(rollout.id)
            raise _Deposed()
        rollout.revision = int(responses[0].response_put.header.revision)
        if rollout.phase.terminal:
            self.baselines.drop(rollout.id)  # only a window needs one
            self._trim_history(lead)

    def _hook(self, point: str, rollout: Rollout) -> None:
        fn = self.hooks.get(point)
        if fn is not None:
            fn(rollout)

    def _drive(
        self,
        lead: Leadership,
        rollout: Rollout,
        manifest: dict[str, Any],
        entry: ReleaseEntry,
        options: RolloutOptions,
    ) -> None:
        """Each wave is its own two-phase commit, analysed before the next one starts."""
        while True:
            # No health sampling while the wave prepares and commits: its samples
            # would serve nothing (the baseline ends when the rollout starts, the
            # window begins after the commit) and compete for the nodes' CPU.
            sampler = self.sampler
            if sampler is not None:
                sampler.pause()
            try:
                if not self._commit_wave(lead, rollout, manifest, entry, options):
                    return
            finally:  # finish scheduled the resumption just after its commit instant
                if sampler is not None:
                    sampler.resume_at(time.time())
            if not self._after_finish(lead, rollout, options):
                return
            rollout.wave += 1
            rollout.phase = Phase.PREPARING
            self._save(lead, rollout)

    def _commit_wave(
        self,
        lead: Leadership,
        rollout: Rollout,
        manifest: dict[str, Any],
        entry: ReleaseEntry,
        options: RolloutOptions,
    ) -> bool:
        """Prepare, decide, then finish or abort one wave; True when it committed."""
        self._hook("before_prepare", rollout)
        self._prepare_all(lead, rollout, manifest, entry, options)
        self._save(lead, rollout)
        self._hook("before_decision", rollout)
        members = self._members(rollout)
        voters = [n for n in members if n.vote is not Vote.UNREACHABLE or not options.allow_missing]
        yes = all(n.vote is Vote.YES for n in voters) and any(n.vote is Vote.YES for n in voters)
        wanted = "commit" if yes and not options.dry_run else "abort"
        # the commit binds the yes voters alone: a node whose vote arrives too late,
        # or one left out under --allow-missing, never acts on it (the convergence
        # loop catches it up instead)
        bound = [n.node for n in members if n.vote is Vote.YES]
        decision = self._decide(lead, self._wave_id(rollout), wanted, bound)
        rollout.decision, rollout.decided_at = decision, time.time()
        if decision != "commit":
            rollout.phase = Phase.ABORTING
            self._save(lead, rollout)
            self._abort_wave(lead, rollout, options, dry_run=options.dry_run and yes)
            return False
        rollout.phase = Phase.COMMITTED
        self._save(lead, rollout)
        self._hook("after_decision", rollout)
        return self._finish_all(lead, rollout, options)

    @staticmethod
    def _wave_id(rollout: Rollout) -> str:
        """The id agents and decision keys see: one per wave."""
        return rollout.id if rollout.waves <= 1 else f"{rollout.id}.w{rollout.wave + 1}"

    @staticmethod
    def _members(rollout: Rollout) -> list[NodeResult]:
        return [n for n in rollout.nodes.values() if n.wave == rollout.wave]

    def _after_finish(self, lead: Leadership, rollout: Rollout, options: RolloutOptions) -> bool:
        """Analyse the window; True when the next wave may start."""
        last = rollout.wave >= rollout.waves - 1
        if options.window_s == 0:
            action = "promote"
        else:
            entry = self._entry_or_stub(rollout.release)
            action = self._analyse(
                lead, rollout, self._policy(entry_manifest_health(entry), options)
            )
        if action != "promote":
            return False
        if last:
            reason = rollout.analysis.get("reason") if rollout.analysis else ""
            window = rollout.analysis.get("window_s") if rollout.analysis else 0
            self._make_permanent(
                lead, rollout, f"healthy for {window:g}s: {reason}" if reason else rollout.reason
            )
            return False
        return True

    def _abort_wave(
        self, lead: Leadership, rollout: Rollout, options: RolloutOptions, *, dry_run: bool
    ) -> None:
        """Abort the current wave; earlier waves already switched go back too."""
        switched = sorted(n.node for n in rollout.nodes.values() if n.finished)
        if not switched:
            self._abort_all(lead, rollout, options, dry_run=dry_run)
            return
        self._abort_all(lead, rollout, options, dry_run=False, release_active=False)
        why = f"wave {rollout.wave + 1} aborted: {_abort_reason(rollout)}"
        rollout.phase, rollout.reason = Phase.PROVISIONAL, why
        self._save(lead, rollout)
        self._rollback_of(lead, rollout, switched, why)

    def _prepare_all(
        self,
        lead: Leadership,
        rollout: Rollout,
        manifest: dict[str, Any],
        entry: ReleaseEntry,
        options: RolloutOptions,
    ) -> None:
        message = manifest_to_proto(manifest) if manifest else None
        if message is not None:
            message.signature = bytes.fromhex(entry.signature)  # stored as hex in etcd
            message.signer = entry.signer

        def prepare(result: NodeResult) -> None:
            if result.vote is Vote.UNREACHABLE:
                return
            request = agent_pb2.PrepareRequest(
                rollout_id=self._wave_id(rollout),
                epoch=lead.epoch,
                force=options.force,
                rollback_target=bool(rollout.options.get("from_memory")),
            )
            if message is not None:
                request.release.CopyFrom(message)
            started = time.perf_counter()
            try:
                reply = self.agents.stub(result.address).Prepare(request, timeout=options.timeout_s)
            except grpc.RpcError as exc:
                result.vote, result.detail = Vote.UNREACHABLE, _rpc_detail(exc)
                return
            result.prepare_s = time.perf_counter() - started
            result.vote = Vote.YES if reply.ok else Vote.NO
            result.prepare_warnings = _kept_warnings(reply.warnings)
            if not rollout.options.get("from_memory"):
                # what this node runs, from the node itself (its membership record may lag)
                rollout.previous[result.node] = reply.current_release
            result.errors = [
                e if e.node else e.on_node(result.node) for e in errors_from_proto(reply.errors)
            ]

        members = self._members(rollout)
        self._parallel(prepare, members, options.concurrency)
        rollout.errors = [e for n in members for e in n.errors]
        for n in members:
            if n.vote is Vote.UNREACHABLE and not options.allow_missing:
                rollout.errors.append(
                    ModuleError(
                        "*", Reason.UNREACHABLE, f"unreachable at prepare: {n.detail}", n.node
                    )
                )

    def _decide(
        self, lead: Leadership, rollout_id: str, wanted: str, participants: list[str] | None = None
    ) -> str:
        """Write the decision once (the commit point) and return the one that stands.

        The record carries our epoch (:mod:`hotfleet.decisions`).  One already
        there stands only if a leader wrote it (verified against etcd); a
        forged one is replaced by ours, fenced and only if it is unchanged,
        so nobody with mere write access to etcd decides a rollout.
        """
        key = self.keys.decision(rollout_id)
        tx = self.client.transactions
        value = decisions.encode(wanted, lead.epoch, participants)
        ok, _ = _retry(lambda: lead.transaction([tx.put(key, value)], [tx.version(key) == 0]))
        if ok:
            return wanted
        for _attempt in range(3):
            raw, meta = self._get(key)
            if raw is None:
                raise _Deposed()
            stands = self._decision_that_stands(rollout_id, raw, int(meta.mod_revision), wanted)
            if stands:
                return stands
            fenced = functools.partial(
                lead.transaction, [tx.put(key, value)], [tx.mod(key) == meta.mod_revision]
            )
            if _retry(fenced)[0]:
                return wanted
        raise _Deposed()

    def _decision_that_stands(self, rollout_id: str, raw: bytes, revision: int, wanted: str) -> str:
        """The decision in ``raw`` if a leader wrote it, "" if it is forged (logged)."""
        try:
            verify = functools.partial(decisions.verify, self.client, self.keys, raw, revision)
            return _retry(verify).decision
        except decisions.ForgedDecision as exc:
            log.error(
                "rollout %s: the decision record was not written by a leader (%s); "
                "replacing it with this leader's %r",
                rollout_id,
                exc,
                wanted,
            )
            return ""

    def _finish_all(self, lead: Leadership, rollout: Rollout, options: RolloutOptions) -> bool:
        """Drive Finish to every yes voter; True if all of them switched.

        A yes vote is kept or the fleet goes back: if any voter fails its
        finish (it raised and restored itself, overran a deadline, restarted
        or never answered), the rollout never turns provisional; the whole
        fleet is rolled back (:meth:`_finish_failed`).
        """
        deadline = time.monotonic() + max(options.timeout_s, 5.0)
        # Agents may restart on another port: the live membership, read once for the wave
        # (one paged range, not a read per node between the decision and the commit).
        live = self._live_addresses()
        # Scheduled commit: every node switches at one instant, far enough ahead for the
        # Finish fan-out to reach them all, instead of whenever its RPC happens to land.
        members = self._members(rollout)
        commit_at = time.time() + commit_lead(len(members))
        sampler = self.sampler
        if sampler is not None:
            sampler.resume_at(commit_at + COMMIT_QUIET_S)
        decided = self._decided_releases(rollout)

        def finish(result: NodeResult) -> None:
            if result.finished or result.vote is not Vote.YES:
                return
            request = agent_pb2.FinishRequest(
                rollout_id=self._wave_id(rollout), epoch=lead.epoch, commit_at=commit_at
            )
            result.address = live.get(result.node) or result.address
            while True:
                try:
                    reply = self.agents.stub(result.address).Finish(
                        request, timeout=max(1.0, deadline - time.monotonic())
                    )
                except grpc.RpcError as exc:
                    result.detail = _rpc_detail(exc)
                    if (
                        time.monotonic() >= deadline
                        or exc.code() is grpc.StatusCode.FAILED_PRECONDITION
                    ):
                        return
                    time.sleep(0.2)
                    continue
                result.finish_warnings = _kept_warnings(reply.warnings)
                result.drained, result.still_in_flight = (
                    not reply.drain_timed_out,
                    reply.still_in_flight,
                )
                if not result.drained:
                    log.warning(
                        "rollout %s: %s switched after its drain timed out, with %d request(s) "
                        "still in flight on the old code",
                        rollout.id,
                        result.node,
                        result.still_in_flight,
                    )
                wrong = _misreported(result.node, reply, decided(result.node)) if reply.ok else None
                if wrong is not None:
                    # a yes voter that switched to something else than what was decided:
                    # not finished, so the fleet goes back (finish_failed)
                    result.errors, result.detail = [wrong], wrong.detail
                    log.error("rollout %s: %s", rollout.id, wrong)
                elif reply.ok:
                    result.finished, result.pause_s, result.detail = True, reply.pause_s, ""
                    result.finished_at = reply.finished_at or time.time()  # the node's own instant
                else:
                    result.errors = [
                        e if e.node else e.on_node(result.node)
                        for e in errors_from_proto(reply.errors)
                    ]
                    result.detail = "finish failed" + (
                        ", previous version restored" if reply.restored else ""
                    )
                return

        self._parallel(finish, members, max(options.concurrency, len(members)))
        rollout.finished_at = time.time()
        failed = [n for n in members if n.vote is Vote.YES and not n.finished]
        if failed and rollout.kind != "rollback":
            self._hook("after_finish", rollout)
            self._finish_failed(lead, rollout, failed)
            return False
        if failed:
            # The way back has no way back: a rollback completes, and the nodes it
            # missed are brought to the release it restores by the convergence loop
            # (once it ends, that release is their target again).
            log.warning(
                "rollout %s: %s did not switch back; the convergence loop catches them up",
                rollout.id,
                ", ".join(n.node for n in failed),
            )
        rollout.phase = Phase.PROVISIONAL
        rollout.reason = f"finished on {sum(n.finished for n in rollout.nodes.values())} node(s)"
        self._save(lead, rollout, *self._current_ops(rollout))
        self._hook("after_finish", rollout)
        return True

    def _decided_releases(self, rollout: Rollout) -> Callable[[str], tuple[str, str] | None]:
        """What each node must run once it finished ``rollout``: (label, digest); None: unknown.

        An upgrade, or a rollback to a named release: the rollout's release
        and the digest it was pushed with ("" for a stub entry: the label
        alone is checked).  A rollback from memory that names no release
        (nodes that ran different releases, or the boot code) returns each
        node to what it ran before the rollout it reverts.
        """
        if rollout.release:
            return lambda _node: (rollout.release, rollout.release_digest)
        reverted = str(rollout.options.get("reverts") or "")
        if rollout.kind != "rollback" or not reverted:
            return lambda _node: None
        try:
            previous = self.rollout(reverted).previous
        except Refused:
            return lambda _node: None
        return lambda node: (previous[node], "") if node in previous else None

    def _current_ops(self, rollout: Rollout) -> list[Any]:
        """Make the rollout's release the desired one of the nodes that switched to it.

        Read by :mod:`coordinator.convergence` (catch-up of nodes that restart
        inside the window) and by agents at start.  A rollback needs no
        record: when it ends, the permanent release is the target again.
        """
        entry = self._entry_or_stub(rollout.release)
        if rollout.options.get("from_memory") or not entry.manifest:
            return []
        record = {
            **self._release_record(entry),
            "rollout": rollout.id,
            "targets": sorted(n.node for n in rollout.nodes.values() if n.finished),
        }
        return [self.client.transactions.put(self.keys.current, json.dumps(record))]

    def _set_desired(self, lead: Leadership, labels: dict[str, str | None]) -> None:
        """Per-node permanent releases (``desired/<node>``; None removes the override)."""
        tx = self.client.transactions
        ops = [
            tx.delete(self.keys.desired_of(node))
            if label is None
            else tx.put(self.keys.desired_of(node), json.dumps({"release": label}))
            for node, label in sorted(labels.items())
        ]
        for i in range(0, len(ops), TXN_OPS):  # etcd's default limit is 128 ops a transaction
            if not _retry(functools.partial(lead.guarded_txn, ops[i : i + TXN_OPS])):
                raise _Deposed()

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

    def _finish_failed(self, lead: Leadership, rollout: Rollout, failed: list[NodeResult]) -> None:
        """Some yes voter did not switch: take every node of the rollout back.

        The rollout stays ``committed`` (never provisional, never permanent)
        until the rollback rollout marks it ``rolled_back``; nodes that never
        switched (or restored themselves) vote yes to it without doing anything.
        """
        errors: list[ModuleError] = []
        for n in failed:
            errors.extend(n.errors)
            if not n.errors:
                errors.append(
                    ModuleError(
                        "*",
                        Reason.TIMEOUT,
                        f"finish not acknowledged: {n.detail or 'no answer'}",
                        n.node,
                    )
                )
        why = "finish_failed: " + "; ".join(
            f"{e.node}: {e.module}: {e.reason.value}: {e.detail}" for e in errors
        )
        rollout.errors = errors
        rollout.reason = f"{why}; rolling the whole fleet back"
        self._save(lead, rollout)
        log.error("rollout %s: %s", rollout.id, rollout.reason)
        voters = sorted(n.node for n in rollout.nodes.values() if n.vote is Vote.YES)
        self._rollback_of(lead, rollout, voters, why)

    def _make_permanent(self, lead: Leadership, rollout: Rollout, reason: str) -> None:
        entry = self._entry_or_stub(rollout.release)
        live = self._live_addresses()

        def permanent(result: NodeResult) -> None:
            if not result.finished:
                return
            result.address = live.get(result.node) or result.address
            try:
                self.agents.stub(result.address).MakePermanent(
                    agent_pb2.MakePermanentRequest(
                        rollout_id=rollout.id, epoch=lead.epoch, release=rollout.release
                    ),
                    timeout=10,
                )
            except grpc.RpcError as exc:
                result.detail = f"make permanent: {_rpc_detail(exc)}"

        self._parallel(permanent, rollout.nodes.values(), 32)
        rollout.phase, rollout.ended_at = Phase.PERMANENT, time.time()
        rollout.reason = reason
        tx = self.client.transactions
        ops = [tx.delete(self.keys.active)] if self._active_id() == rollout.id else []
        ops.append(tx.delete(self.keys.current))  # the permanent release is the target again
        reverted = rollout.options.get("reverts")
        switched = [n.node for n in rollout.nodes.values() if n.finished]
        if reverted:  # back to what was permanent before the reverted upgrade
            old = self.rollout(reverted)
            if old.options.get("target") == ALL_NODES:
                before = old.options.get("previous_permanent", "")
                ops.append(
                    tx.put(self.keys.permanent, before)
                    if before
                    else tx.delete(self.keys.permanent)
                )
            self._set_desired(lead, {n: old.previous.get(n, "") for n in switched})
        elif entry.manifest and rollout.options.get("target") == ALL_NODES:
            ops.append(tx.put(self.keys.permanent, json.dumps(self._release_record(entry))))
            stale = [m.key.decode() for _, m in self.client.get_prefix(self.keys.desired)]
            self._set_desired(lead, {k.rpartition("/")[2]: None for k in stale})
        elif entry.manifest:  # some nodes only: their own permanent release
            self._set_desired(lead, dict.fromkeys(switched, entry.label))
        self._hook("before_permanent", rollout)
        self._save(lead, rollout, *ops)
        if reverted:
            why = rollout.options.get("health", {}).get("why") or "operator request"

            def rolled_back(old: Rollout) -> bool:
                old.phase, old.reason = Phase.ROLLED_BACK, f"rolled back by {rollout.id}: {why}"
                old.ended_at = time.time()
                return True

            self._amend(lead, reverted, rolled_back)
        log.info("rollout %s: %s permanent", rollout.id, rollout.release)

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
            except _Superseded:
                continue
        raise _Superseded(rollout_id)

    def _policy(self, release_health: dict[str, Any], options: RolloutOptions) -> AnalysisPolicy:
        """Defaults, then the release's ``[health]``, then the operator's flags."""
        flags = {k: v for k, v in options.health.items() if k != "why"}
        try:
            policy = AnalysisPolicy.from_mapping(release_health)
            policy = AnalysisPolicy.from_mapping(flags, base=policy)
            if options.window_s:  # 0 means no window at all: never analysed
                policy = AnalysisPolicy.from_mapping({"window_s": options.window_s}, base=policy)
        except PolicyError as exc:
            raise Refused(Refusal.INVALID, f"health policy: {exc}") from exc
        return policy

    def _analyse(self, lead: Leadership, rollout: Rollout, policy: AnalysisPolicy) -> str:
        """The rollback window: judge every upgraded node until it passes, fails or ends unsure.

        Paused is not unguarded: an inconclusive window pauses (waiting for
        ``coordctl promote``/``rollback``) but the judge keeps sampling, so a
        regression that shows later (thresholds, crashes, changed code
        failing) still rolls back by itself, and a window that becomes
        conclusive and healthy resumes to permanent.
        """
        upgraded = sorted(n.node for n in rollout.nodes.values() if n.finished)
        waiting = sorted(n.node for n in rollout.nodes.values() if n.wave > rollout.wave)
        baseline_from = rollout.created_at - policy.baseline_s
        entry = self._entry_or_stub(rollout.release)
        members = {n.node_id: n for n in self.nodes()}
        checks = entry.manifest.get("smoke") or []
        events = run_smoke_checks(
            checks, [members[n] for n in upgraded if n in members], policy.smoke_timeout_s
        )
        judge = Judge(policy)
        baseline = self._baseline(lead, rollout, upgraded, baseline_from)
        inbox: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        with self._lock:
            self._requests[rollout.id] = inbox
        try:
            return self._judge_window(
                lead, rollout, policy, judge, baseline, inbox, upgraded, waiting, events
            )
        finally:
            with self._lock:
                self._requests.pop(rollout.id, None)
            while not inbox.empty():  # whoever asked acts on the record as it is now
                inbox.get_nowait().done.set_exception(_WindowClosed())

    def _take_request(self, inbox: queue.SimpleQueue[_Request], wait_s: float) -> _Request | None:
        """The next operator request, waiting up to ``wait_s`` (less if the engine stops)."""
        deadline = time.monotonic() + wait_s
        while not self._stopping.is_set():
            try:
                return inbox.get(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None
        return None

    def _judge_window(
        self,
        lead: Leadership,
        rollout: Rollout,
        policy: AnalysisPolicy,
        judge: Judge,
        baseline: dict[str, list[Sample]],
        inbox: queue.SimpleQueue[_Request],
        upgraded: list[str],
        waiting: list[str],
        events: list[Any],
    ) -> str:
        sampler = self.sampler
        start = rollout.finished_at
        paused_at: float | None = None
        while True:
            request = self._take_request(inbox, policy.interval_s)
            if request is not None:
                try:
                    request.done.set_result(request.run(self.rollout(rollout.id)))
                except Refused as exc:
                    request.done.set_exception(exc)
                    continue
                except BaseException as exc:
                    request.done.set_exception(exc)
                    raise
                log.info("rollout %s: %s taken from the operator", rollout.id, request.what)
                return "stopped"
            if self._stopping.is_set() or sampler is None:
                return "stopped"
            if self.rollout(rollout.id).phase is not Phase.PROVISIONAL:
                return "stopped"  # promoted, rolled back or aborted by the operator meanwhile
            current, crashes = sampler.samples(upgraded, start)
            members = {n.node_id: n for n in self.nodes()}
            window_events = events + crashes + sampler.lost(upgraded, start, members)
            if self.prometheus is not None:
                window_events += self.prometheus.events()
            peers = sampler.samples(waiting, start)[0] if waiting else None
            verdict = judge.evaluate(
                baseline,
                current,
                window_events,
                peers=peers,
                changed=sampler.changed_code(upgraded, start),
                release=rollout.release,
            )
            elapsed = time.time() - start
            action = verdict.action(policy, window_over=elapsed >= policy.window_s)
            before = rollout.analysis
            rollout.analysis = {
                **verdict.to_json(),
                "elapsed_s": round(elapsed, 3),
                "window_s": policy.window_s,
                "action": action,
            }
            if action == "pause":
                paused_at = paused_at or time.time()
                rollout.analysis["paused"] = paused_record(verdict, paused_at)
            if action == "wait":
                self._save(lead, rollout)
                continue
            if action == "promote":
                if paused_at is not None:
                    rollout.analysis["resumed"] = f"judge passed after a pause: {verdict.reason}"
                self._save(lead, rollout)
            elif action == "rollback":
                failed = verdict.overall is Outcome.FAIL
                why = verdict.reason if failed else f"{verdict.reason} (on_inconclusive = rollback)"
                rollout.reason = f"regression: {why}"
                self._save(lead, rollout)
                log.warning("rollout %s: %s; rolling the fleet back", rollout.id, rollout.reason)
                self._rollback_of(lead, rollout, upgraded, why)
            else:
                rollout.reason = f"{verdict.reason}; paused: {RESUMES}"
                # saved when what the operator reads changes, not every sample; the
                # save is compare-and-swap: an operator's promote/rollback meanwhile wins
                if not before or before.get("reason") != verdict.reason or "paused" not in before:
                    self._save(lead, rollout)
                continue  # still guarded: sampled and judged until promoted or rolled back
            return action

    def _baseline(
        self, lead: Leadership, rollout: Rollout, nodes: list[str], since: float
    ) -> dict[str, list[Sample]]:
        """Each node's pre-rollout samples: this leader's own, else those persisted with the rollout.

        What this leader sampled itself is written to etcd (once per node), so
        a successor elected inside the window judges it against the same
        baseline instead of pausing for want of one.
        """
        sampler = self.sampler
        own = sampler.samples(nodes, since, rollout.created_at)[0] if sampler is not None else {}
        stored = _retry(lambda: self.baselines.load(rollout.id, nodes))
        fresh = {n: s for n, s in own.items() if s and n not in stored}
        if fresh:
            _retry(lambda: self.baselines.save(lead, rollout.id, fresh))
        missing = [n for n in nodes if not own.get(n) and n in stored]
        if missing:
            log.info(
                "rollout %s: judging %s against the baseline persisted with the rollout",
                rollout.id,
                ", ".join(missing),
            )
        return {n: own.get(n) or stored.get(n) or [] for n in nodes}

    def _rollback_of(self, lead: Leadership, rollout: Rollout, nodes: list[str], why: str) -> None:
        """Take ``nodes`` of a provisional ``rollout`` back to what they ran, from memory.

        A node that died meanwhile is skipped: it boots the permanent (old)
        release anyway.
        """
        previous = sorted({rollout.previous.get(n, "") for n in nodes})
        label = previous[0] if len(previous) == 1 else ""
        entry = self._entry_or_stub(label) if label else ReleaseEntry("", "", "", "", 0.0, 0, False)
        options = RolloutOptions(allow_missing=True, window_s=0.0, health={"why": why})
        self._start(
            "rollback",
            entry,
            Target(nodes=nodes),
            options,
            lead,
            from_memory=True,
            reverts=rollout.id,
        )

    def _abort_all(
        self,
        lead: Leadership,
        rollout: Rollout,
        options: RolloutOptions,
        *,
        dry_run: bool,
        release_active: bool = True,
    ) -> None:
        def abort(result: NodeResult) -> None:
            if result.vote is Vote.UNREACHABLE and not result.address:
                return
            try:
                self.agents.stub(self._address_of(result)).Abort(
                    agent_pb2.AbortRequest(rollout_id=self._wave_id(rollout), epoch=lead.epoch),
                    timeout=5,
                )
                result.aborted = True
            except grpc.RpcError as exc:
                result.detail = (
                    f"abort: {_rpc_detail(exc)} (the node drops it from the decision key)"
                )

        self._parallel(abort, self._members(rollout), options.concurrency)
        if not release_active:
            return
        rollout.phase = Phase.DRY_RUN if dry_run else Phase.ABORTED
        rollout.ended_at = time.time()
        if dry_run:
            rollout.reason = f"dry run: every node ({len(rollout.nodes)}) prepared {rollout.release}; aborted on purpose"
        elif not rollout.reason:
            rollout.reason = _abort_reason(rollout)
        tx = self.client.transactions
        self._save(lead, rollout, tx.delete(self.keys.active))
        log.info("rollout %s: %s", rollout.id, rollout.reason)
        reverted = rollout.options.get("reverts")
        if reverted and not dry_run:
            self._rollback_failed(lead, rollout, reverted)

    def _rollback_failed(self, lead: Leadership, rollback: Rollout, reverted: str) -> None:
        """The rollback of a half-committed upgrade aborted: say so on the upgrade.

        A committed upgrade whose finish failed somewhere waits for its
        rollback in ``committed``; if that rollback cannot go through, the
        upgrade turns provisional with the reason, so the operator sees the
        split and can roll back or promote (nothing is left pending for ever).
        """

        def split(old: Rollout) -> bool:
            if old.phase is not Phase.COMMITTED:
                return False
            old.phase = Phase.PROVISIONAL
            old.reason = (
                f"{old.reason}; the automatic rollback {rollback.id} aborted ({rollback.reason}): "
                "the fleet is split, see `coordctl nodes`; retry with `coordctl rollback`"
            )
            return True

        self._amend(lead, reverted, split)

    def _live_addresses(self) -> dict[str, str]:
        """Every registered node's address, from one read of the membership."""
        return {n.node_id: n.address for n in _retry(self.nodes) if n.address}

    def _address_of(self, result: NodeResult) -> str:
        """Agents may restart on another port: prefer the live membership record."""
        raw, _ = self._get(self.keys.node(result.node))
        if raw:
            with contextlib.suppress(ValueError):
                result.address = json.loads(raw).get("address") or result.address
        return result.address

    @staticmethod
    def _parallel(
        fn: Callable[[NodeResult], None], items: Iterable[NodeResult], concurrency: int
    ) -> None:
        items = list(items)
        if not items:
            return
        with ThreadPoolExecutor(
            max_workers=max(1, min(concurrency, len(items))), thread_name_prefix="hotfleet-rpc"
        ) as pool:
            list(pool.map(fn, items))

    def _recover(self) -> None:
        """On winning the election: settle the rollout a previous leader left behind."""
        lead = self._leadership
        if lead is None:
            return
        rid = self._active_id()
        if not rid:
            return
        with self._lock:
            driver = self._driving.get(rid)
        if driver is not None and driver.is_alive():
            return  # a live driver owns it: recovery never re-enters its rollout
        with self._lock:
            self._driving[rid] = threading.current_thread()  # this thread drives it now
        try:
            rollout = self.rollout(rid)
        except Refused:
            self.client.transaction(
                compare=[lead.fence()],
                success=[self.client.transactions.delete(self.keys.active)],
                failure=[],
            )
            return
        options = RolloutOptions(
            **{k: v for k, v in rollout.options.items() if k in RolloutOptions.__dataclass_fields__}
        )
        # presumed abort when undecided (a rollback rollout is never analysed or waved)
        decision = self._decide(lead, self._wave_id(rollout), "abort")
        rollout.decision = decision
        log.warning("new leader recovering rollout %s: decision %s", rid, decision)
        if decision != "commit":
            rollout.phase = Phase.ABORTING
            refused = any(n.vote is Vote.NO for n in rollout.nodes.values())
            rollout.reason = rollout.reason or (
                _abort_reason(rollout) + " (settled by a new leader)"
                if refused
                else "the leader changed before the decision was recorded: presumed abort"
            )
            self._save(lead, rollout)
            self._abort_wave(lead, rollout, options, dry_run=False)
            return
        if rollout.phase is not Phase.PROVISIONAL:
            rollout.phase = Phase.COMMITTED
            self._save(lead, rollout)
            if not self._finish_all(lead, rollout, options):
                return
        # a new leader has no baseline of its own for the window: the judge says so
        if self._after_finish(lead, rollout, options):
            entry = self._entry_or_stub(rollout.release)
            rollout.wave += 1
            rollout.phase = Phase.PREPARING
            self._save(lead, rollout)
            self._drive(lead, rollout, dict(entry.manifest), entry, options)


def _abort_reason(rollout: Rollout) -> str:
    parts: list[str] = []
    for n in sorted(rollout.nodes.values(), key=lambda n: n.node):
        if n.vote is Vote.NO:
            parts.extend(
                f"{e.node or n.node}: {e.module}: {e.reason.value}: {e.detail}" for e in n.errors
            )
        elif n.vote is Vote.UNREACHABLE:
            parts.append(f"{n.node}: unreachable at prepare ({n.detail})")
        elif n.vote is Vote.PENDING:
            parts.append(f"{n.node}: no vote")
    return "aborted, nothing changed: " + ("; ".join(parts) if parts else "aborted by the operator")


WARNINGS_KEPT = 20  # a node's warnings kept per phase in the rollout record
WARNING_CHARS = 500


def _kept_warnings(warnings: Iterable[str]) -> list[str]:
    """A node's prepare or finish warnings as the record keeps them (bounded)."""
    items = list(warnings)
    kept = [
        w if len(w) <= WARNING_CHARS else w[: WARNING_CHARS - 3] + "..."
        for w in items[:WARNINGS_KEPT]
    ]
    if len(items) > WARNINGS_KEPT:
        kept.append(f"... and {len(items) - WARNINGS_KEPT} more warning(s)")
    return kept


def _misreported(node: str, reply: Any, decided: tuple[str, str] | None) -> ModuleError | None:
    """Why a node's FinishReply does not show the decided release, None if it does.

    ``reply.release`` must be the decided label; ``reply.digest`` must be
    the decided digest when both are known (an agent older than the field
    sends none).
    """
    if decided is None:
        return None
    want, want_digest = decided
    got, got_digest = reply.release, reply.digest
    if got == want and (not want_digest or not got_digest or got_digest == want_digest):
        return None
    detail = (
        f"node {node} reported {got or '(boot code)'} (digest {got_digest[:16] or 'none'}) "
        f"after finish; decided {want or '(boot code)'} (digest {want_digest[:16] or 'any'})"
    )
    reason = Reason.DIGEST_MISMATCH if got == want else Reason.BAD_RELEASE
    return ModuleError("*", reason, detail, node)


def commit_lead(nodes: int) -> float:
    """How far ahead of now the commit instant of a wave of ``nodes`` is set."""
    packed = min(nodes, COMMIT_LEAD_PACKED)
    return (
        COMMIT_LEAD_S
        + COMMIT_LEAD_PER_NODE_S * packed
        + COMMIT_LEAD_PER_EXTRA_NODE_S * (nodes - packed)
    )


def _rpc_detail(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"


def _retry(fn: Callable[[], T]) -> T:
    """Retry an idempotent etcd call through a short outage (an etcd restart, a leader change).

    Only transient failures (etcd unreachable or timing out) are retried, with
    jitter, for at most 30 s or what is left of the API request being answered
    (:mod:`hotfleet.transient`); a lost fence (``_Deposed``), a programming
    error or etcd's quota is raised at once, naming its real cause.
    """
    return transient.retrying(ETCD_RETRY_S, "etcd call")(fn)


def _assign_waves(rollout: Rollout, spec: list[str]) -> int:
    """Split the targets into waves of cumulative sizes (``["1", "25%", "100%"]``)."""
    names = sorted(rollout.nodes)
    total, done, wave = len(names), 0, 0
    for item in spec or ["100%"]:
        item = item.strip()
        try:
            size = math.ceil(float(item[:-1]) * total / 100) if item.endswith("%") else int(item)
        except ValueError:
            raise Refused(
                Refusal.INVALID, f"wave size {item!r} is neither a count nor a percentage"
            ) from None
        size = min(total, max(size, done + 1))
        for name in names[done:size]:
            rollout.nodes[name].wave = wave
        done, wave = size, wave + 1
        if done >= total:
            break
    for name in names[done:]:
        rollout.nodes[name].wave = wave
    return wave + (1 if done < total else 0)


def _version_key(version: str) -> tuple[int, ...]:
    """The leading dotted numbers of ``version`` (``2.1.0-bad`` -> ``(2, 1, 0)``).

    Enough to tell an older release from a newer one of the same name;
    versions that differ only after the numbers compare equal, which is
    never called a downgrade.
    """
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()
