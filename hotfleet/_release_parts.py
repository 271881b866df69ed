"""The pieces a release is made of: a module's source, a data file, the digest.

Kept apart from :mod:`hotfleet.release` so that the modules which read and
check untrusted bundles (:mod:`hotfleet._release_checks`,
:mod:`hotfleet._release_build`, :mod:`hotfleet._bundle_reader`) can make and
inspect these without importing the :class:`~hotfleet.release.Release` that
imports them.  Everyone else imports these names from :mod:`hotfleet.release`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

MANIFEST = "release.toml"
INSTRUCTIONS = frozenset({"update", "load_module"})


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
