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
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import keyword
import math
import os
import re
import stat
import struct
import tarfile
import tomllib
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, NoReturn

from hotfleet.errors import ModuleError, Reason, ReleaseError
from hotfleet.limits import (
    MAX_BUNDLE_BYTES,
    MAX_DEPTH,
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_MODULES,
    TooDeep,
    TooLarge,
    loads_toml,
    read_at_most,
)

__all__ = [
    "INSTRUCTIONS",
    "MANIFEST",
    "DataFile",
    "ModuleSource",
    "Release",
    "is_module_name",
    "sha256_hex",
]

MANIFEST = "release.toml"
INSTRUCTIONS = frozenset({"update", "load_module"})

_MODULE_KEYS = frozenset({"instruction", "extra", "depends", "sha256"})
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Names and versions end up in etcd keys, file names and URLs: keep them plain.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Modules the interpreter runs by itself at start-up (site.py): a release that
# provides one runs code in every later process on the node, never hot-loaded.
_STARTUP_HOOKS = frozenset({"sitecustomize", "usercustomize"})
# Archivers' droppings that must not count as the bundle's top-level directory.
_JUNK_DIRS = frozenset({"__pycache__", "__MACOSX"})
# What a corrupt or unreadable bundle raises while being read.
_UNREADABLE = (
    OSError,
    EOFError,
    RuntimeError,  # encrypted zip members
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    UnicodeError,  # tar member names and pax headers in no known encoding
    struct.error,  # truncated zip64 extra fields
)


