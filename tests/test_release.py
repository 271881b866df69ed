"""Release bundles: reading every shape, refusing bad ones, and round trips."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotfleet.errors import ModuleError, Reason, ReleaseError
from hotfleet.release import ModuleSource, Release

SOURCES = {
    "shop": "from shop import cart\n",
    "shop.cart": "from shop.db import connect\n\ndef total(items):\n    return sum(items)\n",
    "shop.db": "def connect():\n    return 'db'\n",
    "util": "VALUE = 1\n",
}

MANIFEST = """\
name = "shop"
version = "2.0.0"

[modules."shop.cart"]
instruction = "load_module"
extra = { from = "1.0.0", fields = ["a", "b"], nested = { x = 1.5, ok = true } }
depends = ["util", "shop.db"]

[[smoke]]
name = "checkout"
path = "/checkout"

[health]
max_error_rate = 0.01
"""


def sample() -> Release:
    return Release.from_sources(
        "shop",
        "2.0.0",
        SOURCES,
        packages=["shop"],
        modules={
            "shop.cart": {
                "instruction": "load_module",
                "extra": {"from": "1.0.0", "fields": ["a", "b"], "nested": {"x": 1.5, "ok": True}},
                "depends": ["util", "shop.db"],
            }
        },
        smoke=[{"name": "checkout", "path": "/checkout"}],
        health={"max_error_rate": 0.01},
    )


def write_tree(root: Path, files: Mapping[str, str | bytes]) -> Path:
    for rel, content in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content, encoding="utf-8")
        else:
            target.write_bytes(content)
    return root


def bundle_files(manifest: str = MANIFEST) -> dict[str, str | bytes]:
    return {
        "release.toml": manifest,
        "shop/__init__.py": SOURCES["shop"],
        "shop/cart.py": SOURCES["shop.cart"],
        "shop/db.py": SOURCES["shop.db"],
        "util.py": SOURCES["util"],
    }


def make_archive(dest: Path, files: Mapping[str, str | bytes], top: str | None = None) -> Path:
    """An archive of ``files`` under ``top`` (or at the root); format from dest's suffix."""
    members = {(f"{top}/{k}" if top else k): v for k, v in files.items()}
    encoded = {k: v.encode() if isinstance(v, str) else v for k, v in members.items()}
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w") as archive:
            for name, data in encoded.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(dest, "w:gz") as tar:
            for name, data in encoded.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return dest


def bad_release(exc: pytest.ExceptionInfo[ReleaseError]) -> ModuleError:
    assert exc.value.reasons == {Reason.BAD_RELEASE}
    return exc.value.errors[0]


# -- reading ------------------------------------------------------------------
def test_directory_bundle_reads_modules_and_manifest(tmp_path: Path) -> None:
    release = Release.from_path(write_tree(tmp_path, bundle_files()))

    assert release.label == "shop@2.0.0"
    assert [m.path for m in release.modules] == [
        "shop/__init__.py",
        "shop/cart.py",
        "shop/db.py",
        "util.py",
    ]
    shop = release.get("shop")
    assert shop is not None and shop.is_package
    cart = release.get("shop.cart")
    assert cart is not None
    assert cart.instruction == "load_module"
    assert cart.extra == {"from": "1.0.0", "fields": ["a", "b"], "nested": {"x": 1.5, "ok": True}}
    assert cart.depends == ("shop.db", "util")
    assert cart.digest == hashlib.sha256(SOURCES["shop.cart"].encode()).hexdigest()
    assert cart.digest_ok
    assert release.smoke == ({"name": "checkout", "path": "/checkout"},)
    assert release.health == {"max_error_rate": 0.01}
    assert release.problems == ()
    assert release == sample()


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".zip"])
@pytest.mark.parametrize("top", [None, "shop-2.0.0"])
def test_archive_bundles_equal_the_directory(tmp_path: Path, suffix: str, top: str | None) -> None:
    archive = make_archive(tmp_path / f"bundle{suffix}", bundle_files(), top)
    assert Release.from_path(archive) == sample()


