"""Per-user limits of chat, counted for every process when ``CHAT_REDIS_URL`` is set.

Without it (the embedded default) each process counts its own users, which is exact for one
process. The counters are ``realtime_kit`` leases (a place held while something runs,
expiring ``CHAT_LEASE_TTL_SECONDS`` after its process stops refreshing it) and sliding
windows. Every key lives under ``CHAT_REDIS_KEY_PREFIX``; the assistant's three limits are in
chat/assistant/quotas.py, on the same store:

- ``<prefix>:sockets:<user id>``: open chat WebSockets (``sockets``). Fails **open**: the cap
  only guards against a runaway client, and Redis being down must not lock people out.
- ``<prefix>:edits:<user id>``: message edits and deletes in the rate window (``edits``).
  Fails **open**: an edit costs one small transaction, like a message.
- ``<prefix>:exports:<user id>``: exports downloading (``exports``). An export keeps a thread
  and, while its reader keeps up, a database connection busy. Fails **open**, like sockets.
- ``<prefix>:searches:<user id>``: searches in the rate window (``searches``). A search is the
  costliest read a user can ask for (a substring scan on a big room takes seconds). Fails
  **open**, like edits: Redis being down must not take search away.

The consumer holds a socket's place from connect to disconnect::

    lease = await quotas.sockets.acquire(user.pk, self.channel_name)  # None: at the cap
    ...
    if lease is not None:
        await lease.release()  # in disconnect(); idempotent
"""

from __future__ import annotations

from realtime_kit.leases import StoreConfig, StoreUnavailable, UserLimit
from realtime_kit.rates import UserRate

from .conf import app_settings

__all__ = ["StoreUnavailable", "edits", "exports", "searches", "sockets", "store"]


def store() -> StoreConfig:
    """The store every chat limit counts in (read at each call: settings stay lazy)."""
    return StoreConfig.from_settings(app_settings)


sockets = UserLimit(
    "sockets", store=store, limit=lambda: app_settings.MAX_SOCKETS_PER_USER, fail_open=True
)

exports = UserLimit(
    "exports",
    store=store,
    limit=lambda: app_settings.EXPORT_MAX_CONCURRENT_PER_USER,
    fail_open=True,
)

edits = UserRate(
    "edits",
    store=store,
    limit=lambda: app_settings.EDIT_RATE_LIMIT,
    window_seconds=lambda: app_settings.EDIT_RATE_LIMIT_WINDOW_SECONDS,
    fail_open=True,
)

searches = UserRate(
    "searches",
    store=store,
    limit=lambda: app_settings.SEARCH_RATE_LIMIT,
    window_seconds=lambda: app_settings.SEARCH_RATE_LIMIT_WINDOW_SECONDS,
    fail_open=True,
)
