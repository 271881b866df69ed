"""Writing a release back as a bundle: release.toml and the files beside it.

:func:`write_bundle` is what :meth:`~hotfleet.release.Release.write_bundle`
does; :meth:`~hotfleet.release.Release.from_path` reads the result back equal,
so release.toml gets the smallest tables that reproduce each module's
metadata (:func:`_table_of`).  ``tomllib`` only reads, hence the small writer
for the subset release.toml uses (strings, numbers, booleans, arrays,
tables): values got there through :func:`~hotfleet._release_checks.portable`,
so nothing else reaches it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotfleet._release_checks import data_identity, module_identity
from hotfleet._release_parts import MANIFEST, ModuleSource
from hotfleet.errors import Reason

if TYPE_CHECKING:
    from hotfleet.release import Release


def write_bundle(release: Release, directory: str | os.PathLike[str]) -> Path:
    """Write ``release`` as a bundle directory; see :meth:`Release.write_bundle`."""
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; refusing to mix a release into it")
    text = manifest_toml(release)
    for module in release.modules:
        module_identity(module.path)  # refuse paths that would escape root
    for item in release.data:
        data_identity(item.path)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(text, encoding="utf-8")
    for path, content in [
        *((m.path, m.source) for m in release.modules),
        *((d.path, d.content) for d in release.data),
    ]:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return root


def manifest_toml(release: Release) -> str:
    """release.toml's text for ``release``."""
    lines = [f"name = {_toml_value(release.name)}", f"version = {_toml_value(release.version)}"]
    if release.health:
        lines += _toml_section("[health]", release.health)
    for check in release.smoke:
        lines += _toml_section("[[smoke]]", check)
    for name, table in sorted(_module_tables(release).items()):
        lines += _toml_section(f"[modules.{_toml_key(name)}]", table)
    return "\n".join(lines) + "\n"


def _module_tables(release: Release) -> dict[str, dict[str, Any]]:
    """release.toml tables that reproduce ``release``, one per module name."""
    tables: dict[str, dict[str, Any]] = {}
    for name in release.module_names():
        entries = [m for m in release.modules if m.name == name]
        # A declared sha256 applies to every file of a duplicated name.
        declare = not all(m.digest_ok for m in entries)
        variants = [_table_of(m, declare_digest=declare) for m in entries]
        if any(v != variants[0] for v in variants):
            raise ValueError(
                f"the entries of duplicated module {name!r} differ in metadata"
                " that one release.toml table cannot express"
            )
        tables[name] = variants[0]
    for problem in release.problems:
        if problem.reason is not Reason.NAME_MISMATCH:
            raise ValueError(f"release.toml cannot express the problem {problem}")
        tables[problem.module] = {}  # the stray table that caused it
    return {name: table for name, table in tables.items() if table or name not in release}


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
        return repr(value)  # finite only (see portable); repr round-trips exactly
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
