"""Hostile input: every finding of issue 12's "Parsing and limits" and "Names" bullets.

Each test builds the input a reviewer used against main (a zip bomb, 200 000
archive entries, a 1 KB deeply nested manifest, a ``problems: null``
permanent record, look-alike module names, ...) and asserts the clean
refusal: a ``ReleaseError``/``bad_release`` (or ``sticky``) naming the field
or module, reached *before* the costly step -- measured as memory allocated
or entries listed, not only as wall time.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from hotfleet.errors import HotfleetError, Reason, ReleaseError
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.limits import (
    MAX_BUNDLE_BYTES,
    MAX_DEPTH,
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_MODULES,
    MAX_PREPARE_MESSAGE_BYTES,
    TooDeep,
    loads_json,
)
from hotfleet.release import MANIFEST, Release
from hotfleet.signing import SignatureError
from hotfleet.store import ContentStore, EtcdBlobBackend
from hotfleet.wire import manifest_from_proto, release_to_proto
from node_agent import Agent, Loader, PrepareError
from tests.agents import Agents, publish, read_member, release, wait_for

MiB = 1024 * 1024
HEADER = b'name = "evil"\nversion = "1.0"\n'


def refused(call: Callable[[], Any]) -> ReleaseError:
    with pytest.raises(ReleaseError) as info:
        call()
    assert info.value.reasons == {Reason.BAD_RELEASE}
    return info.value


def details(error: HotfleetError) -> str:
    return "\n".join(f"{e.module}: {e.detail}" for e in error.errors)


def peak_bytes(call: Callable[[], Any]) -> int:
    """Peak Python allocation while ``call`` runs (what inflating a bomb would show)."""
    tracemalloc.start()
    try:
        call()
    except ReleaseError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


# -- archives: bombs, sizes, entry counts ------------------------------------
@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The finding: a ~510 KB zip holding a 512 MiB module."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    zeros = bytes(MiB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, HEADER)
        with archive.open("big.py", "w", force_zip64=True) as member:
            for _ in range(512):
                member.write(zeros)
    assert path.stat().st_size < 600 * 1024
    return path


def test_zip_bomb_is_refused_before_inflating(zip_bomb: Path) -> None:
    started = time.perf_counter()
    error = refused(lambda: Release.from_path(zip_bomb))
    assert time.perf_counter() - started < 1.0
    assert "big.py" in details(error) and str(MAX_BUNDLE_BYTES) in details(error)
    # Inflating it would allocate 512 MiB; the refusal allocates next to nothing.
    assert peak_bytes(lambda: Release.from_path(zip_bomb)) < MiB


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_oversized_module_is_refused_on_its_declared_size(tmp_path: Path) -> None:
    big = b"#" * (MAX_FILE_BYTES + 1)
    path = _zip(tmp_path / "big.zip", {MANIFEST: HEADER, "big.py": big, "ok.py": b"X = 1\n"})
    error = refused(lambda: Release.from_path(path))
    assert [e.module for e in error.errors] == ["big.py"]
    assert "too large" in error.errors[0].detail
    assert peak_bytes(lambda: Release.from_path(path)) < MAX_FILE_BYTES // 2


def _lie_about_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size a zip's central directory and local header claim."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len] == name:
            struct.pack_into("<L", data, at + 24, size)
            local = struct.unpack_from("<L", data, at + 42)[0]
            struct.pack_into("<L", data, local + 22, size)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def test_a_zip_member_lying_about_its_size_inflates_no_more_than_the_limit(
    tmp_path: Path,
) -> None:
    """The header says 100 bytes, the data inflates to 16x the file limit."""
    path = _zip(tmp_path / "liar.zip", {MANIFEST: HEADER, "liar.py": b"#" * (16 * MAX_FILE_BYTES)})
    _lie_about_size(path, "liar.py", 100)
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("liar.py").file_size == 100
    error = refused(lambda: Release.from_path(path))
    assert "liar" in details(error) or "cannot read the bundle" in details(error)
    # At most limit + 1 inflated bytes (zipfile's buffers double that, briefly).
    assert peak_bytes(lambda: Release.from_path(path)) < 3 * MAX_FILE_BYTES


def test_oversized_release_toml_is_refused(tmp_path: Path) -> None:
    manifest = HEADER + b"# padding\n" * (MAX_MANIFEST_BYTES // 10 + 1)
    path = _zip(tmp_path / "m.zip", {MANIFEST: manifest})
    error = refused(lambda: Release.from_path(path))
    assert any(e.module == MANIFEST and "too large" in e.detail for e in error.errors)
    bundle = tmp_path / "dir"
    bundle.mkdir()
    (bundle / MANIFEST).write_bytes(manifest)
    assert "too large" in details(refused(lambda: Release.from_path(bundle)))


def test_oversized_archive_file_is_refused_unopened(tmp_path: Path) -> None:
    path = tmp_path / "huge.tar.gz"
    with path.open("wb") as out:  # not even a valid archive: its size alone refuses it
        out.truncate(MAX_BUNDLE_BYTES + 1)
    assert "more than" in details(refused(lambda: Release.from_path(path)))


@pytest.fixture(scope="module")
def many_entries_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The finding: 200 000 archive entries took 40 s."""
    path = tmp_path_factory.mktemp("many") / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MANIFEST, HEADER)
        for i in range(200_000):
            archive.writestr(f"junk/f{i}.txt", b"")
    return path


