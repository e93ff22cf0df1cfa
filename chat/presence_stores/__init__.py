"""Where presence entries live. Chosen by the ``CHAT_PRESENCE_STORE`` dotted-path setting.

``memory.MemoryPresenceStore`` serves one process (the embedded default);
``redis.RedisPresenceStore`` is shared by every process of a deployment.
"""

from __future__ import annotations

from django.utils.module_loading import import_string

from ..conf import app_settings
from .base import BasePresenceStore, Snapshot

__all__ = ["BasePresenceStore", "Snapshot", "get_store"]

_store: BasePresenceStore | None = None
_store_path: str | None = None


def get_store() -> BasePresenceStore:
    """Return the configured store, created on first use (never at import time)."""
    global _store, _store_path
    path = app_settings.PRESENCE_STORE
    if _store is None or _store_path != path:
        cls = import_string(path)
        _store = cls()
        _store_path = path
    return _store
