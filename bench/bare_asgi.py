"""The floor: a bare ASGI app on the same server, no framework between the socket and send().

WebSocket (any path): every connection's ``send`` callable sits in one dict; a received text
message is broadcast as it is (the client's frame is already encoded JSON, so nothing is
encoded per recipient) to every connection, the sender included (its echo).
HTTP: ``/healthz`` answers ok; ``/events/`` opens a Server-Sent Events stream that sends one
comment and then holds the connection until the client leaves.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BroadcastApp:
    def __init__(self) -> None:
        self.sockets: dict[int, Send] = {}
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self.websocket(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)

    async def websocket(self, receive: Receive, send: Send) -> None:
        key = next(self._ids)
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.connect":
                    await send({"type": "websocket.accept"})
                    self.sockets[key] = send
                elif message["type"] == "websocket.receive" and message.get("text"):
                    out = {"type": "websocket.send", "text": message["text"]}
                    for socket_send in list(self.sockets.values()):
                        await socket_send(out)
                elif message["type"] == "websocket.disconnect":
                    return
        finally:
            self.sockets.pop(key, None)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/events/":
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        status, body = (200, b"ok") if scope["path"] == "/healthz" else (404, b"not found")
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


application = BroadcastApp()
