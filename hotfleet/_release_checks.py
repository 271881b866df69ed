"""Validation of untrusted release content: names, paths, tables, values.

A bundle or a manifest is untrusted input until checked, and every way in
(a directory, an archive, in-memory sources, a JSON manifest) must refuse the
same things for the same reasons, so the rules live here once:

* :class:`Errors` collects every problem of a bundle so its author fixes them
  in one pass; a helper raises :class:`Bad` for one problem, and
  ``Errors.collect`` turns it into a ``bad_release`` entry.
* Names and paths: :func:`is_module_name` (ASCII identifiers only),
  :func:`module_identity` (a ``.py`` path to its module, start-up hooks
  refused), :func:`data_identity` (a data file a node can place safely),
  :func:`path_of`, :func:`is_junk`; across the release,
  :func:`check_parents` and :func:`check_data`.
* release.toml's content: :func:`parse_header` (name, version, smoke,
  health), :func:`parse_table` (one ``[modules."x"]`` table), and
  :func:`portable`, which keeps only values both TOML and JSON carry, within
  :data:`~hotfleet.limits.MAX_DEPTH`.
"""

from __future__ import annotations

import importlib.machinery
import keyword
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from hotfleet._release_parts import INSTRUCTIONS, MANIFEST, DataFile, ModuleSource
from hotfleet.errors import ModuleError, Reason, ReleaseError
from hotfleet.limits import MAX_DEPTH

_MODULE_KEYS = frozenset({"instruction", "extra", "depends", "sha256"})
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Names and versions end up in etcd keys, file names and URLs: keep them plain.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Modules the interpreter runs by itself at start-up (site.py): a release that
# provides one runs code in every later process on the node, never hot-loaded.
_STARTUP_HOOKS = frozenset({"sitecustomize", "usercustomize"})
# Archivers' droppings that must not count as the bundle's top-level directory.
_JUNK_DIRS = frozenset({"__pycache__", "__MACOSX"})


class Bad(ValueError):
    """One bundle problem; :class:`Errors` turns it into a BAD_RELEASE entry."""

    def __init__(self, module: str, detail: str) -> None:
        super().__init__(f"{module}: {detail}")
        self.module = module
        self.detail = detail


class Errors:
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
        except Bad as bad:
            self.add(bad.module, bad.detail)

    def fail(self, module: str, detail: str) -> NoReturn:
        """Report a problem that makes reading further pointless."""
        self.add(module, detail)
        raise ReleaseError(self.items)

    def check(self) -> None:
        if self.items:
            raise ReleaseError(self.items)


@dataclass(frozen=True)
class Table:
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


def brief(value: object) -> str:
    """A short description of a wrong value for an error message (never its whole repr)."""
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else text


