"""The per-process hub: the only channel-layer consumer of the notifications app.

Each process (event loop) runs at most one hub while it has open streams. The hub joins one
layer group, receives every batch published by ``services.notify`` (from any process) and hands
each recipient's part to the local streams of that user; it also polls the database every
``NOTIFICATIONS_POLL_SECONDS`` for rows nobody told it about (another process without a shared
layer, a message Redis dropped). A broadcast therefore costs one layer message per batch and one
poll query per process, never one per recipient or per stream.

What the hub hands a stream is a ``Range``: "the user's notifications with
``after < id <= upto`` are exactly ``events``" (``events`` None: unknown, read the database).
The stream compares ``after`` with what it has sent to find gaps; see streams.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import sys
from dataclasses import dataclass
from typing import Any

from channels.layers import BaseChannelLayer, get_channel_layer

from realtime_kit.loops import per_loop

from . import protocol, services
from .conf import app_settings

logger = logging.getLogger(__name__)

POLL_BATCH_SIZE = 1000
LAYER_RETRY_SECONDS = 1.0
# A Range.after larger than any id: the stream must read the range from the database.
UNKNOWN_START = sys.maxsize


@dataclass(frozen=True)
class Range:
    after: int
    upto: int
    events: list[services.Event] | None


@dataclass(frozen=True)
class UnreadChanged:
    pass


@dataclass(frozen=True)
class Ended:
    """The stream must end now (the process is draining); the client resumes elsewhere."""


Item = Range | UnreadChanged | Ended


class Subscription:
    """One stream's inbox. Bounded: on overflow it collapses into "read the database".

    A deque and, while the stream waits, one future: not an ``asyncio.Queue`` (three deques
    and an Event each, ~2.4 KiB) for an inbox that is empty almost all the time."""

    def __init__(self, user_id: int, limit: int) -> None:
        self.user_id = user_id
        self.limit = max(limit, 2)
        self._items: collections.deque[Item] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._unread_pending = False
        self._ended = False

    def end(self) -> None:
        """Make ``get`` return ``Ended`` from now on, before anything still queued."""
        if self._ended:
            return
        self._ended = True
        self._wake()

    def put(self, item: Item) -> None:
        if self._ended:
            return
        if isinstance(item, UnreadChanged):
            if self._unread_pending:
                return
            self._unread_pending = True
        if len(self._items) >= self.limit:
            self._collapse(item)
        else:
            self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _collapse(self, item: Item) -> None:
        # A stream that cannot keep up gets one database read instead of unbounded memory.
        upto = item.upto if isinstance(item, Range) else 0
        for queued in self._items:
            if isinstance(queued, Range):
                upto = max(upto, queued.upto)
        self._items.clear()
        if upto:
            self._items.append(Range(UNKNOWN_START, upto, None))
        if self._unread_pending:
            self._items.append(UnreadChanged())

    async def get(self) -> Item:
        # Whatever is still queued is in the database: the resumed stream reads it there.
        while not self._ended and not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._ended:
            return Ended()
        item = self._items.popleft()
        if isinstance(item, UnreadChanged):
            self._unread_pending = False
        return item

    def pending(self) -> int:
        return len(self._items)


class Hub:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._subs: dict[int, set[Subscription]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._layer: BaseChannelLayer | None = None
        self._channel: str | None = None
        self._horizon = 0
        self._poll_now = asyncio.Event()
        self.running = False

    # --- streams -------------------------------------------------------------------------

    async def subscribe(self, user_id: int) -> Subscription:
        """Register a stream; from now on every notification of the user reaches it."""
        async with self._lock:
            if not self.running:
                await self._start()
            sub = Subscription(user_id, app_settings.STREAM_QUEUE_LIMIT)
            self._subs.setdefault(user_id, set()).add(sub)
            return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        """Forget a stream; the last one out stops the hub (leaves the group, ends its tasks)."""
        async with self._lock:
            subs = self._subs.get(sub.user_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.user_id]
            if not self._subs and self.running:
                await self._stop()

    def subscriptions(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    def end_streams(self) -> None:
        """End every stream of this hub (the process is draining)."""
        for subs in self._subs.values():
            for sub in subs:
                sub.end()

    # --- lifecycle -----------------------------------------------------------------------

    async def _start(self) -> None:
        try:
            # Read the horizon before joining: rows committed in between are found by the poll.
            self._horizon = await services.alatest_id()
            layer = get_channel_layer(app_settings.CHANNEL_LAYER)
            if layer is not None:
                self._layer = layer
                channel = await layer.new_channel("notifications.hub.")
                self._channel = channel
                await layer.group_add(services.GROUP, channel)
            # The tasks outlive the request that started the hub: give them a fresh context,
            # not the request's (its thread-sensitive executor is shut down when it ends).
            loop = asyncio.get_running_loop()
            context = contextvars.Context()
            if layer is not None:
                receiver = self._receive_loop(layer, channel)
                self._tasks.append(loop.create_task(receiver, context=context))
            self._tasks.append(loop.create_task(self._poll_loop(), context=context))
            self.running = True
        except BaseException:
            await self._stop()
            raise

    async def _stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        layer, channel = self._layer, self._channel
        self._layer = self._channel = None
        self.running = False
        if layer is not None and channel is not None:
            try:
                await layer.group_discard(services.GROUP, channel)
            except Exception:
                logger.exception("Leaving the notifications group failed")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- layer -----------------------------------------------------------------------------

    async def _receive_loop(self, layer: BaseChannelLayer, channel: str) -> None:
        while True:
            try:
                message = await layer.receive(channel)
            except Exception:
                logger.exception("Receiving notifications from the channel layer failed")
                await asyncio.sleep(LAYER_RETRY_SECONDS)
                continue
            try:
                self.dispatch(message)
            except Exception:
                logger.exception("Dropping a malformed notifications message")

    def dispatch(self, message: dict[str, Any]) -> None:
        """Hand one layer message to the local streams it concerns."""
        kind = message.get("type")
        if kind == protocol.LAYER_BATCH:
            self._dispatch_batch(message)
        elif kind == protocol.LAYER_UNREAD:
            for user_id in message.get("users", []):
                for sub in self._subs.get(int(user_id), ()):
                    sub.put(UnreadChanged())
        elif kind == protocol.LAYER_POLL:
            self._poll_now.set()
        else:
            logger.warning("Ignoring a notifications message of type %r", kind)

    def _dispatch_batch(self, message: dict[str, Any]) -> None:
        tail = message.get("tail")
        if not isinstance(tail, str):
            raise ValueError("tail must be a string")
        for item in protocol.parse_batch_items(message.get("items")):
            subs = self._subs.get(item.user_id)
            if not subs:
                continue
            data = protocol.notification_json(item.notification_id, tail)
            events = [(item.notification_id, data)]
            for sub in subs:
                sub.put(Range(item.previous_id, item.notification_id, events))

    # --- database poll ---------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), app_settings.POLL_SECONDS)
            self._poll_now.clear()
            try:
                more = await self.poll_once()
            except Exception:
                logger.warning("Polling for notifications failed", exc_info=True)
                continue
            if more:
                self._poll_now.set()

    async def poll_once(self) -> bool:
        """Look for rows committed since the last look; return True if there may be more."""
        users = set(self._subs)
        before = self._horizon
        result = await services.apoll(before, users, POLL_BATCH_SIZE)
        if result.horizon <= before:
            return False
        self._horizon = result.horizon
        for user_id, subs in self._subs.items():
            # Streams that arrived during the query were not asked about: unknown for them.
            events = result.events.get(user_id, []) if user_id in users else None
            item = Range(before, result.horizon, events)
            for sub in subs:
                sub.put(item)
        return result.more


_hubs = per_loop(Hub)


async def end_streams() -> None:
    """Drain callback: end the streams of the running loop's hub, if it has one."""
    hub = _hubs.peek()
    if hub is not None:
        hub.end_streams()


def get_hub() -> Hub:
    """The hub of the running event loop (one per process under daphne)."""
    return _hubs.get()
