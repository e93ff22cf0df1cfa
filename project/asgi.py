"""ASGI entry point: HTTP through Django, WebSockets through the apps' routers."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
# Populate the app registry before importing consumers (they import models).
django_asgi_app = get_asgi_application()

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from chat.backpressure import DaphneBackpressure  # noqa: E402

# Daphne serves no static files. This demo host serves them itself so `make run` needs
# nothing else; behind a proxy in production, let the proxy serve STATIC_ROOT instead.
# DaphneBackpressure makes streaming responses (exports) wait for slow clients instead of
# piling up in daphne's write buffer (docs/deployment.md).
http_app = DaphneBackpressure(ASGIStaticFilesHandler(django_asgi_app))

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

import chat.routing  # noqa: E402
from realtime_kit.not_found import not_found_route  # noqa: E402
from realtime_kit.origin import CsrfOriginValidator  # noqa: E402

# Handshakes get Django's CSRF origin rule (realtime_kit/origin.py); a path no app routes is
# closed with 4404 instead of a 500 (realtime_kit/not_found.py).
application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": CsrfOriginValidator(
            AuthMiddlewareStack(URLRouter([*chat.routing.websocket_urlpatterns, not_found_route()]))
        ),
    }
)
