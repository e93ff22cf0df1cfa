from __future__ import annotations

from django.urls import re_path

from .consumers import ChatConsumer

websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<slug>[-a-zA-Z0-9_]+)/$", ChatConsumer.as_asgi()),
]
