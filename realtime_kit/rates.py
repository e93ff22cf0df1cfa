"""Per-user rate quotas that hold across processes: "at most N per window" in a sliding window.

Usage::

    starts = UserRate(
        "panel-starts",
        store=lambda: StoreConfig(app_settings.REDIS_URL, app_settings.REDIS_KEY_PREFIX),
        limit=lambda: app_settings.PANEL_RATE_LIMIT,
        window_seconds=lambda: app_settings.PANEL_RATE_LIMIT_WINDOW_SECONDS,
        fail_open=False,
    )
    wait = await starts.hit(user.pk)  # 0.0: counted; else seconds until one is allowed

Counted in this process's memory (URL ``""``) or in Redis, like ``realtime_kit.leases``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from .leases import StoreConfig
from .limit_stores import StoreUnavailable, rate_store

__all__ = ["StoreUnavailable", "UserRate"]

logger = logging.getLogger(__name__)


class UserRate:
    """At most ``limit()`` events per user in any ``window_seconds()``, under one name."""

    def __init__(
        self,
        name: str,
        *,
        store: Callable[[], StoreConfig],
        limit: Callable[[], int],
        window_seconds: Callable[[], float],
        fail_open: bool,
    ) -> None:
        self.name = name
        self._config = store
        self._limit = limit
        self._window_seconds = window_seconds
        self.fail_open = fail_open

    def key(self, user_id: int) -> str:
        return self._config().key(self.name, user_id)

    async def hit(self, user_id: int) -> float:
        """Count one event of the user: 0.0 when allowed, else the seconds to wait.

        A refused event does not count. When the store is unreachable: 0.0 if ``fail_open``,
        else ``StoreUnavailable``.
        """
        config = self._config()
        store = rate_store(config.url)
        try:
            return await store.hit(
                config.key(self.name, user_id),
                uuid.uuid4().hex,
                self._limit(),
                self._window_seconds(),
            )
        except StoreUnavailable:
            if not self.fail_open:
                raise
            logger.warning("Rate store unavailable: allowing %s without counting", self.name)
            return 0.0
