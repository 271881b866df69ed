"""Content-addressed blob store: module sources travel by sha256 digest.

A release names every module by the digest of its source, so a node can
fetch sources from anywhere and trust only what hashes right: every read is
verified, and a corrupt copy is a ``digest_mismatch`` refusal, never code
that gets loaded.

Backends:

* :class:`EtcdBlobBackend` keeps blobs in etcd, split into chunks far below
  etcd's 1.5 MiB request limit.  The header key is written after all chunks
  (and only if absent), so a blob whose writer died half way is never seen as
  present; its orphan chunks are simply overwritten by the next writer.
* :class:`LocalCache` keeps blobs as files named by digest, written through a
  temp file and a rename, so a node can read blobs it already has while etcd
  is down.

:class:`ContentStore` puts into both and reads through the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from etcd3.utils import prefix_range_end

from hotfleet.errors import HotfleetError, ModuleError, Reason
from hotfleet.etcd_client import EtcdClient
from hotfleet.limits import MAX_BUNDLE_BYTES, MAX_FILE_BYTES, MAX_STORE_BYTES, loads_json

log = logging.getLogger(__name__)

# One size for every writer: two writers racing on the same digest then
# write identical chunks, so a late one can never corrupt a published blob.
CHUNK_SIZE = 512 * 1024
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# An unreferenced blob younger than this is a push in flight, not garbage.
GC_MIN_AGE_S = 600.0
_TXN_BATCH = 64  # range reads per transaction; etcd's default --max-txn-ops is 128


class BlobNotFound(KeyError):
    """No blob with this digest in the store."""

    def __init__(self, digest: str, where: str = "") -> None:
        super().__init__(digest)
        self.digest = digest
        self.where = where

    def __str__(self) -> str:
        return f"blob {self.digest} not found{' in ' + self.where if self.where else ''}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def corrupt_blob(digest: str, detail: str) -> HotfleetError:
    """The error for stored bytes that do not hash to their digest."""
    return HotfleetError([ModuleError(module=digest, reason=Reason.DIGEST_MISMATCH, detail=detail)])


def check_digest(digest: str) -> None:
    """Refuse anything but lowercase sha256 hex: digests become keys and file names."""
    if not _DIGEST_RE.fullmatch(digest):
        raise corrupt_blob(digest, "not a sha256 hex digest (64 lowercase hex characters)")


def verify(digest: str, data: bytes) -> bytes:
    """Return ``data`` if it hashes to ``digest``, else raise ``digest_mismatch``."""
    actual = sha256_hex(data)
    if actual != digest:
        raise corrupt_blob(digest, f"content hashes to {actual} ({len(data)} bytes)")
    return data


class BlobBackend(Protocol):
    """Where blobs live.  Backends store and fetch; :class:`ContentStore` verifies."""

    def has(self, digest: str) -> bool: ...

    def read(self, digest: str) -> bytes:
        """The stored bytes, unverified; raises :class:`BlobNotFound`."""
        ...

    def write(self, digest: str, data: bytes) -> None:
        """Store ``data`` under ``digest``; a no-op when already present."""
        ...

    def read_many(self, digests: Sequence[str]) -> dict[str, bytes]:
        """The stored bytes of as many of ``digests`` as can be read, unverified.

        Missing or unreadable blobs are left out: :meth:`read` tells why.
        """
        ...


class EtcdBlobBackend:
    """Blobs in etcd: ``<prefix><digest>/chunk/<n>`` keys, then a header key.

    The header (``<prefix><digest>/header``, JSON with size and chunk count)
    is the presence marker.  It is created last, in a transaction that only
    creates it when absent, so readers never see a partial blob and a
    concurrent second writer cannot change a blob already published.
    """

    def __init__(self, client: EtcdClient, prefix: str = "/hotfleet/blobs/") -> None:
        self.client = client
        self.prefix = prefix

    def header_key(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.prefix}{digest}/header"

    def chunk_key(self, digest: str, index: int) -> str:
        check_digest(digest)
        return f"{self.prefix}{digest}/chunk/{index:08d}"

    def has(self, digest: str) -> bool:
        value, _ = self.client.get(self.header_key(digest))
        return value is not None

    def write(self, digest: str, data: bytes) -> None:
        if self.has(digest):
            return
        chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
        for index, chunk in enumerate(chunks):
            self.client.put(self.chunk_key(digest, index), chunk)
        # written_at lets garbage collection spare a blob whose release entry
        # is still being written (see collect_garbage).
        header = json.dumps(
            {"size": len(data), "chunks": len(chunks), "written_at": time.time()}
        ).encode()
        key = self.header_key(digest)
        txn = self.client.transactions
        self.client.transaction(
            compare=[txn.create(key) == 0], success=[txn.put(key, header)], failure=[]
        )

    def inventory(self) -> dict[str, StoredBlob]:
        """Every published blob with its size and write time, without reading a chunk.

        One keys-only listing of the prefix finds the headers, then their
        (tiny) values are read in batched transactions.
        """
        headers = [
            meta.key.decode()
            for _, meta in self.client.get_prefix(self.prefix, keys_only=True)
            if meta.key.endswith(b"/header")
        ]
        out: dict[str, StoredBlob] = {}
        txn = self.client.transactions
        for start in range(0, len(headers), _TXN_BATCH):
            batch = headers[start : start + _TXN_BATCH]
            _, responses = self.client.transaction(
                compare=[], success=[txn.get(key) for key in batch], failure=[]
            )
            for key, kvs in zip(batch, responses, strict=True):
                digest = key[len(self.prefix) :].removesuffix("/header")
                for value, _ in kvs:
                    out[digest] = StoredBlob.parse(digest, value)
        return out

    def delete(self, digest: str) -> None:
        """Remove a blob, header and chunks in one range delete (readers see all or none)."""
        self.client.delete_prefix(self._blob_prefix(digest))

    def read(self, digest: str) -> bytes:
        # One range read returns the header and every chunk at a single revision,
        # so a present header means every chunk is there (it is written last).
        prefix = self._blob_prefix(digest)
        return self._assemble(digest, self.client.get_prefix(prefix))

    def read_many(self, digests: Sequence[str]) -> dict[str, bytes]:
        """A release's sources in a few round trips: one transaction of range
        reads per batch (etcd caps the operations of a transaction)."""
        out: dict[str, bytes] = {}
        txn = self.client.transactions
        unique = list(dict.fromkeys(digests))
        for start in range(0, len(unique), _TXN_BATCH):
            batch = unique[start : start + _TXN_BATCH]
            ranges = []
            for digest in batch:
                prefix = self._blob_prefix(digest)
                end = prefix_range_end(prefix.encode())
                ranges.append(txn.get(prefix, range_end=end))
            _, responses = self.client.transaction(compare=[], success=ranges, failure=[])
            for digest, kvs in zip(batch, responses, strict=True):
                try:
                    out[digest] = self._assemble(digest, kvs)
                except (BlobNotFound, HotfleetError):
                    continue  # read() on its own reports it precisely
        return out

    def _blob_prefix(self, digest: str) -> str:
        return self.header_key(digest).removesuffix("header")

    def _assemble(self, digest: str, kvs: Iterable[tuple[bytes, Any]]) -> bytes:
        """Header and chunks (``(value, metadata)`` pairs of one range) into the blob."""
        values = {meta.key.decode(): value for value, meta in kvs}
        raw = values.get(self.header_key(digest))
        if raw is None:
            raise BlobNotFound(digest, f"etcd under {self.prefix}")
        try:
            header = loads_json(raw, f"header of blob {digest}", max_bytes=4096)
            size, count = int(header["size"]), int(header["chunks"])
        except (ValueError, KeyError, TypeError) as exc:
            raise corrupt_blob(digest, f"unreadable blob header in etcd: {exc}") from None
        if not 0 <= size <= MAX_FILE_BYTES or count != -(-size // CHUNK_SIZE):
            # a forged header must not make us loop over a billion chunks
            raise corrupt_blob(digest, f"blob header in etcd says {size} bytes in {count} chunks")
        parts: list[bytes] = []
        for index in range(count):
            chunk = values.get(self.chunk_key(digest, index))
            if chunk is None:
                raise corrupt_blob(digest, f"chunk {index} of {count} missing in etcd")
            parts.append(chunk)
        data = b"".join(parts)
        if len(data) != size:
            raise corrupt_blob(digest, f"{len(data)} bytes in etcd, header says {size}")
        return data


@dataclass(frozen=True)
class StoredBlob:
    """What the store knows of one blob without reading it."""

    digest: str
    size: int
    written_at: float  # 0 for blobs written before the field existed: old enough

    @classmethod
    def parse(cls, digest: str, header: bytes) -> StoredBlob:
        try:
            fields = loads_json(header, f"header of blob {digest}", max_bytes=4096)
            return cls(digest, int(fields["size"]), float(fields.get("written_at", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(digest, 0, 0.0)  # unreadable: no size to count, collectable


class StoreFull(HotfleetError):
    """Storing these blobs would break a limit of the content store; nothing was written."""


def admit(
    stored: Mapping[str, StoredBlob],
    blobs: Mapping[str, bytes],
    *,
    quota: int = MAX_STORE_BYTES,
    max_blob: int = MAX_FILE_BYTES,
    max_batch: int = MAX_BUNDLE_BYTES,
) -> None:
    """Refuse (:class:`StoreFull`) a batch of new ``{digest: bytes}`` before any is written.

    A module over ``max_blob``, a batch (one release) whose new bytes exceed
    ``max_batch``, or a store that would pass ``quota``: etcd's own quota,
    once hit, refuses *every* write -- rollouts, decisions, the operator's
    rollback -- so the store stops well before it.
    """
    errors = [
        ModuleError(
            digest, Reason.BAD_RELEASE, f"a module of {len(data)} bytes; the limit is {max_blob}"
        )
        for digest, data in blobs.items()
        if len(data) > max_blob
    ]
    new = sum(len(data) for digest, data in blobs.items() if digest not in stored)
    if new > max_batch:
        errors.append(
            ModuleError(
                "*", Reason.BAD_RELEASE, f"{new} new bytes in one release; the limit is {max_batch}"
            )
        )
    used = sum(blob.size for blob in stored.values())
    if used + new > quota:
        errors.append(
            ModuleError(
                "*",
                Reason.BAD_RELEASE,
                f"the content store holds {used} bytes; {new} more would pass its quota of"
                f" {quota} bytes (remove releases: coordctl release rm, or raise the quota)",
            )
        )
    if errors:
        raise StoreFull(errors)


def collect_garbage(
    backend: EtcdBlobBackend,
    referenced: Iterable[str],
    *,
    min_age_s: float = GC_MIN_AGE_S,
    now: float | None = None,
) -> list[StoredBlob]:
    """Delete every blob no release references; what was deleted.

    A blob younger than ``min_age_s`` is spared even if unreferenced: its
    release entry is written after its sources, so a push in flight would
    otherwise lose them between the two writes.
    """
    keep = set(referenced)
    now = time.time() if now is None else now
    deleted = []
    for blob in backend.inventory().values():
        if blob.digest in keep or now - blob.written_at < min_age_s:
            continue
        backend.delete(blob.digest)
        deleted.append(blob)
    return deleted


class LocalCache:
    """Blobs as files named by digest in one directory (atomic temp + rename)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.directory / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(digest, str(self.directory)) from None

    def write(self, digest: str, data: bytes) -> None:
        """Temp file and rename, no fsync: every cached read is verified against
        its digest, so a copy torn by a crash is discarded and fetched again."""
        target = self.path(digest)
        if target.is_file():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{digest[:16]}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def discard(self, digest: str) -> None:
        """Drop a (corrupt) copy so that the next read refetches it."""
        self.path(digest).unlink(missing_ok=True)


