from __future__ import annotations

from typing import Any

from django.apps import apps
from django.http import HttpRequest


def realtime_apps(request: HttpRequest) -> dict[str, Any]:
    """Which of the apps this site installed (the layout shows the bell only with one)."""
    return {
        "has_chat": apps.is_installed("chat"),
        "has_notifications": apps.is_installed("notifications"),
    }
