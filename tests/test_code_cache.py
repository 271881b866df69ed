"""The host-level code cache: one compile per host, verified on read, never trusted blindly."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from hotfleet.release import Release
from node_agent import _codecache as codecache
from node_agent._codecache import CodeCache, retarget
from node_agent._prologue import instrument_module
from node_agent.loader import Loader

SOURCE = b"def f(x):\n    return x + 1\n\nclass C:\n    def m(self):\n        return 2\n"


def _digest(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()


def _make(calls: list[int], filename: str = "/a/m.py") -> types.CodeType:
    calls.append(1)
    return compile(SOURCE, filename, "exec", dont_inherit=True)


def _entries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if not p.name.startswith(".")]


def _member_in_a_process(directory: Path) -> subprocess.Popen[str]:
    """A sibling worker: another process using the cache, alive until killed."""
    code = (
        "import sys, time\n"
        "from node_agent._codecache import CodeCache\n"
        f"cache = CodeCache({str(directory)!r})\n"
        "print('joined', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "joined"
    return proc


def test_a_lone_worker_keeps_its_compile_to_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing an entry nobody can read costs a file creation per module: not done."""
    monkeypatch.setattr(codecache, "SIBLINGS_TTL_S", 0.0)
    calls: list[int] = []
    cache = CodeCache(tmp_path / "c")
    cache.get("exec", _digest(SOURCE), lambda: _make(calls))
    assert calls == [1] and _entries(tmp_path / "c") == []
    sibling = _member_in_a_process(tmp_path / "c")
    try:
        other = SOURCE + b"\n# another build\n"
        cache.get("exec", _digest(other), lambda: _make(calls))
        assert len(_entries(tmp_path / "c")) == 1  # now someone can read it
    finally:
        sibling.kill()
        sibling.wait()
    third = SOURCE + b"\n# a third build\n"
    cache.get("exec", _digest(third), lambda: _make(calls))
    assert len(_entries(tmp_path / "c")) == 1  # the killed sibling is not counted...
    assert len(os.listdir(tmp_path / "c" / codecache.MEMBERS)) == 1  # ...and its file is gone


def test_a_forked_child_of_a_cache_user_writes_for_its_parent(tmp_path: Path) -> None:
    """A sibling forked from a worker (the loader benchmark's) does not inherit the
    parent's answer "alone": the parent is alive, so the child's compile is kept."""
    calls: list[int] = []
    cache = CodeCache(tmp_path / "c")
    cache.get("exec", _digest(SOURCE), lambda: _make(calls))  # alone: nothing written
    assert _entries(tmp_path / "c") == []
    other = SOURCE + b"\n# the child's build\n"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        try:
            cache.get("exec", _digest(other), lambda: _make([]))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert len(_entries(tmp_path / "c")) == 1
    cache.get("exec", _digest(other), lambda: _make(calls))
    assert cache.hits == 1 and calls == [1]


def test_second_reader_does_not_compile_and_gets_its_own_file_name(tmp_path: Path) -> None:
    calls: list[int] = []
    one, two = CodeCache(tmp_path / "c"), CodeCache(tmp_path / "c")  # two sibling workers
    a = one.get("exec", _digest(SOURCE), lambda: _make(calls))
    b = two.get("exec", _digest(SOURCE), lambda: _make(calls))
    assert calls == [1] and two.hits == 1 and one.misses == 1
    b = retarget(b, "/b/m.py")
    assert b.co_filename == "/b/m.py"
    nested = [c for c in b.co_consts if isinstance(c, types.CodeType)]
    assert nested and all(c.co_filename == "/b/m.py" for c in nested)
    g: dict[str, object] = {}
    exec(b, g)
    assert g["f"](1) == 2  # type: ignore[operator]
    assert a.co_code == b.co_code


def test_a_corrupted_or_truncated_entry_is_a_miss(tmp_path: Path) -> None:
    calls: list[int] = []
    cache, _sibling = CodeCache(tmp_path / "c"), CodeCache(tmp_path / "c")
    cache.get("exec", _digest(SOURCE), lambda: _make(calls))
    (entry,) = _entries(tmp_path / "c")
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0xFF
    entry.write_bytes(bytes(data))
    cache.get("exec", _digest(SOURCE), lambda: _make(calls))
    assert calls == [1, 1]
    entry.write_bytes(entry.read_bytes()[:20])
    cache.get("exec", _digest(SOURCE), lambda: _make(calls))
    assert calls == [1, 1, 1]


def test_concurrent_misses_compile_once(tmp_path: Path) -> None:
    calls: list[int] = []
    gate = threading.Barrier(4)

    def slow() -> types.CodeType:
        import time

        time.sleep(0.2)
        return _make(calls)

    def worker() -> None:
        cache = CodeCache(tmp_path / "c")
        gate.wait()
        cache.get("exec", _digest(SOURCE), slow)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionError):
        CodeCache(shared)


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(PermissionError):
        CodeCache(link)


def test_a_compile_error_is_not_cached(tmp_path: Path) -> None:
    cache = CodeCache(tmp_path / "c")
    bad = b"def f(:\n"
    for _ in range(2):
        with pytest.raises(SyntaxError):
            cache.get("exec", _digest(bad), lambda: compile(bad, "m.py", "exec"))
    assert cache.hits == 0


def test_counting_twins_from_the_cache_match_a_fresh_instrumentation(tmp_path: Path) -> None:
    cache, _sibling = CodeCache(tmp_path / "c"), CodeCache(tmp_path / "c")
    fresh = instrument_module("m", SOURCE, "/x/m.py")
    instrument_module("m", SOURCE, "/w/m.py", cache, _digest(SOURCE))
    cached = instrument_module("m", SOURCE, "/x/m.py", cache, _digest(SOURCE))
    assert cache.hits == 1
    assert cached.slots == fresh.slots
    assert {k: s for k, (_, s) in cached.codes.items()} == {
        k: s for k, (_, s) in fresh.codes.items()
    }
    assert all(c.co_filename == "/x/m.py" for c, _ in cached.codes.values())


def test_sibling_loaders_share_compiled_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two loaders (sibling workers) prepare the same new module: the second compiles nothing."""
    code = tmp_path / "code"
    code.mkdir()
    cache_dir = tmp_path / "cache"
    release = Release.from_sources(
        "sib", "1.0.0", {"sibmod_cc": "VALUE = 1\ndef f():\n    return VALUE\n"}
    )
    first = Loader([code], code_cache=CodeCache(cache_dir))
    second = Loader([code], code_cache=CodeCache(cache_dir))
    try:
        first.abort(first.prepare(release))
        assert first.code_cache is not None and first.code_cache.misses >= 1
        second.abort(second.prepare(release))
        assert second.code_cache is not None
        assert second.code_cache.misses == 0 and second.code_cache.hits >= 1
    finally:
        sys.modules.pop("sibmod_cc", None)
