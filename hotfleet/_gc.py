"""Pausing the cyclic garbage collector around bursts of allocation.

Parsing a release allocates tens of thousands of AST nodes.  With the
collector on, they trigger collection after collection, full ones included,
and a full collection walks the whole heap of the host process (tens of
milliseconds in a service).  Paused, the same burst costs one collection
afterwards.  Only for code that runs no user code and no I/O: the pause is
process-wide.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["paused", "paused_for"]


@contextmanager
def paused() -> Iterator[None]:
    """No collection inside the block; re-enabled after it unless it was off already."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def paused_for(budget_s: float) -> Iterator[Callable[[], None]]:
    """Paused for a long operation, but not beyond ``budget_s`` seconds of CPU.

    Yields a checkpoint to call between steps: once the process has spent the
    budget (all its threads: garbage piles up with work done, not with time
    spent waiting for a CPU on a crowded host) it turns collection back on,
    so an unusually long operation (a huge release, slow user code) does not
    let a busy host's cyclic garbage pile up.
    """
    was = gc.isenabled()
    gc.disable()
    deadline = time.process_time() + budget_s
    resumed = not was

    def checkpoint() -> None:
        nonlocal resumed
        if not resumed and time.process_time() > deadline:
            resumed = True
            gc.enable()

    try:
        yield checkpoint
    finally:
        if not resumed:
            gc.enable()
