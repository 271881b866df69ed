"""The content store's limits and garbage collection, against a real etcd.

The finding: no size, count or blob quota (pushes filled etcd's quota and
blocked the operator) and blobs were never collected.  Pushes are now
admitted against per-module, per-release and whole-store limits before a
byte is written; removing a release (or pushing past the history kept)
collects the blobs no release refers to, sparing what is in use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from coordinator.cli import EXIT_OK, EXIT_REFUSED
from coordinator.engine import Refused
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.limits import MAX_BUNDLE_BYTES, MAX_FILE_BYTES
from hotfleet.release import Release, sha256_hex
from hotfleet.store import (
    ContentStore,
    EtcdBlobBackend,
    StoredBlob,
    StoreFull,
    admit,
    collect_garbage,
)
from node_agent.agent import permanent_record
from tests.agents import RELEASES, release
from tests.coordinators import Coordinators, coordctl
from tests.fleet import Leader

pytestmark = pytest.mark.integration


def _stored(*sizes: int) -> dict[str, StoredBlob]:
    return {f"{i:064x}": StoredBlob(f"{i:064x}", size, 0.0) for i, size in enumerate(sizes)}


def test_admit_refuses_an_oversized_module_naming_its_digest() -> None:
    big = b"#" * (MAX_FILE_BYTES + 1)
    with pytest.raises(StoreFull) as info:
        admit({}, {sha256_hex(big): big, sha256_hex(b"x"): b"x"})
    assert [e.module for e in info.value.errors] == [sha256_hex(big)]
    assert str(MAX_FILE_BYTES) in info.value.errors[0].detail


def test_admit_refuses_a_release_over_the_batch_limit() -> None:
    blobs = {sha256_hex(bytes([i]) * 10): bytes([i]) * 10 for i in range(5)}
    with pytest.raises(StoreFull, match="50 new bytes in one release"):
        admit({}, blobs, max_batch=49)
    admit({}, blobs, max_batch=50)
    assert MAX_BUNDLE_BYTES > MAX_FILE_BYTES


def test_admit_counts_only_new_bytes_against_the_quota() -> None:
    stored = _stored(60, 30)
    known = next(iter(stored))
    admit(stored, {known: b"x" * 60}, quota=100)  # already there: costs nothing
    new = b"y" * 11
    with pytest.raises(StoreFull, match="holds 90 bytes; 11 more would pass its quota of 100"):
        admit(stored, {sha256_hex(new): new}, quota=100)


@pytest.fixture
def backend(etcd_client: EtcdClient, etcd_prefix: str) -> EtcdBlobBackend:
    return EtcdBlobBackend(etcd_client, Keys(etcd_prefix).blobs)


def test_inventory_lists_sizes_without_reading_chunks(backend: EtcdBlobBackend) -> None:
    store = ContentStore(backend)
    small, big = b"s" * 10, b"b" * (3 * 512 * 1024 + 7)  # four chunks
    before = time.time()
    digests = {store.put(small): len(small), store.put(big): len(big)}
    inventory = backend.inventory()
    assert {d: b.size for d, b in inventory.items()} == digests
    assert all(before - 1 <= b.written_at <= time.time() + 1 for b in inventory.values())


def test_collect_garbage_spares_referenced_and_young_blobs(backend: EtcdBlobBackend) -> None:
    store = ContentStore(backend)
    kept, garbage = store.put(b"kept = 1\n"), store.put(b"garbage = 1\n")
    assert collect_garbage(backend, {kept}) == []  # garbage is young: maybe a push in flight
    deleted = collect_garbage(backend, {kept}, now=time.time() + 3600)
    assert [b.digest for b in deleted] == [garbage]
    assert set(backend.inventory()) == {kept}
    assert store.get(kept) == b"kept = 1\n"
    assert not backend.has(garbage)


@pytest.fixture
def gc_leader(etcd_endpoint: str, etcd_prefix: str) -> Iterator[Leader]:
    lead = Leader(etcd_endpoint, etcd_prefix)
    lead.engine.book.gc_min_age_s = 0.0
    try:
        yield lead
    finally:
        lead.close()


def _release(version: str, shared: str = "SHARED = 1\n") -> Release:
    return Release.from_sources(
        "app", version, {"app": "", "app.shared": shared, "app.own": f"V = {version!r}\n"},
        packages=["app"],
    )  # fmt: skip


def _digests(release: Release) -> set[str]:
    return {m.digest for m in release.modules}


def test_release_rm_collects_only_blobs_no_other_release_uses(gc_leader: Leader) -> None:
    engine, backend = gc_leader.engine, EtcdBlobBackend(gc_leader.client, gc_leader.keys.blobs)
    v1, v2 = _release("1"), _release("2")
    engine.push_release(v1)
    engine.push_release(v2)
    assert set(backend.inventory()) == _digests(v1) | _digests(v2)
    collected = engine.remove_release("app@1")
    assert set(collected) == _digests(v1) - _digests(v2)  # only app/own.py of v1
    assert set(backend.inventory()) == _digests(v2)
    assert [r.label for r in engine.releases()] == ["app@2"]
    with pytest.raises(Refused) as info:
        engine.release("app@1")
    assert info.value.code == "not_found"


def test_release_rm_refuses_the_permanent_release(gc_leader: Leader) -> None:
    engine = gc_leader.engine
    v1 = _release("1")
    engine.push_release(v1)
    gc_leader.client.put(gc_leader.keys.permanent, permanent_record(v1))
    with pytest.raises(Refused) as info:
        engine.remove_release("app@1")
    assert info.value.code == "busy" and "permanent release" in str(info.value)
    assert [r.label for r in engine.releases()] == ["app@1"]
    assert set(EtcdBlobBackend(gc_leader.client, gc_leader.keys.blobs).inventory()) == _digests(v1)


def test_push_over_the_quota_is_refused_before_writing(gc_leader: Leader) -> None:
    engine, backend = gc_leader.engine, EtcdBlobBackend(gc_leader.client, gc_leader.keys.blobs)
    engine.push_release(_release("1"))
    used = sum(b.size for b in backend.inventory().values())
    engine.book.store_quota = used + 5
    big = _release("2", shared="S = '" + "x" * 100 + "'\n")
    with pytest.raises(Refused) as info:
        engine.push_release(big)
    assert info.value.code == "quota" and "app@2 not pushed" in str(info.value)
    assert sum(b.size for b in backend.inventory().values()) == used  # nothing written
    assert [r.label for r in engine.releases()] == ["app@1"]


def test_pushes_past_the_history_drop_the_oldest_unused_releases(gc_leader: Leader) -> None:
    engine, backend = gc_leader.engine, EtcdBlobBackend(gc_leader.client, gc_leader.keys.blobs)
    engine.book.release_history = 2
    releases = [_release(str(v)) for v in range(1, 5)]
    engine.push_release(releases[0])
    gc_leader.client.put(gc_leader.keys.permanent, permanent_record(releases[0]))  # in use: stays
    for pushed in releases[1:]:
        engine.push_release(pushed)
    labels = sorted(r.label for r in engine.releases())
    assert labels == ["app@1", "app@4"]  # app@2, then app@3, fell out; app@1 is permanent
    wanted = set().union(*(_digests(r) for r in releases if r.label in labels))
    assert set(backend.inventory()) == wanted


def test_coordctl_release_rm(
    coordinators: Coordinators, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    leader = coordinators.start("a")
    leader.wait_leader()
    for name in ("shop-2.0.0", "shop-2.1.0-bad"):
        pushed = coordctl(leader, "release", "push", str(RELEASES / name))
        assert pushed.code == EXIT_OK, pushed
    etcd_client.put(Keys(etcd_prefix).permanent, permanent_record(release("shop-2.0.0")))

    busy = coordctl(leader, "release", "rm", "shop@2.0.0")
    assert busy.code == EXIT_REFUSED, busy
    assert "in use (it is the permanent release)" in busy.err

    removed = coordctl(leader, "-o", "json", "release", "rm", "shop@2.1.0-bad")
    assert removed.code == EXIT_OK, removed
    assert removed.json()["release"] == "shop@2.1.0-bad"
    listed = coordctl(leader, "-o", "json", "release", "list")
    assert [r["label"] for r in listed.json()["items"]] == ["shop@2.0.0"]

    missing = coordctl(leader, "release", "rm", "shop@9.9.9")
    assert missing.code == EXIT_REFUSED and "never pushed" in missing.err
