"""One call that wires a host's ASGI application: HTTP and WebSockets, as the apps need them.

Written by hand, the wiring has five parts that each fail only at runtime when forgotten
(issue 13): the settings module (daphne exits with ``ImproperlyConfigured``), static files
(chat.js 404 without a proxy), the auth middleware (every socket closed with 4401), the origin
validator (a foreign page's socket accepted with the user's cookie) and the route of last
resort (an unknown path a handshake 500). ``realtime_kit.checks`` inspects the application
``ASGI_APPLICATION`` names and reports each missing part, whether it came from here or not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from django.urls import URLPattern, URLResolver


def get_asgi_application(
    settings_module: str | None = None,
    websocket_urlpatterns: Sequence[URLPattern | URLResolver] = (),
    serve_static: bool | None = None,
) -> Any:
    """The host's ASGI application: Django for HTTP, the apps' consumers for WebSockets.

    ``settings_module`` becomes ``DJANGO_SETTINGS_MODULE`` unless the environment sets it.
    ``websocket_urlpatterns`` are the host's own WebSocket routes, tried before the apps'.
    ``serve_static``: serve ``STATIC_URL`` from the finders (development; default
    ``settings.DEBUG``); in production let the proxy serve ``STATIC_ROOT``.
    """
    if settings_module:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    # Populates the app registry: consumers import models, so they are imported after this.
    from django.core.asgi import get_asgi_application as django_asgi_application

    django_app = django_asgi_application()

    from channels.routing import ProtocolTypeRouter, URLRouter
    from django.apps import apps
    from django.conf import settings

    from .backpressure import DaphneBackpressure
    from .not_found import not_found_route
    from .origin import CsrfOriginValidator
    from .session_auth import SessionAuthMiddleware

    http_app: Any = django_app
    if serve_static if serve_static is not None else settings.DEBUG:
        from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

        http_app = ASGIStaticFilesHandler(django_app)
    routes: list[URLPattern | URLResolver] = list(websocket_urlpatterns)
    if apps.is_installed("chat"):
        from chat.routing import get_websocket_urlpatterns

        routes += get_websocket_urlpatterns()
    return ProtocolTypeRouter(
        {
            # Streaming responses (exports, SSE) wait for slow clients instead of filling
            # daphne's write buffer; under other servers it passes straight through.
            "http": DaphneBackpressure(http_app),
            # Django's CSRF origin rule for handshakes (realtime_kit/origin.py), the session
            # user in scope["user"] (AuthMiddlewareStack's, in one layer; the host's own
            # consumers also get its scope["cookies"]), and 4404 for a path no route matches.
            "websocket": CsrfOriginValidator(
                SessionAuthMiddleware(
                    URLRouter([*routes, not_found_route()]),
                    cookies=bool(websocket_urlpatterns),
                )
            ),
        }
    )
