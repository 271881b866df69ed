"""Pausing the cyclic collector around prepare: bounded, and always restored."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from hotfleet._gc import paused_for
from tests.codebase import Codebase


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:  # exactly as it was: a test that turned it off must not leave it off
        if was:
            gc.enable()
        else:
            gc.disable()


def test_pause_holds_until_the_budget_is_spent_then_checkpoints_resume(collector_on: None) -> None:
    with paused_for(10.0) as checkpoint:
        checkpoint()
        assert not gc.isenabled()  # within budget
    assert gc.isenabled()
    with paused_for(0.01) as checkpoint:
        time.sleep(0.05)
        checkpoint()
        assert not gc.isenabled()  # waiting is not work: the budget is CPU time
        spent = time.process_time() + 0.02
        while time.process_time() < spent:
            pass
        assert not gc.isenabled()  # nothing turns it back on between checkpoints
        checkpoint()
        assert gc.isenabled()  # budget spent: collection is back on mid-operation
    assert gc.isenabled()


def test_a_collector_the_host_turned_off_stays_off(collector_on: None) -> None:
    gc.disable()
    with paused_for(0.0) as checkpoint:
        checkpoint()
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_prepare_runs_with_the_collector_paused_and_restores_it(
    cb: Codebase, collector_on: None
) -> None:
    """A module new in the release is executed (staged) during prepare: it sees
    the collector paused; afterwards the host's setting is back, even when
    prepare refuses."""
    cb.boot({"m": "X = 1\n"})
    probe = "import gc\nENABLED_DURING_PREPARE = gc.isenabled()\n"
    prepared = cb.loader.prepare(cb.release("2", {"m": "X = 2\n", "probe": probe}))
    assert gc.isenabled()
    cb.loader.finish(prepared)
    assert cb.module("probe").ENABLED_DURING_PREPARE is False
    with pytest.raises(Exception, match="boom"):
        cb.loader.prepare(cb.release("3", {"m": "X = 3\n", "bad": "raise RuntimeError('boom')\n"}))
    assert gc.isenabled()
