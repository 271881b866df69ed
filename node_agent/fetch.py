"""Fetching a release: its manifest checked and its signature verified, then its sources.

Why its own module: a Prepare and the start-up reconcile both turn a manifest
into a :class:`~hotfleet.release.Release` this process may load, and that
path has its own failure modes (a forged or unsigned manifest costs no fetch;
etcd down is worth retrying, a bad digest is not), kept here apart from the
2PC (:mod:`node_agent.participant`) and the gRPC face (:mod:`node_agent.grpc_server`).

:class:`ReleaseSource`
    :meth:`~ReleaseSource.fetch` rebuilds a release from a manifest, sources
    from the local cache first, then one batched etcd read
    (:class:`hotfleet.store.ContentStore`); :meth:`~ReleaseSource.obtain` does
    it for a ``PrepareRequest``, the signing policy (:mod:`node_agent.trust`)
    applied before any fetch; :meth:`~ReleaseSource.keep` writes a committed
    release's sources to the cache, so the node can prepare it again (a
    retry, a rollback to it) while etcd is down.

It owns no thread and no connection: etcd is reached through the agent's
:class:`~node_agent.etcd_link.EtcdLink`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import etcd3.exceptions
import grpc

from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.errors import HotfleetError, ModuleError, Reason
from hotfleet.keys import Keys
from hotfleet.release import Release
from hotfleet.store import BlobNotFound, ContentStore, EtcdBlobBackend, LocalCache
from hotfleet.wire import manifest_from_proto
from node_agent.etcd_link import EtcdLink
from node_agent.participant import refusal
from node_agent.reconcile import SourcesUnavailable

__all__ = ["ReleaseSource"]

log = logging.getLogger("node_agent.agent")

_err = refusal

# (digest, signature hex, signer key id, release label): raises to refuse
Verify = Callable[[str, str, str, str], None]


class ReleaseSource:
    """Releases for this node: blobs under ``keys.blobs`` in etcd (``etcd`` None: only
    ``cache``), each checked by ``verify`` (the signing policy) before it is fetched."""

    def __init__(
        self, keys: Keys, cache: LocalCache, etcd: EtcdLink | None, verify: Verify
    ) -> None:
        self.keys = keys
        self.cache = cache
        self.etcd = etcd
        self.verify = verify

    def content_store(self) -> ContentStore:
        if self.etcd is None:
            raise RuntimeError("agent runs without etcd")
        return ContentStore(EtcdBlobBackend(self.etcd.client(), self.keys.blobs), self.cache)

    def keep(self, release: Release) -> None:
        """Keep a committed release's sources in the local cache, so the node can
        prepare it again (a retry, a rollback to it) while etcd is unreachable.

        Done after the commit rather than in prepare: creating a file per module
        is CPU that a fleet sharing a host needs for preparing; an aborted
        release is never written.  Best effort: the cache is an optimisation.
        """
        if self.etcd is None:
            return
        try:
            self.content_store().keep(release.blobs())
        except OSError as exc:
            log.warning("could not cache the sources of %s: %s", release.label, exc)

    def obtain(self, request: agent_pb2.PrepareRequest) -> Release:
        """Fetch and verify the release a Prepare names (signature first, before any fetch)."""
        wire = request.release
        label = f"{wire.name}@{wire.version}"
        manifest = manifest_from_proto(wire)
        release = self.fetch(
            manifest,
            verify=lambda declared: self.verify(
                wire.digest or declared.digest, wire.signature.hex(), wire.signer, label
            ),
        )
        if wire.digest and wire.digest != release.digest:
            # Release.from_manifest refuses this already; never sign off on it here
            detail = f"manifest digest {wire.digest} != content digest {release.digest}"
            raise HotfleetError([_err("*", detail, Reason.DIGEST_MISMATCH)])
        return release

    def fetch(
        self, manifest: Mapping[str, Any], verify: Callable[[Release], None] | None = None
    ) -> Release:
        """Rebuild a release from its manifest, sources from the cache or etcd.

        The manifest is checked whole first, without fetching a byte: a
        malformed or oversized one is a :class:`ReleaseError` naming the field,
        and ``verify`` (the signature check) gets the release as the manifest
        declares it (name, version, digest over the declared module digests;
        no sources yet), so an unsigned or forged release costs no fetch.
        Raises :class:`HotfleetError` listing every module that could not be
        fetched or verified (``digest_mismatch`` for bad bytes), and
        :class:`SourcesUnavailable` when etcd (or the cache's disk) failed.
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
        if self.etcd is not None:
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
                    if self.etcd is None:  # an embedded agent with no fleet behind it
                        errors.append(
                            _err(module, f"source {digest} cannot be fetched: no etcd configured")
                        )
                        return b""
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
