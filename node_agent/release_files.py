"""What a release holds besides module code: data files, and the packages it needs.

:class:`ReleaseFiles` wraps the node's :class:`~node_agent.loader.Loader`
(the participant and the reconciler drive it as they drive the loader):

* **prepare** refuses, before the loader plans anything (so before any
  staging fork), a release whose code imports a third-party package the node
  lacks (``missing_dependency``, naming the module, the line and the package)
  and a data file the node cannot place (``bad_release``) or whose bytes do
  not match their digest (``digest_mismatch``).  It reads what each data file
  replaces *now*: on a host whose workers share one code directory, a peer
  that switched first has already written the new bytes by the time this
  worker finishes.
* **finish** switches the code, then writes each data file next to its
  package (write to a temporary file, then rename: a reader sees the old
  bytes or the new, never a mix) so ``open(Path(__file__).parent / "x.json")``
  and ``importlib.resources`` read the new bytes once the code is new.  A
  write that fails puts back what was written and rolls the code back: the
  node then runs exactly what it ran before (``FinishError(restored=True)``).
* **rollback** restores the code, then the previous bytes (a file the
  release added is removed).  **abort** changes nothing: nothing was written.

Data files are written when the release becomes current, not when it becomes
permanent as modules are: the code that reads them is already the new code.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotfleet.errors import ModuleError, Reason
from hotfleet.imports import import_sites, shared_trees
from hotfleet.release import DataFile, Release
from node_agent._codepaths import prime_import_sites
from node_agent.errors import FinishError, PrepareError

__all__ = ["ReleaseFiles", "missing_packages"]

log = logging.getLogger(__name__)

# Import names whose distribution on PyPI is called something else.
_DISTRIBUTIONS = {
    "yaml": "PyYAML",
    "PIL": "Pillow",
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "bs4": "beautifulsoup4",
    "dateutil": "python-dateutil",
    "jwt": "PyJWT",
    "google": "google-* (a namespace package)",
    "OpenSSL": "pyOpenSSL",
    "Crypto": "pycryptodome",
    "magic": "python-magic",
    "dotenv": "python-dotenv",
}


def _installed(top: str, code_paths: list[Path]) -> bool:
    if top in sys.modules or top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return True
    try:
        if importlib.util.find_spec(top) is not None:
            return True
    except (ImportError, ValueError):
        pass
    return importlib.machinery.PathFinder.find_spec(top, [str(p) for p in code_paths]) is not None


def missing_packages(release: Release, code_paths: list[Path]) -> list[ModuleError]:
    """Imports of top-level packages that are neither in the release nor on this node.

    Every unguarded absolute import counts, in a function body too (it fails
    at the first call, on every node); imports inside ``try: ... except
    ImportError`` or under ``TYPE_CHECKING`` are the module's own business.
    One error per module and package, naming the first line that imports it.
    """
    in_release = {m.name.partition(".")[0] for m in release.modules}
    errors: list[ModuleError] = []
    known: dict[str, bool] = {}
    for ms in release.modules:
        try:
            sites = import_sites(ms.source)
        except (SyntaxError, ValueError):
            continue  # the loader refuses it as badfile
        reported: set[str] = set()
        for site in sites:
            top = site.top
            if site.guarded or top in in_release or top in reported:
                continue
            if top not in known:
                known[top] = _installed(top, code_paths)
            if known[top]:
                continue
            reported.add(top)
            where = "in a function body" if site.in_function else "at module level"
            dist = _DISTRIBUTIONS.get(top)
            hint = f" (distribution {dist})" if dist else ""
            errors.append(
                ModuleError(
                    ms.name,
                    Reason.MISSING_DEPENDENCY,
                    f"needs the package {top!r}{hint}: {ms.path} line {site.line} imports"
                    f" {site.name} {where}, and {top} is neither in the release, nor in the"
                    " standard library, nor installed on this node; install it on every node"
                    " first",
                )
            )
    return errors


@dataclass
class _Write:
    target: Path
    content: bytes
    before: bytes | None  # None: the file did not exist
    restore: bool = True  # False: the disk already held the new bytes at prepare


@dataclass
class _Plan:
    writes: list[_Write] = field(default_factory=list)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _put(path: Path, content: bytes | None) -> None:
    """Write (or remove, for None) ``path`` atomically."""
    if content is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.hotfleet-{os.getpid()}-tmp")
    try:
        tmp.write_bytes(content)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ReleaseFiles:
    """The loader, plus the data files and package requirements of a release (see module doc)."""

    __slots__ = ("_backup", "_code", "_lock", "_pending")

    def __init__(self, code: Any) -> None:
        object.__setattr__(self, "_code", code)
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_pending", None)  # (prepared, plan) of the latest prepare
        object.__setattr__(self, "_backup", None)  # the last finish's writes, for rollback

    def __getattr__(self, name: str) -> Any:
        return getattr(self._code, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._code, name, value)  # current_release etc. belong to the loader

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @property
    def code_paths(self) -> list[Path]:
        return list(self._code.code_paths)

    # -------------------------------------------------------------- prepare
    def _root_of(self, item: DataFile) -> Path:
        """The code path holding ``item``'s top-level directory on this node."""
        roots = [p.resolve() for p in self.code_paths]
        package = sys.modules.get(item.top) if item.top else None
        for entry in getattr(package, "__path__", None) or ():
            parent = Path(entry).resolve().parent
            if parent in roots:
                return parent
        for root in roots:
            if item.top and (root / item.top).is_dir():
                return root
        return roots[0]

    def _plan(self, release: Release) -> _Plan:
        errors = missing_packages(release, self.code_paths)
        plan = _Plan()
        for item in release.data:
            if not item.digest_ok:
                errors.append(
                    ModuleError(
                        item.path,
                        Reason.DIGEST_MISMATCH,
                        f"{item.path}: expected sha256 {item.digest}, content is"
                        f" {item.actual_digest}",
                    )
                )
                continue
            root = self._root_of(item)
            target = root / item.path
            try:
                inside = target.resolve().is_relative_to(root)
                before = _read(target) if inside and not target.is_dir() else None
            except OSError as exc:
                errors.append(
                    ModuleError(item.path, Reason.BAD_RELEASE, f"cannot read {target}: {exc}")
                )
                continue
            if not inside or target.is_dir():
                why = "a directory" if inside else f"outside {root} (a symbolic link)"
                errors.append(
                    ModuleError(
                        item.path,
                        Reason.BAD_RELEASE,
                        f"data file {item.path} cannot be written: {target} is {why}",
                    )
                )
                continue
            plan.writes.append(_Write(target, item.content, before, before != item.content))
        if errors:
            raise PrepareError(errors)
        return plan

    def prepare(self, release: Release, *, force: bool = False) -> Any:
        # one parse per source for the package check and the loader (a third of
        # a small release's prepare CPU was parsing its new sources twice)
        with shared_trees():
            prime_import_sites(getattr(self._code, "code_cache", None), release.modules)
            plan = self._plan(release)
            prepared = self._code.prepare(release, force=force)
        with self._lock:
            self._set("_pending", (prepared, plan))
        return prepared

    def unpack(self, release: Release) -> Any:
        """The loader's :meth:`~node_agent.loader.Loader.unpack`, the import sites
        the package check reads included."""
        cache = getattr(self._code, "code_cache", None)
        return self._code.unpack(release, lambda: prime_import_sites(cache, release.modules))

    def abort(self, prepared: Any) -> None:
        with self._lock:
            if self._pending is not None and self._pending[0] is prepared:
                self._set("_pending", None)
        self._code.abort(prepared)

    # --------------------------------------------------------------- finish
    def finish(self, prepared: Any, *, at: float = 0.0) -> Any:
        with self._lock:
            pending = self._pending
            self._set("_pending", None)
        plan = pending[1] if pending is not None and pending[0] is prepared else None
        if plan is None:  # prepared elsewhere (cannot happen through prepare): plan it now
            plan = self._plan(prepared.release)
        report = self._code.finish(prepared, at=at)
        if not plan.writes:
            self._set("_backup", None)
            return report
        done: list[_Write] = []
        try:
            for write in plan.writes:
                _put(write.target, write.content)
                done.append(write)
        except OSError as exc:
            for write in reversed(done):
                if write.restore:
                    _put(write.target, write.before)
            self._code.rollback()
            error = ModuleError(
                prepared.release.label,
                Reason.BAD_RELEASE,
                f"cannot write the data file {write.target}: {exc}; the previous code and"
                " files are back",
            )
            raise FinishError([error], restored=True) from exc
        self._set("_backup", [w for w in plan.writes if w.restore])
        return report

    def rollback(self, *, at: float = 0.0) -> Any:
        report = self._code.rollback(at=at)
        backup = self._backup
        self._set("_backup", None)
        for write in reversed(backup or []):
            try:
                _put(write.target, write.before)
            except OSError as exc:  # the code is back; say loudly which file is not
                log.error("rollback could not restore the data file %s: %s", write.target, exc)
        return report

    def make_permanent(self) -> None:
        self._code.make_permanent()
        self._set("_backup", None)
