"""The part of hotfleet that lives inside every worker process.

Public API (kept small on purpose):

* :class:`Loader` — prepare / finish / abort / rollback of whole releases;
* :class:`DrainBarrier`, :class:`WSGIMiddleware`, :class:`ASGIMiddleware` —
  mark guarded work so a finish is atomic for it;
* :func:`register` — stateful objects migrated by ``code_change``;
* the errors :class:`PrepareError`, :class:`FinishError`, :class:`LoaderStateError`.
"""

from node_agent.drain import ASGIMiddleware, DrainBarrier, WSGIMiddleware
from node_agent.errors import FinishError, LoaderStateError, PrepareError
from node_agent.loader import (
    FinishReport,
    Loader,
    ModuleChange,
    ModuleState,
    ModuleStatus,
    Prepared,
    PreparedState,
    ReleaseInfo,
)
from node_agent.stateful import register, unregister

__all__ = [
    "ASGIMiddleware",
    "DrainBarrier",
    "FinishError",
    "FinishReport",
    "Loader",
    "LoaderStateError",
    "ModuleChange",
    "ModuleState",
    "ModuleStatus",
    "PrepareError",
    "Prepared",
    "PreparedState",
    "ReleaseInfo",
    "WSGIMiddleware",
    "register",
    "unregister",
]
