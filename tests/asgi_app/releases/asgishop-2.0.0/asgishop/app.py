"""ASGI app with a lifespan background task (supervised), a websocket and a long stream.

Routes: ``GET /versions``, ``GET /tick`` (what the background task last wrote
and how often it restarted), ``GET /stream?s=SECONDS`` (a chunk every 0.1 s),
websocket ``/ws`` (echoes each message with the version that answered).
``app`` is wrapped by ``node_agent.asgi.hotfleet_app``: under ``uvicorn
--workers N`` each worker is a participant; under gunicorn's uvicorn worker
with ``node_agent.gunicorn`` the wrapper passes through.
"""

import asyncio
import json
import os

from node_agent import asupervise
from node_agent.asgi import hotfleet_app

VERSION = "2"
TICKS = {"version": None, "count": 0, "starts": 0}


async def ticker():
    TICKS["starts"] += 1
    while True:
        TICKS["version"] = "2"
        TICKS["count"] += 1
        await asyncio.sleep(0.05)


async def _json(send, body, status=200):
    data = json.dumps({**body, "version": VERSION, "pid": os.getpid()}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            asupervise(ticker, name="ticker")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _websocket(receive, send):
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text") or ""
        await send(
            {"type": "websocket.send", "text": json.dumps({"echo": text, "version": VERSION})}
        )


async def _stream(scope, send):
    seconds = float((scope.get("query_string") or b"s=1").decode().partition("=")[2] or 1)
    version = VERSION.encode()  # the version this response started on, to its end
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(int(seconds * 10)):
        await send({"type": "http.response.body", "body": version, "more_body": True})
        await asyncio.sleep(0.1)
    await send({"type": "http.response.body", "body": b""})


async def inner(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "websocket":
        await _websocket(receive, send)
    elif scope["path"] == "/tick":
        await _json(send, {"TICKS": dict(TICKS)})
    elif scope["path"] == "/stream":
        await _stream(scope, send)
    else:
        await _json(send, {})


app = hotfleet_app(inner)
