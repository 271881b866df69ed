"""The coordinator's refusal: a request it will not start, with a code scripts branch on."""

from __future__ import annotations

from hotfleet.errors import HotfleetError, ModuleError, Reason
from hotfleet.protocol import Refusal

__all__ = ["Refused"]


class Refused(HotfleetError):
    """A request the coordinator will not start; nothing changed anywhere."""

    def __init__(self, code: Refusal, message: str, *, leader: str = "") -> None:
        super().__init__([ModuleError("*", Reason.BAD_RELEASE, message)], message)
        self.code = code
        self.leader = leader
