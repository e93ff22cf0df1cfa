"""Leases and rate windows in Redis, shared by every process of a deployment.

Leases: one sorted set per key, member = holder id, score = expiry (milliseconds, Redis
clock). Each operation is one Lua script, so "drop expired, count, add" is atomic however many
processes race. Why a sorted set: expired leases of a crashed process go in one
ZREMRANGEBYSCORE, counting is ZCARD, and a refresh is a ZADD per lease; plain keys with TTLs
would need a SCAN to count.

Rate windows: one sorted set per key, member = event id, score = when it happened.

Time comes from Redis (``TIME`` inside the scripts, allowed since Redis 5 with effect
replication, the only mode of Redis 7), so processes on hosts whose clocks disagree still
agree on expiry. Each key also carries a Redis TTL covering its newest entry, so a key nobody
touches any more disappears by itself.

A Redis restart without persistence loses every lease. Until each holder's keeper refreshes
(at most a third of the TTL later, see ``realtime_kit.leases``) keys count too few and may
admit up to ``limit`` extra leases; the refresh re-creates the lost ones, so the count is the
truth again, possibly above the limit until enough are released.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Sequence
from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .base import BaseLeaseStore, BaseRateStore, LeaseRef, StoreUnavailable

# A request waits at most this long for Redis: a user opening a stream should not hang
# while Redis is unreachable (the caller then fails open or closed, its choice).
REDIS_TIMEOUT_SECONDS = 2.0
# Leases per script call of a refresh: long scripts block Redis for everyone meanwhile.
REFRESH_CHUNK_LEASES = 500

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# The key lives as long as its longest-lived entry.
_EXTEND_KEY = """
local function extend(key, until_ms, ttl_ms)
  if redis.call('PTTL', key) < ttl_ms then redis.call('PEXPIREAT', key, until_ms) end
end
"""

# KEYS[1] lease set; ARGV holder, limit, ttl_ms. Returns 1 (held) or 0 (full).
ACQUIRE_LUA = (
    _NOW_MS
    + _EXTEND_KEY
    + """
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
extend(KEYS[1], now + ttl, ttl)
return 1
"""
)

# KEYS lease sets; ARGV ttl_ms, then the holder of each key. Returns how many were missing.
REFRESH_LUA = (
    _NOW_MS
    + _EXTEND_KEY
    + """
local ttl = tonumber(ARGV[1])
local missing = 0
for i, key in ipairs(KEYS) do
  local score = redis.call('ZSCORE', key, ARGV[i + 1])
  if (not score) or tonumber(score) <= now then missing = missing + 1 end
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  extend(key, now + ttl, ttl)
end
return missing
"""
)

# KEYS[1] lease set. Returns the live leases.
COUNT_LUA = (
    _NOW_MS
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)

# KEYS[1] event set; ARGV event id, limit, window_ms. Returns 0 (counted) or the wait in ms.
HIT_LUA = (
    _NOW_MS
    + """
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(tonumber(oldest[2]) + window - now, 1)
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""
)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class _Connection:
    """A client of one event loop and the scripts registered on it."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            # One immediate retry replaces a pooled connection that a Redis restart broke;
            # the default backs off for seconds, which a request cannot wait.
            retry=Retry(NoBackoff(), 1),
        )
        self.acquire = self.client.register_script(ACQUIRE_LUA)
        self.refresh = self.client.register_script(REFRESH_LUA)
        self.count = self.client.register_script(COUNT_LUA)
        self.hit = self.client.register_script(HIT_LUA)


# url -> event loop -> connection. A redis connection cannot be shared between event loops
# (tests and management commands run their own); the lease and rate stores of one URL share.
_connections: dict[str, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Connection]] = {}


def _connection(url: str) -> _Connection:
    loop = asyncio.get_running_loop()
    per_loop = _connections.setdefault(url, weakref.WeakKeyDictionary())
    connection = per_loop.get(loop)
    if connection is None:
        connection = per_loop[loop] = _Connection(url)
    return connection


async def _close(url: str) -> None:
    connection = _connections.get(url, weakref.WeakKeyDictionary()).pop(
        asyncio.get_running_loop(), None
    )
    if connection is not None:
        await connection.client.aclose()


class _RedisStore:
    def __init__(self, url: str) -> None:
        self.url = url

    def _connection(self) -> _Connection:
        return _connection(self.url)

    async def close(self) -> None:
        await _close(self.url)


def _unavailable(exc: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"Redis: {exc.__class__.__name__}: {exc}")


class RedisLeaseStore(_RedisStore, BaseLeaseStore):
    async def acquire(self, key: str, holder_id: str, limit: int, ttl_seconds: float) -> bool:
        try:
            held = await self._connection().acquire([key], [holder_id, limit, _ms(ttl_seconds)])
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return bool(held)

    async def release(self, key: str, holder_id: str) -> None:
        try:
            await self._connection().client.zrem(key, holder_id)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def refresh(self, leases: Sequence[LeaseRef], ttl_seconds: float) -> int:
        if not leases:
            return 0
        connection = self._connection()
        ttl_ms = _ms(ttl_seconds)
        chunks = [
            leases[i : i + REFRESH_CHUNK_LEASES]
            for i in range(0, len(leases), REFRESH_CHUNK_LEASES)
        ]
        try:
            async with connection.client.pipeline(transaction=False) as pipe:
                for chunk in chunks:
                    keys = [lease.key for lease in chunk]
                    args = [ttl_ms, *(lease.holder_id for lease in chunk)]
                    await connection.refresh(keys, args, client=pipe)
                results: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return sum(int(missing) for missing in results)

    async def count(self, key: str) -> int:
        try:
            return int(await self._connection().count([key]))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc


class RedisRateStore(_RedisStore, BaseRateStore):
    async def hit(self, key: str, event_id: str, limit: int, window_seconds: float) -> float:
        try:
            wait_ms = await self._connection().hit([key], [event_id, limit, _ms(window_seconds)])
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return int(wait_ms) / 1000
