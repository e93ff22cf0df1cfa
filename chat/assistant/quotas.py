"""Per-user limits of the assistant, counted for every process when ``CHAT_REDIS_URL`` is set.

Built like chat's other limits (chat/quotas.py: the same store and key prefix). The keys, under
``CHAT_REDIS_KEY_PREFIX``:

- ``<prefix>:assistant-replies:<user id>``: running room replies (``room_replies``).
- ``<prefix>:panel-streams:<user id>``: open private panel streams (``panel_streams``).
- ``<prefix>:panel-starts:<user id>``: panel starts in the rate window (``panel_starts``).

All three fail **closed** (``StoreUnavailable``; callers answer ``unavailable``): each admitted
request costs a model call, and an outage of the store must not become unlimited spending.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from realtime_kit.leases import Lease, StoreUnavailable, UserLimit
from realtime_kit.rates import UserRate

from ..conf import app_settings
from ..quotas import store

__all__ = [
    "BUSY",
    "RATE_LIMITED",
    "UNAVAILABLE",
    "Refused",
    "StoreUnavailable",
    "acquire_panel_stream",
    "panel_starts",
    "panel_streams",
    "room_replies",
]

BUSY = "assistant_busy"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"
# Seconds a client refused for a busy slot (or a store outage) should wait before retrying.
BUSY_RETRY_AFTER_SECONDS = 1.0
UNAVAILABLE_RETRY_AFTER_SECONDS = 5.0


room_replies = UserLimit(
    "assistant-replies",
    store=store,
    limit=lambda: app_settings.ASSISTANT_MAX_CONCURRENT_PER_USER,
    fail_open=False,
)
panel_streams = UserLimit(
    "panel-streams",
    store=store,
    limit=lambda: app_settings.ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER,
    fail_open=False,
)
panel_starts = UserRate(
    "panel-starts",
    store=store,
    limit=lambda: app_settings.ASSISTANT_PANEL_RATE_LIMIT,
    window_seconds=lambda: app_settings.ASSISTANT_PANEL_RATE_LIMIT_WINDOW_SECONDS,
    fail_open=False,
)


@dataclass(frozen=True)
class Refused:
    code: str  # BUSY, RATE_LIMITED or UNAVAILABLE
    retry_after_seconds: float


async def acquire_panel_stream(user_id: int) -> Lease | Refused:
    """Hold one of the user's panel streams and count its start, or say why not.

    The open-streams cap is checked first, so a start refused as busy does not use up the
    rate window; a start refused by the rate gives its stream place back.
    """
    try:
        lease = await panel_streams.acquire(user_id, uuid.uuid4().hex)
    except StoreUnavailable:
        return Refused(UNAVAILABLE, UNAVAILABLE_RETRY_AFTER_SECONDS)
    if lease is None:
        return Refused(BUSY, BUSY_RETRY_AFTER_SECONDS)
    try:
        wait = await panel_starts.hit(user_id)
    except StoreUnavailable:
        await lease.release()
        return Refused(UNAVAILABLE, UNAVAILABLE_RETRY_AFTER_SECONDS)
    except BaseException:
        await lease.release()
        raise
    if wait > 0:
        await lease.release()
        return Refused(RATE_LIMITED, wait)
    return lease