def portable(value: Any, module: str, where: str, depth: int = 0) -> Any:
    """A deep copy of ``value`` made of what both TOML and JSON can carry.

    Manifests travel as JSON and bundles as TOML, so anything else (dates,
    None, NaN) could not survive the trip and is refused up front, and so is
    nesting deeper than :data:`MAX_DEPTH` (which would also exhaust the stack).
    """
    if depth > MAX_DEPTH:
        raise Bad(module, f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Bad(module, f"{where}: {value!r} cannot be carried in a JSON manifest")
        return value
    if isinstance(value, list | tuple):
        return [portable(item, module, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        plain: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise Bad(module, f"{where}: table keys must be strings, got {key!r}")
            plain[key] = portable(item, module, f"{where}.{key}", depth + 1)
        return plain
    raise Bad(
        module,
        f"{where}: {type(value).__name__} values are not supported"
        " (use strings, numbers, booleans, arrays and tables)",
    )


def parse_header(document: Mapping[str, Any], errors: Errors) -> dict[str, Any]:
    """name, version, smoke and health, as keyword arguments for :class:`Release`."""
    header: dict[str, Any] = {}
    for key in ("name", "version"):
        with errors.collect():
            value = document.get(key)
            if not isinstance(value, str) or not _LABEL.fullmatch(value):
                raise Bad(
                    MANIFEST,
                    f"{MANIFEST}: {key} must be a string of letters, digits and ._+-"
                    f" (starting with a letter or digit), got {brief(value)}",
                )
            header[key] = value
    with errors.collect():
        smoke = document.get("smoke", [])
        if not isinstance(smoke, list) or not all(isinstance(s, Mapping) for s in smoke):
            raise Bad(MANIFEST, f"{MANIFEST}: smoke must be an array of tables ([[smoke]])")
        header["smoke"] = tuple(portable(s, MANIFEST, f"smoke[{i}]") for i, s in enumerate(smoke))
    with errors.collect():
        health = document.get("health", {})
        if not isinstance(health, Mapping):
            raise Bad(MANIFEST, f"{MANIFEST}: health must be a table ([health])")
        header["health"] = portable(health, MANIFEST, "health")
    return header


def parse_table(name: str, raw: Any) -> Table:
    where = f'{MANIFEST} [modules."{name}"]'
    if not is_module_name(name):
        raise Bad(name, f"{where}: {name!r} is not a dotted Python module name")
    if not isinstance(raw, Mapping):
        raise Bad(name, f"{where} must be a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _MODULE_KEYS)
    if unknown:
        raise Bad(
            name,
            f"{where}: unknown key(s) {unknown}; known: {sorted(_MODULE_KEYS)}"
            ' (dotted module names must be quoted: [modules."a.b"])',
        )
    instruction = raw.get("instruction", "update")
    if not isinstance(instruction, str) or instruction not in INSTRUCTIONS:
        raise Bad(
            name,
            f"{where}: instruction must be one of {sorted(INSTRUCTIONS)}, got {brief(instruction)}",
        )
    depends = raw.get("depends", [])
    if not isinstance(depends, list | tuple) or not all(is_module_name(d) for d in depends):
        raise Bad(name, f"{where}: depends must be an array of module names, got {brief(depends)}")
    sha256 = raw.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
        raise Bad(name, f"{where}: sha256 must be 64 hex digits, got {brief(sha256)}")
    extra = raw.get("extra")
    return Table(
        instruction=instruction,
        extra=None if extra is None else portable(extra, name, f"{where} extra"),
        depends=tuple(sorted(set(depends))),
        sha256=None if sha256 is None else sha256.lower(),
    )


def module_identity(path: str) -> tuple[str, bool]:
    """(module name, is_package) for a ``.py`` path inside a bundle."""
    parts = path.removesuffix(".py").split("/")
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    if not parts:
        raise Bad(path, f"{path}: an __init__.py at the bundle root belongs to no package")
    for part in parts:
        if part == "__init__" or not is_module_name(part):
            raise Bad(
                path,
                f"{path}: {part!r} is not a valid module name part (ASCII letters, digits and _,"
                " not starting with a digit, not a keyword)",
            )
    if len(parts) == 1 and parts[0] in _STARTUP_HOOKS:
        raise Bad(
            path,
            f"{path}: {parts[0]} is run by the interpreter at start-up (site.py), not loaded by"
            " hotfleet; a release must not provide it",
        )
    return ".".join(parts), is_package


def check_parents(modules: Iterable[ModuleSource], errors: Errors) -> None:
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


def path_of(module: str, is_package: bool) -> str:
    if not is_module_name(module):
        raise Bad(module, f"{module!r} is not a dotted Python module name")
    base = module.replace(".", "/")
    return f"{base}/__init__.py" if is_package else f"{base}.py"


def data_identity(path: str) -> None:
    """Refuse a data file a node could not place safely next to its package."""
    parts = path.split("/")
    if path == MANIFEST or any(p in ("", ".", "..") or is_junk(p) or "\\" in p for p in parts):
        raise Bad(path, f"{path}: not a plain relative path inside the bundle")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise Bad(path, f"{path!r}: control characters in a file name")
    base = parts[-1].lower()
    code = [s for s in importlib.machinery.all_suffixes() if s != ".py" and base.endswith(s)]
    if code or base.endswith((".pyo", ".pth")):
        raise Bad(
            path,
            f"{path}: compiled code or an extension module ({code[0] if code else base}) is not"
            " data; a release carries sources and data files only",
        )


def check_data(modules: Iterable[ModuleSource], data: Iterable[DataFile], errors: Errors) -> None:
    """A data file must not sit where a module's file or directory is."""
    paths = {m.path for m in modules}
    dirs = {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}
    for item in data:
        if item.path in dirs or item.path in paths:
            errors.add(item.path, f"{item.path}: a data file where the release has a module path")


def is_junk(part: str) -> bool:
    return part.startswith(".") or part in _JUNK_DIRS
