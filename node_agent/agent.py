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
         "health": {"requests": 10, "errors": 0, "uncaught": 0},
         "replaces": 4199}   # only in a recycled worker's successor: the pid before
                             # it on this key, which wrote "stopping" as it left

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
current leader's epoch as etcd says is obeyed; anything else is refused with
``FAILED_PRECONDITION`` (:mod:`node_agent.fence`; the highest verified epoch
is persisted in ``cache_dir``).  Authority: with TLS, mutating RPCs are
taken only from certificates with the ``coordinator`` role
(:mod:`hotfleet.tls`).  Signing: outside dev mode every release must be
signed by a trusted key, checked before anything is fetched
(:mod:`node_agent.trust`).  A rollback target needs no signature: it is
code this process already ran.

:class:`Agent` is the façade: it checks its settings, builds the parts
below, wires them together, starts and stops them (it owns every thread,
server and lease they run, through them), and keeps the agent's API:

=====================================  ==========================================
part                                   module
=====================================  ==========================================
gRPC servicer and server               :mod:`node_agent.grpc_server`
the fence (epochs)                     :mod:`node_agent.fence`
signing policy                         :mod:`node_agent.trust`
fetching releases, the source cache    :mod:`node_agent.fetch`
the etcd settings and read client      :mod:`node_agent.etcd_link`
Status/Health/record/Prometheus        :mod:`node_agent.report`
WSGI/ASGI wrapping                     :mod:`node_agent.app_guard`
the 2PC state machine (and its wire)   :mod:`node_agent.participant` (``participant_wire``)
decisions read from etcd               :mod:`node_agent.decision_watch`
reconcile at start                     :mod:`node_agent.reconcile`
membership (lease, record)             :mod:`node_agent.membership`
=====================================  ==========================================
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.errors import ModuleError
from hotfleet.fencing import LeaderEpochs
from hotfleet.keys import DEFAULT_PREFIX, Keys
from hotfleet.release import Release
from hotfleet.signing import DEFAULT_FLEET
from hotfleet.store import ContentStore, LocalCache
from hotfleet.tls import TLSFiles
from node_agent.app_guard import agent_asgi, agent_wsgi
from node_agent.decision_watch import DecisionWatch, DecisionWatches
from node_agent.etcd_link import EtcdLink
from node_agent.fence import Fence
from node_agent.fetch import ReleaseSource
from node_agent.grpc_server import AgentServer, FencedServicer
from node_agent.loader import PREPARE_TIMEOUT_S, Loader
from node_agent.membership import Membership
from node_agent.metrics import Metrics
from node_agent.participant import Participant
from node_agent.participant_wire import WireParticipant
from node_agent.reconcile import Reconciler, SourcesUnavailable
from node_agent.release_files import ReleaseFiles
from node_agent.report import NodeCard, Reports
from node_agent.supervision import SupervisedLoader
from node_agent.trust import SigningPolicy, TrustedKeys

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PREFIX", "Agent", "SourcesUnavailable", "TLSFiles", "permanent_record"]

# the servicer under its old name (benchmarks/_simagent.py serves simulated agents with it)
_Servicer = FencedServicer


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


