"""The release bundle: what an operator ships and what every node loads.

A release travels in two shapes.  On the operator's side it is a directory or
an archive holding ``release.toml`` and the sources under their package paths;
on the wire it is a JSON manifest that names every module by content digest,
so agents fetch the bytes from a content store and can prove they got what
the coordinator meant.  :class:`Release` is the one in-memory form both shapes
turn into.

Reading a bundle never executes or imports anything and never extracts an
archive to disk: a release is untrusted input until the loader has checked it.
Problems that make a bundle unreadable raise :class:`ReleaseError` at once (all
of them together, so the author fixes the bundle in one pass).  Problems the
loader must report per module at prepare time -- a declared digest that does
not match, the same module twice, a manifest table for a module that is not
there -- are *kept* in the release instead of raised, so they reach the node
and come back with the node's verdict.

This module is the in-memory form and its identity (:attr:`Release.digest`,
the JSON wire form); the rest of the work sits in modules of its own, and
every name other code uses is imported from here:

* :mod:`hotfleet._release_parts`: :class:`ModuleSource`, :class:`DataFile`,
  :func:`sha256_hex`, :data:`MANIFEST`.
* :mod:`hotfleet._bundle_reader`: a directory or archive into its files,
  within the limits.
* :mod:`hotfleet._release_checks`: names, paths, tables and values of
  untrusted content (:func:`is_module_name`), and error collection.
* :mod:`hotfleet._release_build`: release.toml plus files, or a JSON
  manifest, into a release's parts.
* :mod:`hotfleet._release_toml`: writing a release back as a bundle.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hotfleet import _release_toml
from hotfleet._bundle_reader import read_bundle
from hotfleet._release_build import build, read_manifest
from hotfleet._release_checks import Errors, is_module_name, path_of, portable
from hotfleet._release_parts import INSTRUCTIONS, MANIFEST, DataFile, ModuleSource, sha256_hex
from hotfleet.errors import ModuleError
from hotfleet.limits import TooDeep, loads_toml

__all__ = [
    "INSTRUCTIONS",
    "MANIFEST",
    "DataFile",
    "ModuleSource",
    "Release",
    "is_module_name",
    "sha256_hex",
]


@dataclass(frozen=True)
class Release:
    """A named, versioned set of modules (and data files): the unit a fleet upgrades to.

    ``modules`` may name one module twice (``a/b.py`` and ``a/b/__init__.py``):
    which one Python would import depends on the node's path, so the loader
    refuses it as ``duplicated`` rather than this class guessing.
    """

    name: str
    version: str
    modules: tuple[ModuleSource, ...]
    smoke: tuple[Mapping[str, Any], ...] = ()
    health: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    problems: tuple[ModuleError, ...] = ()
    data: tuple[DataFile, ...] = ()

    def __post_init__(self) -> None:
        # Normalise whatever a caller passed, so equal releases compare equal
        # and nobody mutates a release through a dict they still hold.
        set_ = object.__setattr__
        set_(self, "modules", tuple(sorted(self.modules, key=lambda m: m.path)))
        set_(self, "smoke", tuple(MappingProxyType(dict(s)) for s in self.smoke))
        set_(self, "health", MappingProxyType(dict(self.health)))
        set_(self, "problems", tuple(self.problems))
        set_(self, "data", tuple(sorted(self.data, key=lambda d: d.path)))

    @cached_property
    def digest(self) -> str:
        """Identity of the release's content: what signatures and rollout records pin.

        Computed over the *declared* module digests, so it can be checked
        before a single module is fetched.
        """
        body = self._manifest_body()
        fields = ("name", "path", "digest", "instruction", "extra", "depends")
        identity = {
            "name": self.name,
            "version": self.version,
            "modules": sorted(
                ([m[f] for f in fields] for m in body["modules"]), key=lambda m: m[:2]
            ),
            "smoke": body["smoke"],
            "health": body["health"],
        }
        if self.data:  # absent when empty: digests of releases without data files unchanged
            identity["data"] = [[d.path, d.digest] for d in self.data]
        canonical = json.dumps(
            identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
        return sha256_hex(canonical.encode("ascii"))

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def module_names(self) -> list[str]:
        """Distinct module names, sorted (a duplicated module appears once)."""
        return sorted({m.name for m in self.modules})

    def blobs(self) -> dict[str, bytes]:
        """Every byte string of the release by its actual digest: what a content store keeps."""
        out = {m.actual_digest: m.source for m in self.modules}
        out.update((d.actual_digest, d.content) for d in self.data)
        return out

    def get(self, name: str) -> ModuleSource | None:
        """The first entry (in path order) for ``name``; see ``modules`` for duplicates."""
        return next((m for m in self.modules if m.name == name), None)

    # -- reading -------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Release:
        """Read a bundle directory or ``.tar.gz``/``.tgz``/``.zip`` archive."""
        errors = Errors(os.fspath(path))
        files = read_bundle(Path(path), errors)
        manifest = files.pop(MANIFEST)
        try:
            document = loads_toml(manifest.decode("utf-8"), MANIFEST)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            errors.fail(MANIFEST, f"{MANIFEST} is not valid UTF-8 TOML: {exc}")
        except TooDeep as exc:
            errors.fail(MANIFEST, str(exc))
        return Release(**build(document, files, errors))

    @classmethod
    def from_sources(
        cls,
        name: str,
        version: str,
        sources: Mapping[str, str | bytes],
        *,
        packages: Iterable[str] = (),
        modules: Mapping[str, Mapping[str, Any]] | None = None,
        smoke: Iterable[Mapping[str, Any]] = (),
        health: Mapping[str, Any] | None = None,
        data: Mapping[str, str | bytes] | None = None,
    ) -> Release:
        """Build a release in memory, validated exactly like a bundle on disk.

        ``sources`` is keyed by module name; names in ``packages`` become
        ``<name>/__init__.py``.  ``modules`` holds release.toml-style tables.
        ``data`` is keyed by path in the bundle (``shop/prices.json``).
        """
        errors = Errors("from_sources")
        package_set = set(packages)
        files: dict[str, bytes] = {}
        for module, source in sources.items():
            with errors.collect():
                path = path_of(module, module in package_set)
                files[path] = source.encode("utf-8") if isinstance(source, str) else source
        for path, content in (data or {}).items():
            files[path] = content.encode("utf-8") if isinstance(content, str) else content
        for missing in sorted(package_set - set(sources)):
            errors.add(missing, f"{missing!r} is listed in packages but has no source")
        document = {
            "name": name,
            "version": version,
            "modules": dict(modules or {}),
            "smoke": list(smoke),
            "health": dict(health or {}),
        }
        return Release(**build(document, files, errors))

    # -- the wire form ---------------------------------------------------------
    def to_manifest(self) -> dict[str, Any]:
        """Everything but the source bytes, as plain JSON-ready data (fresh copies)."""
        return {
            **self._manifest_body(),
            "digest": self.digest,
            "problems": [
                {"module": p.module, "reason": p.reason.value, "detail": p.detail}
                for p in self.problems
            ],
        }

    def _manifest_body(self) -> dict[str, Any]:
        body = {
            "name": self.name,
            "version": self.version,
            "modules": [
                {
                    "name": m.name,
                    "path": m.path,
                    "digest": m.digest,
                    "is_package": m.is_package,
                    "instruction": m.instruction,
                    "extra": None if m.extra is None else portable(m.extra, m.name, "extra"),
                    "depends": list(m.depends),
                }
                for m in self.modules
            ],
            "smoke": portable(list(self.smoke), MANIFEST, "smoke"),
            "health": portable(self.health, MANIFEST, "health"),
        }
        if self.data:
            body["data"] = [{"path": d.path, "digest": d.digest} for d in self.data]
        return body

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], fetch: Callable[[str], bytes]) -> Release:
        """Rebuild a release, fetching each module's bytes by its declared digest.

        The declared digest is kept even if ``fetch`` returns other bytes: the
        loader turns that into ``digest_mismatch`` for the module concerned.
        Whatever ``fetch`` raises (content missing from the store) propagates.
        A ``digest`` field in the manifest, if present, must match the
        rebuilt release, so a manifest edited in transit is refused outright.
        """
        errors = Errors("manifest")
        parts, claimed = read_manifest(manifest, fetch, errors)
        release = cls(**parts)
        if claimed is not None and claimed != release.digest:
            errors.fail(MANIFEST, f"manifest digest {claimed} != content digest {release.digest}")
        return release

    # -- writing ---------------------------------------------------------------
    def write_bundle(self, directory: str | os.PathLike[str]) -> Path:
        """Write the release as a bundle directory that :meth:`from_path` reads back equal.

        ``directory`` must be absent or empty: leftover files would silently
        become part of the release.
        """
        return _release_toml.write_bundle(self, directory)

    def __contains__(self, name: object) -> bool:
        return any(m.name == name for m in self.modules)
