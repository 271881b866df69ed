"""Running a release's code where nothing else can see it yet.

New modules execute in module objects that are not in ``sys.modules``, and
changed statements of loaded modules execute in a copy of their namespace.
Imports performed by that code must see the *staged* versions of the release's
other modules, so staged code gets a private ``__builtins__`` whose
``__import__`` answers release modules from the stage and everything else
from the real import system.  Once the stage is committed (or dropped) the hook
just forwards to the real ``__import__``.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import importlib.util
import linecache
import types
from collections.abc import Callable, Mapping
from typing import Any

_real_import = builtins.__import__


class StagedView(types.SimpleNamespace):
    """What staged code sees in place of a *loaded* module of the release.

    Attribute reads come from the staged namespace first and fall back to the
    real module; after staging every view bound by staged code is replaced by
    the real module object (:meth:`Stage.unview`).
    """

    def __init__(self, module: types.ModuleType, namespace: dict[str, Any]) -> None:
        object.__setattr__(self, "_hf_module", module)
        object.__setattr__(self, "_hf_ns", namespace)

    def __getattribute__(self, name: str) -> Any:
        ns = object.__getattribute__(self, "_hf_ns")
        if name in ns:
            return ns[name]
        return getattr(object.__getattribute__(self, "_hf_module"), name)


class _SourceLoader(importlib.machinery.SourcelessFileLoader):
    """A loader that answers ``get_source`` from the release, for tracebacks and inspect."""

    def __init__(self, fullname: str, path: str, source: bytes) -> None:
        super().__init__(fullname, path)
        self._source = source

    def get_source(self, fullname: str) -> str:  # type: ignore[override]
        return self._source.decode("utf-8", "replace")


def register_source(filename: str, source: bytes) -> None:
    """Make tracebacks show the release's lines, not whatever is on disk."""
    text = source.decode("utf-8", "replace")
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)


class Stage:
    """The isolated import world of one prepare."""

    def __init__(self, real_import: Callable[..., Any] = _real_import) -> None:
        self.active = True
        self._real_import = real_import
        self.modules: dict[str, types.ModuleType] = {}  # staged new modules
        self.views: dict[str, StagedView] = {}  # loaded modules being updated
        self.pending: dict[str, Callable[[], None]] = {}  # staged modules not executed yet
        self.builtins: dict[str, Any] = dict(vars(builtins))
        self.builtins["__import__"] = self._import

    # -- the import hook ---------------------------------------------------
    def _lookup(self, name: str) -> Any:
        if name in self.pending:
            self.pending.pop(name)()
        if name in self.modules:
            return self.modules[name]
        if name in self.views:
            return self.views[name]
        return None

    def _import(
        self,
        name: str,
        globals: Mapping[str, Any] | None = None,
        locals: Mapping[str, Any] | None = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> Any:
        if not self.active:
            return self._real_import(name, globals, locals, fromlist, level)
        if level:
            package = (globals or {}).get("__package__") or ""
            absname = importlib.util.resolve_name("." * level + name, package) if name else ""
            if not name:
                absname = importlib.util.resolve_name("." * level, package)
        else:
            absname = name
        if not self._touches(absname):
            return self._real_import(name, globals, locals, fromlist, level)
        parts = absname.split(".")
        for i in range(1, len(parts) + 1):  # import parents first, as Python does
            prefix = ".".join(parts[:i])
            if self._lookup(prefix) is None:
                self._real_import(prefix)
        if fromlist:
            children = {}
            for item in fromlist:
                if item != "*":
                    child = self._lookup(f"{absname}.{item}")
                    if child is not None:
                        children[item] = child
            parent = self._resolve(absname)
            if children and isinstance(parent, types.ModuleType) and absname not in self.modules:
                return StagedView(parent, children)  # `from loaded_pkg import new_submodule`
            return parent
        return self._resolve(parts[0]) if not level else self._resolve(absname)

    def _touches(self, absname: str) -> bool:
        staged = self.modules.keys() | self.views.keys()
        parts = absname.split(".")
        return any(".".join(parts[:i]) in staged for i in range(1, len(parts) + 1)) or any(
            s.startswith(absname + ".") for s in staged
        )

    def _resolve(self, name: str) -> Any:
        found = self._lookup(name)
        if found is not None:
            return found
        import sys

        return sys.modules[name]

    # -- staging -----------------------------------------------------------
    def new_module(
        self, name: str, filename: str, source: bytes, is_package: bool, search_path: list[str]
    ) -> types.ModuleType:
        """A module object for a module the process has not loaded yet."""
        module = types.ModuleType(name)
        loader = _SourceLoader(name, filename, source)
        spec = importlib.util.spec_from_file_location(
            name,
            filename,
            loader=loader,
            submodule_search_locations=search_path if is_package else None,
        )
        assert spec is not None
        module.__spec__ = spec
        module.__loader__ = loader
        module.__file__ = filename
        module.__package__ = name if is_package else name.rpartition(".")[0]
        if is_package:
            module.__path__ = list(search_path)
        module.__dict__["__builtins__"] = self.builtins
        self.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent in self.modules:
            setattr(self.modules[parent], child, module)
        register_source(filename, source)
        return module

    def view(self, module: types.ModuleType, namespace: dict[str, Any]) -> StagedView:
        v = StagedView(module, namespace)
        self.views[module.__name__] = v
        return v

    def unview(self, namespace: dict[str, Any]) -> None:
        """Replace views (and the private builtins) bound by staged code with real objects."""
        for key, value in list(namespace.items()):
            if isinstance(value, StagedView):
                namespace[key] = object.__getattribute__(value, "_hf_module")

    def close(self) -> None:
        """From now on the hook is a plain forwarder to the real ``__import__``."""
        self.active = False
        self.pending.clear()
