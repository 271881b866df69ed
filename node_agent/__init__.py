"""The part of hotfleet that lives inside every worker process.

Public API (kept small on purpose):

* :class:`Loader` — prepare / finish / abort / rollback of whole releases;
* :class:`DrainBarrier`, :class:`WSGIMiddleware`, :class:`ASGIMiddleware` —
  mark guarded work so a finish is atomic for it;
* :func:`register` — stateful objects migrated by ``code_change``;
* :func:`supervise` / :func:`asupervise` — background threads and asyncio tasks
  stopped at a safe point and restarted on the new code at every switch
  (:mod:`node_agent.supervision`);
* the errors :class:`PrepareError`, :class:`FinishError`, :class:`LoaderStateError`;
* :class:`Agent` (in :mod:`node_agent.agent`) — the whole node agent embedded in
  an app: loader, gRPC server, etcd membership, metrics.  Imported lazily, so
  application code that only calls :func:`register` does not load gRPC.
"""

import os
from typing import TYPE_CHECKING, Any

# The loader forks a staging process for every prepare that runs release code
# (node_agent._rehearsal).  gRPC core's own fork handlers, on by default, crash
# such a child of a process that serves gRPC (SIGSEGV in threading._after_fork);
# the child never uses gRPC, so they are switched off unless the host chose.
# Read by gRPC core when it initializes: before the agent's first server.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

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
from node_agent.supervision import asupervise, supervise

if TYPE_CHECKING:
    from node_agent.agent import Agent


def __getattr__(name: str) -> Any:
    if name == "Agent":
        from node_agent.agent import Agent

        return Agent
    raise AttributeError(f"module 'node_agent' has no attribute {name!r}")


__all__ = [
    "ASGIMiddleware",
    "Agent",
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
    "asupervise",
    "register",
    "supervise",
    "unregister",
]