def test_200k_entry_zip_is_refused_by_its_declared_count(many_entries_zip: Path) -> None:
    started = time.perf_counter()
    error = refused(lambda: Release.from_path(many_entries_zip))
    elapsed = time.perf_counter() - started
    assert "200001 entries" in details(error) and str(MAX_ENTRIES) in details(error)
    # Parsing the central directory alone (what ZipFile does on open) is far slower.
    started = time.perf_counter()
    with zipfile.ZipFile(many_entries_zip) as archive:
        assert len(archive.infolist()) == 200_001
    assert elapsed < (time.perf_counter() - started) / 10


def test_tar_with_too_many_entries_stops_listing_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "many.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(HEADER)
        tar.addfile(info, io.BytesIO(HEADER))
        for i in range(MAX_ENTRIES + 5_000):
            tar.addfile(tarfile.TarInfo(f"junk/f{i}.txt"), io.BytesIO(b""))
    listed: list[str] = []
    original = tarfile.TarFile.next

    def counting_next(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        member = original(self)
        if member is not None:
            listed.append(member.name)
        return member

    tarfile.TarFile.next = counting_next  # type: ignore[method-assign]
    try:
        error = refused(lambda: Release.from_path(path))
    finally:
        tarfile.TarFile.next = original  # type: ignore[method-assign]
    assert f"more than {MAX_ENTRIES} entries" in details(error)
    # (tarfile.open reads the first member once more: count names, not calls)
    assert len(set(listed)) == MAX_ENTRIES + 1  # not one member more


def test_tar_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tar.gz"
    size = 2 * MAX_BUNDLE_BYTES
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("big.py")
        info.size = size
        zeros = io.BytesIO(bytes(size))
        tar.addfile(info, zeros)
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(HEADER)
        tar.addfile(info, io.BytesIO(HEADER))
    error = refused(lambda: Release.from_path(path))
    assert "big.py" in details(error) and str(MAX_BUNDLE_BYTES) in details(error)
    assert peak_bytes(lambda: Release.from_path(path)) < MiB


def test_oversized_module_in_a_directory_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_bytes(HEADER)
    (tmp_path / "big.py").write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    error = refused(lambda: Release.from_path(tmp_path))
    assert [e.module for e in error.errors] == ["big.py"]


# -- nesting -------------------------------------------------------------------
DEEP = 400  # ~1 KB of brackets: deep enough for RecursionError before the fix


@pytest.mark.parametrize(
    "text",
    [
        "extra_deep = " + "[" * DEEP + "]" * DEEP,
        "[health]\nx = " + "{a = " * DEEP + "1" + "}" * DEEP,
        '[modules."m"]\nextra = ' + "[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2),
    ],
    ids=["array", "inline-table", "just-over-the-limit"],
)
def test_deeply_nested_release_toml_is_a_release_error(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_bytes(HEADER + text.encode())
    (tmp_path / "m.py").write_bytes(b"X = 1\n")
    error = refused(lambda: Release.from_path(tmp_path))
    assert "deeper than" in details(error)


def test_deeply_nested_json_field_is_refused_naming_the_field() -> None:
    wire = release_to_proto(Release.from_sources("ok", "1", {"m": "X = 1\n"}))
    wire.modules[0].extra_json = "[" * 100_000 + "]" * 100_000
    with pytest.raises(TooDeep, match="m: extra_json"):
        manifest_from_proto(wire)
    wire.modules[0].extra_json = ""
    wire.health_json = '{"a":' * DEEP + "1" + "}" * DEEP
    with pytest.raises(TooDeep, match="health_json"):
        manifest_from_proto(wire)


def test_deep_python_values_given_to_from_sources_are_a_release_error() -> None:
    extra: Any = 1
    for _ in range(5_000):
        extra = [extra]
    error = refused(
        lambda: Release.from_sources("x", "1", {"m": "X = 1\n"}, modules={"m": {"extra": extra}})
    )
    assert "deeper than" in details(error)


def test_oversized_json_is_refused_before_parsing() -> None:
    with pytest.raises(ValueError, match="more than"):
        loads_json(b" " * (MAX_MANIFEST_BYTES + 1), "record")


# -- manifests on the wire and in etcd ----------------------------------------
def _manifest(**changes: Any) -> dict[str, Any]:
    manifest = Release.from_sources("ok", "1", {"m": "X = 1\n"}).to_manifest()
    manifest.update(changes)
    return manifest


def _never(digest: str) -> bytes:
    raise AssertionError(f"fetched {digest} from a manifest that should be refused first")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"problems": None}, "'problems' must be a list"),
        ({"modules": None}, "'modules' must be a list"),
        ({"modules": {"a": 1}}, "'modules' must be a list"),
        ({"digest": ["x"]}, "'digest' must be a string"),
        ({"name": {"a": 1}}, "name must be a string"),
        ({"smoke": "x"}, "smoke must be an array of tables"),
    ],
)
def test_malformed_manifest_is_refused_before_any_fetch(
    changes: dict[str, Any], needle: str
) -> None:
    assert needle in details(refused(lambda: Release.from_manifest(_manifest(**changes), _never)))


