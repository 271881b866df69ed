"""What a prepare hands to finish, and what the loader reports: the loader's records.

:class:`Prepared` carries a staged release from
:func:`node_agent._prepare.plan_release` to the switch in
:mod:`node_agent._finish` (its private fields are the precomputed edits, the
new modules, the migrations and the ``from`` bindings to refresh);
:class:`Backup` is the journal that undoes the last switch.  The public ones
(:class:`ReleaseInfo`, :class:`FinishReport`, :class:`ModuleStatus`, ...) are
re-exported by :mod:`node_agent.loader`.  Data only: no behaviour beyond a property.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from hotfleet.release import Release
from node_agent._install import NewModule
from node_agent._patch import Op
from node_agent._prologue import Instrumented
from node_agent._update import ModulePlan


class ModuleState(enum.StrEnum):
    NOT_LOADED = "not_loaded"
    LOADED = "loaded"
    MODIFIED = "modified"
    REMOVED = "removed"


@dataclass(frozen=True)
class ModuleStatus:
    """What :meth:`~node_agent.loader.Loader.status` says of one module, compared by digest, never mtime."""

    module: str
    state: ModuleState
    release: str  # "name@version" of the release that loaded it, "" for the boot code
    loaded_digest: str
    disk_digest: str


@dataclass(frozen=True)
class ReleaseInfo:
    name: str
    version: str
    digest: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def of(cls, release: Release) -> ReleaseInfo:
        return cls(release.name, release.version, release.digest)


@dataclass(frozen=True)
class ModuleChange:
    """How prepare classified one module of the release."""

    module: str
    kind: str  # "new" | "updated" | "unchanged"
    details: tuple[str, ...] = ()


class PreparedState(enum.StrEnum):
    PREPARED = "prepared"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True)
class FinishReport:
    """What a finish or rollback did; ``pause_s`` is how long guarded work was held."""

    release: ReleaseInfo | None
    pause_s: float
    drained: bool
    still_in_flight: int
    migrated: int
    warnings: tuple[str, ...] = ()
    switched_at: float = 0.0  # wall-clock instant the new code became current (commit skew)
    changed_code: tuple[str, ...] = ()  # module:qualname of every function changed or added
    # scheduled at an instant: how long before it the hold was ready (negative: late);
    # the coordinator sets its next commit lead from the fleet's (coordinator.commitlead)
    armed_ahead_s: float | None = None


@dataclass
class Migration:
    obj: Any
    module: str
    extra: Any


@dataclass(frozen=True)
class Binding:
    """``holder.<local>`` was bound by ``from <module> import <attr>``."""

    holder: dict[str, Any]
    local: str


@dataclass
class Prepared:
    """A release staged by :meth:`~node_agent.loader.Loader.prepare`, ready to finish or abort."""

    release: Release
    order: list[tuple[str, ...]]
    changes: list[ModuleChange]
    warnings: list[str]
    prepare_s: float
    state: PreparedState = PreparedState.PREPARED
    report: FinishReport | None = None
    rehearsal_s: float = 0.0  # wall time of the staging process (0: nothing to run)
    rehearsal_cpu_s: float = 0.0  # its CPU
    # where the prepare's wall time went: step -> seconds (validate, purge_check, plan,
    # instrument, rehearse), plus the host code cache's hits/misses/waits of this prepare
    profile: dict[str, float] = field(default_factory=dict)
    _generation: int = 0
    _new: dict[str, NewModule] = field(default_factory=dict)
    _plans: dict[str, ModulePlan] = field(default_factory=dict)
    _migrations: list[Migration] = field(default_factory=list)
    _bindings: dict[tuple[str, str], list[Binding]] = field(default_factory=dict)
    # 3.11 only: counting twins of the changed modules' code (node_agent._prologue)
    _instrumented: dict[str, Instrumented] = field(default_factory=dict)

    @property
    def runs_code(self) -> bool:
        """Does finishing it execute any of the release's code (else it is pure patching)?

        ``NAME = <literal>`` statements execute nothing: their values were read
        off the tree in prepare and the switch only binds them, so a release
        that changes constants and function bodies needs no staging process
        (the usual hotfix: a fork saved on every worker of the fleet).
        """
        return bool(
            self._new
            or self._migrations
            or any(
                p.late_ops or any(st.literal is None for st in p.statements)
                for p in self._plans.values()
            )
        )


@dataclass
class Backup:
    """The previous version, in memory: the journal that undoes the last switch."""

    journal: list[Op]
    restores: ReleaseInfo | None
    leaves: ReleaseInfo | None
    migrations: list[Migration]
    loaded: dict[str, tuple[str, bytes, str]]
