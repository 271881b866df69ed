"""ASGI apps under hotfleet: :meth:`Agent.asgi` and an app wrapper for uvicorn ``--workers``.

:func:`agent_asgi` (what :meth:`node_agent.agent.Agent.asgi` returns) puts an
ASGI app behind the drain guard (:class:`~node_agent.drain.ASGIMiddleware`),
records request metrics and answers ``GET /-/metrics`` itself.

*What is guarded.*  An ``http`` request is one unit of work from its first
message to the end of its response, streaming included; a ``websocket`` is
one unit for the whole connection.  A finish closes the gate and waits for
the units inside; a long stream or an open websocket does not block a deploy
for longer than the drain timeout (``HOTFLEET_DRAIN_TIMEOUT``, ``--drain-timeout``):
the switch then happens with those units still inside, and the finish says so
(a warning naming how many were in flight, in the Finish reply and the
rollout record).  Such a unit keeps running the code it started with
until it ends, like any Erlang process; code it calls through a module
(``m.f()``) is the new code from the switch on.

*Lifespan* passes through unguarded: startup and shutdown are not requests.

:func:`hotfleet_app` makes an app a participant on its own, for servers whose
workers no hotfleet hook reaches (``uvicorn --workers N``)::

    # app.py
    from node_agent.asgi import hotfleet_app
    app = hotfleet_app(my_asgi_app)        # settings from HOTFLEET_* (node_agent.embed)

    $ HOTFLEET_DEV=1 HOTFLEET_CODE_PATH=. uvicorn --workers 3 app:app

At lifespan startup each worker claims a stable slot on the host (a lock file
that dies with the process), builds its agent and awaits
:meth:`~node_agent.agent.Agent.start_async`, which reconciles the code to the
fleet's release without blocking the event loop; only then does the app's own
startup run and the server take requests.  At shutdown the agent deregisters
first.  Under gunicorn with :mod:`node_agent.gunicorn` the worker already has
its agent and :func:`hotfleet_app` passes everything through.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from node_agent.app_guard import ASGIApp, Message, Receive, Scope, Send, agent_asgi

if TYPE_CHECKING:
    from node_agent.agent import Agent
    from node_agent.embed import SlotClaim

__all__ = ["agent_asgi", "current_agent", "hotfleet_app"]

log = logging.getLogger(__name__)

_agent: Agent | None = None  # the agent hotfleet_app started in this process


def current_agent() -> Agent | None:
    """The agent of this worker process, whichever integration started it."""
    if _agent is not None:
        return _agent
    from node_agent import gunicorn

    found: Agent | None = gunicorn.current_agent()
    return found


class hotfleet_app:
    """``app`` as a hotfleet participant of its own (module docstring); settings from the environment."""

    def __init__(self, app: ASGIApp, settings: Any = None) -> None:
        self.app = app
        self._settings = settings
        self._wrapped: ASGIApp | None = None
        self._agent: Agent | None = None
        self._claim: SlotClaim | None = None
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        global _agent
        async with self._lock:
            if self._wrapped is not None:
                return
            existing = current_agent()
            if existing is not None:  # gunicorn's hook already wrapped the app around us
                self._wrapped = self.app
                return
            from node_agent.embed import Settings, claim_slot

            settings = self._settings or Settings.from_env()
            self._claim = claim_slot(
                settings.slot_dir, f"{settings.node_id_template}-{settings.host}"
            )
            agent = settings.agent(self._claim.slot)
            await agent.start_async()
            self._agent = _agent = agent
            self._wrapped = agent.asgi(self.app)
            log.info(
                "hotfleet: ASGI worker slot %s is node %s (gRPC %s)",
                self._claim.slot,
                agent.node_id,
                agent.address,
            )

    async def _stop(self) -> None:
        global _agent
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent.stop_async()
            _agent = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self._wrapped is None:  # a server that runs no lifespan: start on the first request
            await self._start()
        assert self._wrapped is not None
        await self._wrapped(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        consumed = False

        async def wrapped_receive() -> Message:
            nonlocal consumed
            message = await receive()
            consumed = True
            if message.get("type") == "lifespan.startup":
                # before the app's own startup: its tasks start on the fleet's code
                await self._start()
            elif message.get("type") == "lifespan.shutdown":
                await self._stop()
            return message

        try:
            await self.app(scope, wrapped_receive, send)
        except Exception:
            if consumed:
                raise
            # the app does not speak lifespan: answer it ourselves, for the agent's sake
            await self._own_lifespan(receive, send)

    async def _own_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    raise
                await send({"type": "lifespan.startup.complete"})
            elif message.get("type") == "lifespan.shutdown":
                await self._stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