class Agent:
    """Everything hotfleet runs inside one worker process; see the module docstring.

    The keyword parameters come in groups, each handed to the part it
    configures: the gRPC server (``listen``, ``advertise_host``, ``tls``,
    ``grpc_workers``), etcd (``etcd``, ``etcd_timeout``, ``etcd_options``,
    ``lease_ttl``, ``ready_timeout``), trust (``dev``, ``trusted_keys``,
    ``fleet``), the loader (``code_paths``, ``drain_timeout``,
    ``prepare_timeout``, or a ready ``loader``) and who the node is
    (``node_id``, ``labels``, ``http_address``, ``prefix``, ``cache_dir``).
    """

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
        trusted_keys: TrustedKeys = None,
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
        self.signing = SigningPolicy(trusted_keys, node_id=node_id, dev=dev, fleet=fleet)
        self.etcd = (
            EtcdLink(etcd, timeout=etcd_timeout, options=etcd_options) if etcd is not None else None
        )
        self.node_id = node_id
        self.keys = Keys(prefix)
        self.prefix = self.keys.prefix
        self.dev = dev
        self.tls = tls
        self.ready_timeout = ready_timeout
        self.card = NodeCard(
            node_id,
            dict(labels or {}),
            secure=tls is not None,
            trusted_keys=sorted(self.signing.keys),
            http_address=http_address,
        )
        self.server = AgentServer(
            node_id, listen=listen, advertise_host=advertise_host, tls=tls, workers=grpc_workers
        )
        self.loader = loader or SupervisedLoader(
            code_paths, drain_timeout=drain_timeout, prepare_timeout=prepare_timeout
        )
        self.metrics = Metrics()
        self.cache = LocalCache(
            Path(cache_dir)
            if cache_dir is not None
            else Path(tempfile.gettempdir()) / f"hotfleet-blobs-{os.getuid()}"
        )
        self.releases = ReleaseSource(self.keys, self.cache, self.etcd, self.signing.check)

        # a prepared rollout's decision is read from etcd too: a prepared node
        # never waits for a dead coordinator
        self._watches = (
            DecisionWatches(self.keys, self.etcd.client, self.apply_decision)
            if self.etcd is not None
            else None
        )
        # data files and package requirements of a release, around the loader
        self.code = ReleaseFiles(self.loader)
        # the 2PC participant: every mutating operation goes through it, under its lock
        self.participant = Participant(
            self.code,
            node_id=node_id,
            watch=self._watches,
            on_state=self._publish,
            on_committed=self.releases.keep,
        )
        # the leader's epoch as etcd says (None: no etcd, only a monotonic fence)
        self._fence = Fence(
            node_id,
            self.keys,
            self.cache.directory,
            LeaderEpochs(self.etcd.client, self.keys) if self.etcd is not None else None,
            dev=dev,
            on_raise=self._publish,
        )
        self._wire = WireParticipant(
            self.participant,
            node_id,
            self.releases.obtain,
            lambda: self._fence.epoch,
            keep=self.releases.keep,
        )
        self.reconciler = Reconciler(
            node_id,
            self.keys,
            cast(Loader, self.code),  # a Loader in all but name: it delegates to one
            self.participant,
            verify=self.check_signature,
            fetch=self.fetch_release,
            done=etcd is None,
        )
        self.reports = Reports(
            self.card,
            self.loader,
            self.metrics,
            self.participant,
            self._fence,
            lambda: self.membership,
        )
        self.membership: Membership | None = None
        if self.etcd is not None:
            self.membership = Membership(
                self.keys.node(node_id),
                self.reports.membership_record,
                self.etcd.new_client,
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
        self.card.address = self.server.start(FencedServicer(self))
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
        stuck release never keeps a stopping agent alive.  Each part the agent
        started is stopped here, the shared etcd client last.
        """
        self.participant.stop()
        if self.membership is not None:
            self.membership.stop(revoke=True)
        self.server.stop(grace)
        if self._watches is not None:
            assert self.etcd is not None
            self._watches.stop(self.etcd.timeout + 1.0)
        if self.etcd is not None:
            self.etcd.close()
        self.metrics.uninstall_excepthooks()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def start_async(self) -> None:
        """:meth:`start` for an event loop: runs on a worker thread, the loop keeps serving."""
        import asyncio

        await asyncio.to_thread(self.start)

    async def stop_async(self, grace: float = 1.0) -> None:
        """:meth:`stop` for an event loop (on a worker thread)."""
        import asyncio

        await asyncio.to_thread(self.stop, grace)

    # -------------------------------------------------------------- the app
    def wsgi(self, app: WSGIApplication) -> WSGIApplication:
        """``app`` behind the drain guard, with request metrics and ``/-/metrics``."""
        return agent_wsgi(self, app)

    def asgi(self, app: Any) -> Any:
        """``app`` (ASGI) behind the drain guard, with request metrics and ``/-/metrics``.

        Websockets and streaming responses are guarded for their whole life;
        a finish waits for them at most the drain timeout and then says how
        many were left in flight (:mod:`node_agent.asgi`).
        """
        return agent_asgi(self, app)

    def set_gauge(self, name: str, value: float) -> None:
        """An application-defined health gauge (Health RPC and Prometheus)."""
        self.metrics.set_gauge(name, value)

    # ----------------------------------------------------------- who we are
    @property
    def address(self) -> str:
        """The gRPC ``host:port`` others reach this agent at ("" until started)."""
        return self.card.address

    @property
    def http_address(self) -> str:
        """The app's ``host:port`` as published in the membership record ("" if none)."""
        return self.card.http_address

    @http_address.setter
    def http_address(self, value: str) -> None:
        self.card.http_address = value

    @property
    def labels(self) -> dict[str, str]:
        return self.card.labels

    @property
    def started_at(self) -> float:
        return self.card.started_at

    @property
    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        return self.signing.keys

    @property
    def fleet(self) -> str:
        return self.signing.fleet

    def _advertised(self, host: str) -> str:
        return self.server.advertised(host)

    # ---------------------------------------------------------------- state
    @property
    def reconcile_errors(self) -> list[ModuleError]:
        """Why reconciling to the fleet's release at start failed (empty if it did not)."""
        return self.reconciler.errors

    @property
    def etcd_connected(self) -> bool:
        return self.reports.etcd_connected

    @property
    def state(self) -> str:
        """What Status reports: the agent's state, or ``etcd_unreachable`` while cut off."""
        return self.reports.state

    @property
    def epoch_seen(self) -> int:
        return self._fence.epoch

    @property
    def epoch_path(self) -> Path:
        """Where the highest epoch seen survives a restart (per node and cluster prefix)."""
        return self._fence.path

    def _publish(self) -> None:
        if self.membership is not None:
            self.membership.publish()

    # ---------------------------------------------------- fencing, releases
    def fence(self, epoch: int) -> str | None:
        """Accept ``epoch`` only if etcd says it leads; the refusal message otherwise
        (:meth:`node_agent.fence.Fence.check`)."""
        return self._fence.check(epoch)

    def check_signature(self, digest: str, signature_hex: str, signer: str, label: str) -> None:
        """Apply the signing policy to a release; raise :class:`HotfleetError` to refuse it
        (:meth:`node_agent.trust.SigningPolicy.check`)."""
        self.signing.check(digest, signature_hex, signer, label)

    def fetch_release(
        self, manifest: Mapping[str, Any], verify: Callable[[Release], None] | None = None
    ) -> Release:
        """Rebuild a release from its manifest, sources from the cache or etcd
        (:meth:`node_agent.fetch.ReleaseSource.fetch`)."""
        return self.releases.fetch(manifest, verify)

    def content_store(self) -> ContentStore:
        return self.releases.content_store()

    # ----------------------------------------------------------- operations
    # Each RPC is translated to the participant's wire-free call and back
    # (node_agent.participant_wire); the protocol itself lives in
    # node_agent.participant.
    def prepare(self, request: agent_pb2.PrepareRequest) -> agent_pb2.PrepareReply:
        return self._wire.prepare(request)

    def unpack(self, request: agent_pb2.PrepareRequest) -> agent_pb2.PrepareReply:
        return self._wire.unpack(request)

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

    # ------------------------------------------------------------- reports
    def status(self) -> agent_pb2.StatusReply:
        return self.reports.status()

    def module_status(self, modules: Sequence[str]) -> agent_pb2.ModuleStatusReply:
        """What each named module runs against its source on disk (``ValueError`` for a
        name that is not a dotted module name; :meth:`node_agent.report.Reports.module_status`)."""
        return self.reports.module_status(modules)

    def health(self) -> agent_pb2.HealthReply:
        return self.reports.health()

    def membership_record(self) -> dict[str, Any]:
        return self.reports.membership_record()

    def prometheus(self) -> str:
        return self.reports.prometheus()
