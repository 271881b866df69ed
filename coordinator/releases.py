"""The cluster's release store: pushed releases, their content, and the store's upkeep.

What ``coordctl release push|list|show|rm`` works on.  A pushed release is
an entry ``releases/<name>/<version>`` (label, digest, manifest, signature)
and its module sources by digest in the content store (:mod:`hotfleet.store`);
an entry read back is checked against the key it was read under (a swapped
or edited entry is refused, never installed under another name).  The
upkeep keeps the store bounded: a byte quota checked before a push writes
anything, the newest ``release_history`` entries (and every one in use), and
garbage collection of the blobs no entry or permanent record refers to.

Which releases are *in use* is the engine's knowledge (nodes, rollouts), so
it is a callable here; so is whether this coordinator may write (it leads).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from coordinator.errors import Refused
from hotfleet import transient
from hotfleet.errors import HotfleetError
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.limits import MAX_STORE_BYTES
from hotfleet.protocol import Refusal
from hotfleet.release import Release
from hotfleet.store import (
    GC_MIN_AGE_S,
    ContentStore,
    EtcdBlobBackend,
    StoreFull,
    admit,
    collect_garbage,
)

__all__ = ["RELEASE_HISTORY", "ReleaseBook", "ReleaseEntry", "check_entry", "entry_manifest_health"]

log = logging.getLogger("hotfleet.coordinator")

T = TypeVar("T")

# Release entries kept in the store; older ones nothing uses go, with their blobs.
RELEASE_HISTORY = 100
ETCD_RETRY_S = 30.0  # how long an etcd outage is ridden out (transient errors only)


def _retry(fn: Callable[[], T]) -> T:
    return transient.retrying(ETCD_RETRY_S, "etcd call")(fn)


@dataclass
class ReleaseEntry:
    label: str
    name: str
    version: str
    digest: str
    pushed_at: float
    modules: int
    signed: bool
    manifest: dict[str, Any] = field(default_factory=dict)
    signature: str = ""
    signer: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def entry_manifest_health(entry: ReleaseEntry) -> dict[str, Any]:
    """The release's own ``[health]`` overrides."""
    return dict(entry.manifest.get("health") or {})


def check_entry(ref: str, entry: ReleaseEntry) -> None:
    """Refuse a store entry that is not the release ``ref`` names (a swapped or edited entry).

    The entry's label, name and version, its manifest's name and version, and
    the digest recomputed from the manifest must all agree with the key it
    was read under; otherwise ``upgrade NAME@NEW`` could install an old
    (validly signed) release while every record says NEW.
    """
    name, _, version = ref.partition("@")
    manifest = entry.manifest if isinstance(entry.manifest, dict) else {}
    claims = {
        "label": (entry.label, ref),
        "name": (entry.name, name),
        "version": (entry.version, version),
        "manifest name": (manifest.get("name"), name),
        "manifest version": (manifest.get("version"), version),
    }
    wrong = [f"{what} {got!r}" for what, (got, want) in claims.items() if got != want]
    if not wrong:
        try:
            rebuilt = Release.from_manifest(manifest, lambda _digest: b"").digest
        except HotfleetError as exc:
            wrong.append(f"manifest does not rebuild ({exc})")
        else:
            if rebuilt != entry.digest:
                wrong.append(f"digest {entry.digest} while the manifest's is {rebuilt}")
    if wrong:
        raise Refused(
            Refusal.INVALID,
            f"the store entry for {ref} is not {ref}: {'; '.join(wrong)}; refusing to use it "
            "(someone wrote it outside `coordctl release push`; push the release again under "
            "a new version)",
        )