class ContentStore:
    """Put and get blobs by sha256; every byte returned has been verified."""

    def __init__(self, backend: BlobBackend, cache: LocalCache | None = None) -> None:
        self.backend = backend
        self.cache = cache

    def put(self, data: bytes) -> str:
        """Store ``data`` (skipped where already present) and return its digest."""
        digest = sha256_hex(data)
        self.backend.write(digest, data)
        if self.cache is not None:
            self.cache.write(digest, data)
        return digest

    def has(self, digest: str) -> bool:
        check_digest(digest)
        return (self.cache is not None and self.cache.has(digest)) or self.backend.has(digest)

    def get_many(self, digests: Sequence[str], *, keep: bool = True) -> dict[str, bytes]:
        """Verified bytes of every digest that can be had at once (cache, then one
        batched backend read); anything left out is for :meth:`get` to explain.

        ``keep=False`` leaves what came from the backend out of the cache: the
        caller writes it later, off its critical path (see :meth:`keep`).
        """
        out: dict[str, bytes] = {}
        wanted = []
        for digest in dict.fromkeys(digests):
            cached = self.get_cached(digest)
            if cached is None:
                wanted.append(digest)
            else:
                out[digest] = cached
        for digest, data in self.backend.read_many(wanted).items():
            if sha256_hex(data) == digest:
                out[digest] = data
                if keep and self.cache is not None:
                    self.cache.write(digest, data)
        return out

    def keep(self, blobs: Mapping[str, bytes]) -> None:
        """Write verified ``{digest: bytes}`` into the cache (no-op without one)."""
        if self.cache is not None:
            for digest, data in blobs.items():
                self.cache.write(digest, data)

    def get_cached(self, digest: str) -> bytes | None:
        """Verified bytes from the cache alone; a corrupt copy is discarded."""
        check_digest(digest)
        if self.cache is None:
            return None
        try:
            return verify(digest, self.cache.read(digest))
        except BlobNotFound:
            return None
        except HotfleetError as exc:
            log.warning("discarding corrupt cached blob: %s", exc)
            self.cache.discard(digest)
            return None

    def get(self, digest: str) -> bytes:
        """Verified bytes of ``digest``: from the cache if it holds a good copy.

        A cached copy that fails verification is discarded and refetched, so
        a torn or tampered cache file heals itself instead of blocking loads.
        """
        cached = self.get_cached(digest)
        if cached is not None:
            return cached
        data = verify(digest, self.backend.read(digest))
        if self.cache is not None:
            self.cache.write(digest, data)
        return data
