"""Errors raised by the node-side loader.

They subclass :class:`hotfleet.HotfleetError`, so every one of them carries the
full list of per-module :class:`hotfleet.ModuleError` entries.
"""

from __future__ import annotations

from collections.abc import Iterable

from hotfleet.errors import HotfleetError, ModuleError


class PrepareError(HotfleetError):
    """``prepare`` refused the release; nothing visible changed."""


class FinishError(HotfleetError):
    """A state migration raised while finishing (or rolling back).

    The only way a finish can fail after a successful prepare.  ``restored``
    says the loader put the previous version back by itself, so the process
    runs exactly what it ran before the call.
    """

    def __init__(
        self, errors: Iterable[ModuleError], message: str | None = None, *, restored: bool
    ) -> None:
        super().__init__(errors, message)
        self.restored = restored


class LoaderStateError(HotfleetError):
    """A call that does not fit the loader's state (stale ``Prepared``, nothing to roll back)."""
