"""Chat's WebSocket routes, under ``CHAT_WEBSOCKET_PREFIX`` (``ws/chat/`` by default)."""

from __future__ import annotations

import re
from typing import Any

from django.urls import URLPattern, re_path

from .conf import app_settings

# Room slugs as the model allows them (SlugField); anything else is no route (4404).
SLUG_PATTERN = r"(?P<slug>[-a-zA-Z0-9_]+)"


def get_websocket_urlpatterns() -> list[URLPattern]:
    """The routes of the chat consumer, read from the settings when called."""
    from .consumers import ChatConsumer

    prefix = re.escape(app_settings.WEBSOCKET_PREFIX)
    return [re_path(rf"^{prefix}{SLUG_PATTERN}/$", ChatConsumer.as_asgi())]


def room_ws_path(slug: str) -> str:
    """The path a browser opens for ``slug``'s socket (the room page puts it in the page)."""
    return f"/{app_settings.WEBSOCKET_PREFIX}{slug}/"


def __getattr__(name: str) -> Any:
    # `from chat.routing import websocket_urlpatterns` keeps working, with the setting applied.
    if name == "websocket_urlpatterns":
        return get_websocket_urlpatterns()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