def test_archive_ignores_macos_junk_beside_the_top_directory(tmp_path: Path) -> None:
    files = {f"shop-2/{k}": v for k, v in bundle_files().items()}
    files["__MACOSX/shop-2/._release.toml"] = b"\x00\x05junk"
    assert Release.from_path(make_archive(tmp_path / "b.zip", files)) == sample()


def test_caches_and_dotfiles_are_ignored_and_other_files_are_data(tmp_path: Path) -> None:
    data = {
        "README.md": b"# shop",
        "shop/data.json": b"{}",
        "shop/stubs.pyi": b"x: int",
        "nested/release.toml": b"not = [valid",
    }
    files = bundle_files() | {
        "shop/__pycache__/cart.cpython-311.pyc": b"\x00garbage",
        "shop/__pycache__/evil.py": "raise SystemExit",
        ".hidden.py": "x = 1",
        ".git/hooks/pre-commit.py": "x = 1",
        **data,
    }
    release = Release.from_path(write_tree(tmp_path, files))
    assert release.modules == sample().modules
    assert {d.path: d.content for d in release.data} == data
    assert all(d.digest_ok for d in release.data)


def test_duplicate_module_is_kept_as_two_entries(tmp_path: Path) -> None:
    files = {
        "release.toml": 'name = "dup"\nversion = "1"\n',
        "a/__init__.py": "",
        "a/b.py": "X = 1\n",
        "a/b/__init__.py": "X = 2\n",
    }
    release = Release.from_path(write_tree(tmp_path, files))
    entries = [m for m in release.modules if m.name == "a.b"]
    assert [(m.path, m.is_package) for m in entries] == [
        ("a/b.py", False),
        ("a/b/__init__.py", True),
    ]
    assert release.module_names() == ["a", "a.b"]
    first = release.get("a.b")
    assert first is not None and first.path == "a/b.py"


def test_table_for_missing_module_is_a_name_mismatch_problem(tmp_path: Path) -> None:
    manifest = 'name = "shop"\nversion = "1"\n[modules."shop.pay"]\ninstruction = "update"\n'
    release = Release.from_path(write_tree(tmp_path, {"release.toml": manifest, "util.py": ""}))
    (problem,) = release.problems
    assert problem.module == "shop.pay"
    assert problem.reason is Reason.NAME_MISMATCH
    assert "shop/pay.py" in problem.detail and "shop/pay/__init__.py" in problem.detail
    assert release.module_names() == ["util"]


def test_declared_digest_is_kept_even_when_wrong(tmp_path: Path) -> None:
    declared = "AB" * 32
    manifest = f'name = "s"\nversion = "1"\n[modules.util]\nsha256 = "{declared}"\n'
    release = Release.from_path(write_tree(tmp_path, {"release.toml": manifest, "util.py": "X=1"}))
    util = release.get("util")
    assert util is not None
    assert util.digest == declared.lower()
    assert util.actual_digest == hashlib.sha256(b"X=1").hexdigest()
    assert not util.digest_ok


# -- refusing -----------------------------------------------------------------
BASE = 'name = "shop"\nversion = "1.0"\n'


