"""The WebSocket route of last resort: a path no app routes is closed with 4404, not a 500.

Channels' ``URLRouter`` raises ``ValueError`` for a path it cannot route; daphne logs the
traceback and answers the handshake with 500, which clients treat as a server fault and
retry. Hosts add ``websocket_not_found`` as their last route instead. It accepts, then closes
with 4404 at once: the code chat uses for a room that does not exist, which clients know as
"do not reconnect" (a denied handshake would reach browsers as a bare 1006, retried forever).
Nothing is read and no traceback is logged.
"""

from __future__ import annotations

from typing import Any, cast

from django.urls import URLPattern, re_path

NOT_FOUND_CLOSE_CODE = 4404


async def websocket_not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI app: accept a WebSocket that no route matched, then close it with 4404."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": NOT_FOUND_CLOSE_CODE})


def not_found_route() -> URLPattern:
    """A route matching every path: put it last in the host's WebSocket URLRouter."""
    # Channels routes ASGI apps with Django's URL patterns; the stubs only know views.
    return re_path(r"", cast(Any, websocket_not_found))
