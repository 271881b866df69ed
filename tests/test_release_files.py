"""Release contents beyond modules (issue 13 item 5): data files and the packages code needs.

A JSON file the app reads is carried by the release (manifest, digest, wire,
content store), written next to its package when the release becomes current
through the participant's 2PC, and put back on rollback; an aborted prepare
leaves it untouched.  A release importing a package the node lacks is refused
``missing_dependency`` naming it, before the loader plans anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hotfleet.errors import Reason, ReleaseError
from hotfleet.release import Release
from hotfleet.wire import manifest_from_proto, manifest_to_proto
from node_agent.errors import PrepareError
from node_agent.participant import Participant, PrepareCall, State
from node_agent.release_files import ReleaseFiles
from tests.codebase import Codebase

READER = """\
import json
from pathlib import Path

def prices():
    return json.loads((Path(__file__).parent / "prices.json").read_text())
"""


def _boot(cb: Codebase) -> tuple[Participant, ReleaseFiles, Path]:
    data = cb.root / cb.pkg / "prices.json"
    data.write_text(json.dumps({"apple": 1}))
    cb.boot({"prices": READER})
    code = ReleaseFiles(cb.loader)
    participant = Participant(code, node_id="n1")
    participant.set_state(State.IDLE)
    return participant, code, data


def _release(cb: Codebase, version: str, data: dict[str, Any], extra: str = "") -> Release:
    return Release.from_sources(
        "app",
        version,
        {f"{cb.pkg}.prices": READER + extra},
        data={f"{cb.pkg}/prices.json": json.dumps(data)},
    )


def _prepare(participant: Participant, rid: str, release: Release) -> Any:
    return participant.prepare(PrepareCall(rid, release.digest, lambda: release, release.label))


def test_data_file_switches_with_the_code_and_comes_back_on_rollback(cb: Codebase) -> None:
    participant, _code, data = _boot(cb)
    mod = cb.module("prices")
    assert mod.prices() == {"apple": 1}

    vote = _prepare(participant, "r1", _release(cb, "2", {"apple": 2}, "\nV = 2\n"))
    assert vote.ok, vote
    assert json.loads(data.read_text()) == {"apple": 1}  # prepared: nothing written yet
    outcome = participant.finish("r1")
    assert outcome.ok, outcome
    assert mod.prices() == {"apple": 2} and mod.V == 2

    back = participant.rollback("rb1")
    assert back.ok, back
    assert mod.prices() == {"apple": 1} and not hasattr(mod, "V")
    assert not list(data.parent.glob(".*hotfleet*"))  # no temporary files left


def test_a_data_only_change_and_a_new_data_file_roll_back(cb: Codebase) -> None:
    participant, _code, data = _boot(cb)
    release = Release.from_sources(
        "app",
        "2",
        {f"{cb.pkg}.prices": READER},
        data={f"{cb.pkg}/prices.json": '{"apple": 3}', f"{cb.pkg}/tpl/page.html": "<p>new</p>"},
    )
    assert _prepare(participant, "r1", release).ok
    assert participant.finish("r1").ok
    assert cb.module("prices").prices() == {"apple": 3}
    added = cb.root / cb.pkg / "tpl" / "page.html"
    assert added.read_text() == "<p>new</p>"
    assert participant.rollback("rb1").ok
    assert json.loads(data.read_text()) == {"apple": 1}
    assert not added.exists()  # the release added it: rollback removes it


def test_an_aborted_prepare_leaves_the_file_untouched(cb: Codebase) -> None:
    participant, _code, data = _boot(cb)
    before = data.read_bytes()
    assert _prepare(participant, "r1", _release(cb, "2", {"apple": 2})).ok
    assert participant.abort("r1")
    assert data.read_bytes() == before
    assert cb.module("prices").prices() == {"apple": 1}


def test_permanent_release_keeps_its_data(cb: Codebase) -> None:
    participant, code, data = _boot(cb)
    assert _prepare(participant, "r1", _release(cb, "2", {"apple": 2})).ok
    assert participant.finish("r1").ok
    assert participant.make_permanent().ok
    assert json.loads(data.read_text()) == {"apple": 2}
    assert not code.can_rollback


def test_data_digest_is_signed_and_travels_the_wire() -> None:
    def release(payload: str) -> Release:
        return Release.from_sources(
            "a", "1", {"pkg": "X = 1\n"}, packages=["pkg"], data={"pkg/d.json": payload}
        )

    one, two = release("{}"), release('{"x": 1}')
    plain = Release.from_sources("a", "1", {"pkg": "X = 1\n"}, packages=["pkg"])
    assert len({one.digest, two.digest, plain.digest}) == 3  # the signature covers the data
    assert "data" not in plain.to_manifest()  # releases without data: digest as before
    manifest = manifest_from_proto(manifest_to_proto(one.to_manifest()))
    assert manifest["data"] == [{"path": "pkg/d.json", "digest": one.data[0].digest}]
    rebuilt = Release.from_manifest(manifest, one.blobs().__getitem__)
    assert rebuilt == one and rebuilt.digest == one.digest


def test_bundle_carries_data_and_refuses_compiled_code(tmp_path: Path) -> None:
    root = tmp_path / "b"
    (root / "pkg" / "tpl").mkdir(parents=True)
    (root / "release.toml").write_text('name = "a"\nversion = "1"\n')
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "tpl" / "x.html").write_text("<p/>")
    release = Release.from_path(root)
    assert [(d.path, d.content) for d in release.data] == [("pkg/tpl/x.html", b"<p/>")]
    assert Release.from_path(release.write_bundle(tmp_path / "copy")) == release
    (root / "pkg" / "fast.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    with pytest.raises(ReleaseError) as info:
        Release.from_path(root)
    assert "fast.cpython" in str(info.value) and "not data" in str(info.value)


def test_a_tampered_data_file_is_refused_digest_mismatch(cb: Codebase) -> None:
    participant, _code, _data = _boot(cb)
    good = _release(cb, "2", {"apple": 2})
    blobs = {d: (b"{}" if d == good.data[0].digest else b) for d, b in good.blobs().items()}
    tampered = Release.from_manifest(good.to_manifest(), blobs.__getitem__)
    vote = _prepare(participant, "r1", tampered)
    assert not vote.ok
    assert [(e.module, e.reason) for e in vote.errors] == [
        (f"{cb.pkg}/prices.json", Reason.DIGEST_MISMATCH)
    ]


@pytest.mark.parametrize(
    ("source", "line", "where"),
    [
        ("import hf_missing_pkg_q.sub\n", 1, "at module level"),
        (
            "X = 1\n\ndef f():\n    from hf_missing_pkg_q import thing\n    return thing\n",
            4,
            "in a function body",
        ),
    ],
)
def test_a_package_the_node_lacks_is_refused_naming_it_before_any_staging(
    cb: Codebase, monkeypatch: pytest.MonkeyPatch, source: str, line: int, where: str
) -> None:
    participant, code, _data = _boot(cb)
    staged: list[object] = []
    monkeypatch.setattr(cb.loader, "_rehearse", lambda *a: staged.append(a))
    release = Release.from_sources(
        "app", "2", {f"{cb.pkg}.prices": READER, f"{cb.pkg}.uses": source}
    )
    with pytest.raises(PrepareError) as info:
        code.prepare(release)
    (error,) = info.value.errors
    assert error.module == f"{cb.pkg}.uses" and error.reason is Reason.MISSING_DEPENDENCY
    assert "'hf_missing_pkg_q'" in error.detail and f"line {line}" in error.detail
    assert where in error.detail
    assert staged == [] and f"{cb.pkg}.uses" not in __import__("sys").modules
    vote = _prepare(participant, "r1", release)  # the same through the 2PC
    assert not vote.ok and "missing_dependency" in str(vote.errors[0])


def test_guarded_stdlib_installed_and_in_release_imports_pass(cb: Codebase) -> None:
    _participant, code, _data = _boot(cb)
    source = (
        "import json, os.path\nimport grpc\n"
        "try:\n    import hf_missing_pkg_q\nexcept ImportError:\n    hf_missing_pkg_q = None\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hf_missing_types_q\n"
        f"from {cb.pkg} import prices\n"
    )
    release = Release.from_sources(
        "app", "2", {f"{cb.pkg}.prices": READER, f"{cb.pkg}.uses": source}
    )
    code.abort(code.prepare(release))