@pytest.mark.parametrize(
    ("files", "module", "needle"),
    [
        ({"util.py": ""}, "release.toml", "no release.toml"),
        ({"release.toml": "name = [oops"}, "release.toml", "not valid UTF-8 TOML"),
        ({"release.toml": b"name = '\xff'"}, "release.toml", "not valid UTF-8 TOML"),
        ({"release.toml": 'version = "1"'}, "release.toml", "name must be"),
        ({"release.toml": 'name = 3\nversion = "1"'}, "release.toml", "got 3"),
        ({"release.toml": 'name = "a b"\nversion = "1"'}, "release.toml", "got 'a b'"),
        ({"release.toml": 'name = "x"'}, "release.toml", "version must be"),
        (
            {"release.toml": BASE + '[modules.util]\ninstruction = "reload"', "util.py": ""},
            "util",
            "instruction must be one of ['load_module', 'update'], got 'reload'",
        ),
        (
            {"release.toml": BASE + "[modules.util]\ndepends = 'x'", "util.py": ""},
            "util",
            "depends must be an array of module names",
        ),
        (
            {"release.toml": BASE + "[modules.util]\nsha256 = 'abc'", "util.py": ""},
            "util",
            "sha256 must be 64 hex digits",
        ),
        (
            {"release.toml": BASE + "[modules.shop.cart]\ninstruction = 'update'"},
            "shop",
            "unknown key(s) ['cart']",
        ),
        (
            {"release.toml": BASE + "[modules.util]\nextra = 1979-05-27", "util.py": ""},
            "util",
            "date values are not supported",
        ),
        (
            {"release.toml": BASE + "[modules.util]\nextra = nan", "util.py": ""},
            "util",
            "cannot be carried in a JSON manifest",
        ),
        ({"release.toml": BASE + "smoke = 1"}, "release.toml", "smoke must be an array"),
        ({"release.toml": BASE + "health = 1"}, "release.toml", "health must be a table"),
        (
            {"release.toml": BASE, "shop/my-mod.py": ""},
            "shop/my-mod.py",
            "shop/my-mod.py: 'my-mod' is not a valid module name part",
        ),
        (
            {"release.toml": BASE, "class/x.py": ""},
            "class/x.py",
            "'class' is not a valid module name part",
        ),
        ({"release.toml": BASE, "__init__.py": ""}, "__init__.py", "bundle root"),
    ],
)
def test_unreadable_bundle_is_bad_release(
    tmp_path: Path, files: dict[str, str | bytes], module: str, needle: str
) -> None:
    root = write_tree(tmp_path / "bundle", files)
    with pytest.raises(ReleaseError) as exc:
        Release.from_path(root)
    error = bad_release(exc)
    assert error.module == module
    assert needle in error.detail
    assert str(root) in error.detail


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    manifest = 'name = 1\nversion = 2\n[modules.util]\ninstruction = "x"\n'
    files = {"release.toml": manifest, "util.py": "", "bad-name.py": ""}
    with pytest.raises(ReleaseError) as exc:
        Release.from_path(write_tree(tmp_path, files))
    assert sorted(e.module for e in exc.value.errors) == [
        "bad-name.py",
        "release.toml",
        "release.toml",
        "util",
    ]


@pytest.mark.parametrize("name", ["missing", "bundle.rar"])
def test_missing_path_or_unknown_format_is_bad_release(tmp_path: Path, name: str) -> None:
    if name.endswith(".rar"):
        (tmp_path / name).write_bytes(b"Rar!")
    with pytest.raises(ReleaseError) as exc:
        Release.from_path(tmp_path / name)
    assert name in bad_release(exc).detail


@pytest.mark.parametrize("suffix", [".tgz", ".zip"])
def test_corrupt_archive_is_bad_release(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"definitely not an archive")
    with pytest.raises(ReleaseError) as exc:
        Release.from_path(path)
    assert "cannot read the bundle" in bad_release(exc).detail


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
@pytest.mark.parametrize("evil", ["../evil.py", "shop/../../evil.py", "/abs/evil.py", "../x.txt"])
def test_archive_member_escaping_the_root_is_refused(
    tmp_path: Path, suffix: str, evil: str
) -> None:
    files = bundle_files() | {evil: "import os; os.system('boom')\n"}
    archive = make_archive(tmp_path / f"b{suffix}", files)
    with pytest.raises(ReleaseError) as exc:
        Release.from_path(archive)
    error = bad_release(exc)
    assert error.module == evil
    assert evil in error.detail
    assert not (tmp_path.parent / "evil.py").exists()


def test_symlinked_module_in_tar_is_refused(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "b.tgz", bundle_files())
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m)) for m in tar.getmembers()]
        payload = {m.name: f.read() if f else b"" for m, f in members}
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in payload.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("shop/secret.py")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ReleaseError) as exc:
        Release.from_path(archive)
    error = bad_release(exc)
    assert error.module == "shop/secret.py"
    assert "symlink" in error.detail


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_in_directory_bundle_is_refused(tmp_path: Path) -> None:
    outside = write_tree(tmp_path / "outside", {"secret.py": "TOKEN = 1\n"})
    root = write_tree(tmp_path / "bundle", bundle_files())
    (root / "shop" / "secret.py").symlink_to(outside / "secret.py")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ReleaseError) as exc:
        Release.from_path(root)
    assert {e.module for e in exc.value.errors} == {"shop/secret.py", "linked"}


