"""The node agent: the loader, a gRPC server, etcd membership and metrics, in the app's process.

:class:`Agent` is the library form (``node-agent`` wraps it around a WSGI
server, see :mod:`node_agent.cli`)::

    agent = Agent("node-1", code_paths=["/srv/app"], etcd="http://etcd:2379",
                  listen="0.0.0.0:7070", labels={"zone": "eu-west"}, dev=True)
    wsgi_app = agent.wsgi(app)          # drain guard + metrics + /-/metrics
    agent.http_address = "10.0.0.5:8080"
    agent.start()                       # reconcile, serve gRPC, register
    ...
    agent.stop()                        # deregister at once, stop gRPC

Keys in etcd (``<prefix>`` defaults to ``/hotfleet/``; every key is built by
:class:`hotfleet.keys.Keys`):

``<prefix>nodes/<node_id>``
    Membership, written by the agent on a lease (keepalive every TTL/3; the
    key vanishes when the lease expires or is revoked on a clean stop).
    JSON object::

        {"node_id": "n1", "address": "10.0.0.5:7070",       # gRPC NodeAgent
         "http_address": "10.0.0.5:8080",                   # the app, "" if none
         "labels": {"zone": "eu-west"},
         "current_release": "shop@2.0.0",                   # "" = unknown boot code
         "previous_release": "shop@1.0.0",                  # rollback target or ""
         "permanent_release": "shop@1.0.0",
         "state": "idle",        # starting|reconciling|idle|preparing|prepared|
                                 # finishing|rolling_back|reconcile_failed|stopping
         "prepared_rollout": "",  "epoch_seen": 7,
         "pid": 4242, "started_at": 1718000000.0,            # unix seconds
         "secure": true,                                    # false in dev mode
         "trusted_keys": ["3f2a9c0d1e4b5a67"],              # release-signing key ids
         "health": {"requests": 10, "errors": 0, "uncaught": 0}}

``<prefix>releases/permanent``
    The fleet's permanent release, written by the coordinator when a rollout
    turns permanent; read by agents when they start.  JSON object::

        {"release": "shop@1.0.0",
         "digest": "<Release.digest>",
         "manifest": <Release.to_manifest()>,
         "signature": "<ed25519 signature, hex>",   # may lack only in dev mode
         "signer": "<key id>"}

    If the node's boot code differs from it (compared module by module by
    digest), the agent fetches the sources, prepares, finishes and makes it
    permanent *before* it registers; if the boot code already is that
    release, the agent just records it as current and permanent.  The
    signature is verified as for a Prepare (below) before anything is loaded.

``<prefix>rollouts/<id>/decision``
    ``{"decision": "commit"|"abort", "epoch": N}``, written once by the
    leading coordinator in a transaction fenced by its leader key: the 2PC
    commit point (:mod:`hotfleet.decisions`).  A record is believed only if
    epoch ``N`` led when it was written (etcd's history of the election); a
    forged one is logged and ignored.  While a rollout is prepared here, a thread the agent owns polls
    its decision key every 0.5 s and acts on it by itself (finish on
    ``commit``, drop on ``abort``), through the same code paths as the Finish
    and Abort RPCs and idempotent with them; so a prepared node never depends
    on the coordinator that prepared it.  An unreachable etcd is retried.

``<prefix>blobs/<sha256>/...``
    Module sources by digest (:class:`hotfleet.store.EtcdBlobBackend`), a
    release's in one transaction; once a release is committed the agent keeps
    its sources in ``cache_dir``, so it can prepare it again (a retry, a
    rollback to it) while etcd is down.

Fencing: every mutating RPC carries the coordinator's epoch, and only the
current leader's epoch as etcd says (the create revision of the lowest key
under ``<prefix>election/``, read by the agent and cached for a second) is
obeyed; anything else is refused with ``FAILED_PRECONDITION`` (see
:meth:`Agent.fence`).  The highest *verified* epoch is persisted (atomic
write) in ``cache_dir`` as ``epoch-<node_id>-<hash of prefix>.json`` =
``{"epoch": 7}`` and is what the agent obeys while etcd is unreachable.
Authority: with TLS, mutating RPCs are taken only from certificates with the
``coordinator`` role (:mod:`hotfleet.tls`).

Signing: outside dev mode the agent needs at least one trusted ed25519 key
(``trusted_keys``, ``node-agent --trust-key``) and refuses to start without
one; every Prepare must carry ``ReleaseManifest.signature``/``signer`` valid
over the release digest (which the agent checks against the digest it
recomputes from the manifest), or it is refused with ``*: unsigned`` /
``*: bad_signature``.  In dev mode an unsigned release is accepted, but a
signature that is present is verified when trusted keys are configured.  A
rollback target needs no signature: it is code this process already ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import etcd3.exceptions
import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc
from hotfleet.errors import HotfleetError, ModuleError, Reason
from hotfleet.etcd_client import EtcdClient, open_client, parse_endpoints
from hotfleet.fencing import LeaderEpochs
from hotfleet.keys import DEFAULT_PREFIX, Keys
from hotfleet.limits import MAX_MODULES, MAX_PREPARE_MESSAGE_BYTES
from hotfleet.release import Release, is_module_name
from hotfleet.signing import DEFAULT_FLEET, load_public_keys, verify_release
from hotfleet.store import BlobNotFound, ContentStore, EtcdBlobBackend, LocalCache
from hotfleet.tls import TLSFiles, agent_guard
from hotfleet.wire import manifest_from_proto
from node_agent.asgi_guard import agent_asgi
from node_agent.coverage import health_fields, prometheus_lines
from node_agent.decision_watch import (
    DecisionWatch,
    DecisionWatches,
)
from node_agent.drain import WSGIMiddleware
from node_agent.loader import PREPARE_TIMEOUT_S, Loader
from node_agent.membership import Membership
from node_agent.metrics import Metrics
from node_agent.participant import Participant, State, label, refusal
from node_agent.participant_wire import WireParticipant
from node_agent.reconcile import Reconciler, SourcesUnavailable
from node_agent.release_files import ReleaseFiles
from node_agent.supervision import SupervisedLoader

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PREFIX", "Agent", "SourcesUnavailable", "TLSFiles", "permanent_record"]

METRICS_PATH = "/-/metrics"


def permanent_record(release: Release, signature: str = "", signer: str = "") -> str:
    """The value of ``<prefix>releases/permanent`` for ``release`` (what a coordinator writes).

    ``signature`` (hex) and ``signer`` (key id) come from
    :func:`hotfleet.signing.sign_release`; agents outside dev mode refuse an
    unsigned record.
    """
    record: dict[str, Any] = {
        "release": release.label,
        "digest": release.digest,
        "manifest": release.to_manifest(),
    }
    if signature:
        record["signature"] = signature
        record["signer"] = signer
    return json.dumps(record, sort_keys=True)


_label = label
_err = refusal


class Agent:
    """Everything hotfleet runs inside one worker process; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        code_paths: Sequence[str | os.PathLike[str]],
        etcd: str | None = "http://127.0.0.1:2379",
        *,
        prefix: str = DEFAULT_PREFIX,
        listen: str = "127.0.0.1:0",
        advertise_host: str | None = None,
        labels: Mapping[str, str] | None = None,
        http_address: str = "",
        dev: bool = False,
        tls: TLSFiles | None = None,
        trusted_keys: Mapping[str, Ed25519PublicKey]
        | Iterable[str | os.PathLike[str]]
        | None = None,
        lease_ttl: int = 10,
        cache_dir: str | os.PathLike[str] | None = None,
        drain_timeout: float = 5.0,
        prepare_timeout: float = PREPARE_TIMEOUT_S,
        etcd_timeout: float = 3.0,
        etcd_options: Mapping[str, Any] | None = None,
        ready_timeout: float = 15.0,
        grpc_workers: int = 8,
        loader: Loader | None = None,
        fleet: str = DEFAULT_FLEET,
    ) -> None:
        if not node_id or "/" in node_id:
            raise ValueError(f"node id must be non-empty and contain no '/': {node_id!r}")
        if not dev and tls is None:
            raise ValueError(
                "refusing to serve the agent's gRPC API without mutual TLS: an unauthenticated "
                "agent is remote code execution. Give tls=TLSFiles(cert, key, ca), or dev=True "
                "for an insecure development setup"
            )
        if isinstance(trusted_keys, Mapping):
            self.trusted_keys: dict[str, Ed25519PublicKey] = dict(trusted_keys)
        elif isinstance(trusted_keys, str | os.PathLike):
            self.trusted_keys = load_public_keys([trusted_keys])
        else:
            self.trusted_keys = load_public_keys(trusted_keys or ())
        if not dev and not self.trusted_keys:
            raise ValueError(
                "refusing to start without a trusted release-signing key: outside dev mode "
                "every release must carry an ed25519 signature that the agent verifies before "
                "it prepares anything. Give trusted_keys=[path to release-signing.pub] "
                "(node-agent --trust-key PATH; make one with `python -m hotfleet.signing "
                "keygen DIR`), or dev=True for an insecure development setup"
            )
        if etcd is not None:
            parse_endpoints(etcd)  # fail on a bad URL now, not in a background thread
        self.node_id = node_id
        self.fleet = fleet  # release signatures must name it (hotfleet.signing)
        self.keys = Keys(prefix)
        self.prefix = self.keys.prefix
        self.labels = dict(labels or {})
        self.listen = listen
        self.advertise_host = advertise_host
        self.http_address = http_address
        self.dev = dev
        self.tls = tls
        self.etcd_endpoints = etcd
        self.etcd_timeout = etcd_timeout
        self.etcd_options = dict(etcd_options or {})
        self.ready_timeout = ready_timeout
        self.grpc_workers = grpc_workers
        self.loader = loader or SupervisedLoader(
            code_paths, drain_timeout=drain_timeout, prepare_timeout=prepare_timeout
        )
        self.metrics = Metrics()
        self.cache = LocalCache(
            Path(cache_dir)
            if cache_dir is not None
            else Path(tempfile.gettempdir()) / f"hotfleet-blobs-{os.getuid()}"
        )
        self.started_at = time.time()
        self.address = ""  # gRPC host:port once started

        # a prepared rollout's decision is read from etcd too: a prepared node
        # never waits for a dead coordinator
        self._watches = (
            DecisionWatches(self.keys, self._client, self.apply_decision)
            if etcd is not None
            else None
        )
        # the 2PC participant: every mutating operation goes through it, under its lock
        # data files and package requirements of a release, around the loader
        self.code = ReleaseFiles(self.loader)
        self.participant = Participant(
            self.code,
            node_id=node_id,
            watch=self._watches,
            on_state=self._publish,
            on_committed=self._cache_sources,
        )
        self._op_lock = self.participant.lock
        self._wire = WireParticipant(self.participant, node_id, self._obtain, lambda: self._epoch)
        self._epoch_lock = threading.Lock()
        self._epoch = self._load_epoch()
        # the leader's epoch as etcd says (None: no etcd, only a monotonic fence)
        self._leader_epochs = LeaderEpochs(self._client, self.keys) if etcd is not None else None
        self.reconciler = Reconciler(
            node_id,
            self.keys,
            cast(Loader, self.code),  # a Loader in all but name: it delegates to one
            self.participant,
            verify=self.check_signature,
            fetch=self.fetch_release,
            done=etcd is None,
        )
        self._data_client: EtcdClient | None = None
        self._data_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.membership: Membership | None = None
        if etcd is not None:
            self.membership = Membership(
                self.keys.node(node_id),
                self.membership_record,
                self._new_client,
                ttl=lease_ttl,
                on_session=self.reconciler,
            )

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Serve gRPC, reconcile to the fleet's permanent release and register.

        Waits up to ``ready_timeout`` for the first etcd session (reconcile
        included); if etcd does not answer, the agent starts anyway in state
        ``etcd_unreachable`` and keeps retrying in the background.
        """
        self.metrics.install_excepthooks()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=self.grpc_workers, thread_name_prefix="hotfleet-grpc"),
            options=[
                ("grpc.so_reuseport", 0),
                # Stated, not inherited: a larger request is refused by gRPC
                # itself (RESOURCE_EXHAUSTED) before it is decoded.
                ("grpc.max_receive_message_length", MAX_PREPARE_MESSAGE_BYTES),
            ],
            # With TLS, who may call what comes from the client certificate's role
            # (hotfleet.tls.AGENT_POLICY): only coordinators change code here.
            interceptors=[agent_guard()] if self.tls is not None else [],
        )
        agent_pb2_grpc.add_NodeAgentServicer_to_server(_Servicer(self), self._server)
        if self.tls is not None:
            port = self._server.add_secure_port(self.listen, self.tls.server_credentials())
        else:
            port = self._server.add_insecure_port(self.listen)
        host = self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
        self.address = _join(self._advertised(host), port)
        self._server.start()
        log.info("node agent %s: gRPC NodeAgent on %s", self.node_id, self.address)
        if self.dev:
            log.warning(
                "!!! DEV MODE: node agent %s serves gRPC on %s WITHOUT TLS OR AUTHENTICATION; "
                "anyone who can reach it can load code into this process. Never use in production.",
                self.node_id,
                self.address,
            )
        if self.membership is None:
            self.participant.settle()
            return
        self.membership.start()
        if not self.membership.wait_first_attempt(self.ready_timeout):
            log.warning("etcd did not answer within %.1fs; serving anyway", self.ready_timeout)
        if not self.membership.connected:
            log.error(
                "etcd unreachable (%s): serving the boot code, will reconcile and register "
                "when etcd answers",
                self.membership.last_error or "no answer yet",
            )

    def stop(self, grace: float = 1.0) -> None:
        """Deregister at once (revoke the lease), stop the gRPC server and decision polls.

        A prepare in progress is cancelled (its staging process killed), so a
        stuck release never keeps a stopping agent alive.
        """
        self.participant.stop()
        if self.membership is not None:
            self.membership.stop(revoke=True)
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1)
            self._server = None
        if self._watches is not None:
            self._watches.stop(self.etcd_timeout + 1.0)
        with self._data_lock:
            if self._data_client is not None:
                self._data_client.close()
                self._data_client = None
        self.metrics.uninstall_excepthooks()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- the app
    def wsgi(self, app: WSGIApplication) -> WSGIApplication:
        """``app`` behind the drain guard, with request metrics and ``/-/metrics``."""
        guarded = WSGIMiddleware(app, self.loader.barrier, self.metrics.observe)

        def agent_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == METRICS_PATH:
                body = self.prometheus().encode()
                start_response(
                    "200 OK",
                    [
                        ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                        ("Content-Length", str(len(body))),
                    ],
                )
                return [body]
            return guarded(environ, start_response)

        return agent_app

    def asgi(self, app: Any) -> Any:
        """``app`` (ASGI) behind the drain guard, with request metrics and ``/-/metrics``.

        Websockets and streaming responses are guarded for their whole life;
        a finish waits for them at most the drain timeout and then says how
        many were left in flight (:mod:`node_agent.asgi`).
        """
        return agent_asgi(self, app)

    async def start_async(self) -> None:
        """:meth:`start` for an event loop: runs on a worker thread, the loop keeps serving."""
        import asyncio

        await asyncio.to_thread(self.start)

    async def stop_async(self, grace: float = 1.0) -> None:
        """:meth:`stop` for an event loop (on a worker thread)."""
        import asyncio

        await asyncio.to_thread(self.stop, grace)

    def set_gauge(self, name: str, value: float) -> None:
        """An application-defined health gauge (Health RPC and Prometheus)."""
        self.metrics.set_gauge(name, value)

    # ---------------------------------------------------------------- state
    @property
    def reconcile_errors(self) -> list[ModuleError]:
        """Why reconciling to the fleet's release at start failed (empty if it did not)."""
        return self.reconciler.errors

    @property
    def etcd_connected(self) -> bool:
        return self.membership is not None and self.membership.connected

    @property
    def state(self) -> str:
        """What Status reports: the agent's state, or ``etcd_unreachable`` while cut off."""
        cut_off = self.membership is not None and not self.membership.connected
        state = self.participant.state
        if cut_off and state not in (State.STOPPING, State.RECONCILING):
            return "etcd_unreachable"
        return str(state)

    @property
    def epoch_seen(self) -> int:
        return self._epoch

    def _publish(self) -> None:
        if self.membership is not None:
            self.membership.publish()

    def _settle(self) -> None:
        self.participant.settle()

    def membership_record(self) -> dict[str, Any]:
        snap = self.metrics.snapshot()
        loader = self.loader
        return {
            "node_id": self.node_id,
            "address": self.address,
            "http_address": self.http_address,
            "labels": self.labels,
            "current_release": _label(loader.current_release),
            "previous_release": _label(loader.previous_release),
            "permanent_release": _label(loader.permanent_release),
            "state": str(self.participant.state),
            "prepared_rollout": self.participant.prepared_rollout,
            "epoch_seen": self._epoch,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "secure": self.tls is not None,
            "trusted_keys": sorted(self.trusted_keys),
            "health": {"requests": snap.requests, "errors": snap.errors, "uncaught": snap.uncaught},
        }

    def prometheus(self) -> str:
        stats = self.loader.barrier.stats()
        return self.metrics.prometheus(
            {"node": self.node_id},
            info={
                "current": _label(self.loader.current_release),
                "previous": _label(self.loader.previous_release),
                "permanent": _label(self.loader.permanent_release),
                "state": self.state,
            },
            extra=lambda: {
                "hotfleet_epoch_seen": self._epoch,
                "hotfleet_etcd_connected": float(self.etcd_connected),
                "hotfleet_drain_holds": stats.held_total,
                "hotfleet_drain_last_hold_seconds": stats.last_hold_s,
                "hotfleet_drain_max_hold_seconds": stats.max_hold_s,
                "hotfleet_in_flight_requests": self.loader.barrier.in_flight,
            },
        ) + prometheus_lines(self.loader.coverage.report(), {"node": self.node_id})

    # ----------------------------------------------------------------- etcd
    def _new_client(self) -> EtcdClient:
        assert self.etcd_endpoints is not None
        return open_client(self.etcd_endpoints, timeout=self.etcd_timeout, **self.etcd_options)

    def _client(self) -> EtcdClient:
        """A long-lived client for reads (blobs, permanent release)."""
        if self.etcd_endpoints is None:
            raise RuntimeError("agent runs without etcd")
        with self._data_lock:
            if self._data_client is None:
                self._data_client = self._new_client()
            return self._data_client

    def content_store(self) -> ContentStore:
        return ContentStore(EtcdBlobBackend(self._client(), self.keys.blobs), self.cache)

    def _cache_sources(self, release: Release) -> None:
        """Keep a committed release's sources in the local cache, so the node can
        prepare it again (a retry, a rollback to it) while etcd is unreachable.

        Done after the commit rather than in prepare: creating a file per module
        is CPU that a fleet sharing a host needs for preparing; an aborted
        release is never written.  Best effort: the cache is an optimisation.
        """
        if self.etcd_endpoints is None:
            return
        try:
            self.content_store().keep(release.blobs())
        except OSError as exc:
            log.warning("could not cache the sources of %s: %s", release.label, exc)

    def fetch_release(
        self, manifest: Mapping[str, Any], verify: Callable[[Release], None] | None = None
    ) -> Release:
        """Rebuild a release from its manifest, sources from the cache or etcd.

        The manifest is checked whole first, without fetching a byte: a
        malformed or oversized one is a :class:`ReleaseError` naming the field,
        and ``verify`` (the signature check) gets the release as the manifest
        declares it (name, version, digest over the declared module digests;
        no sources yet), so an unsigned or forged release costs no fetch.
        Raises :class:`HotfleetError` listing every module that could not be
        fetched or verified (``digest_mismatch`` for bad bytes).
        """
        declared = Release.from_manifest(manifest, lambda _digest: b"")
        if verify is not None:
            verify(declared)
        errors: list[ModuleError] = []
        names = {d.digest: d.path for d in declared.data}
        names.update((m.digest, m.name) for m in declared.modules)
        store: ContentStore | None = None
        unavailable: list[Exception] = []
        fetched: dict[str, bytes] = {}
        unreachable: Exception | None = None
        if self.etcd_endpoints is not None:
            try:  # the fast path: cache, then one batched read of everything else
                store = self.content_store()
                # not cached yet: a release is written to the cache once committed (finish)
                fetched = store.get_many([d for d in names if isinstance(d, str)], keep=False)
            except (grpc.RpcError, etcd3.exceptions.Etcd3Exception) as exc:
                unreachable = exc  # each missing module says so below, without a retry each
            except HotfleetError as exc:  # a malformed digest: one by one below says which
                log.debug("batched source fetch refused, fetching one by one: %s", exc)

        def fetch(digest: str) -> bytes:
            nonlocal store
            if digest in fetched:
                return fetched[digest]
            module = str(names.get(digest, digest))
            try:
                if unreachable is not None:  # no retry per module: only what is cached
                    cached = store.get_cached(digest) if store is not None else None
                    if cached is not None:
                        return cached
                    raise unreachable
                if store is None:
                    store = self.content_store()
                return store.get(digest)  # the local cache first, so etcd may be down
            except BlobNotFound as exc:
                errors.append(_err(module, f"source {digest} is not in the content store: {exc}"))
            except HotfleetError as exc:
                errors.extend(_err(module, e.detail, e.reason) for e in exc.errors)
            except (grpc.RpcError, etcd3.exceptions.Etcd3Exception, OSError) as exc:
                # etcd (or the cache's disk) failed us: worth retrying; a bug is not
                unavailable.append(exc)
                errors.append(
                    _err(module, f"cannot fetch source {digest}: {type(exc).__name__}: {exc}")
                )
            return b""

        release = Release.from_manifest(manifest, fetch)
        if unavailable:
            raise SourcesUnavailable(errors)
        if errors:
            raise HotfleetError(errors)
        return release

    # ------------------------------------------------------------- fencing
    def fence(self, epoch: int) -> str | None:
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
        with self._epoch_lock:
            if self._leader_epochs is None:
                return self._monotonic_fence(epoch)
            try:
                leader = self._leader_epochs.current(epoch)
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
                    return self._monotonic_fence(epoch)
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
            self._raise_fence(epoch)
            return None

    def _monotonic_fence(self, epoch: int) -> str | None:
        if epoch < self._epoch:
            return (
                f"node {self.node_id}: epoch {epoch} is lower than {self._epoch} already seen; "
                "a newer coordinator leads"
            )
        self._raise_fence(epoch)
        return None

    def _raise_fence(self, epoch: int) -> None:
        if epoch > self._epoch:
            self._epoch = epoch
            self._save_epoch(epoch)
            if self.membership is not None:
                self.membership.publish()

    @property
    def epoch_path(self) -> Path:
        """Where the highest epoch seen survives a restart (per node and cluster prefix)."""
        tag = hashlib.sha256(self.keys.prefix.encode()).hexdigest()[:8]
        return self.cache.directory / f"epoch-{self.node_id}-{tag}.json"

    def _load_epoch(self) -> int:
        path = self.epoch_path
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

    def _save_epoch(self, epoch: int) -> None:
        """Atomically replace the epoch file (temp file, fsync, rename)."""
        path = self.epoch_path
        tmp = ""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as out:
                json.dump({"epoch": epoch, "node_id": self.node_id, "prefix": self.prefix}, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            tmp = ""
        except OSError as exc:  # the fence still holds in memory
            log.error("cannot persist epoch %d to %s: %s", epoch, path, exc)
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)

    # ------------------------------------------------------------- signing
    def check_signature(self, digest: str, signature_hex: str, signer: str, label: str) -> None:
        """Apply the signing policy to a release; raise :class:`HotfleetError` to refuse it.

        Outside dev mode a valid signature by a trusted key is required; in
        dev mode an unsigned release passes, a signed one is verified if
        trusted keys are configured.
        """
        if not signature_hex and self.dev:
            log.warning("dev mode: accepting the unsigned release %s", label or digest)
            return
        if signature_hex and not self.trusted_keys:  # dev mode only: non-dev requires keys
            log.warning(
                "dev mode: release %s is signed by %s but no trusted key is configured; "
                "signature not verified",
                label or digest,
                signer or "?",
            )
            return
        try:
            verify_release(
                digest, signature_hex, signer, self.trusted_keys, release=label, fleet=self.fleet
            )
        except HotfleetError as exc:
            log.error(
                "node %s refuses release %s: %s",
                self.node_id,
                label or digest,
                "; ".join(map(str, exc.errors)),
            )
            raise

    # ----------------------------------------------------------- operations
    # Each RPC is translated to the participant's wire-free call and back
    # (node_agent.participant_wire); the protocol itself lives in
    # node_agent.participant.
    def prepare(self, request: agent_pb2.PrepareRequest) -> agent_pb2.PrepareReply:
        return self._wire.prepare(request)

    def _obtain(self, request: agent_pb2.PrepareRequest) -> Release:
        """Fetch and verify the release a Prepare names (signature first, before any fetch)."""
        wire = request.release
        label = f"{wire.name}@{wire.version}"
        manifest = manifest_from_proto(wire)
        release = self.fetch_release(
            manifest,
            verify=lambda declared: self.check_signature(
                wire.digest or declared.digest, wire.signature.hex(), wire.signer, label
            ),
        )
        if wire.digest and wire.digest != release.digest:
            # Release.from_manifest refuses this already; never sign off on it here
            detail = f"manifest digest {wire.digest} != content digest {release.digest}"
            raise HotfleetError([_err("*", detail, Reason.DIGEST_MISMATCH)])
        return release

    def apply_decision(
        self,
        rollout_id: str,
        decision: str,
        watch: DecisionWatch | None = None,
        participants: Sequence[str] | None = None,
    ) -> bool:
        """Act on a rollout's durable decision read from etcd (see :meth:`Participant.apply_decision`).

        ``participants``: the nodes the decision names (None: an older record
        naming none, which binds every prepared node).
        """
        included = participants is None or self.node_id in participants
        return self.participant.apply_decision(rollout_id, decision, watch, included=included)

    def finish(self, request: agent_pb2.FinishRequest) -> agent_pb2.FinishReply:
        return self._wire.finish(request)

    def abort(self, request: agent_pb2.AbortRequest) -> agent_pb2.AbortReply:
        return self._wire.abort(request)

    def rollback(self, request: agent_pb2.RollbackRequest) -> agent_pb2.RollbackReply:
        return self._wire.rollback(request)

    def make_permanent(
        self, request: agent_pb2.MakePermanentRequest
    ) -> agent_pb2.MakePermanentReply:
        return self._wire.make_permanent(request)

    def status(self) -> agent_pb2.StatusReply:
        return agent_pb2.StatusReply(
            node_id=self.node_id,
            state=self.state,
            current_release=_label(self.loader.current_release),
            previous_release=_label(self.loader.previous_release),
            permanent_release=_label(self.loader.permanent_release),
            labels=self.labels,
            epoch_seen=self._epoch,
            prepared_rollout=self.participant.prepared_rollout,
        )

    def module_status(self, modules: Sequence[str]) -> agent_pb2.ModuleStatusReply:
        """What each named module (default: every known one) runs against its source on disk.

        Only dotted module names are answered: the digest lookup maps a name
        to a file under the code paths, and a path or ``..`` in a "name"
        would make it a way to hash any ``*.py`` on the host.  Raises
        ``ValueError`` naming the first bad name.
        """
        if len(modules) > MAX_MODULES:
            raise ValueError(f"{len(modules)} module names asked for, more than {MAX_MODULES}")
        for name in modules:
            if not is_module_name(name):
                raise ValueError(
                    f"{name[:200]!r} is not a dotted module name (ASCII identifiers joined by .)"
                )
        names = list(modules) or self.loader.loaded_modules()
        out = []
        for name in names:
            s = self.loader.status(name)
            out.append(
                agent_pb2.ModuleState(
                    module=s.module,
                    state=s.state.value,
                    release=s.release,
                    loaded_digest=s.loaded_digest,
                    disk_digest=s.disk_digest,
                )
            )
        return agent_pb2.ModuleStatusReply(modules=out)

    def health(self) -> agent_pb2.HealthReply:
        s = self.metrics.snapshot()
        return agent_pb2.HealthReply(
            requests=s.requests,
            errors=s.errors,
            latency_bounds_s=list(s.latency_bounds_s),
            latency_counts=list(s.latency_counts),
            cpu_s=s.cpu_s,
            rss_bytes=s.rss_bytes,
            uncaught=s.uncaught,
            gauges=dict(s.gauges),
            uptime_s=s.uptime_s,
            release=_label(self.loader.current_release),
            **health_fields(self.loader.coverage.report(), s.host),
        )

    # -------------------------------------------------------------- helpers
    def _advertised(self, host: str) -> str:
        if self.advertise_host:
            return self.advertise_host
        if host in ("0.0.0.0", "::", ""):
            return socket.getfqdn()
        return host


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Servicer(agent_pb2_grpc.NodeAgentServicer):
    """The gRPC face of :class:`Agent`: fencing, then the agent's operation."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _fenced(self, epoch: int, context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        refusal = self.agent.fence(epoch)
        if refusal is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        return call()

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.prepare(request))

    def Finish(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.finish(request))

    def Abort(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.abort(request))

    def Rollback(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.rollback(request))

    def MakePermanent(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._fenced(request.epoch, context, lambda: self.agent.make_permanent(request))

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.agent.status()

    def ModuleStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return self.agent.module_status(list(request.modules))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.agent.node_id}: {exc}")

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.agent.health()
