"""Unpacking a pushed release ahead of its rollout (OTP's ``unpack_release``).

What must hold: an unpack leaves in the host code cache what a prepare of
the release computes from its sources, so the rollout's prepare of every
worker of the host misses nothing; it runs nothing of the release (a module
that loops or writes at import does neither), stages nothing and changes
nothing the process runs; one worker per host does it; it never holds up a
prepare; a release a prepare would refuse is reported with the same
reasons; and through the fleet it is fenced like every mutating call.
Loader-level tests use real loaders on one cache directory (two loaders =
two workers of a host); the integration tests run real agents under a real
leader.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import pytest

from coordinator.engine import Target
from coordinator.model import Phase
from coordinator.unpack import unpack_on
from hotfleet.errors import Reason
from node_agent import Loader
from node_agent._codecache import CodeCache
from tests.agents import Agents, release
from tests.codebase import Codebase
from tests.fleet import Leader, opts, start_fleet, versions

BOOT = {
    "m": "VERSION = 1\n\ndef f():\n    return 1\n\nclass C:\n    def g(self):\n        return 'old'\n",
}
V2 = {
    "m": "VERSION = 2\n\ndef f():\n    return 2\n\nclass C:\n    def g(self):\n        return 'new'\n",
}


def _loader(cb: Codebase, cache_dir: Path) -> Loader:
    return Loader([cb.root], drain_timeout=2.0, code_cache=CodeCache(cache_dir))


# ------------------------------------------------------------- loader level
def test_an_unpacked_release_prepares_on_a_sibling_without_a_miss(
    cb: Codebase, tmp_path: Path
) -> None:
    mods = cb.boot(BOOT)
    first = _loader(cb, tmp_path / "cc")
    rel = cb.release("2", V2)
    done = first.unpack(rel)  # alone on the host: written all the same, for later readers
    assert done.done and not done.errors, done
    assert mods["m"].f() == 1 and mods["m"].C().g() == "old"  # nothing changed
    sibling = _loader(cb, tmp_path / "cc")  # a worker that starts afterwards
    prepared = sibling.prepare(rel)
    assert prepared.profile["cache_misses"] == 0, prepared.profile
    assert prepared.profile["cache_hits"] > 0
    sibling.finish(prepared)
    assert mods["m"].f() == 2 and mods["m"].C().g() == "new"
    # the sibling's own unpack of the same change is left to the first
    again = _loader(cb, tmp_path / "cc").unpack(cb.release("2", V2))
    assert not again.done and "this host has it unpacked already" in again.detail


def test_a_cold_prepare_misses_where_an_unpacked_one_hits(cb: Codebase, tmp_path: Path) -> None:
    """The control of the test above: without the unpack the same prepare misses."""
    cb.boot(BOOT)
    prepared = _loader(cb, tmp_path / "cc").prepare(cb.release("2", V2))
    assert prepared.profile["cache_misses"] > 0, prepared.profile


def test_unpack_runs_nothing_of_the_release(cb: Codebase, tmp_path: Path) -> None:
    """A module that writes at import, one that loops for ever: the unpack neither
    writes nor hangs, and stages nothing."""
    cb.boot(BOOT)
    marker = tmp_path / "ran"
    rel = cb.release(
        "2",
        {
            **V2,
            "side": f"open({str(marker)!r}, 'w').write('ran')\n",
            "spin": "while True:\n    pass\n",
        },
    )
    loader = _loader(cb, tmp_path / "cc")
    started = time.monotonic()
    done = loader.unpack(rel)
    assert done.done, done
    assert time.monotonic() - started < 10
    assert not marker.exists()
    assert loader._pending is None  # nothing staged: a later finish has nothing to switch


def test_unpack_reports_what_a_prepare_would_refuse(cb: Codebase, tmp_path: Path) -> None:
    mods = cb.boot(BOOT)
    done = _loader(cb, tmp_path / "cc").unpack(cb.release("2", {"m": "def f(:\n"}))
    assert not done.done
    (error,) = done.errors
    assert error.module == f"{cb.pkg}.m" and error.reason is Reason.BADFILE
    assert "line 1" in error.detail
    assert mods["m"].f() == 1


def test_unpack_gives_way_to_a_prepare_in_progress(cb: Codebase, tmp_path: Path) -> None:
    """A prepare rehearsing a slow import holds the loader: the unpack does not wait for it."""
    cb.boot(BOOT)
    loader = _loader(cb, tmp_path / "cc")
    loader.prepare_timeout, loader.switch_timeout = 20.0, 20.0
    slow = cb.release("2", {**V2, "slow": "import time\ntime.sleep(2.0)\n"})
    result: list[object] = []
    preparing = threading.Thread(target=lambda: result.append(loader.prepare(slow)))
    preparing.start()
    try:
        deadline = time.monotonic() + 10
        while loader._lock.acquire(blocking=False):  # until the prepare holds it
            loader._lock.release()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        asked = time.monotonic()
        done = loader.unpack(cb.release("3", V2))
        assert time.monotonic() - asked < 1.0
        assert not done.done and done.detail == "a prepare is in progress"
    finally:
        preparing.join(30)
    assert result and getattr(result[0], "release", None) == slow


def test_an_aborted_prepare_leaves_later_unpacks_free(cb: Codebase, tmp_path: Path) -> None:
    """The Abort that cancelled a prepare is spent with it: an unpack afterwards is done."""
    cb.boot(BOOT)
    cb.loader = _loader(cb, tmp_path / "cc")
    cb.loader.prepare_timeout, cb.loader.switch_timeout = 20.0, 20.0
    cb.prepare_cancelled(cb.release("2", {**V2, "spin": "while True:\n    pass\n"}), 0.5)
    done = cb.loader.unpack(cb.release("3", V2))
    assert done.done, done


def test_without_a_host_cache_unpack_says_so(cb: Codebase) -> None:
    cb.boot(BOOT)
    done = Loader([cb.root], code_cache=None).unpack(cb.release("2", V2))
    assert not done.done and "HOTFLEET_CODE_CACHE" in done.detail


# -------------------------------------------------------------- integration
def _prepared_cache_counts(log: str, label: str) -> tuple[int, int]:
    found = re.findall(
        rf"prepared {re.escape(label)} .*host code cache: (\d+) hits, (\d+) misses", log
    )
    assert found, log[-2000:]
    hits, misses = found[-1]
    return int(hits), int(misses)


@pytest.mark.integration
def test_a_pushed_release_unpacked_on_the_fleet_prepares_without_a_miss(
    agents: Agents, leader: Leader, tmp_path: Path
) -> None:
    """Three workers of one host (one code cache): one unpacks, the two others leave
    it to it; nothing of the release runs; the rollout's prepares all hit."""
    nodes = start_fleet(agents, 3, env={"HOTFLEET_CODE_CACHE": str(tmp_path / "host-cc")})
    leader.engine.push_release(release("shop-2.0.0"))
    answers = leader.engine.unpack_release("shop@2.0.0")
    assert sorted(a.node for a in answers) == ["n1", "n2", "n3"]
    done = [a for a in answers if a.done]
    assert len(done) == 1, answers
    assert all("this host has it unpacked already" in a.detail for a in answers if not a.done), (
        answers
    )
    assert versions(nodes) == {"1"}  # nothing switched
    rollout = leader.wait(leader.engine.upgrade("shop@2.0.0", Target(all=True), opts()).id)
    assert rollout.phase is Phase.PERMANENT, rollout.reason
    assert versions(nodes) == {"2"}
    for node in nodes:
        hits, misses = _prepared_cache_counts(node.log_path.read_text(), "shop@2.0.0")
        assert misses == 0 and hits > 0, (node.log_path, hits, misses)


@pytest.mark.integration
def test_unpack_names_the_node_and_module_a_prepare_would_refuse_and_is_fenced(
    agents: Agents, leader: Leader, tmp_path: Path
) -> None:
    nodes = start_fleet(agents, 2, env={"HOTFLEET_CODE_CACHE": str(tmp_path / "host-cc")})
    leader.engine.push_release(release("shop-3.0.0-broken"))
    answers = leader.engine.unpack_release("shop@3.0.0-broken")
    refused = [a for a in answers if a.errors]
    assert refused, answers
    assert all(re.match(r"shop\.\w+: \w+: .+", e) for a in refused for e in a.errors), answers
    assert versions(nodes) == {"1"}
    # a deposed leader's epoch (lower than the one the nodes saw) is refused
    entry = leader.engine.release("shop@3.0.0-broken")
    (stale,) = unpack_on(
        [leader.engine.nodes()[0]],
        leader.engine.agents.stub,
        entry,
        leader.lead.epoch - 1,
    )
    assert not stale.done and grpc.StatusCode.FAILED_PRECONDITION.name in stale.detail.upper()
