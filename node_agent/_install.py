"""Executing a release's *new* modules, at finish, through the real import system.

A module the process has not loaded yet runs its body exactly once: during
finish, behind the barrier, after the commit decision (and before that only in
the staging process, see :mod:`node_agent._rehearsal`).  The switch executes
the release in dependency order; a :class:`ReleaseFinder` placed first on
``sys.meta_path`` for the duration of the switch answers imports of the
release's new modules from the precompiled code, so ``import shop.discounts``
in an updated module's changed statement, or between two new modules, finds
the release's version and nothing on disk.  The import system itself puts the
module in ``sys.modules`` (and removes it if its body raises), exactly as for
any import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


def register_source(filename: str, source: bytes) -> None:
    """Make tracebacks show the release's lines, not whatever is on disk."""
    text = source.decode("utf-8", "replace")
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)


@dataclass(frozen=True)
class NewModule:
    """A module of the release the process has not loaded: compiled in prepare, run in finish."""

    name: str
    filename: str
    source: bytes
    code: types.CodeType
    is_package: bool
    search_path: tuple[str, ...]


class _Loader(importlib.abc.Loader):
    def __init__(self, new: NewModule) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        register_source(self.new.filename, self.new.source)
        exec(self.new.code, module.__dict__)

    def get_source(self, fullname: str) -> str:
        return self.new.source.decode("utf-8", "replace")


class ReleaseFinder(importlib.abc.MetaPathFinder):
    """Finds the release's new modules, and only those."""

    def __init__(self, modules: Sequence[NewModule]) -> None:
        self.modules = {m.name: m for m in modules}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = self.modules.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            new.filename,
            loader=_Loader(new),
            submodule_search_locations=list(new.search_path) if new.is_package else None,
        )


@contextmanager
def release_importable(modules: Sequence[NewModule]) -> Iterator[None]:
    """Let the release's new modules be imported while the block runs."""
    if not modules:
        yield
        return
    finder = ReleaseFinder(modules)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