def test_duplicate_archive_member_is_refused(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "b.tgz", bundle_files())
    with tarfile.open(archive, "r:gz") as tar:
        payload = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [*payload, ("util.py", b"X = 'shadow'\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ReleaseError) as exc:
        Release.from_path(archive)
    assert "util.py appears twice" in bad_release(exc).detail


# -- digests ------------------------------------------------------------------
def test_release_digest_is_stable_across_shapes(tmp_path: Path) -> None:
    from_dir = Release.from_path(write_tree(tmp_path / "d", bundle_files()))
    from_zip = Release.from_path(make_archive(tmp_path / "b.zip", bundle_files(), "top"))
    assert sample().digest == from_dir.digest == from_zip.digest
    assert len(sample().digest) == 64


def _change_module(release: Release, name: str, **changes: Any) -> Release:
    modules = tuple(
        dataclasses.replace(m, **changes) if m.name == name else m for m in release.modules
    )
    return dataclasses.replace(release, modules=modules)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: dataclasses.replace(r, version="2.0.1"),
        lambda r: dataclasses.replace(r, name="shop2"),
        lambda r: dataclasses.replace(r, smoke=()),
        lambda r: dataclasses.replace(r, health={"max_error_rate": 0.02}),
        lambda r: _change_module(r, "util", digest="0" * 64),
        lambda r: _change_module(r, "shop.cart", instruction="update"),
        lambda r: _change_module(r, "shop.cart", extra={"from": "1.0.1"}),
        lambda r: _change_module(r, "shop.cart", depends=("util",)),
        lambda r: _change_module(r, "util", path="util/__init__.py", is_package=True),
    ],
    ids=["version", "name", "smoke", "health", "digest", "instruction", "extra", "depends", "path"],
)
def test_release_digest_changes_with_content(mutate: Any) -> None:
    assert mutate(sample()).digest != sample().digest


def test_changed_source_changes_module_and_release_digest() -> None:
    changed = Release.from_sources(
        "shop", "2.0.0", SOURCES | {"util": "VALUE = 2\n"}, packages=["shop"]
    )
    original = Release.from_sources("shop", "2.0.0", SOURCES, packages=["shop"])
    assert changed.get("util") != original.get("util")
    assert changed.digest != original.digest


# -- round trips --------------------------------------------------------------
def test_write_bundle_round_trips(tmp_path: Path) -> None:
    release = sample()
    root = release.write_bundle(tmp_path / "out")
    assert root == tmp_path / "out"
    again = Release.from_path(root)
    assert again == release
    assert again.digest == release.digest


def test_write_bundle_round_trips_duplicates_problems_and_declared_digests(tmp_path: Path) -> None:
    manifest = (
        'name = "odd"\nversion = "1"\n'
        f'[modules."a.b"]\nsha256 = "{"0" * 64}"\ndepends = ["a"]\n'
        '[modules.ghost]\n[modules."weird key"]\n'
    )
    files = {"release.toml": manifest, "a/__init__.py": "", "a/b.py": "", "a/b/__init__.py": ""}
    with pytest.raises(ReleaseError):  # 'weird key' is not a module name
        Release.from_path(write_tree(tmp_path / "bad", files))
    files["release.toml"] = manifest.replace('[modules."weird key"]\n', "")
    release = Release.from_path(write_tree(tmp_path / "src", files))
    assert [p.module for p in release.problems] == ["ghost"]
    assert Release.from_path(release.write_bundle(tmp_path / "out")) == release


def test_write_bundle_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "stale.py").write_text("X = 1\n")
    with pytest.raises(FileExistsError):
        sample().write_bundle(tmp_path)


