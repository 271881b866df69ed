"""Fuzzing every input hotfleet reads from someone else: only project errors escape.

Bundles (directory, tar.gz, zip, and corrupted archives), release.toml text,
manifests as dicts, wire ``ReleaseManifest``/``PrepareRequest`` messages,
JSON fields and the permanent record in etcd.  The property is the same
everywhere: the input is accepted, or refused with a ``ReleaseError`` /
``bad_release`` -- never a ``RecursionError``, ``TypeError``, ``KeyError``,
``AttributeError`` or an exception that gRPC would turn into ``UNKNOWN``.

Kept fast for CI: modest example counts, small inputs, a deadline per example.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.service import release_from_push
from hotfleet._proto.hotfleet.v1 import agent_pb2, common_pb2, coordinator_pb2
from hotfleet.errors import HotfleetError, ReleaseError
from hotfleet.etcd_client import EtcdClient
from hotfleet.keys import Keys
from hotfleet.limits import loads_json, loads_toml
from hotfleet.release import MANIFEST, Release
from hotfleet.wire import manifest_from_proto, release_to_proto
from node_agent import Agent
from node_agent.agent import SourcesUnavailable

FAST = settings(
    max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "60")),
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# -- strategies ------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)

name_parts = st.sampled_from(
    ["a", "b", "pkg", "__init__", "..", ".", "", "sitecustomize", "\uff53ys", "x y", "1x",
     "class", "release.toml", "__pycache__", ".git", "C:", "\x7f", "a\\b"]
)  # fmt: skip
member_names = st.builds(
    lambda parts, suffix, lead: lead + "/".join(parts) + suffix,
    st.lists(name_parts, min_size=1, max_size=4),
    st.sampled_from([".py", "", ".toml", ".txt", "/"]),
    st.sampled_from(["", "", "/", "./", "top/"]),
)
python_sources = st.sampled_from([b"X = 1\n", b"import os\n", b"def f(:\n", b"\xff\xfe", b""])
contents = python_sources | st.binary(max_size=48)


def _toml_atom(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str | int | bool) else "1.5"


toml_lines = st.one_of(
    st.just('name = "shop"'),
    st.just('version = "1.0"'),
    st.builds(lambda k, v: f"{k} = {_toml_atom(v)}", st.sampled_from(["name", "version", "x"]), json_values),
    st.builds(lambda n: f'[modules."{n}"]', st.sampled_from(["a", "pkg.a", "b", "a b", ""])),
    st.builds(
        lambda k, v: f"{k} = {v}",
        st.sampled_from(["instruction", "extra", "depends", "sha256", "other"]),
        st.sampled_from(['"update"', '"reload"', "[1, 2]", '["a", "b.c"]', "{ a = 1 }", '"' + "a" * 64 + '"']),
    ),
    st.sampled_from(["[health]", "[[smoke]]", "[modules]", "[[modules]]", "modules = 3"]),
    st.integers(0, 200).map(lambda d: "deep = " + "[" * d + "]" * d),
    st.text(max_size=20),
)  # fmt: skip
manifests_text = st.lists(toml_lines, max_size=8).map("\n".join)

files = st.dictionaries(member_names, contents, max_size=6)


def _write_zip(path: Path, manifest: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MANIFEST, manifest)
        for name, data in members.items():
            archive.writestr(name or "x", data)


def _write_tar(path: Path, manifest: str, members: dict[str, bytes], kinds: list[bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for i, (name, data) in enumerate([(MANIFEST, manifest.encode()), *members.items()]):
            info = tarfile.TarInfo(name or "x")
            info.type = kinds[i % len(kinds)] if i else tarfile.REGTYPE
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "../outside.py"
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)


def _write_dir(root: Path, manifest: str, members: dict[str, bytes]) -> None:
    root.mkdir()
    (root / MANIFEST).write_text(manifest, encoding="utf-8", errors="surrogatepass")
    for name, data in members.items():
        parts = [p for p in name.split("/") if p not in ("", ".", "..")]
        if not parts:
            continue
        target = root.joinpath(*parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError:  # a name that is already a directory here: skip it
            continue


def read_or_refuse(path: Path) -> Release | None:
    """The property: a bundle is read, or refused with ReleaseError alone."""
    try:
        return Release.from_path(path)
    except ReleaseError as exc:
        assert exc.errors, "a ReleaseError must say what is wrong"
        assert all(e.detail for e in exc.errors)
        return None


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def _fresh(root: Path) -> Path:
    path = root / uuid.uuid4().hex
    path.mkdir()
    return path


# -- bundles ---------------------------------------------------------------------
@FAST
@given(manifest=manifests_text, members=files, form=st.sampled_from(["dir", "zip", "tar"]),
       kinds=st.lists(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                                        tarfile.LNKTYPE, tarfile.FIFOTYPE]), min_size=1, max_size=3))  # fmt: skip
def test_bundles_are_read_or_refused_cleanly(
    scratch: Path, manifest: str, members: dict[str, bytes], form: str, kinds: list[bytes]
) -> None:
    where = _fresh(scratch)
    if form == "dir":
        path = where / "bundle"
        _write_dir(path, manifest, members)
    elif form == "zip":
        path = where / "bundle.zip"
        _write_zip(path, manifest, members)
    else:
        path = where / "bundle.tar.gz"
        _write_tar(path, manifest, members, kinds)
    release = read_or_refuse(path)
    if release is not None:  # what was read must survive the wire
        store = {m.digest: m.source for m in release.modules}
        store.update({d.digest: d.content for d in release.data})  # data files travel too
        assert Release.from_manifest(release.to_manifest(), store.__getitem__) == release


@FAST
@given(
    members=files,
    form=st.sampled_from(["zip", "tar"]),
    cuts=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=6),
    truncate=st.none() | st.floats(0, 1),
)
def test_corrupted_archives_are_refused_cleanly(
    scratch: Path,
    members: dict[str, bytes],
    form: str,
    cuts: list[tuple[float, int]],
    truncate: float | None,
) -> None:
    where = _fresh(scratch)
    path = where / ("b.zip" if form == "zip" else "b.tar.gz")
    good = 'name = "shop"\nversion = "1"\n'
    _write_zip(path, good, members) if form == "zip" else _write_tar(
        path, good, members, [tarfile.REGTYPE]
    )
    data = bytearray(path.read_bytes())
    for at, value in cuts:
        data[min(int(at * len(data)), len(data) - 1)] = value
    if truncate is not None:
        data = data[: int(truncate * len(data))]
    path.write_bytes(bytes(data))
    read_or_refuse(path)


@FAST
@given(text=manifests_text)
def test_release_toml_text_is_parsed_or_refused(scratch: Path, text: str) -> None:
    root = _fresh(scratch)
    (root / MANIFEST).write_text(text, encoding="utf-8", errors="surrogatepass")
    (root / "a.py").write_bytes(b"X = 1\n")
    read_or_refuse(root)


@settings(max_examples=40, deadline=2000)
@given(depth=st.integers(0, 5000), opener=st.sampled_from(["[", "{", '{"a":']))
def test_json_and_toml_nesting_of_any_depth_is_a_value_error(depth: int, opener: str) -> None:
    closer = {"[": "]", "{": "}", '{"a":': "}"}[opener]
    inner = "1" if opener == '{"a":' else ""
    text = opener * depth + inner + closer * depth
    with contextlib.suppress(ValueError):
        loads_json(text, "field")
    toml = "x = " + (
        "{a = " * depth + "1" + "}" * depth if opener != "[" else "[" * depth + "]" * depth
    )
    with contextlib.suppress(ValueError):  # TooDeep and tomllib.TOMLDecodeError alike
        loads_toml(toml, MANIFEST)


# -- manifests -------------------------------------------------------------------
BASE = Release.from_sources(
    "shop",
    "1.0",
    {"pkg": "", "pkg.a": "X = 1\n", "b": "import pkg.a\n"},
    packages=["pkg"],
    modules={"pkg.a": {"extra": {"k": [1, 2]}, "depends": ["b"]}},
    smoke=[{"path": "/"}],
)
SOURCES = {m.digest: m.source for m in BASE.modules}
TOP_KEYS = ["name", "version", "digest", "modules", "smoke", "health", "problems", "other"]
ENTRY_KEYS = ["name", "path", "digest", "is_package", "instruction", "extra", "depends"]


@FAST
@given(data=st.data())
def test_mutated_manifests_are_accepted_or_release_errors(data: st.DataObject) -> None:
    manifest: Any = BASE.to_manifest()
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            key = data.draw(st.sampled_from(TOP_KEYS))
            if data.draw(st.booleans()):
                manifest.pop(key, None)
            else:
                manifest[key] = data.draw(json_values)
        elif isinstance(manifest.get("modules"), list) and manifest["modules"]:
            entries = manifest["modules"]
            index = data.draw(st.integers(0, len(entries) - 1))
            if isinstance(entries[index], dict):
                entries[index][data.draw(st.sampled_from(ENTRY_KEYS))] = data.draw(json_values)
            else:
                entries[index] = data.draw(json_values)
    if data.draw(st.booleans()):
        manifest = data.draw(json_values)  # not even an object
    fetch = data.draw(st.sampled_from(["store", "empty"]))
    try:
        Release.from_manifest(manifest, lambda d: SOURCES.get(d, b"") if fetch == "store" else b"")
    except ReleaseError as exc:
        assert exc.errors


text_fields = st.text(max_size=12) | st.sampled_from(
    ["pkg.a", "pkg/a.py", "b.py", "../x.py", "a" * 64]
)
json_text = st.one_of(
    st.text(max_size=30),
    json_values.map(json.dumps),
    st.integers(0, 3000).map(lambda d: "[" * d + "]" * d),
)


@st.composite
def wire_manifests(draw: st.DrawFn) -> common_pb2.ReleaseManifest:
    wire = release_to_proto(BASE)
    for entry in wire.modules:
        for field in ("name", "path", "digest", "instruction"):
            if draw(st.integers(0, 4)) == 0:
                setattr(entry, field, draw(text_fields))
        if draw(st.integers(0, 3)) == 0:
            entry.extra_json = draw(json_text)
        if draw(st.integers(0, 4)) == 0:
            entry.depends.append(draw(text_fields))
    for field in ("name", "version", "digest"):
        if draw(st.integers(0, 4)) == 0:
            setattr(wire, field, draw(text_fields))
    for field in ("smoke_json", "health_json"):
        if draw(st.integers(0, 3)) == 0:
            setattr(wire, field, draw(json_text))
    return wire


@FAST
@given(wire=wire_manifests())
def test_wire_manifests_decode_or_raise_value_errors(wire: common_pb2.ReleaseManifest) -> None:
    try:
        manifest = manifest_from_proto(wire)
    except ValueError:
        return
    try:
        Release.from_manifest(manifest, lambda digest: SOURCES.get(digest, b""))
    except ReleaseError as exc:
        assert exc.errors


@pytest.fixture(scope="module")
def offline_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent with no etcd: every prepare ends at the fetch at the latest, nothing loads."""
    code = tmp_path_factory.mktemp("fuzz-code")
    yield Agent("n-fuzz", [code], None, dev=True, cache_dir=code / ".cache")


