"""Presence entries in Redis, shared by every daphne process.

One sorted set per room: member = the entry's identity (connection id, user id, username),
score = its expiry time. Why a sorted set: a heartbeat is one ZADD per room for all of a
process's sockets, listing the live entries is one ZRANGEBYSCORE from ``now``, and expired
entries of a crashed process go in one ZREMRANGEBYSCORE, all O(log N) per entry. Plain keys
with TTLs would need a SCAN to list a room; hash fields cannot expire on their own in Redis 7.0.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from typing import Any

from redis import asyncio as aioredis

from ..conf import app_settings
from ..presence import Entry
from .base import BasePresenceStore, Snapshot


def _member(entry: Entry) -> str:
    return json.dumps([entry.conn_id, entry.user_id, entry.username], separators=(",", ":"))


def _entry(member: bytes | str, score: float) -> Entry:
    conn_id, user_id, username = json.loads(member)
    return Entry(conn_id=conn_id, user_id=int(user_id), username=username, expires_at=score)


class RedisPresenceStore(BasePresenceStore):
    def __init__(self) -> None:
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> Any:
        # One client per event loop: a redis connection cannot be shared between loops
        # (management commands and tests run their own).
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            url = app_settings.PRESENCE_REDIS_URL
            client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            self._clients[loop] = client
        return client

    def _key(self, room_id: int) -> str:
        return f"{app_settings.PRESENCE_KEY_PREFIX}:room:{room_id}"

    def _epoch_key(self) -> str:
        return f"{app_settings.PRESENCE_KEY_PREFIX}:epoch"

    async def add(self, room_id: int, entries: list[Entry]) -> None:
        if not entries:
            return
        key = self._key(room_id)
        async with self._client().pipeline(transaction=False) as pipe:
            pipe.zadd(key, {_member(e): e.expires_at for e in entries})
            # A room nobody heartbeats any more disappears as a whole.
            pipe.expire(key, int(app_settings.PRESENCE_TIMEOUT_SECONDS * 2) + 1)
            await pipe.execute()

    async def remove(self, room_id: int, entry: Entry) -> None:
        await self._client().zrem(self._key(room_id), _member(entry))

    async def snapshot(self, room_id: int, now: float) -> Snapshot:
        key = self._key(room_id)
        async with self._client().pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zrangebyscore(key, now, "+inf", withscores=True)
            pipe.set(self._epoch_key(), uuid.uuid4().hex, nx=True)
            pipe.get(self._epoch_key())
            _, rows, _, epoch = await pipe.execute()
        entries = [_entry(member, score) for member, score in rows]
        return Snapshot(entries=entries, epoch=epoch.decode() if epoch else "")

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()
