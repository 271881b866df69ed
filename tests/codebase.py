"""A throwaway application package for loader tests.

Each test gets its own uniquely named top-level package on a fresh code path,
so tests never see each other's modules, and everything it imported is
removed from ``sys.modules`` afterwards.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from hotfleet.release import Release
from node_agent import Loader

if TYPE_CHECKING:
    from node_agent.errors import PrepareError


class Codebase:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pkg = f"hfapp_{uuid.uuid4().hex[:10]}"
        (root / self.pkg).mkdir(parents=True)
        (root / self.pkg / "__init__.py").write_text("")
        sys.path.insert(0, str(root))
        self.loader = Loader([root], drain_timeout=2.0)

    def write(self, files: dict[str, str]) -> None:
        """Write ``{module: source}`` (module relative to the package) as boot code."""
        for mod, src in files.items():
            path = self.root / self.pkg / (mod.replace(".", "/") + ".py")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(src))

    def boot(self, files: dict[str, str]) -> dict[str, ModuleType]:
        """Write boot code, import it, and let the loader take its baseline."""
        self.write(files)
        mods = {m: importlib.import_module(f"{self.pkg}.{m}") for m in files}
        self.loader = Loader([self.root], drain_timeout=2.0)
        return mods

    def release(self, version: str, files: dict[str, str], **kw: object) -> Release:
        sources = {f"{self.pkg}.{m}": textwrap.dedent(s) for m, s in files.items()}
        modules = kw.pop("modules", None)
        if modules is not None:
            modules = {f"{self.pkg}.{m}": v for m, v in modules.items()}  # type: ignore[attr-defined]
        return Release.from_sources("app", version, sources, modules=modules, **kw)  # type: ignore[arg-type]

    def prepare_cancelled(self, release: Release, after_s: float) -> PrepareError:
        """Prepare ``release`` while another thread cancels it after ``after_s``; the refusal.

        Asserts the prepare came back promptly (well before any deadline the
        test set), since an Abort must never wait for what it cancels.
        """
        # here: bare interpreters import this module without pytest or the package's
        # __init__ (test_coverage's other-interpreter scenario)
        import pytest

        from node_agent.errors import PrepareError

        timer = threading.Timer(after_s, self.loader.cancel_prepare)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(PrepareError) as err:
                self.loader.prepare(release)
        finally:
            timer.cancel()
            timer.join()
        assert time.monotonic() - started < after_s + 4.5
        assert "cancelled" in err.value.errors[0].detail
        return err.value

    def upgrade(self, version: str, files: dict[str, str], **kw: object):  # type: ignore[no-untyped-def]
        prepared = self.loader.prepare(self.release(version, files, **kw))
        return self.loader.finish(prepared)

    def module(self, mod: str) -> ModuleType:
        return sys.modules[f"{self.pkg}.{mod}"]

    def close(self) -> None:
        for name in [n for n in sys.modules if n == self.pkg or n.startswith(self.pkg + ".")]:
            del sys.modules[name]
        if str(self.root) in sys.path:
            sys.path.remove(str(self.root))