@FAST
@given(wire=wire_manifests(), rollout=st.text(max_size=8), force=st.booleans())
def test_prepare_requests_always_get_a_reply(
    offline_agent: Agent, wire: common_pb2.ReleaseManifest, rollout: str, force: bool
) -> None:
    request = agent_pb2.PrepareRequest(rollout_id=rollout, release=wire, force=force)
    reply = offline_agent.prepare(request)
    assert not reply.ok
    assert reply.errors and all(e.reason and e.detail for e in reply.errors)


def test_a_valid_release_prepared_on_an_agent_without_etcd_is_refused_naming_the_module(
    offline_agent: Agent,
) -> None:
    """Found by the property above: the fetch raised RuntimeError instead of refusing."""
    release = Release.from_sources("shop", "9.9", {"pkg": "", "pkg.m": "X = 1\n"}, packages=["pkg"])
    request = agent_pb2.PrepareRequest(rollout_id="r1", release=release_to_proto(release))
    reply = offline_agent.prepare(request)
    assert not reply.ok
    assert {e.module for e in reply.errors} >= {"pkg.m"}
    assert all("no etcd configured" in e.detail for e in reply.errors), reply.errors


sources = st.dictionaries(
    st.sampled_from(sorted(SOURCES)) | st.text(max_size=70), st.binary(max_size=24), max_size=4
)


