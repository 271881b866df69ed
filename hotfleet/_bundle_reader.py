"""Reading a bundle directory or archive into its files, without trusting it.

:func:`read_bundle` turns a directory, ``.tar.gz``/``.tgz`` or ``.zip`` into
release.toml, the ``.py`` and the data files, keyed by posix path from the
bundle's root.  Nothing is executed, imported or extracted to disk, and the
limits of :mod:`hotfleet.limits` are checked before the costly step: the
entry count and total size as members are listed (:class:`_Budget`, a zip's
count from its end record), each file's declared size before it is read
(:class:`_Entry`).  Links, special files, paths leaving the root and members
twice are refused; what the files mean is :mod:`hotfleet._release_build`'s
business.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

from hotfleet._release_checks import Bad, Errors, is_junk
from hotfleet._release_parts import MANIFEST
from hotfleet.limits import (
    MAX_BUNDLE_BYTES,
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    TooLarge,
    read_at_most,
)

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

    def __init__(self, errors: Errors) -> None:
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


def read_bundle(path: Path, errors: Errors) -> dict[str, bytes]:
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
        dirnames[:] = sorted(d for d in dirnames if not is_junk(d))
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
        raise Bad(name, f"archive member {name!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise Bad(name, f"archive member {name!r} escapes the bundle root")
    return parts


def _select(entries: Iterable[_Entry], errors: Errors, *, archive: bool) -> dict[str, bytes]:
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
        if not rel or any(is_junk(p) for p in rel) or entry.kind == "directory":
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
    tops = {parts[0] for parts in paths if not is_junk(parts[0])}
    if len(tops) == 1:
        (top,) = tops
        if (top, MANIFEST) in paths:
            return (top,)
    return ()