def test_manifest_that_is_not_an_object_is_a_release_error() -> None:
    values: list[Any] = [[], None, "x", 3]
    for value in values:
        error = refused(partial(Release.from_manifest, value, _never))
        assert "must be a JSON object" in details(error)


def test_too_many_modules_are_refused_before_any_fetch() -> None:
    entry = _manifest()["modules"][0]
    modules = [{**entry, "name": f"m{i}", "path": f"m{i}.py"} for i in range(MAX_MODULES + 1)]
    error = refused(lambda: Release.from_manifest(_manifest(modules=modules), _never))
    assert f"more than the limit of {MAX_MODULES}" in details(error)
    wire = release_to_proto(Release.from_sources("ok", "1", {"m": "X = 1\n"}))
    wire.modules.extend([wire.modules[0]] * MAX_MODULES)
    with pytest.raises(ValueError, match="modules, more than the limit"):
        manifest_from_proto(wire)


def test_signature_is_checked_before_any_source_is_fetched(tmp_path: Path) -> None:
    """The finding: 30 000 unsigned modules fetched for 37 s before the signature check."""
    agent = Agent("n-sig", [tmp_path], None, dev=True)
    seen: list[str] = []

    def refuse(declared: Release) -> None:
        seen.append(declared.digest)
        raise SignatureError([])

    manifest = Release.from_sources("ok", "1", {"m": "X = 1\n", "n": "Y = 2\n"}).to_manifest()
    with pytest.raises(SignatureError):
        agent.fetch_release(manifest, verify=refuse)  # no etcd, no cache: a fetch would fail
    assert seen == [manifest["digest"]]