@FAST
@given(wire=wire_manifests(), carried=sources, keep=st.booleans())
def test_pushes_rebuild_a_release_or_are_refused_invalid(
    wire: common_pb2.ReleaseManifest, carried: dict[str, bytes], keep: bool
) -> None:
    """What the coordinator's PushRelease does with a request: never a non-project error."""
    request = coordinator_pb2.PushReleaseRequest(release=wire)
    request.sources.update({**(SOURCES if keep else {}), **carried})
    try:
        release_from_push(request)
    except HotfleetError as exc:
        assert getattr(exc, "code", "") == "invalid" and exc.errors


# -- the permanent record in etcd --------------------------------------------------
@st.composite
def permanent_records(draw: st.DrawFn) -> bytes:
    """A permanent record of a release whose sources are not in the store, mutated."""
    record: Any = {"release": BASE.label, "digest": BASE.digest, "manifest": BASE.to_manifest()}
    for _ in range(draw(st.integers(0, 3))):
        target = (
            record["manifest"]
            if draw(st.booleans()) and isinstance(record.get("manifest"), dict)
            else record
        )
        key = draw(
            st.sampled_from(["manifest", "digest", "signature", "problems", "modules", "name"])
        )
        target[key] = draw(json_values)
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return b"[" * draw(st.integers(100, 5000))
    return json.dumps(record).encode()


@pytest.mark.integration
@FAST
@given(raw=permanent_records())
def test_permanent_records_are_reconciled_or_refused_once(
    etcd_endpoint: str, etcd_client: EtcdClient, etcd_prefix: str, tmp_path: Path, raw: bytes
) -> None:
    """Never an exception the membership thread would retry for ever as "etcd unreachable"."""
    etcd_client.put(Keys(etcd_prefix).permanent, raw)
    agent = Agent(
        "n-rec-fuzz",
        [tmp_path],
        etcd_endpoint,
        dev=True,
        prefix=etcd_prefix,
        cache_dir=_fresh(tmp_path),
    )
    try:
        agent.reconciler(etcd_client)
    except SourcesUnavailable:  # pragma: no cover - only with etcd itself failing
        pytest.fail("etcd is up: nothing here is worth retrying")
    # Returning (not raising) is what ends the membership thread's retries.
    assert agent.loader.current_release is None or agent.loader.current_release.label != BASE.label
