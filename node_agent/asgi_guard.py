"""An ASGI app behind an agent's drain guard, with request metrics and ``/-/metrics``.

What :meth:`node_agent.agent.Agent.asgi` returns (see :mod:`node_agent.asgi`
for what is guarded and how a long stream or a websocket meets a deploy).
Its own module so the agent can wrap an app without importing the
embedding code in :mod:`node_agent.asgi`, which builds agents.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from node_agent.drain import ASGIMiddleware

if TYPE_CHECKING:
    from node_agent.agent import Agent

__all__ = ["METRICS_PATH", "ASGIApp", "Message", "Receive", "Scope", "Send", "agent_asgi"]

METRICS_PATH = "/-/metrics"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def agent_asgi(agent: Agent, app: ASGIApp) -> ASGIApp:
    """``app`` behind ``agent``'s drain guard, with request metrics and ``/-/metrics``."""
    guarded = ASGIMiddleware(app, agent.loader.barrier, agent.metrics.observe)

    async def agent_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http" and scope.get("path") == METRICS_PATH:
            body = (await asyncio.to_thread(agent.prometheus)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await guarded(scope, receive, send)

    agent_app.hotfleet_agent = agent  # type: ignore[attr-defined]
    return agent_app