class ReleaseBook:
    """Pushed releases in etcd and the content store's upkeep (see the module docstring)."""

    #: Blob bytes the content store may hold (see hotfleet.store.admit).
    store_quota: int = MAX_STORE_BYTES
    #: Release entries kept; older ones not in use are removed with their blobs.
    release_history: int = RELEASE_HISTORY
    #: Unreferenced blobs younger than this belong to a push in flight.
    gc_min_age_s: float = GC_MIN_AGE_S

    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        *,
        in_use: Callable[[], dict[str, str]],
        may_write: Callable[[], bool],
        permanent_raw: Callable[[], str],
    ) -> None:
        self.client = client
        self.keys = keys
        self.store = ContentStore(EtcdBlobBackend(client, keys.blobs))
        self._in_use = in_use
        self._may_write = may_write
        self._permanent_raw = permanent_raw

    def releases(self) -> list[ReleaseEntry]:
        out = []
        for raw, meta in _retry(lambda: list(self.client.get_prefix(self.keys.releases))):
            if meta.key.decode() in (self.keys.permanent, self.keys.current):
                continue
            out.append(ReleaseEntry(**json.loads(raw)))
        return sorted(out, key=lambda r: r.pushed_at)

    def release(self, ref: str) -> ReleaseEntry:
        name, sep, version = ref.partition("@")
        if not sep or not name or not version:
            raise Refused(Refusal.INVALID, f"release reference {ref!r} is not NAME@VERSION")
        raw, _ = _retry(lambda: self.client.get(self.keys.release(name, version)))
        if raw is None:
            raise Refused(
                Refusal.NOT_FOUND,
                f"release {ref} was never pushed; push it with `coordctl release push PATH`",
            )
        entry = ReleaseEntry(**json.loads(raw))
        check_entry(ref, entry)
        return entry

    def push(self, release: Release, signature: str = "", signer: str = "") -> ReleaseEntry:
        """Store the sources by digest and the manifest under name/version (idempotent)."""
        if release.problems:
            raise Refused(
                Refusal.INVALID, "release is malformed: " + "; ".join(map(str, release.problems))
            )
        self._admit(release)
        for ms in release.modules:
            if not ms.digest_ok:
                raise Refused(
                    Refusal.INVALID,
                    f"{ms.name}: digest_mismatch: {ms.path} does not match its declared sha256",
                )
            self.store.put(ms.source)
        for item in release.data:
            if not item.digest_ok:
                raise Refused(
                    Refusal.INVALID,
                    f"{item.path}: digest_mismatch: the data file does not match its digest",
                )
            self.store.put(item.content)
        entry = ReleaseEntry(
            release.label,
            release.name,
            release.version,
            release.digest,
            time.time(),
            len(release.modules),
            bool(signature),
            release.to_manifest(),
            signature,
            signer,
        )
        key = self.keys.release(release.name, release.version)
        tx = self.client.transactions
        ok, _ = self.client.transaction(
            compare=[tx.version(key) == 0],
            success=[tx.put(key, json.dumps(entry.to_json()))],
            failure=[],
        )
        if not ok:
            existing = self.release(release.label)
            if existing.digest != release.digest:
                raise Refused(
                    Refusal.EXISTS,
                    f"{release.label} was already pushed with different content (digest {existing.digest[:12]}…); bump the version",
                )
            return existing
        self.trim()
        return entry

    # ------------------------------------------------------ the store's upkeep
    def _admit(self, release: Release) -> None:
        """Refuse a push the content store cannot take, before writing a byte of it."""
        blobs = release.blobs()
        try:
            stored = EtcdBlobBackend(self.client, self.keys.blobs).inventory()
            admit(stored, blobs, quota=self.store_quota)
        except StoreFull as exc:
            details = "; ".join(e.detail for e in exc.errors)
            raise Refused(Refusal.QUOTA, f"{release.label} not pushed: {details}") from exc

    def permanent_manifest(self) -> dict[str, Any]:
        """The permanent record's manifest; Refused if it cannot be read (GC must then wait)."""
        raw = self._permanent_raw()
        if not raw:
            return {}
        try:
            manifest = json.loads(raw)["manifest"]
            if isinstance(manifest, dict) and isinstance(manifest.get("modules"), list):
                return manifest
        except (ValueError, KeyError, TypeError) as exc:
            log.debug("unreadable permanent record: %s", exc)
        raise Refused(
            Refusal.UNAVAILABLE,
            f"{self.keys.permanent} is unreadable: no blob is collected while it may need them",
        )

    def remove(self, ref: str) -> list[str]:
        """Delete a pushed release no one uses, then its now unreferenced blobs (leader only).

        Refused (``busy``) for a release in use (see :meth:`_in_use`); returns
        the digests of the blobs collected.
        """
        entry = self.release(ref)
        why = self._in_use().get(entry.label)
        if why:
            raise Refused(Refusal.BUSY, f"{entry.label} is in use ({why}); it stays in the store")
        self.client.delete(self.keys.release(entry.name, entry.version))
        log.info("release %s removed from the store", entry.label)
        return self.collect_blobs()

    def trim(self) -> None:
        """Keep the newest ``release_history`` release entries, and all in use (leader only)."""
        if not self._may_write():
            return
        entries = self.releases()
        if len(entries) <= self.release_history:
            return
        in_use = self._in_use()
        spare = [e for e in entries if e.label not in in_use]
        for entry in spare[: len(entries) - self.release_history]:  # oldest first
            self.client.delete(self.keys.release(entry.name, entry.version))
            log.info("release %s is past the history kept: removed", entry.label)
        self.collect_blobs()

    def collect_blobs(self) -> list[str]:
        """Delete the blobs no release entry nor the permanent record refers to."""
        referenced = {
            m["digest"]
            for entry in self.releases()
            for m in entry.manifest.get("modules", [])
            if isinstance(m, dict) and isinstance(m.get("digest"), str)
        }
        referenced |= {
            m.get("digest", "")
            for m in self.permanent_manifest().get("modules", [])
            if isinstance(m, dict)
        }
        deleted = collect_garbage(
            EtcdBlobBackend(self.client, self.keys.blobs), referenced, min_age_s=self.gc_min_age_s
        )
        if deleted:
            log.info(
                "collected %d blobs (%d bytes) no release refers to",
                len(deleted),
                sum(b.size for b in deleted),
            )
        return [b.digest for b in deleted]
