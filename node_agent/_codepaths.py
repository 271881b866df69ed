"""Where the node's application code lives, what of it is loaded, and compiling it.

The loader replaces only modules under its code paths (:meth:`CodePaths.under`);
for each of them :attr:`CodePaths.loaded` keeps what runs (digest, source,
release label), the boot code's as its file was first seen, so that prepare
diffs against what really runs and ``status`` compares it with the disk.
Release sources are compiled here: once per source and file name in a
process, and through the host's code cache (:mod:`node_agent._codecache`)
once per host.
"""

from __future__ import annotations

import functools
import hashlib
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hotfleet._gc import paused as gc_paused
from hotfleet.imports import ImportInfo, parse_source, remember_scan, scan_imports
from hotfleet.release import ModuleSource
from node_agent._codecache import CodeCache, retarget
from node_agent._install import NewModule

# In the key of the host cache's import scans: change it whenever what
# hotfleet.imports.scan_imports finds changes, so no worker reads another
# version's scans.
SCAN_FORMAT = "hotfleet-imports-1"


class CodePaths:
    """The directories of the node's code, and the loaded modules' sources by digest."""

    def __init__(self, paths: list[Path], cache: CodeCache | None) -> None:
        self.paths = paths
        self.cache = cache
        # module -> (digest, source, release label) of what is loaded
        self.loaded: dict[str, tuple[str, bytes, str]] = {}

    def under(self, module: Any) -> Path | None:
        """The module's source file if it lies under a code path (else it is sticky)."""
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or not file.endswith(".py"):
            return None
        path = Path(file).resolve()
        return path if any(path.is_relative_to(root) for root in self.paths) else None

    def baseline(self, name: str, module: types.ModuleType) -> tuple[str, bytes, str]:
        """What is loaded: the release's source, or for boot code the file as first seen."""
        known = self.loaded.get(name)
        if known is None:
            path = self.under(module)
            source = path.read_bytes() if path is not None and path.exists() else b""
            known = (digest(source), source, "")
            self.loaded[name] = known
        return known

    def disk_digest(self, name: str) -> str:
        """The digest of the module's file on the code paths ("" where there is none)."""
        rel = name.split(".")
        for root in self.paths:
            for candidate in (
                root.joinpath(*rel, "__init__.py"),
                root.joinpath(*rel).with_suffix(".py"),
            ):
                if candidate.is_file():
                    return digest(candidate.read_bytes())
        return ""

    def compile(self, ms: ModuleSource, module: Any = None) -> types.CodeType:
        """Compile once per distinct source and file name (validation compiled it already)."""
        return _compile_cached(ms.source, self.filename(ms, module), self.cache)

    def scan(self, modules: Sequence[ModuleSource]) -> None:
        """Scan the modules' imports (:func:`~hotfleet.imports.scan_imports`) once per host.

        The scans of a whole release are one host cache entry; a sibling's,
        read from it, are remembered for this process's scans of the same
        sources (the checks and the planner's ordering): none of them parses.
        Raises :class:`SyntaxError` like the scan (the sources compiled first).
        """
        if self.cache is None or not modules:
            return

        def make() -> tuple[Any, ...]:
            return tuple(
                scan_imports(ms.name, ms.source, is_package=ms.is_package).to_plain()
                for ms in modules
            )

        key = digest(
            "\0".join(
                [SCAN_FORMAT, *(f"{ms.name}:{ms.is_package}:{ms.actual_digest}" for ms in modules)]
            ).encode()
        )
        plain = self.cache.get("imports", key, make)
        if not isinstance(plain, tuple) or len(plain) != len(modules):
            return  # not what "imports" entries hold: each is scanned when asked
        for ms, one in zip(modules, plain, strict=True):
            try:
                info = ImportInfo.from_plain(one)
            except ValueError:
                continue
            remember_scan(ms.name, ms.source, info, is_package=ms.is_package)

    def filename(self, ms: ModuleSource, module: Any = None) -> str:
        file = getattr(module, "__file__", None)
        return file if isinstance(file, str) else str(self.paths[0] / ms.path)

    def new_module(self, ms: ModuleSource) -> NewModule:
        """What finish needs to run a module the node does not have yet."""
        filename = self.filename(ms)
        search = tuple(str(p.joinpath(*ms.name.split("."))) for p in self.paths)
        return NewModule(ms.name, filename, ms.source, self.compile(ms), ms.is_package, search)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=64)
def _compile_cached(source: bytes, filename: str, cache: CodeCache | None) -> types.CodeType:
    """Compiled once per process and, through the host ``cache``, once per host."""

    def make() -> types.CodeType:
        # from the (cached) tree the planner diffs anyway: the source is parsed once
        tree = parse_source(source)
        with gc_paused():
            return compile(tree, filename, "exec", dont_inherit=True)

    if cache is None:
        return make()
    code = cache.get("exec", digest(source), make)
    if not isinstance(code, types.CodeType):  # not what "exec" entries hold: ignore it
        return make()
    return retarget(code, filename)
