"""What the participant speaks: the states it reports, the code it drives, its calls and answers.

Why apart from :mod:`node_agent.participant`: the state machine there is the
part to read closely; these are the nouns everyone else shares with it: the
agent's wire translation, the simulated agents of the scale benchmark and the
protocol tests build :class:`PrepareCall` and read :class:`Vote` and
:class:`Outcome`, and :class:`Code` is what a loader (or a simulation of one)
must provide.  Plain values and protocols: no behaviour, no wire, no etcd.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hotfleet.errors import ModuleError
from node_agent.loader import FinishReport, ReleaseInfo

__all__ = [
    "Change",
    "Code",
    "DecisionWatch",
    "Outcome",
    "Permanence",
    "Plan",
    "PrepareCall",
    "State",
    "Vote",
]


class State(enum.StrEnum):
    """What the node is doing; reported as-is in Status and membership."""

    STARTING = "starting"
    RECONCILING = "reconciling"
    RECONCILE_FAILED = "reconcile_failed"
    IDLE = "idle"
    PREPARING = "preparing"
    PREPARED = "prepared"
    FINISHING = "finishing"
    ROLLING_BACK = "rolling_back"
    STOPPING = "stopping"


class Plan(Protocol):
    """A staged release, as :meth:`Code.prepare` returns it."""

    @property
    def changes(self) -> Sequence[Any]: ...  # each has .module, .kind, .details

    @property
    def warnings(self) -> Sequence[str]: ...


class Code(Protocol):
    """The code a participant switches (the loader, or a simulation of it)."""

    @property
    def current_release(self) -> ReleaseInfo | None: ...

    @property
    def previous_release(self) -> ReleaseInfo | None: ...

    @property
    def permanent_release(self) -> ReleaseInfo | None: ...

    @property
    def can_rollback(self) -> bool: ...

    def prepare(self, release: Any, *, force: bool = False) -> Any: ...

    def finish(self, prepared: Any, *, at: float = 0.0) -> FinishReport:
        """Switch to ``prepared``; with ``at`` (unix time), everything but the hold
        happens first and the hold begins at that instant."""
        ...

    def abort(self, prepared: Any) -> None: ...

    def rollback(self, *, at: float = 0.0) -> FinishReport: ...

    def make_permanent(self) -> None: ...

    def cancel_prepare(self) -> None: ...


class DecisionWatch(Protocol):
    """Something that reads the rollout's decision while it is prepared (the agent's etcd watch).

    ``commit_at`` is the commit instant the decision it hands over names
    (unix time; 0 when it names none).
    """

    stopped: threading.Event
    commit_at: float

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def grace_over(self) -> bool: ...


@dataclass(frozen=True)
class Change:
    """How prepare classified one module (what the vote reports)."""

    module: str
    kind: str
    detail: str = ""


@dataclass(frozen=True)
class PrepareCall:
    """A Prepare, as the participant needs it.

    ``obtain`` fetches and verifies the release (signature first); it raises
    :class:`HotfleetError` or ``ValueError`` to refuse it, and is called only
    when the release must really be staged (never for a replay).
    """

    rollout_id: str
    digest: str
    obtain: Callable[[], Any]
    label: str = ""  # name@version the coordinator names ("" for the boot code)
    rollback: bool = False  # a fleet rollback: the target may be in memory
    has_sources: bool = True  # the request carries a manifest the store can provide
    force: bool = False


@dataclass(frozen=True)
class Vote:
    ok: bool
    errors: tuple[ModuleError, ...] = ()
    changes: tuple[Change, ...] = ()
    warnings: tuple[str, ...] = ()
    prepare_s: float = 0.0
    current_release: str = ""


@dataclass(frozen=True)
class Outcome:
    """What a finish or rollback did here."""

    ok: bool
    errors: tuple[ModuleError, ...] = ()
    restored: bool = False  # a failed switch put the previous version back
    pause_s: float = 0.0
    release: str = ""  # what the node runs now
    warnings: tuple[str, ...] = ()
    finished_at: float = 0.0
    already: bool = False  # a replay of a finish done before
    drained: bool = True
    still_in_flight: int = 0
    digest: str = ""  # content digest of what the node runs now ("" for the boot code)
    # how long before the commit instant the switch was ready (negative: the commit
    # reached this node that late); None without an instant
    armed_ahead_s: float | None = None


@dataclass(frozen=True)
class Permanence:
    ok: bool
    permanent_release: str
    errors: tuple[ModuleError, ...] = ()