# -- names -------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "\uff53\uff59\uff53",  # fullwidth "sys": NFKC makes it sys itself
        "\u0455ys",  # Cyrillic dze: looks like sys
        "os\u200b",  # zero-width space
        "caf\u00e9",  # any non-ASCII identifier
    ],
)
def test_look_alike_module_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ReleaseError) as info:
        Release.from_sources("x", "1", {name: "X = 1\n"})
    assert info.value.reasons == {Reason.BAD_RELEASE}
    (tmp_path / MANIFEST).write_bytes(HEADER)
    (tmp_path / f"{name}.py").write_bytes(b"X = 1\n")
    error = refused(lambda: Release.from_path(tmp_path))
    assert "not a valid module name part" in details(error)
    manifest = _manifest()
    manifest["modules"][0].update(name=name, path=f"{name}.py")
    refused(lambda: Release.from_manifest(manifest, _never))


@pytest.mark.parametrize("name", ["sitecustomize", "usercustomize"])
@pytest.mark.parametrize("package", [False, True])
def test_interpreter_startup_hooks_are_refused(name: str, package: bool) -> None:
    error = refused(
        lambda: Release.from_sources(
            "x", "1", {name: "X = 1\n"}, packages=[name] if package else []
        )
    )
    assert "run by the interpreter at start-up" in details(error)
    # The same name inside a package is an ordinary module.
    Release.from_sources("x", "1", {"app": "", f"app.{name}": "X = 1\n"}, packages=["app"])


def test_a_plain_module_cannot_be_a_parent() -> None:
    error = refused(lambda: Release.from_sources("x", "1", {"a": "X = 1\n", "a.b": "Y = 2\n"}))
    assert [e.module for e in error.errors] == ["a.b"]
    assert "parent a is a plain module" in details(error)


@pytest.fixture
def loader(tmp_path: Path) -> Iterator[Loader]:
    code = tmp_path / "code"
    code.mkdir()
    yield Loader(code_paths=[code])


def _prepare_errors(loader: Loader, release: Release) -> list[tuple[str, Reason, str]]:
    with pytest.raises(PrepareError) as info:
        loader.abort(loader.prepare(release))
    return [(e.module, e.reason, e.detail) for e in info.value.errors]


def test_module_without_its_parent_package_is_refused(loader: Loader) -> None:
    errors = _prepare_errors(loader, Release.from_sources("x", "1", {"nopkg.sub": "X = 1\n"}))
    assert len(errors) == 1
    module, reason, detail = errors[0]
    assert module == "nopkg.sub"
    assert reason in {Reason.MISSING_DEPENDENCY, Reason.IMPORT_ERROR}
    assert "nopkg" in detail


@pytest.mark.parametrize("name", ["tenacity.injected", "grpc.injected", "tenacity.sub.deeper"])
def test_new_module_inside_an_installed_package_is_sticky(loader: Loader, name: str) -> None:
    errors = _prepare_errors(loader, Release.from_sources("x", "1", {name: "X = 1\n"}))
    assert [(m, r) for m, r, _ in errors] == [(name, Reason.STICKY)]
    assert "is an installed package" in errors[0][2] and "site-packages" in errors[0][2]


def test_new_module_inside_a_package_of_the_code_path_is_accepted(loader: Loader) -> None:
    first = Release.from_sources("x", "1", {"mine": "X = 1\n"}, packages=["mine"])
    loader.finish(loader.prepare(first))
    second = Release.from_sources(
        "x", "2", {"mine": "X = 1\n", "mine.sub": "Y = 2\n"}, packages=["mine"]
    )
    loader.abort(loader.prepare(second))


# -- the agent's own surface -----------------------------------------------------
@pytest.fixture
def local_agent(tmp_path: Path) -> Iterator[agent_pb2_grpc.NodeAgentStub]:
    code = tmp_path / "code"
    (code / "app").mkdir(parents=True)
    (code / "app" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "secret.py").write_text("TOKEN = 'do not hash me'\n")
    with (
        Agent("n-local", [code], None, dev=True) as agent,
        grpc.insecure_channel(agent.address) as channel,
    ):
        yield agent_pb2_grpc.NodeAgentStub(channel)


