"""Where per-user limits are counted, chosen by a URL: ``""`` for this process's memory,
``redis://`` (or ``rediss://``, ``unix://``) for a Redis shared by every process.

Stores are created on first use, never at import time; a Redis store opens its connection
lazily too, one per event loop.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .base import BaseLeaseStore, BaseRateStore, LeaseRef, StoreUnavailable

__all__ = [
    "REDIS_SCHEMES",
    "BaseLeaseStore",
    "BaseRateStore",
    "LeaseRef",
    "StoreUnavailable",
    "lease_store",
    "rate_store",
    "url_problem",
]

REDIS_SCHEMES = ("redis", "rediss", "unix")

_lease_stores: dict[str, BaseLeaseStore] = {}
_rate_stores: dict[str, BaseRateStore] = {}


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a store, or None when it can (for system checks)."""
    if url == "":
        return None
    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        return f"{url!r} is neither '' (in-process) nor a {'/'.join(REDIS_SCHEMES)}:// URL"
    return None


def lease_store(url: str) -> BaseLeaseStore:
    """The lease store of ``url`` (one per URL and process)."""
    store = _lease_stores.get(url)
    if store is None:
        from . import memory, redis

        store = _lease_stores[url] = (
            redis.RedisLeaseStore(url) if url else memory.MemoryLeaseStore()
        )
    return store


def rate_store(url: str) -> BaseRateStore:
    """The rate store of ``url`` (one per URL and process)."""
    store = _rate_stores.get(url)
    if store is None:
        from . import memory, redis

        store = _rate_stores[url] = redis.RedisRateStore(url) if url else memory.MemoryRateStore()
    return store
