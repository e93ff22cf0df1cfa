"""Session authentication for WebSockets in one layer: ``scope["user"]`` and ``scope["session"]``.

Channels' ``AuthMiddlewareStack`` is three middlewares (cookies, session, auth), and a socket
holds all three for as long as it is open: a copy of the scope per layer, a wrapper around
``send`` and its state, every cookie parsed into a dict (~3 KiB per idle socket: 34.5 -> 31.5
KiB, docs/benchmarks.md). For a WebSocket the stack does no more than this middleware: read
the session cookie, load the session and resolve the user once, at connect, with Channels' own
``get_user`` (the session's backend, the session auth hash, an invalid session flushed). Its
session wrapper saves a modified session only on an HTTP response, never on a WebSocket.

``scope["session"]`` is the session store for that key and ``scope["user"]`` the user or
``AnonymousUser``, as under the stack; with ``cookies=True`` ``scope["cookies"]`` is every
cookie too (``get_asgi_application`` asks for it when the host adds routes of its own, whose
consumers may read it). A scope that already has a user and a session passes through.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from channels.auth import AuthMiddleware, get_user
from django.conf import settings
from django.http.cookie import parse_cookie

__all__ = ["SessionAuthMiddleware", "handshake_cookies"]


def handshake_cookies(scope: dict[str, Any]) -> dict[str, str]:
    """The cookies of the handshake, parsed as Django parses a request's (every ``Cookie``
    header, in order: a later value of a name wins)."""
    values = [
        value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"cookie"
    ]
    return parse_cookie("; ".join(values)) if values else {}


class SessionAuthMiddleware(AuthMiddleware):
    """``AuthMiddlewareStack``'s ``scope["session"]`` and ``scope["user"]`` in one layer.

    A subclass of Channels' ``AuthMiddleware``, so that checks looking for it (this package's
    ``realtime_kit.E003``) find it."""

    def __init__(self, inner: Any, *, cookies: bool = False) -> None:
        super().__init__(inner)
        self.cookies = cookies

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        if "user" in scope and "session" in scope:
            return await self.inner(scope, receive, send)
        scope = dict(scope)
        cookies = handshake_cookies(scope)
        if self.cookies:
            scope["cookies"] = cookies
        store = import_module(settings.SESSION_ENGINE).SessionStore
        scope["session"] = store(cookies.get(settings.SESSION_COOKIE_NAME))
        scope["user"] = await get_user(scope)
        return await self.inner(scope, receive, send)
