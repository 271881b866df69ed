"""One desired state, reconciled continuously: every registered node on the fleet's release.

The fleet's target is read from etcd, never from this process's memory, so a
new leader picks it up where the old one left it:

``releases/current``
    written by the leader when an upgrade's nodes have switched (its window
    opens): the release record plus ``rollout`` and ``targets`` (the nodes it
    is the target of).  Deleted when the rollout ends (permanent or rolled
    back), so that ``releases/permanent`` is the target again.
``desired/<node>``
    ``{"release": label}``: the node's permanent release when a rollout for
    some nodes only (``--nodes``, ``--selector``, a canary) became permanent
    there; the release record comes from the pushed entry.
``releases/permanent``
    the release every other node must run (written by a rollout for all nodes).

:class:`Convergence` is the leader's loop over that desired state: a node that
restarted (and booted the old permanent release), joined, missed a finish,
was left out with ``--allow-missing`` or drifted is brought to its target by
itself, one node at a time: Prepare, a durable decision of its own (so the
agent finishes from etcd if this coordinator dies), Finish, and MakePermanent
when the target is the permanent release.  It never acts while a rollout's
two-phase commit is in flight (only before one or inside its window), and it
holds the engine's rollout gate while it works, so no rollout starts under a
catch-up.  Each catch-up is recorded under ``catchups/<node>`` and shown by
``coordctl nodes`` (converged / catching up / drifting, and why).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from coordinator.fencing import retry
from hotfleet import transient
from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.decisions import Decided
from hotfleet.etcd_client import read_together
from hotfleet.wire import errors_from_proto, manifest_to_proto

if TYPE_CHECKING:
    from coordinator.election import Leadership
    from coordinator.engine import Engine
    from coordinator.fleet import NodeInfo
    from coordinator.transport import AgentStub

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # how often the leader compares the fleet with its desired state
RETRY_AFTER_S = 15.0  # a node whose catch-up failed is not tried again sooner
RESTING = frozenset({"idle", "reconcile_failed"})  # node states a catch-up may interrupt


@dataclass(frozen=True)
class Desired:
    """What one node should run: a release record (or the boot code when ``record`` is None)."""

    label: str
    record: Mapping[str, Any] | None
    permanent: bool  # make it what the node boots into


def _errors(wire: Any) -> str:
    return "; ".join(f"{e.module}: {e.reason.value}: {e.detail}" for e in errors_from_proto(wire))


def _loads(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Convergence:
    """The leader's desired-state loop; started by :meth:`Engine.lead`, stopped on step-down."""

    def __init__(self, engine: Engine, interval_s: float = INTERVAL_S) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_at: dict[str, float] = {}
        # (rollout id, record revision) last judged, and whether it was in its window
        self._phase_seen: tuple[tuple[str, int], bool] = (("", 0), False)
        # told of every catch-up's outcome ("ok" | "failed"), e.g. the coordinator's metrics
        self.on_catch_up: Callable[[str], None] = lambda _outcome: None

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        # an event per run: a thread of an earlier leadership still ending never sees it cleared
        stop = self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(stop,), name="hotfleet-converge", daemon=True
        )
        self._thread.start()

    def signal_stop(self) -> None:
        """Ask the loop to end (its etcd retries give up at once); :meth:`stop` waits for it."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _run(self, stop: threading.Event) -> None:
        with transient.cancelled_by(stop):
            while not stop.wait(self.interval_s):
                try:
                    self.converge_once()
                except Exception as exc:  # a bug here must be seen, and must not end the loop
                    if not transient.from_etcd(exc):
                        log.exception("convergence pass failed (a bug)")
                    elif not stop.is_set():
                        log.warning("convergence pass: %s; next pass", transient.describe(exc))

    # ----------------------------------------------------------------- state
    def desired(self) -> Callable[[str], Desired]:
        """``node -> Desired``, from the records in etcd."""
        engine, keys = self.engine, self.engine.keys
        # one revision: make_permanent writes the permanent release and deletes the window's
        # in one transaction; two reads could straddle it and want the old release (seen in CI)
        (permanent_raw, current_raw), (overridden,) = retry(
            lambda: read_together(engine.client, (keys.permanent, keys.current), (keys.desired,))
        )
        permanent, current = _loads(permanent_raw), _loads(current_raw)
        targets = set(current.get("targets") or ()) if current else set()
        base = Desired(str(permanent.get("release", "")), permanent, True) if permanent else None
        overrides: dict[str, str] = {}
        for raw, meta in overridden:
            record = _loads(raw)
            if record is not None:
                overrides[meta.key.decode().rpartition("/")[2]] = str(record.get("release", ""))
        entries: dict[str, Mapping[str, Any] | None] = {}

        def entry(label: str) -> Mapping[str, Any] | None:
            if label not in entries:
                entries[label] = engine.release_record(label) if label else None
            return entries[label]

        def want(node: str) -> Desired:
            if current is not None and node in targets:
                return Desired(str(current.get("release", "")), current, False)
            if node in overrides:
                return Desired(overrides[node], entry(overrides[node]), True)
            return base if base is not None else Desired("", None, True)

        return want

    def status(self, nodes: list[NodeInfo]) -> dict[str, tuple[str, str, str]]:
        """``node -> (desired label, converged|catching_up|drifting, why)`` for ``coordctl nodes``."""
        want = self.desired()
        records = {}
        for raw, meta in self.engine.client.get_prefix(self.engine.keys.catchups):
            record = _loads(raw)
            if record is not None:
                records[meta.key.decode().rpartition("/")[2]] = record
        out = {}
        for n in nodes:
            d = want(n.node_id)
            last = records.get(n.node_id, {})
            if n.current_release == d.label:
                out[n.node_id] = (d.label, "converged", "")
            elif last.get("outcome") == "running" and last.get("release") == d.label:
                out[n.node_id] = (d.label, "catching_up", f"loading {d.label}")
            else:
                why = str(last.get("detail") or "") if last.get("release") == d.label else ""
                if not why:
                    why = (
                        f"runs {n.current_release or 'the boot code'}, the fleet wants "
                        f"{d.label or 'the boot code'}"
                        + ("" if n.state in RESTING else f" (node is {n.state})")
                    )
                out[n.node_id] = (d.label, "drifting", why)
        return out

    # ------------------------------------------------------------------ work
    def converge_once(self) -> list[str]:
        """One pass: catch up every resting node that is off its target; the nodes tried."""
        engine = self.engine
        if not engine.is_leader():
            return []
        tried = []
        with engine._rollout_gate:
            if not self._window_or_idle():
                return []
            want = self.desired()
            for node in engine.nodes():
                if self._stop.is_set():
                    break
                d = want(node.node_id)
                if node.current_release == d.label or node.state not in RESTING:
                    continue
                if time.monotonic() - self._failed_at.get(node.node_id, -1e9) < RETRY_AFTER_S:
                    continue
                from_store = d.record is not None and d.record.get("manifest")
                # the boot code is wanted: nothing in the store to load, but a node
                # that switched away from it holds it in memory as its backup
                if not from_store and node.previous_release != d.label:
                    continue
                if self._catch_up(node, d):
                    tried.append(node.node_id)
        return tried

    def _window_or_idle(self) -> bool:
        """No two-phase commit in flight: no active rollout, or one in its window."""
        from coordinator.model import Kind, Phase  # the engine module imports this one

        rid = self.engine._active_id()
        if not rid:
            return True
        try:
            # the record is read (and parsed: ~100 bytes a node) only when it changed since
            # the last pass, not every second of a 1000-node rollout (issue 17)
            key = self.engine.keys.rollout(rid)
            head = self.engine.client.get_response(key, keys_only=True)
            revision = int(head.kvs[0].mod_revision) if head.kvs else 0
            if self._phase_seen[0] == (rid, revision):
                return self._phase_seen[1]
            saved = self.engine.last_saved
            if saved is not None and saved[:2] == (rid, revision):  # this engine wrote it
                phase, kind = saved[2], saved[3]
            else:
                rollout = self.engine.rollout(rid)
                phase, kind, revision = rollout.phase, rollout.kind, rollout.revision
        except Exception as exc:  # unreadable now: no catch-up this pass (never wrongly)
            if not transient.from_etcd(exc):
                log.exception("reading rollout %s failed (a bug)", rid)
            return False
        # a rollback's brief provisional phase is no window: it is on its way to permanent
        window = phase is Phase.PROVISIONAL and kind is not Kind.ROLLBACK
        self._phase_seen = ((rid, revision), window)
        return window

    def _catch_up(self, node: NodeInfo, d: Desired) -> bool:
        """Bring ``node`` to ``d``: load it from the store, or, for the boot code, roll
        back; False when the node itself says there is nothing to do."""
        if d.record is not None and d.record.get("manifest"):
            return self._attempt(
                node, d, f"loading {d.label}", f"caught up to {d.label}", self._load
            )
        want = d.label or "the boot code"
        return self._attempt(
            node, d, f"rolling back to {want}", f"rolled back to {want}", self._back
        )

    def _attempt(
        self,
        node: NodeInfo,
        d: Desired,
        doing: str,
        done: str,
        steps: Callable[[AgentStub, Leadership, str, NodeInfo, Desired], str],
    ) -> bool:
        """One recorded catch-up: ``steps`` returns "" on success, else why it failed."""
        lead = self.engine._require_leader()
        stub = self.engine.agents.stub(node.address)
        rid = f"catchup-{node.node_id}-{int(time.time() * 1000)}"
        try:
            # the membership record lags the node (it is published after a finish
            # replies): ask the node itself before acting on the record
            now = stub.Status(agent_pb2.StatusRequest(), timeout=5)
            if now.current_release == d.label or now.state not in RESTING:
                return False
            self._record(node.node_id, d.label, "running", doing, rid)
            log.info("catch-up %s: %s runs %r, %s", rid, node.node_id, now.current_release, doing)
            why = steps(stub, lead, rid, node, d)
        except grpc.RpcError as exc:
            why = f"unreachable: {exc.code().name}: {exc.details()}"
        if why:
            self._failed(node.node_id, d.label, why, rid)
            return True
        self._failed_at.pop(node.node_id, None)
        self._record(node.node_id, d.label, "ok", done, rid)
        self.on_catch_up("ok")
        log.warning("catch-up %s: %s %s", rid, node.node_id, done)
        return True

    def _load(self, stub: AgentStub, lead: Leadership, rid: str, node: NodeInfo, d: Desired) -> str:
        """Prepare, decide (naming this node alone), finish, and make permanent if wanted."""
        assert d.record is not None
        message = manifest_to_proto(dict(d.record["manifest"]))
        if d.record.get("signature"):
            message.signature = bytes.fromhex(str(d.record["signature"]))
            message.signer = str(d.record.get("signer") or "")
        reply = stub.Prepare(
            agent_pb2.PrepareRequest(rollout_id=rid, epoch=lead.epoch, release=message),
            timeout=60,
        )
        if not reply.ok:
            return f"refused {d.label}: {_errors(reply.errors)}"
        # it finishes from etcd if we die
        self.engine.protocol.decide(lead, rid, Decided.COMMIT, [node.node_id])
        finished = stub.Finish(
            agent_pb2.FinishRequest(rollout_id=rid, epoch=lead.epoch), timeout=60
        )
        if not finished.ok:
            return f"finish of {d.label} failed: {_errors(finished.errors)}"
        want_digest = str(d.record.get("digest") or "")
        if finished.release != d.label or (
            finished.digest and want_digest and finished.digest != want_digest
        ):
            # never counted as caught up: the loop tries again and shows it drifting
            return (
                f"reported {finished.release or 'the boot code'} (digest "
                f"{finished.digest[:12] or '?'}) after finishing {d.label} "
                f"(digest {want_digest[:12] or '?'})"
            )
        if d.permanent:
            stub.MakePermanent(
                agent_pb2.MakePermanentRequest(rollout_id=rid, epoch=lead.epoch, release=d.label),
                timeout=30,
            )
        return ""

    def _back(self, stub: AgentStub, lead: Leadership, rid: str, node: NodeInfo, d: Desired) -> str:
        """A one-node Rollback to the boot code the node holds in memory."""
        request = agent_pb2.RollbackRequest(
            rollout_id=rid, epoch=lead.epoch, expected_release=d.label
        )
        reply = stub.Rollback(request, timeout=60)
        if not reply.ok:
            return f"cannot go back to {d.label or 'the boot code'}: {_errors(reply.errors)}"
        return ""

    def _failed(self, node: str, label: str, detail: str, rid: str) -> None:
        self._failed_at[node] = time.monotonic()
        self._record(node, label, "failed", detail, rid)
        self.on_catch_up("failed")
        log.error("catch-up %s: %s cannot load %s: %s", rid, node, label, detail)

    def _record(self, node: str, label: str, outcome: str, detail: str, rid: str) -> None:
        record = {
            "release": label,
            "outcome": outcome,
            "detail": detail,
            "id": rid,
            "at": time.time(),
        }
        self.engine.client.put(self.engine.keys.catchup(node), json.dumps(record))
