"""Settings of the notifications app: one prefixed object, read lazily so override_settings works.

Every setting is documented in docs/settings.md. Hosts set them in their Django settings as
``NOTIFICATIONS_<NAME>``; nothing here is read at import time.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings


class NotificationsSettings:
    prefix = "NOTIFICATIONS_"

    def _get(self, name: str, default: Any) -> Any:
        return getattr(settings, self.prefix + name, default)

    @property
    def KEEPALIVE_SECONDS(self) -> float:
        """Idle time after which a stream sends a ``: keepalive`` comment."""
        return float(self._get("KEEPALIVE_SECONDS", 15.0))

    @property
    def POLL_SECONDS(self) -> float:
        """How often each process looks in the database for notifications it was not told of.

        The fallback for notifications sent by another process without a shared channel layer
        (``manage.py notify`` next to ``make run``) and for pub/sub messages Redis dropped.
        """
        return float(self._get("POLL_SECONDS", 2.0))

    @property
    def MAX_STREAMS_PER_USER(self) -> int:
        """Concurrent streams of one user (all processes with REDIS_URL); more get 429."""
        return int(self._get("MAX_STREAMS_PER_USER", 10))

    @property
    def REDIS_URL(self) -> str:
        """Redis where the stream cap is counted for every process ('' : in this process)."""
        return str(self._get("REDIS_URL", "") or "")

    @property
    def REDIS_KEY_PREFIX(self) -> str:
        """Prefix of those Redis keys (to share one Redis between sites)."""
        return str(self._get("REDIS_KEY_PREFIX", "notifications:limits"))

    @property
    def LEASE_TTL_SECONDS(self) -> float:
        """How long a crashed process's streams keep counting against the cap, in seconds."""
        return float(self._get("LEASE_TTL_SECONDS", 30.0))

    @property
    def RETRY_MILLISECONDS(self) -> int:
        """The ``retry:`` reconnection delay sent to EventSource clients."""
        return int(self._get("RETRY_MILLISECONDS", 3000))

    @property
    def REPLAY_BATCH_SIZE(self) -> int:
        """Notifications per database page when replaying after ``Last-Event-ID``."""
        return int(self._get("REPLAY_BATCH_SIZE", 200))

    @property
    def BATCH_SIZE(self) -> int:
        """Recipients per INSERT (and per broadcast message) in ``notify()``."""
        return int(self._get("BATCH_SIZE", 1000))

    @property
    def LIST_LIMIT(self) -> int:
        """Notifications in ``GET /notifications/`` when the client gives no ``limit``."""
        return int(self._get("LIST_LIMIT", 20))

    @property
    def STREAM_QUEUE_LIMIT(self) -> int:
        """Undelivered events one stream may buffer before it falls back to the database."""
        return int(self._get("STREAM_QUEUE_LIMIT", 1000))

    @property
    def CHANNEL_LAYER(self) -> str:
        """Alias of the channel layer that carries notifications between processes."""
        return str(self._get("CHANNEL_LAYER", "default"))


app_settings = NotificationsSettings()
