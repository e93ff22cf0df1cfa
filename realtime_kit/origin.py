"""Same-origin check of WebSocket handshakes: exactly Django's CSRF origin rule.

Channels' ``AllowedHostsOriginValidator`` compares hosts only, so a page on any port or
scheme of an allowed host (``http://127.0.0.1:9999``, ``https://…``, another service on
``localhost``) could open a socket carrying the user's session cookie, while Django's CSRF
check refuses a POST from the same page. ``CsrfOriginValidator`` asks Django's own
``CsrfViewMiddleware`` instead, so HTTP and WebSockets follow one rule and one setting
(``CSRF_TRUSTED_ORIGINS``): the ``Origin`` must be the handshake's own
``scheme://host[:port]`` (``ws`` counting as ``http``, ``wss`` as ``https``;
``SECURE_PROXY_SSL_HEADER`` and ``USE_X_FORWARDED_HOST`` apply when configured, as they do
for HTTP), or match an entry of ``CSRF_TRUSTED_ORIGINS`` (``https://*.example.com`` included).

Two refusals go beyond what ``_origin_verified`` itself decides. A ``Host`` that
``ALLOWED_HOSTS`` refuses, as for HTTP, where ``CommonMiddleware`` answers 400 before any
view. And a handshake without ``Origin``, where HTTP would fall back to the CSRF token that a
handshake cannot carry: browsers always send ``Origin`` on WebSocket handshakes (RFC 6455
§4.1), and only browsers attach the session cookie on their own; a client without one is a
script that can send any ``Origin`` it likes, so refusing it costs that client one header and
keeps the rule "must match" with no exception.
"""

from __future__ import annotations

import io
from typing import Any

from channels.security.websocket import WebsocketDenier
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

Scope = dict[str, Any]

# The HTTP scheme whose origin a WebSocket scheme stands for (ASGI: "ws" when absent).
HTTP_SCHEME_OF = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def handshake_request(scope: Scope) -> HttpRequest:
    """The handshake as the GET request Django would see (headers, server, scheme; no body)."""
    scheme = HTTP_SCHEME_OF.get(str(scope.get("scheme") or "ws"), "http")
    http_scope = {**scope, "type": "http", "method": "GET", "scheme": scheme}
    return ASGIRequest(http_scope, io.BytesIO())


def _no_response(request: HttpRequest) -> HttpResponse:
    raise AssertionError("only the origin check of the middleware is used")


def origin_allowed(scope: Scope) -> bool:
    """Whether Django's CSRF check would accept this handshake's ``Origin`` on a POST."""
    request = handshake_request(scope)
    if "HTTP_ORIGIN" not in request.META:
        return False
    try:
        request.get_host()
    except DisallowedHost:
        return False
    # A fresh middleware per handshake: it caches CSRF_TRUSTED_ORIGINS on first use, which
    # would outlive override_settings; building it costs two list comprehensions.
    # _origin_verified is private, but it is the one place Django keeps this rule (unchanged
    # since Django 4.0); tests/test_origin.py pins its behaviour, so a change fails loudly.
    middleware = CsrfViewMiddleware(_no_response)
    return bool(middleware._origin_verified(request))  # type: ignore[attr-defined]


class CsrfOriginValidator:
    """ASGI middleware: deny (HTTP 403) a WebSocket handshake whose Origin CSRF would refuse."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and not origin_allowed(scope):
            # Closing before accepting makes daphne answer the handshake with 403.
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