toml_scalars = (
    st.text()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(extra=toml_values, smoke=st.lists(st.dictionaries(st.text(), toml_values, max_size=3)))
def test_write_bundle_round_trips_any_extra_and_smoke(extra: Any, smoke: list[Any]) -> None:
    release = Release.from_sources(
        "r", "1", {"m": "X = 1\n"}, modules={"m": {"extra": extra}}, smoke=smoke
    )
    with tempfile.TemporaryDirectory() as directory:
        again = Release.from_path(release.write_bundle(Path(directory) / "b"))
    assert again == release
    assert again.digest == release.digest


def test_manifest_round_trips_through_json_and_a_content_store() -> None:
    release = sample()
    store = {m.digest: m.source for m in release.modules}
    fetched: list[str] = []

    def fetch(digest: str) -> bytes:
        fetched.append(digest)
        return store[digest]

    manifest = json.loads(json.dumps(release.to_manifest()))
    assert "source" not in json.dumps(manifest)
    again = Release.from_manifest(manifest, fetch)
    assert again == release
    assert again.digest == manifest["digest"] == release.digest
    assert sorted(fetched) == sorted(store)


def test_manifest_keeps_declared_digest_when_store_returns_other_bytes() -> None:
    release = sample()
    manifest = release.to_manifest()
    again = Release.from_manifest(manifest, lambda digest: b"tampered = True\n")
    cart = again.get("shop.cart")
    assert cart is not None
    assert cart.digest == release.get("shop.cart").digest  # type: ignore[union-attr]
    assert cart.source == b"tampered = True\n"
    assert not cart.digest_ok


def test_manifest_carries_problems() -> None:
    release = Release.from_sources("r", "1", {"m": ""}, modules={"ghost": {}})
    again = Release.from_manifest(release.to_manifest(), lambda d: b"")
    assert again.problems == release.problems
    assert again.problems[0].reason is Reason.NAME_MISMATCH


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.update(version="9.9"), "manifest digest"),
        (lambda m: m["modules"][0].update(name="other"), "the path means 'shop'"),
        (lambda m: m["modules"][0].update(path="../evil.py"), "'..' is not a valid module"),
        (lambda m: m["modules"][0].update(instruction="boom"), "instruction must be"),
        (lambda m: m["modules"][0].pop("digest"), "has no digest"),
    ],
    ids=["digest", "name", "path", "instruction", "no-digest"],
)
def test_tampered_manifest_is_bad_release(edit: Any, needle: str) -> None:
    release = sample()
    manifest = release.to_manifest()
    edit(manifest)
    store = {m.digest: m.source for m in release.modules}
    with pytest.raises(ReleaseError) as exc:
        Release.from_manifest(manifest, store.__getitem__)
    assert needle in bad_release(exc).detail


# -- programmatic construction --------------------------------------------------
def test_from_sources_builds_packages_and_paths() -> None:
    release = Release.from_sources("r", "1", {"pkg": b"", "pkg.mod": "X = 1\n"}, packages=["pkg"])
    assert [(m.name, m.path, m.is_package) for m in release.modules] == [
        ("pkg", "pkg/__init__.py", True),
        ("pkg.mod", "pkg/mod.py", False),
    ]
    assert release.get("pkg.mod") == ModuleSource(
        name="pkg.mod",
        path="pkg/mod.py",
        source=b"X = 1\n",
        digest=hashlib.sha256(b"X = 1\n").hexdigest(),
        is_package=False,
    )
    assert "pkg.mod" in release and "nope" not in release
    assert release.get("nope") is None


def test_from_sources_refuses_bad_names_and_unknown_packages() -> None:
    with pytest.raises(ReleaseError) as exc:
        Release.from_sources("r", "1", {"my-mod": "", "ok": ""}, packages=["ghost"])
    assert {e.module for e in exc.value.errors} == {"my-mod", "ghost"}


def test_release_normalises_what_it_is_given() -> None:
    health = {"max_error_rate": 0.5}
    release = Release.from_sources("r", "1", {"b": "", "a": ""}, health=health)
    health["max_error_rate"] = 1.0
    assert release.health == {"max_error_rate": 0.5}
    with pytest.raises(TypeError):
        release.health["x"] = 1  # type: ignore[index]
    assert [m.path for m in release.modules] == ["a.py", "b.py"]