def sha256_hex(data: bytes) -> str:
    """The one digest function, so bundles, manifests and loaders agree on it."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModuleSource:
    """One module's bytes plus what the release says about it.

    ``digest`` is what the release *claims* (declared in release.toml or the
    manifest, else computed); ``actual_digest`` is what the bytes are.  They
    are kept apart so a node can refuse a tampered or corrupted module with
    ``digest_mismatch`` instead of silently loading it.
    """

    name: str
    path: str
    source: bytes
    digest: str
    is_package: bool
    instruction: str = "update"
    extra: Any = None
    depends: tuple[str, ...] = ()

    @cached_property
    def actual_digest(self) -> str:
        # Cached in the instance __dict__ (no slots), so hashing big sources
        # once is enough; dataclass equality ignores it.
        return sha256_hex(self.source)

    @property
    def digest_ok(self) -> bool:
        return self.digest == self.actual_digest


@dataclass(frozen=True)
class DataFile:
    """A file of a package that is not a module (a template, a JSON table the code reads).

    Carried like a module: addressed by content digest in the manifest,
    covered by the release digest (so by its signature), stored in the content
    store; a node writes it next to its package when the release becomes
    current and puts the previous bytes back on rollback.  ``path`` is posix,
    relative to the bundle root, as the node writes it relative to the code
    path holding its top-level directory (``shop/prices.json`` next to
    ``shop/__init__.py``; a file at the root next to top-level modules).
    """

    path: str
    content: bytes
    digest: str

    @cached_property
    def actual_digest(self) -> str:
        return sha256_hex(self.content)

    @property
    def digest_ok(self) -> bool:
        return self.digest == self.actual_digest

    @property
    def top(self) -> str:
        """The top-level directory holding the file ("" for a file at the bundle root)."""
        head, sep, _ = self.path.partition("/")
        return head if sep else ""


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
        errors = _Errors(os.fspath(path))
        files = _read_bundle(Path(path), errors)
        manifest = files.pop(MANIFEST)
        try:
            document = loads_toml(manifest.decode("utf-8"), MANIFEST)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            errors.fail(MANIFEST, f"{MANIFEST} is not valid UTF-8 TOML: {exc}")
        except TooDeep as exc:
            errors.fail(MANIFEST, str(exc))
        return _build(document, files, errors)

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
        errors = _Errors("from_sources")
        package_set = set(packages)
        files: dict[str, bytes] = {}
        for module, source in sources.items():
            with errors.collect():
                path = _path_of(module, module in package_set)
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
        return _build(document, files, errors)

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
                    "extra": None if m.extra is None else _plain(m.extra, m.name, "extra"),
                    "depends": list(m.depends),
                }
                for m in self.modules
            ],
            "smoke": _plain(list(self.smoke), MANIFEST, "smoke"),
            "health": _plain(self.health, MANIFEST, "health"),
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
        errors = _Errors("manifest")
        if not isinstance(manifest, Mapping):
            errors.fail(
                MANIFEST, f"a manifest must be a JSON object, got {type(manifest).__name__}"
            )
        header = _parse_header(manifest, errors)
        entries = manifest.get("modules", [])
        if not isinstance(entries, list):
            errors.add(MANIFEST, f"manifest 'modules' must be a list, got {_kind(entries)}")
            entries = []
        elif len(entries) > MAX_MODULES:  # before fetching a single source
            errors.fail(
                MANIFEST,
                f"manifest 'modules' has {len(entries)} entries, more than the limit of"
                f" {MAX_MODULES} modules in one release",
            )
        raw_problems = manifest.get("problems", [])
        if not isinstance(raw_problems, list):
            errors.add(MANIFEST, f"manifest 'problems' must be a list, got {_kind(raw_problems)}")
            raw_problems = []
        data_entries = manifest.get("data", [])
        if not isinstance(data_entries, list):
            errors.add(MANIFEST, f"manifest 'data' must be a list, got {_kind(data_entries)}")
            data_entries = []
        elif len(entries) + len(data_entries) > MAX_MODULES:
            errors.fail(
                MANIFEST,
                f"manifest has {len(entries)} modules and {len(data_entries)} data files, more"
                f" than the limit of {MAX_MODULES} files in one release",
            )
        claimed = manifest.get("digest")
        if claimed is not None and not isinstance(claimed, str):
            errors.add(MANIFEST, f"manifest 'digest' must be a string, got {_kind(claimed)}")
        errors.check()  # a malformed header fetches nothing
        modules: list[ModuleSource] = []
        for entry in entries:
            with errors.collect():
                modules.append(_manifest_module(entry, fetch))
        data: list[DataFile] = []
        for entry in data_entries:
            with errors.collect():
                data.append(_manifest_data(entry, fetch))
        problems: list[ModuleError] = []
        for raw in raw_problems:
            with errors.collect():
                problems.append(_manifest_problem(raw))
        _check_parents(modules, errors)
        _check_data(modules, data, errors)
        errors.check()
        release = cls(modules=tuple(modules), problems=tuple(problems), data=tuple(data), **header)
        if claimed is not None and claimed != release.digest:
            errors.fail(MANIFEST, f"manifest digest {claimed} != content digest {release.digest}")
        return release

    # -- writing ---------------------------------------------------------------
    def write_bundle(self, directory: str | os.PathLike[str]) -> Path:
        """Write the release as a bundle directory that :meth:`from_path` reads back equal.

        ``directory`` must be absent or empty: leftover files would silently
        become part of the release.
        """
        root = Path(directory)
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} is not empty; refusing to mix a release into it")
        text = self._manifest_toml()
        for module in self.modules:
            _module_identity(module.path)  # refuse paths that would escape root
        for item in self.data:
            _data_identity(item.path)
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).write_text(text, encoding="utf-8")
        for path, content in [
            *((m.path, m.source) for m in self.modules),
            *((d.path, d.content) for d in self.data),
        ]:
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return root

    def _manifest_toml(self) -> str:
        lines = [f"name = {_toml_value(self.name)}", f"version = {_toml_value(self.version)}"]
        if self.health:
            lines += _toml_section("[health]", self.health)
        for check in self.smoke:
            lines += _toml_section("[[smoke]]", check)
        for name, table in sorted(self._module_tables().items()):
            lines += _toml_section(f"[modules.{_toml_key(name)}]", table)
        return "\n".join(lines) + "\n"

    def _module_tables(self) -> dict[str, dict[str, Any]]:
        """release.toml tables that reproduce this release, one per module name."""
        tables: dict[str, dict[str, Any]] = {}
        for name in self.module_names():
            entries = [m for m in self.modules if m.name == name]
            # A declared sha256 applies to every file of a duplicated name.
            declare = not all(m.digest_ok for m in entries)
            variants = [_table_of(m, declare_digest=declare) for m in entries]
            if any(v != variants[0] for v in variants):
                raise ValueError(
                    f"the entries of duplicated module {name!r} differ in metadata"
                    " that one release.toml table cannot express"
                )
            tables[name] = variants[0]
        for problem in self.problems:
            if problem.reason is not Reason.NAME_MISMATCH:
                raise ValueError(f"release.toml cannot express the problem {problem}")
            tables[problem.module] = {}  # the stray table that caused it
        return {name: table for name, table in tables.items() if table or name not in self}

    def __contains__(self, name: object) -> bool:
        return any(m.name == name for m in self.modules)


# -- validation ---------------------------------------------------------------
class _Bad(ValueError):
    """One bundle problem; :class:`_Errors` turns it into a BAD_RELEASE entry."""

    def __init__(self, module: str, detail: str) -> None:
        super().__init__(f"{module}: {detail}")
        self.module = module
        self.detail = detail


class _Errors:
    """Collects every problem of a bundle so its author can fix them in one pass."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.items: list[ModuleError] = []

    def add(self, module: str, detail: str) -> None:
        self.items.append(ModuleError(module, Reason.BAD_RELEASE, f"{self.origin}: {detail}"))

    @contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except _Bad as bad:
            self.add(bad.module, bad.detail)

    def fail(self, module: str, detail: str) -> NoReturn:
        """Report a problem that makes reading further pointless."""
        self.add(module, detail)
        raise ReleaseError(self.items)

    def check(self) -> None:
        if self.items:
            raise ReleaseError(self.items)


