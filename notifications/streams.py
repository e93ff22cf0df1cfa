"""One SSE stream: replay after Last-Event-ID, then live events, without gaps or duplicates.

Ordering guarantee: the stream subscribes to the hub *before* reading the database, so every
notification committed after that read reaches it as a live ``Range``. ``synced`` is an id such
that every notification of the user up to it has been sent (or was already there when a client
without Last-Event-ID connected: those are in the unread count). A range at or below ``synced``
is a duplicate and dropped; a range that starts above it is a gap, filled from the database
first. Clients thus get each notification once, in id order.

When the process drains for a restart (``realtime_kit.drain``), the hub ends every
subscription: the stream stops at an event boundary and its response ends normally, so the
browser reconnects after ``retry`` with the last id it received and the replay sends the rest.

Every database read of a stream is ``detached`` (``realtime_kit.threads``): it runs on the
process's shared database thread, not on the request's own thread, which would keep an open
connection per stream for as long as the stream lasts.

Concurrent streams are counted per user by a ``realtime_kit`` lease per stream, under
``<NOTIFICATIONS_REDIS_KEY_PREFIX>:streams:<user id>``: in this process, or for every process
when ``NOTIFICATIONS_REDIS_URL`` is set. The view refuses streams beyond
``NOTIFICATIONS_MAX_STREAMS_PER_USER``. The cap fails open: when Redis is down streams are
admitted (and counted once it is back), because the bell must not stop working for everyone
over a cap that only guards against runaway clients.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from django.db import DatabaseError

from realtime_kit import drain, sse
from realtime_kit.leases import Lease, StoreConfig, UserLimit
from realtime_kit.metrics import metrics
from realtime_kit.threads import detached, release_request_thread

from . import protocol, services
from .conf import app_settings
from .hub import Ended, Range, Subscription, UnreadChanged, get_hub

logger = logging.getLogger(__name__)


def _store() -> StoreConfig:
    return StoreConfig.from_settings(app_settings)


streams_cap = UserLimit(
    "streams", store=_store, limit=lambda: app_settings.MAX_STREAMS_PER_USER, fail_open=True
)


class TooManyStreams(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"At most {limit} notification streams per user.")
        self.limit = limit


async def reserve(user_id: int) -> Lease:
    """Take one of the user's stream places or raise TooManyStreams.

    Give it back with ``release_soon()`` (idempotent; the store is told in the background, so
    it is safe in finalizers)."""
    lease = await streams_cap.acquire(user_id, uuid.uuid4().hex)
    if lease is None:
        raise TooManyStreams(streams_cap.limit)
    return lease


def active_streams(user_id: int | None = None) -> int:
    """Streams open in this process (of one user, or of everyone)."""
    return streams_cap.held_here(user_id)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8")


class NotificationStream:
    def __init__(self, user_id: int, last_event_id: int | None, lease: Lease) -> None:
        self.user_id = user_id
        self.last_event_id = last_event_id
        self.lease = lease
        self.synced = 0

    async def events(self) -> AsyncIterator[bytes]:
        """The response body. Ends when the client leaves; cleans up in ``finally``."""
        hub = get_hub()
        sub: Subscription | None = None
        gauge = metrics().sse_streams_open
        gauge.inc()
        try:
            # The request's own thread is idle from here on (every read below is detached):
            # ending it saves ~22 KiB per held stream.
            release_request_thread()
            # Headers and the first bytes go out at once (daphne sends headers with the body).
            yield _bytes(sse.encode_retry(app_settings.RETRY_MILLISECONDS))
            sub = await hub.subscribe(self.user_id)
            async for chunk in self._start():
                yield chunk
            async for chunk in self._live(sub):
                yield chunk
        except DatabaseError:
            # End the response cleanly: the client reconnects with Last-Event-ID after retry.
            logger.warning("Notification stream of user %s ended", self.user_id, exc_info=True)
        finally:
            gauge.dec()
            if sub is not None:
                await hub.unsubscribe(sub)
            self.lease.release_soon()

    async def _start(self) -> AsyncIterator[bytes]:
        # The horizon first: a row committed after it is either in the unread state below or
        # (if later still) arrives live; it is never in neither.
        horizon = await detached(services.alatest_id())
        state = await detached(services.aunread_state(self.user_id))
        yield _bytes(protocol.unread_event(state.count, state.last_id))
        if self.last_event_id is None:
            self.synced = horizon
            return
        self.synced = min(self.last_event_id, horizon)
        async for chunk in self._fetch(horizon):
            yield chunk

    async def _fetch(self, upto: int) -> AsyncIterator[bytes]:
        """Send the user's notifications in (synced, upto] from the database, in batches."""
        batch = max(app_settings.REPLAY_BATCH_SIZE, 1)
        while self.synced < upto:
            events = await detached(
                services.aevents_between(self.user_id, self.synced, upto, batch)
            )
            if events:
                metrics().notifications_delivered.inc(len(events))
                yield _bytes("".join(protocol.notification_event(i, d) for i, d in events))
            if len(events) < batch:
                break
            self.synced = events[-1][0]
        self.synced = max(self.synced, upto)

    async def _live(self, sub: Subscription) -> AsyncIterator[bytes]:
        if drain.draining():
            return  # the hub may have ended its streams before this one subscribed
        loop = asyncio.get_running_loop()
        keepalive = app_settings.KEEPALIVE_SECONDS
        last_write = loop.time()
        while True:
            try:
                # Measured from the last write: ranges that send nothing do not count.
                async with asyncio.timeout(max(last_write + keepalive - loop.time(), 0)):
                    item = await sub.get()
            except TimeoutError:
                yield _bytes(protocol.keepalive())
                last_write = loop.time()
                continue
            if isinstance(item, Ended):
                return
            async for chunk in self._handle(item):
                yield chunk
                last_write = loop.time()

    async def _handle(self, item: Range | UnreadChanged) -> AsyncIterator[bytes]:
        if isinstance(item, UnreadChanged):
            state = await detached(services.aunread_state(self.user_id))
            yield _bytes(protocol.unread_event(state.count, state.last_id))
            return
        if item.upto <= self.synced:
            return
        if item.events is None or item.after > self.synced:
            # A gap (or a range the hub could not list): the database has the whole range.
            async for chunk in self._fetch(item.upto):
                yield chunk
            return
        fresh = [(i, d) for i, d in item.events if i > self.synced]
        self.synced = item.upto
        if fresh:
            metrics().notifications_delivered.inc(len(fresh))
            yield _bytes("".join(protocol.notification_event(i, d) for i, d in fresh))
