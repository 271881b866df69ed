"""Structured failures shared by every part of hotfleet.

A refusal must tell an operator *which* node, *which* module and *why*, in a
form a script can branch on.  So every failure carries a list of
:class:`ModuleError` entries whose ``reason`` is a stable :class:`Reason` code
(the same strings travel over gRPC and land in etcd), never just a message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum


class Reason(StrEnum):
    """Why a module was refused; the codes are part of the wire contract."""

    DIGEST_MISMATCH = "digest_mismatch"
    BADFILE = "badfile"
    NAME_MISMATCH = "name_mismatch"
    DUPLICATED = "duplicated"
    STICKY = "sticky"
    IMPORT_ERROR = "import_error"
    MISSING_DEPENDENCY = "missing_dependency"
    INCOMPATIBLE_CHANGE = "incompatible_change"
    NOT_PURGED = "not_purged"
    CODE_CHANGE_FAILED = "code_change_failed"
    TIMEOUT = "timeout"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    BAD_RELEASE = "bad_release"
    # the node did not answer (down, partitioned, deadline): nothing wrong with the release
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class ModuleError:
    """One refusal: the module it concerns, a reason code and a human detail.

    ``node`` is empty on the node itself and filled in by whoever aggregates
    errors from several nodes (the agent, the coordinator).
    """

    module: str
    reason: Reason
    detail: str
    node: str = ""

    def on_node(self, node: str) -> ModuleError:
        return replace(self, node=node)

    def __str__(self) -> str:
        where = f"{self.node}: " if self.node else ""
        return f"{where}{self.module}: {self.reason.value}: {self.detail}"


class HotfleetError(Exception):
    """Base of every error hotfleet raises on purpose.

    It always carries ``errors`` so that callers can report every problem at
    once instead of the first one only.
    """

    def __init__(self, errors: Iterable[ModuleError], message: str | None = None) -> None:
        self.errors: list[ModuleError] = list(errors)
        text = message or "; ".join(str(e) for e in self.errors) or type(self).__name__
        super().__init__(text)

    @property
    def reasons(self) -> set[Reason]:
        return {e.reason for e in self.errors}


class ReleaseError(HotfleetError):
    """A release bundle that cannot even be read (bad manifest, bad archive)."""
