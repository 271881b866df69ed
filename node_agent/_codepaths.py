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

import contextlib
import functools
import hashlib
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hotfleet._gc import paused as gc_paused
from hotfleet.imports import (
    ImportInfo,
    ImportSite,
    import_sites,
    parse_source,
    remember_scan,
    remember_sites,
    scan_imports,
)
from hotfleet.release import ModuleSource
from node_agent._codecache import CodeCache, retarget
from node_agent._install import NewModule

# In the keys of the host cache's per-release entries: change one whenever
# what it holds changes (hotfleet.imports.scan_imports, import_sites), so no
# worker reads another version's results.
FORMATS = {"imports": "hotfleet-imports-1", "sites": "hotfleet-sites-1"}


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
        _per_host(
            self.cache,
            "imports",
            modules,
            lambda ms: scan_imports(ms.name, ms.source, is_package=ms.is_package).to_plain(),
            lambda ms, plain: remember_scan(
                ms.name, ms.source, ImportInfo.from_plain(plain), is_package=ms.is_package
            ),
        )

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


def prime_import_sites(cache: CodeCache | None, modules: Sequence[ModuleSource]) -> None:
    """:func:`~hotfleet.imports.import_sites` of the modules, found once per host.

    What the node's package check reads (:mod:`node_agent.release_files`);
    a module whose source does not parse is left to the loader's refusal.
    """

    def sites(ms: ModuleSource) -> tuple[tuple[str, int, bool, bool], ...] | None:
        try:
            found = import_sites(ms.source)
        except (SyntaxError, ValueError):
            return None
        return tuple((s.name, s.line, s.in_function, s.guarded) for s in found)

    def remember(ms: ModuleSource, plain: Any) -> None:
        if plain is not None:
            remember_sites(
                ms.source, (ImportSite(str(a), int(b), bool(c), bool(d)) for a, b, c, d in plain)
            )

    _per_host(cache, "sites", modules, sites, remember)


def _per_host(
    cache: CodeCache | None,
    kind: str,
    modules: Sequence[ModuleSource],
    find: Callable[[ModuleSource], Any],
    remember: Callable[[ModuleSource, Any], None],
) -> None:
    """``find`` each module's plain result once per host: the whole release's in one
    cache entry (one file, not one per module); what a sibling found is passed to
    ``remember`` here.  A result of another shape is ignored (found again when asked).
    """
    if cache is None or not modules:
        return
    key = digest(
        "\0".join(
            [FORMATS[kind], *(f"{ms.name}:{ms.is_package}:{ms.actual_digest}" for ms in modules)]
        ).encode()
    )
    found = cache.get(kind, key, lambda: tuple(find(ms) for ms in modules))
    if not isinstance(found, tuple) or len(found) != len(modules):
        return
    for ms, one in zip(modules, found, strict=True):
        with contextlib.suppress(TypeError, ValueError):
            remember(ms, one)
