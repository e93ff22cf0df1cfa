"""Settings of the chat app: one prefixed object, read lazily so override_settings works.

Every setting is documented in docs/settings.md. Hosts set them in their Django settings as
``CHAT_<NAME>``; nothing here is read at import time.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings


class ChatSettings:
    prefix = "CHAT_"

    def _get(self, name: str, default: Any) -> Any:
        return getattr(settings, self.prefix + name, default)

    @property
    def HISTORY_LIMIT(self) -> int:
        """Messages sent on connect when the client gives no ``after``."""
        return int(self._get("HISTORY_LIMIT", 50))

    @property
    def MAX_TEXT_LENGTH(self) -> int:
        """Longest message text, in characters."""
        return int(self._get("MAX_TEXT_LENGTH", 4000))

    @property
    def MAX_FRAME_BYTES(self) -> int:
        """Largest WebSocket message the consumer accepts, in bytes (UTF-8)."""
        return int(self._get("MAX_FRAME_BYTES", 64 * 1024))

    @property
    def MAX_FRAMES_PER_MESSAGE(self) -> int:
        """Most frames a client may batch in one WebSocket message (a JSON array)."""
        return int(self._get("MAX_FRAMES_PER_MESSAGE", 50))

    @property
    def RATE_LIMIT_MESSAGES(self) -> int:
        """Messages a user may send (all rooms together) per rate window."""
        return int(self._get("RATE_LIMIT_MESSAGES", 10))

    @property
    def RATE_LIMIT_WINDOW_SECONDS(self) -> float:
        """Length of the sliding rate-limit window, in seconds."""
        return float(self._get("RATE_LIMIT_WINDOW_SECONDS", 5.0))

    @property
    def REPLAY_BATCH_SIZE(self) -> int:
        """Messages per database page and per WebSocket message when replaying history."""
        return int(self._get("REPLAY_BATCH_SIZE", 200))


app_settings = ChatSettings()
