"""From what was read to a release: release.toml plus files, or a JSON manifest.

The two shapes a release travels in meet here.  :func:`build` turns
release.toml's document and the files of a bundle (read from disk by
:mod:`hotfleet._bundle_reader`, or given in memory to
:meth:`~hotfleet.release.Release.from_sources`) into modules and data files;
:func:`read_manifest` does the same for the wire form, fetching the bytes by
digest.  Both return keyword arguments for :class:`~hotfleet.release.Release`
(which imports this module, so it cannot be built here), after the checks of
:mod:`hotfleet._release_checks`.

Problems the loader must report per module at prepare time (a declared digest
that does not match, the same module twice, a table for a module that is not
there) are kept in the parts, not raised, so they reach the node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hotfleet._release_checks import (
    SHA256,
    Bad,
    Errors,
    Table,
    brief,
    check_data,
    check_parents,
    data_identity,
    module_identity,
    parse_header,
    parse_table,
)
from hotfleet._release_parts import MANIFEST, DataFile, ModuleSource, sha256_hex
from hotfleet.errors import ModuleError, Reason
from hotfleet.limits import MAX_MODULES


def _name_mismatch(name: str) -> ModuleError:
    stem = name.replace(".", "/")
    return ModuleError(
        name,
        Reason.NAME_MISMATCH,
        f'{MANIFEST} has a [modules."{name}"] table but the release has neither'
        f" {stem}.py nor {stem}/__init__.py",
    )


def build(
    document: Mapping[str, Any], files: Mapping[str, bytes], errors: Errors
) -> dict[str, Any]:
    """The part of reading shared by bundles and in-memory sources.

    ``document`` is release.toml's content; returns the keyword arguments of
    :class:`~hotfleet.release.Release`.
    """
    header = parse_header(document, errors)
    tables: dict[str, Table] = {}
    raw_tables = document.get("modules", {})
    if isinstance(raw_tables, Mapping):
        for name, raw in raw_tables.items():
            with errors.collect():
                tables[name] = parse_table(name, raw)
    else:
        errors.add(MANIFEST, f'{MANIFEST}: modules must be a table ([modules."name"])')
    modules: list[ModuleSource] = []
    data: list[DataFile] = []
    for path in sorted(files):
        if not path.endswith(".py"):
            with errors.collect():
                data_identity(path)
                data.append(DataFile(path, files[path], sha256_hex(files[path])))
            continue
        with errors.collect():
            name, is_package = module_identity(path)
            table = tables.get(name, Table())
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
    check_parents(modules, errors)
    check_data(modules, data, errors)
    errors.check()
    present = {m.name for m in modules}
    problems = tuple(_name_mismatch(name) for name in sorted(tables) if name not in present)
    return {"modules": tuple(modules), "problems": problems, "data": tuple(data), **header}


def read_manifest(
    manifest: Mapping[str, Any], fetch: Callable[[str], bytes], errors: Errors
) -> tuple[dict[str, Any], Any]:
    """The release a JSON manifest describes, and the digest the manifest claims (or None).

    The release comes as keyword arguments of :class:`~hotfleet.release.Release`.

    Each module's and data file's bytes are fetched by declared digest, once
    the header has been checked (a malformed header fetches nothing);
    :meth:`~hotfleet.release.Release.from_manifest` compares the claim with
    the rebuilt release.
    """
    if not isinstance(manifest, Mapping):
        errors.fail(MANIFEST, f"a manifest must be a JSON object, got {type(manifest).__name__}")
    header = parse_header(manifest, errors)
    entries = manifest.get("modules", [])
    if not isinstance(entries, list):
        errors.add(MANIFEST, f"manifest 'modules' must be a list, got {brief(entries)}")
        entries = []
    elif len(entries) > MAX_MODULES:  # before fetching a single source
        errors.fail(
            MANIFEST,
            f"manifest 'modules' has {len(entries)} entries, more than the limit of"
            f" {MAX_MODULES} modules in one release",
        )
    raw_problems = manifest.get("problems", [])
    if not isinstance(raw_problems, list):
        errors.add(MANIFEST, f"manifest 'problems' must be a list, got {brief(raw_problems)}")
        raw_problems = []
    data_entries = manifest.get("data", [])
    if not isinstance(data_entries, list):
        errors.add(MANIFEST, f"manifest 'data' must be a list, got {brief(data_entries)}")
        data_entries = []
    elif len(entries) + len(data_entries) > MAX_MODULES:
        errors.fail(
            MANIFEST,
            f"manifest has {len(entries)} modules and {len(data_entries)} data files, more"
            f" than the limit of {MAX_MODULES} files in one release",
        )
    claimed = manifest.get("digest")
    if claimed is not None and not isinstance(claimed, str):
        errors.add(MANIFEST, f"manifest 'digest' must be a string, got {brief(claimed)}")
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
    check_parents(modules, errors)
    check_data(modules, data, errors)
    errors.check()
    parts = {"modules": tuple(modules), "problems": tuple(problems), "data": tuple(data)}
    return {**parts, **header}, claimed


def _manifest_module(entry: Any, fetch: Callable[[str], bytes]) -> ModuleSource:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
        raise Bad(MANIFEST, f"manifest module entry without a path: {entry!r}")
    path = entry["path"]
    if not path.endswith(".py"):
        raise Bad(path, f"manifest module path {path!r} is not a .py file")
    name, is_package = module_identity(path)
    if (name, is_package) != (entry.get("name"), entry.get("is_package")):
        raise Bad(
            path,
            f"manifest entry {path!r} says name={entry.get('name')!r},"
            f" is_package={entry.get('is_package')!r}; the path means {name!r}, {is_package!r}",
        )
    raw = {key: entry[key] for key in ("instruction", "extra", "depends") if key in entry}
    table = parse_table(name, {**raw, "sha256": entry.get("digest")})
    if table.sha256 is None:
        raise Bad(name, f"manifest entry {path!r} has no digest")
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


def _manifest_data(entry: Any, fetch: Callable[[str], bytes]) -> DataFile:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
        raise Bad(MANIFEST, f"manifest data entry without a path: {brief(entry)}")
    path = entry["path"]
    if path.endswith(".py"):
        raise Bad(path, f"manifest data entry {path!r} is a module; list it under modules")
    data_identity(path)
    digest = entry.get("digest")
    if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
        raise Bad(path, f"manifest data entry {path!r}: digest must be 64 hex digits")
    digest = digest.lower()
    return DataFile(path, bytes(fetch(digest)), digest)


def _manifest_problem(raw: Any) -> ModuleError:
    try:
        return ModuleError(str(raw["module"]), Reason(raw["reason"]), str(raw["detail"]))
    except (TypeError, KeyError, ValueError) as exc:
        raise Bad(MANIFEST, f"manifest problem entry {raw!r} is malformed: {exc}") from None