@dataclass(frozen=True)
class _Table:
    """A validated ``[modules."x"]`` table."""

    instruction: str = "update"
    extra: Any = None
    depends: tuple[str, ...] = ()
    sha256: str | None = None


def is_module_name(name: object) -> bool:
    """Dotted ASCII identifiers only.

    Python accepts any Unicode identifier and NFKC-normalises it, so a
    fullwidth ``sys`` (U+FF53 U+FF59 U+FF53) *is* ``sys`` to the import
    system while one spelt with a Cyrillic dze (U+0455) only looks like it:
    either way a reviewer reading the release sees one module and the node
    loads another.
    """
    return isinstance(name, str) and all(
        part.isascii() and part.isidentifier() and not keyword.iskeyword(part)
        for part in name.split(".")
    )


def _kind(value: object) -> str:
    """A short description of a wrong value for an error message (never its whole repr)."""
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else text


def _plain(value: Any, module: str, where: str, depth: int = 0) -> Any:
    """A deep copy of ``value`` made of what both TOML and JSON can carry.

    Manifests travel as JSON and bundles as TOML, so anything else (dates,
    None, NaN) could not survive the trip and is refused up front, and so is
    nesting deeper than :data:`MAX_DEPTH` (which would also exhaust the stack).
    """
    if depth > MAX_DEPTH:
        raise _Bad(module, f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Bad(module, f"{where}: {value!r} cannot be carried in a JSON manifest")
        return value
    if isinstance(value, list | tuple):
        return [_plain(item, module, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        plain: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Bad(module, f"{where}: table keys must be strings, got {key!r}")
            plain[key] = _plain(item, module, f"{where}.{key}", depth + 1)
        return plain
    raise _Bad(
        module,
        f"{where}: {type(value).__name__} values are not supported"
        " (use strings, numbers, booleans, arrays and tables)",
    )


def _parse_header(document: Mapping[str, Any], errors: _Errors) -> dict[str, Any]:
    """name, version, smoke and health, as keyword arguments for :class:`Release`."""
    header: dict[str, Any] = {}
    for key in ("name", "version"):
        with errors.collect():
            value = document.get(key)
            if not isinstance(value, str) or not _LABEL.fullmatch(value):
                raise _Bad(
                    MANIFEST,
                    f"{MANIFEST}: {key} must be a string of letters, digits and ._+-"
                    f" (starting with a letter or digit), got {_kind(value)}",
                )
            header[key] = value
    with errors.collect():
        smoke = document.get("smoke", [])
        if not isinstance(smoke, list) or not all(isinstance(s, Mapping) for s in smoke):
            raise _Bad(MANIFEST, f"{MANIFEST}: smoke must be an array of tables ([[smoke]])")
        header["smoke"] = tuple(_plain(s, MANIFEST, f"smoke[{i}]") for i, s in enumerate(smoke))
    with errors.collect():
        health = document.get("health", {})
        if not isinstance(health, Mapping):
            raise _Bad(MANIFEST, f"{MANIFEST}: health must be a table ([health])")
        header["health"] = _plain(health, MANIFEST, "health")
    return header


def _parse_table(name: str, raw: Any) -> _Table:
    where = f'{MANIFEST} [modules."{name}"]'
    if not is_module_name(name):
        raise _Bad(name, f"{where}: {name!r} is not a dotted Python module name")
    if not isinstance(raw, Mapping):
        raise _Bad(name, f"{where} must be a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _MODULE_KEYS)
    if unknown:
        raise _Bad(
            name,
            f"{where}: unknown key(s) {unknown}; known: {sorted(_MODULE_KEYS)}"
            ' (dotted module names must be quoted: [modules."a.b"])',
        )
    instruction = raw.get("instruction", "update")
    if not isinstance(instruction, str) or instruction not in INSTRUCTIONS:
        raise _Bad(
            name,
            f"{where}: instruction must be one of {sorted(INSTRUCTIONS)}, got {_kind(instruction)}",
        )
    depends = raw.get("depends", [])
    if not isinstance(depends, list | tuple) or not all(is_module_name(d) for d in depends):
        raise _Bad(name, f"{where}: depends must be an array of module names, got {_kind(depends)}")
    sha256 = raw.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise _Bad(name, f"{where}: sha256 must be 64 hex digits, got {_kind(sha256)}")
    extra = raw.get("extra")
    return _Table(
        instruction=instruction,
        extra=None if extra is None else _plain(extra, name, f"{where} extra"),
        depends=tuple(sorted(set(depends))),
        sha256=None if sha256 is None else sha256.lower(),
    )


def _table_of(module: ModuleSource, *, declare_digest: bool) -> dict[str, Any]:
    """The smallest release.toml table that reproduces ``module``'s metadata."""
    table: dict[str, Any] = {}
    if module.instruction != "update":
        table["instruction"] = module.instruction
    if module.extra is not None:
        table["extra"] = module.extra
    if module.depends:
        table["depends"] = list(module.depends)
    if declare_digest:
        table["sha256"] = module.digest
    return table


def _module_identity(path: str) -> tuple[str, bool]:
    """(module name, is_package) for a ``.py`` path inside a bundle."""
    parts = path.removesuffix(".py").split("/")
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    if not parts:
        raise _Bad(path, f"{path}: an __init__.py at the bundle root belongs to no package")
    for part in parts:
        if part == "__init__" or not is_module_name(part):
            raise _Bad(
                path,
                f"{path}: {part!r} is not a valid module name part (ASCII letters, digits and _,"
                " not starting with a digit, not a keyword)",
            )
    if len(parts) == 1 and parts[0] in _STARTUP_HOOKS:
        raise _Bad(
            path,
            f"{path}: {parts[0]} is run by the interpreter at start-up (site.py), not loaded by"
            " hotfleet; a release must not provide it",
        )
    return ".".join(parts), is_package


def _check_parents(modules: Iterable[ModuleSource], errors: _Errors) -> None:
    """A submodule's parent, when the release has it, must be a package.

    ``a.py`` next to ``a/b.py`` gives a module ``a.b`` nothing can import.
    Whether a parent the release lacks exists on the node is the loader's
    question (it is either loaded from the code path or refused there).
    """
    kinds: dict[str, bool] = {}
    for m in modules:
        kinds[m.name] = kinds.get(m.name, False) or m.is_package
    for m in modules:
        parent = m.name.rpartition(".")[0]
        if parent in kinds and not kinds[parent]:
            errors.add(
                m.name,
                f"{m.path}: its parent {parent} is a plain module in this release, not a package"
                f" ({parent.replace('.', '/')}/__init__.py), so {m.name} cannot be imported",
            )


def _path_of(module: str, is_package: bool) -> str:
    if not is_module_name(module):
        raise _Bad(module, f"{module!r} is not a dotted Python module name")
    base = module.replace(".", "/")
    return f"{base}/__init__.py" if is_package else f"{base}.py"


def _name_mismatch(name: str) -> ModuleError:
    stem = name.replace(".", "/")
    return ModuleError(
        name,
        Reason.NAME_MISMATCH,
        f'{MANIFEST} has a [modules."{name}"] table but the release has neither'
        f" {stem}.py nor {stem}/__init__.py",
    )


def _build(document: Mapping[str, Any], files: Mapping[str, bytes], errors: _Errors) -> Release:
    """The part of reading shared by bundles and in-memory sources."""
    header = _parse_header(document, errors)
    tables: dict[str, _Table] = {}
    raw_tables = document.get("modules", {})
    if isinstance(raw_tables, Mapping):
        for name, raw in raw_tables.items():
            with errors.collect():
                tables[name] = _parse_table(name, raw)
    else:
        errors.add(MANIFEST, f'{MANIFEST}: modules must be a table ([modules."name"])')
    modules: list[ModuleSource] = []
    data: list[DataFile] = []
    for path in sorted(files):
        if not path.endswith(".py"):
            with errors.collect():
                _data_identity(path)
                data.append(DataFile(path, files[path], sha256_hex(files[path])))
            continue
        with errors.collect():
            name, is_package = _module_identity(path)
            table = tables.get(name, _Table())
            modules.append(
                ModuleSource(
                    name=name,
                    path=path,
                    source=files[path],
                    digest=table.sha256 or sha256_hex(files[path]),
                    is_package=is_package,
                    instruction=table.instruction,
                    extra=table.extra,
                    depends=table.depends,
                )
            )
    _check_parents(modules, errors)
    _check_data(modules, data, errors)
    errors.check()
    present = {m.name for m in modules}
    problems = tuple(_name_mismatch(name) for name in sorted(tables) if name not in present)
    return Release(modules=tuple(modules), problems=problems, data=tuple(data), **header)


def _manifest_module(entry: Any, fetch: Callable[[str], bytes]) -> ModuleSource:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
        raise _Bad(MANIFEST, f"manifest module entry without a path: {entry!r}")
    path = entry["path"]
    if not path.endswith(".py"):
        raise _Bad(path, f"manifest module path {path!r} is not a .py file")
    name, is_package = _module_identity(path)
    if (name, is_package) != (entry.get("name"), entry.get("is_package")):
        raise _Bad(
            path,
            f"manifest entry {path!r} says name={entry.get('name')!r},"
            f" is_package={entry.get('is_package')!r}; the path means {name!r}, {is_package!r}",
        )
    raw = {key: entry[key] for key in ("instruction", "extra", "depends") if key in entry}
    table = _parse_table(name, {**raw, "sha256": entry.get("digest")})
    if table.sha256 is None:
        raise _Bad(name, f"manifest entry {path!r} has no digest")
    return ModuleSource(
        name=name,
        path=path,
        source=bytes(fetch(table.sha256)),
        digest=table.sha256,
        is_package=is_package,
        instruction=table.instruction,
        extra=table.extra,
        depends=table.depends,
    )


def _data_identity(path: str) -> None:
    """Refuse a data file a node could not place safely next to its package."""
    parts = path.split("/")
    if path == MANIFEST or any(p in ("", ".", "..") or _is_junk(p) or "\\" in p for p in parts):
        raise _Bad(path, f"{path}: not a plain relative path inside the bundle")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise _Bad(path, f"{path!r}: control characters in a file name")
    base = parts[-1].lower()
    code = [s for s in importlib.machinery.all_suffixes() if s != ".py" and base.endswith(s)]
    if code or base.endswith((".pyo", ".pth")):
        raise _Bad(
            path,
            f"{path}: compiled code or an extension module ({code[0] if code else base}) is not"
            " data; a release carries sources and data files only",
        )


def _check_data(modules: Iterable[ModuleSource], data: Iterable[DataFile], errors: _Errors) -> None:
    """A data file must not sit where a module's file or directory is."""
    paths = {m.path for m in modules}
    dirs = {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}
    for item in data:
        if item.path in dirs or item.path in paths:
            errors.add(item.path, f"{item.path}: a data file where the release has a module path")


def _manifest_data(entry: Any, fetch: Callable[[str], bytes]) -> DataFile:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
        raise _Bad(MANIFEST, f"manifest data entry without a path: {_kind(entry)}")
    path = entry["path"]
    if path.endswith(".py"):
        raise _Bad(path, f"manifest data entry {path!r} is a module; list it under modules")
    _data_identity(path)
    digest = entry.get("digest")
    if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise _Bad(path, f"manifest data entry {path!r}: digest must be 64 hex digits")
    digest = digest.lower()
    return DataFile(path, bytes(fetch(digest)), digest)


def _manifest_problem(raw: Any) -> ModuleError:
    try:
        return ModuleError(str(raw["module"]), Reason(raw["reason"]), str(raw["detail"]))
    except (TypeError, KeyError, ValueError) as exc:
        raise _Bad(MANIFEST, f"manifest problem entry {raw!r} is malformed: {exc}") from None


# -- reading bundles ---------------------------------------------------------
def _base_name(path: str) -> str:
    """The last component, as :func:`_member_parts` will see it (``a/b.py/`` is ``b.py``)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return parts[-1] if parts else ""


def _limit_for(path: str) -> int:
    """Bytes one file may hold: release.toml (by its base name) or a module."""
    return MAX_MANIFEST_BYTES if _base_name(path) == MANIFEST else MAX_FILE_BYTES


def _wanted(path: str) -> bool:
    """Whether a member is part of the release (release.toml, a module, a data file).

    Only bytecode caches are left out: an interpreter writes them and the
    node compiles the sources itself.
    """
    base = _base_name(path)
    return bool(base) and not base.endswith((".pyc", ".pyo"))


@dataclass(frozen=True)
class _Entry:
    """One member of a bundle before selection; ``read`` is None unless it is a regular file.

    ``size`` is what the member declares (the archive header, the directory
    entry): limits are checked on it before anything is read, and ``read``
    itself reads at most ``limit + 1`` bytes, so a lying header costs at most
    that much.
    """

    name: str
    read: Callable[[int], bytes] | None
    kind: str = "file"
    size: int = 0


class _Budget:
    """Counts a bundle's entries and bytes as they are listed, refusing at the first excess.

    Each check runs before the costly step: listing stops at entry
    ``MAX_ENTRIES + 1`` (the 200 000-member zip is refused after 20 001), and
    a member whose declared size breaks the total is refused before it is
    inflated or skipped over.
    """

    def __init__(self, errors: _Errors) -> None:
        self.errors = errors
        self.entries = 0
        self.bytes = 0

    def admit(self, entry: _Entry, *, costs: bool) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            self.errors.fail(
                MANIFEST, f"the bundle has more than {MAX_ENTRIES} entries (files and directories)"
            )
        if costs:
            self.bytes += entry.size
            if self.bytes > MAX_BUNDLE_BYTES:
                self.errors.fail(
                    entry.name,
                    f"the bundle's files add up to more than {MAX_BUNDLE_BYTES} bytes"
                    f" (reached at {entry.name!r}, {entry.size} bytes)",
                )


def _read_bundle(path: Path, errors: _Errors) -> dict[str, bytes]:
    """release.toml, the .py and the data files of a bundle, keyed by posix path from its root."""
    suffix = path.name.lower()
    try:
        if path.is_dir():
            return _select(_directory_entries(path), errors, archive=False)
        if suffix.endswith((".tar.gz", ".tgz", ".zip")) and path.is_file():
            size = path.stat().st_size
            if size > MAX_BUNDLE_BYTES:
                errors.fail(
                    MANIFEST, f"the archive is {size} bytes, more than {MAX_BUNDLE_BYTES} bytes"
                )
        if suffix.endswith((".tar.gz", ".tgz")) and path.is_file():
            with tarfile.open(path, "r:gz") as tar:
                return _select(_tar_entries(tar), errors, archive=True)
        if suffix.endswith(".zip") and path.is_file():
            declared = _zip_entry_count(path)
            if declared is not None and declared > MAX_ENTRIES:
                errors.fail(
                    MANIFEST,
                    f"the archive declares {declared} entries, more than {MAX_ENTRIES}",
                )
            with zipfile.ZipFile(path) as archive:
                return _select(_zip_entries(archive), errors, archive=True)
    except _UNREADABLE as exc:
        errors.fail(MANIFEST, f"cannot read the bundle: {type(exc).__name__}: {exc}")
    if not path.exists():
        errors.fail(MANIFEST, "no such file or directory")
    errors.fail(MANIFEST, "not a directory nor a .tar.gz, .tgz or .zip archive")


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")


def _zip_entry_count(path: Path) -> int | None:
    """The entry count a zip's end record declares, read without parsing the directory.

    ``zipfile.ZipFile`` builds an object per entry on open (1.7 s for
    200 000), so the count is checked first from the last few KB; None when
    no end record is found (``ZipFile`` then says what is wrong).
    """
    with path.open("rb") as stream:
        size = stream.seek(0, os.SEEK_END)
        tail_len = min(size, _EOCD.size + 65535 + _EOCD64_LOCATOR.size)
        stream.seek(size - tail_len)
        tail = stream.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _EOCD.size > len(tail):
            return None
        count = _EOCD.unpack_from(tail, at)[4]
        locator = at - _EOCD64_LOCATOR.size
        if count != 0xFFFF or locator < 0:
            return int(count)
        signature, _, offset, _ = _EOCD64_LOCATOR.unpack_from(tail, locator)
        if signature != b"PK\x06\x07" or offset + _EOCD64.size > size:
            return int(count)
        stream.seek(offset)
        record = stream.read(_EOCD64.size)
        if len(record) < _EOCD64.size or record[:4] != b"PK\x06\x06":
            return int(count)
        return int(_EOCD64.unpack(record)[7])


def _read_file(path: Path, limit: int) -> bytes:
    with path.open("rb") as stream:
        return read_at_most(stream, limit, str(path.name))


def _directory_entries(root: Path) -> Iterator[_Entry]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        here = Path(dirpath)
        for name in [*dirnames, *sorted(filenames)]:
            item = here / name
            rel = item.relative_to(root).as_posix()
            if item.is_symlink():
                yield _Entry(rel, None, "directory symlink" if item.is_dir() else "symlink")
            elif item.is_file():
                yield _Entry(rel, partial(_read_file, item), size=item.stat().st_size)
            elif item.is_dir():
                yield _Entry(rel, None, "directory")
            else:
                yield _Entry(rel, None, "special file")


def _tar_kind(member: tarfile.TarInfo) -> str:
    return "symlink" if member.issym() else "hard link" if member.islnk() else "special file"


def _read_now(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[int], bytes]:
    """Read a wanted member while the stream is at it (a gzip stream cannot seek back cheaply)."""
    limit = _limit_for(member.name)
    if member.size > limit:
        return partial(_too_large, member.name, member.size)
    stream = tar.extractfile(member)
    assert stream is not None  # regular members always have data
    data = read_at_most(stream, limit, member.name)
    return lambda _limit: data


def _too_large(name: str, size: int, limit: int) -> bytes:
    raise TooLarge(f"{name} declares {size} bytes, more than the {limit} bytes limit")


def _tar_entries(tar: tarfile.TarFile) -> Iterator[_Entry]:
    # Iterating the TarFile (not getmembers()) lists members one at a time, so
    # the budget stops a huge or endless archive before the rest is inflated.
    for member in tar:
        if member.isfile():
            read = _read_now(tar, member) if _wanted(member.name) else partial(_unread, member.name)
            yield _Entry(member.name, read, size=member.size)
        elif member.isdir():
            yield _Entry(member.name, None, "directory")
        else:
            yield _Entry(member.name, None, _tar_kind(member))


def _unread(name: str, limit: int) -> bytes:
    raise AssertionError(f"{name} is a bytecode cache: never read")


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:  # the header's claim: refused before inflating a byte
        raise TooLarge(f"{info.filename} declares {info.file_size} bytes, more than {limit}")
    with archive.open(info) as stream:  # the claim may lie: inflate at most limit + 1 bytes
        return read_at_most(stream, limit, info.filename)


def _zip_entries(archive: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in archive.infolist():
        if info.filename.endswith("/"):  # not is_dir(): a corrupt entry may have no name
            yield _Entry(info.filename, None, "directory")
        elif stat.S_ISLNK(info.external_attr >> 16):
            yield _Entry(info.filename, None, "symlink")
        else:
            yield _Entry(
                info.filename, partial(_read_zip_member, archive, info), size=info.file_size
            )


def _member_parts(name: str) -> tuple[str, ...]:
    """Path components of an archive member, refusing anything that leaves the root."""
    if PurePosixPath(name).is_absolute() or re.match(r"[A-Za-z]:[\\/]", name):
        raise _Bad(name, f"archive member {name!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _Bad(name, f"archive member {name!r} escapes the bundle root")
    return parts


def _is_junk(part: str) -> bool:
    return part.startswith(".") or part in _JUNK_DIRS


def _select(entries: Iterable[_Entry], errors: _Errors, *, archive: bool) -> dict[str, bytes]:
    """Keep release.toml, .py and data files; refuse anything unsafe or ambiguous."""
    members: list[tuple[tuple[str, ...], _Entry]] = []
    budget = _Budget(errors)
    for entry in entries:
        # An archive's every byte is inflated (or skipped by inflating) on the
        # way; a directory's other files are never read, so cost nothing.
        budget.admit(entry, costs=archive or _wanted(entry.name))
        with errors.collect():
            members.append((_member_parts(entry.name), entry))
    errors.check()
    prefix = _bundle_root([parts for parts, _ in members if parts])
    files: dict[str, bytes] = {}
    for parts, entry in members:
        rel = parts[len(prefix) :] if parts[: len(prefix)] == prefix else ()
        if not rel or any(_is_junk(p) for p in rel) or entry.kind == "directory":
            continue
        path = "/".join(rel)
        relevant = _wanted(path)
        if entry.read is None:
            # A link could smuggle in bytes from outside the bundle, and a
            # linked directory could hide modules: refuse rather than guess.
            if relevant or entry.kind == "directory symlink":
                errors.add(path, f"{path} is a {entry.kind}; bundles hold regular files only")
        elif relevant:
            if path in files:
                errors.add(path, f"{path} appears twice in the archive")
            try:
                files[path] = entry.read(_limit_for(path))
            except TooLarge as exc:
                errors.add(path, f"{path} is too large: {exc}")
    if MANIFEST not in files:
        where = "at the archive root or in its single top-level directory" if archive else ""
        errors.add(MANIFEST, f"no {MANIFEST} {where or 'in the bundle directory'}")
    errors.check()
    return files


def _bundle_root(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """() if release.toml is at the root, else the single top-level directory holding it."""
    if (MANIFEST,) in paths:
        return ()
    tops = {parts[0] for parts in paths if not _is_junk(parts[0])}
    if len(tops) == 1:
        (top,) = tops
        if (top, MANIFEST) in paths:
            return (top,)
    return ()


# -- a TOML writer for the subset release.toml uses ---------------------------
_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # finite only (see _plain); repr round-trips exactly
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to release.toml")


def _toml_section(header: str, table: Mapping[str, Any]) -> list[str]:
    return ["", header, *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())]