@pytest.mark.parametrize(
    "name", ["../secret", "/etc/passwd", "app/../../secret", "app/__init__", "a..b", "x\x00"]
)
def test_module_status_refuses_a_path(local_agent: agent_pb2_grpc.NodeAgentStub, name: str) -> None:
    """The finding: ModuleStatus answered the digest of any *.py on the host."""
    with pytest.raises(grpc.RpcError) as info:
        local_agent.ModuleStatus(agent_pb2.ModuleStatusRequest(modules=[name]), timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "n-local" in (info.value.details() or "")
    assert "not a dotted module name" in (info.value.details() or "")


def test_module_status_still_answers_module_names(
    local_agent: agent_pb2_grpc.NodeAgentStub,
) -> None:
    reply = local_agent.ModuleStatus(agent_pb2.ModuleStatusRequest(modules=["app"]), timeout=5)
    assert [m.module for m in reply.modules] == ["app"]
    assert reply.modules[0].disk_digest  # app/__init__.py under the code path


def test_deeply_nested_prepare_is_bad_release_not_unknown(
    local_agent: agent_pb2_grpc.NodeAgentStub,
) -> None:
    wire = release_to_proto(Release.from_sources("deep", "1", {"m": "X = 1\n"}))
    wire.modules[0].extra_json = "[" * 100_000 + "]" * 100_000
    reply = local_agent.Prepare(agent_pb2.PrepareRequest(rollout_id="r", release=wire), timeout=10)
    assert not reply.ok
    assert [(e.reason, e.node) for e in reply.errors] == [("bad_release", "n-local")]
    assert "extra_json" in reply.errors[0].detail


def test_prepare_over_the_message_limit_is_refused_by_grpc(
    local_agent: agent_pb2_grpc.NodeAgentStub,
) -> None:
    wire = common_pb2.ReleaseManifest(name="big", version="1")
    wire.health_json = " " * (MAX_PREPARE_MESSAGE_BYTES + 1)
    with pytest.raises(grpc.RpcError) as info:
        local_agent.Prepare(agent_pb2.PrepareRequest(rollout_id="r", release=wire), timeout=10)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.integration
def test_null_problems_in_the_permanent_record_fails_reconcile_once(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    """The finding: ``problems: null`` left the agent retrying for ever, logging "etcd unreachable"."""
    v2 = release("shop-2.0.0")
    publish(etcd_client, etcd_prefix, v2)
    manifest = v2.to_manifest()
    manifest["problems"] = None
    record = {"release": v2.label, "digest": v2.digest, "manifest": manifest}
    etcd_client.put(Keys(etcd_prefix).permanent, json.dumps(record))
    agent = agents.start("n-null")
    status = agent.status()
    assert (status.state, status.current_release) == ("reconcile_failed", "")
    member = wait_for(lambda: read_member(etcd_client, etcd_prefix, "n-null"))
    assert member["state"] == "reconcile_failed"
    log = agent.log()
    assert "'problems' must be a list" in log
    assert "etcd unreachable" not in log


@pytest.mark.integration
@pytest.mark.parametrize(
    "header",
    [
        b'{"size": 1, "chunks": 1000000000}',  # would loop a billion times
        b'{"size": 99999999999, "chunks": 190735}',  # more than any module may hold
        b"[" * 5000,  # nesting: RecursionError before
        b'{"size": "x"}',
    ],
)
def test_forged_blob_header_is_a_digest_mismatch(
    etcd_client: EtcdClient, etcd_prefix: str, header: bytes
) -> None:
    backend = EtcdBlobBackend(etcd_client, Keys(etcd_prefix).blobs)
    digest = ContentStore(backend).put(b"X = 1\n")
    etcd_client.put(backend.header_key(digest), header)
    started = time.perf_counter()
    with pytest.raises(HotfleetError) as info:
        backend.read(digest)
    assert info.value.reasons == {Reason.DIGEST_MISMATCH}
    assert time.perf_counter() - started < 1.0
    assert backend.read_many([digest]) == {}
