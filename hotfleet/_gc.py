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
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused"]


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
