"""The content-addressed blob store against a real etcd."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import etcd3.exceptions
import pytest

from hotfleet.errors import HotfleetError, Reason
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from hotfleet.store import CHUNK_SIZE, BlobNotFound, ContentStore, EtcdBlobBackend, LocalCache

pytestmark = pytest.mark.integration

BIG = 3 * 1024 * 1024


@pytest.fixture
def backend(etcd_client: EtcdClient, etcd_prefix: str) -> EtcdBlobBackend:
    return EtcdBlobBackend(etcd_client, prefix=etcd_prefix)


def test_round_trip_small_big_and_empty(backend: EtcdBlobBackend) -> None:
    store = ContentStore(backend)
    for data in (b"print('hi')\n", os.urandom(BIG), b""):
        digest = store.put(data)
        assert digest == hashlib.sha256(data).hexdigest()
        assert store.has(digest)
        assert store.get(digest) == data
    big = os.urandom(BIG)
    digest = store.put(big)
    chunks = list(backend.client.get_prefix(f"{backend.prefix}{digest}/chunk/"))
    assert len(chunks) == BIG // CHUNK_SIZE
    assert all(len(value) <= CHUNK_SIZE for value, _ in chunks)


def test_put_is_idempotent(backend: EtcdBlobBackend) -> None:
    store = ContentStore(backend)
    digest = store.put(b"same bytes")
    _, first = backend.client.get(backend.header_key(digest))
    assert store.put(b"same bytes") == digest
    _, second = backend.client.get(backend.header_key(digest))
    assert second.mod_revision == first.mod_revision  # nothing rewritten


def test_corrupt_chunk_is_a_digest_mismatch(backend: EtcdBlobBackend) -> None:
    store = ContentStore(backend)
    digest = store.put(os.urandom(CHUNK_SIZE + 10))
    backend.client.put(backend.chunk_key(digest, 1), b"tampered!!")
    with pytest.raises(HotfleetError) as info:
        store.get(digest)
    (error,) = info.value.errors
    assert error.reason is Reason.DIGEST_MISMATCH
    assert error.module == digest


def test_missing_chunk_and_missing_blob(backend: EtcdBlobBackend) -> None:
    store = ContentStore(backend)
    absent = hashlib.sha256(b"never stored").hexdigest()
    assert not store.has(absent)
    with pytest.raises(BlobNotFound) as info:
        store.get(absent)
    assert isinstance(info.value, KeyError)
    assert absent in str(info.value)
    digest = store.put(os.urandom(CHUNK_SIZE * 2))
    backend.client.delete(backend.chunk_key(digest, 0))
    with pytest.raises(HotfleetError) as corrupt:
        store.get(digest)
    assert corrupt.value.reasons == {Reason.DIGEST_MISMATCH}


def test_partial_write_is_not_present(backend: EtcdBlobBackend) -> None:
    data = os.urandom(CHUNK_SIZE * 2)
    digest = hashlib.sha256(data).hexdigest()
    backend.client.put(backend.chunk_key(digest, 0), data[:CHUNK_SIZE])  # writer died here
    assert not backend.has(digest)
    assert ContentStore(backend).put(data) == digest
    assert ContentStore(backend).get(digest) == data


def test_malformed_digest_is_refused(tmp_path: Path, backend: EtcdBlobBackend) -> None:
    store = ContentStore(backend, LocalCache(tmp_path / "cache"))
    for bad in ("../../etc/passwd", "ABC", "0" * 63):
        with pytest.raises(HotfleetError) as info:
            store.get(bad)
        assert info.value.reasons == {Reason.DIGEST_MISMATCH}


def test_cache_serves_while_etcd_is_down(tmp_path: Path, etcd_server: EtcdServer) -> None:
    client = connect(etcd_server.endpoint, timeout=1)
    try:
        store = ContentStore(EtcdBlobBackend(client), LocalCache(tmp_path / "cache"))
        data = os.urandom(CHUNK_SIZE + 1)
        digest = store.put(data)
        uncached = ContentStore(EtcdBlobBackend(client)).put(b"only in etcd")
        etcd_server.stop()
        assert store.get(digest) == data
        assert store.has(digest)
        with pytest.raises(etcd3.exceptions.Etcd3Exception):
            store.get(uncached)
    finally:
        client.close()


def test_corrupt_cache_copy_is_refetched(tmp_path: Path, backend: EtcdBlobBackend) -> None:
    cache = LocalCache(tmp_path / "cache")
    store = ContentStore(backend, cache)
    digest = store.put(b"good source")
    cache.path(digest).write_bytes(b"torn")
    assert store.get(digest) == b"good source"
    assert cache.read(digest) == b"good source"
    assert [p.name for p in cache.directory.iterdir()] == [digest]  # no temp files left


def test_get_many_reads_a_release_in_batches_and_leaves_the_bad_ones_to_get(
    tmp_path: Path, backend: EtcdBlobBackend
) -> None:
    """A release's sources come in one transaction per 64 blobs (cache first);
    a missing or corrupt blob is left out, and ``get`` then names the problem."""
    writer = ContentStore(backend)
    blobs = [f"module {i}\n".encode() for i in range(130)] + [os.urandom(CHUNK_SIZE * 2 + 7)]
    digests = [writer.put(b) for b in blobs]
    corrupt = writer.put(b"will be tampered with")
    backend.client.put(backend.chunk_key(corrupt, 0), b"tampered")
    missing = hashlib.sha256(b"never pushed").hexdigest()

    cache = LocalCache(tmp_path / "cache")
    reader = ContentStore(backend, cache)
    cache.write(digests[0], blobs[0])  # served from the cache
    cache.path(digests[1]).parent.mkdir(parents=True, exist_ok=True)
    cache.path(digests[1]).write_bytes(b"torn copy")  # discarded, read again from etcd

    got = reader.get_many([*digests, corrupt, missing, digests[5]])
    assert got == dict(zip(digests, blobs, strict=True))
    assert cache.read(digests[1]) == blobs[1] and cache.has(digests[-1])
    with pytest.raises(HotfleetError) as info:
        reader.get(corrupt)
    assert info.value.reasons == {Reason.DIGEST_MISMATCH}
    with pytest.raises(BlobNotFound):
        reader.get(missing)
    assert not [p for p in cache.directory.iterdir() if p.name.endswith(".tmp")]
