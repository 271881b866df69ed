"""An app (WSGI or ASGI) behind an agent's drain guard, with request metrics and ``/-/metrics``.

What :meth:`Agent.wsgi <node_agent.agent.Agent.wsgi>` and
:meth:`Agent.asgi <node_agent.agent.Agent.asgi>` return (see
:mod:`node_agent.drain` for the guards, :mod:`node_agent.asgi` for how a
long stream or a websocket meets a deploy).  Its own module so the agent
can wrap an app without importing the embedding code in
:mod:`node_agent.asgi`, which builds agents; both wrappers answer
``/-/metrics`` the same way, with the agent's Prometheus text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from node_agent.drain import ASGIMiddleware, WSGIMiddleware

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from node_agent.agent import Agent

__all__ = [
    "METRICS_PATH",
    "ASGIApp",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "agent_asgi",
    "agent_wsgi",
]

METRICS_PATH = "/-/metrics"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def agent_wsgi(agent: Agent, app: WSGIApplication) -> WSGIApplication:
    """``app`` (WSGI) behind ``agent``'s drain guard, with request metrics and ``/-/metrics``."""
    guarded = WSGIMiddleware(app, agent.loader.barrier, agent.metrics.observe)

    def agent_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == METRICS_PATH:
            body = agent.prometheus().encode()
            start_response(
                "200 OK",
                [("Content-Type", METRICS_CONTENT_TYPE), ("Content-Length", str(len(body)))],
            )
            return [body]
        return guarded(environ, start_response)

    return agent_app


def agent_asgi(agent: Agent, app: ASGIApp) -> ASGIApp:
    """``app`` (ASGI) behind ``agent``'s drain guard, with request metrics and ``/-/metrics``."""
    guarded = ASGIMiddleware(app, agent.loader.barrier, agent.metrics.observe)

    async def agent_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http" and scope.get("path") == METRICS_PATH:
            body = (await asyncio.to_thread(agent.prometheus)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", METRICS_CONTENT_TYPE.encode()),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await guarded(scope, receive, send)

    agent_app.hotfleet_agent = agent  # type: ignore[attr-defined]
    return agent_app
