"""The per-process presence hub: tracks this process's sockets, shares them through the store,
and sends each room's presence diffs to its local sockets.

Why a hub and not one broadcast per join: a join writes one store entry and publishes one tiny
"changed" event to the room's presence group, to which each *process* (not each socket)
subscribes. Each process then recomputes the room's presence at most every
``CHAT_PRESENCE_MIN_INTERVAL_SECONDS`` (one store read), and sends the diff, encoded once, to
its own sockets. A burst of joins costs O(N), not O(N²), and clients get a handful of frames.

Crash safety: entries expire unless heartbeated; every process sweeps its rooms regularly, so
the users of a SIGKILLed process disappear within ``CHAT_PRESENCE_TIMEOUT_SECONDS``. When the
store loses its data (a Redis restart changes its epoch) every process re-adds its own entries
and holds back leaves for a moment so nobody flickers offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from channels.layers import get_channel_layer

from realtime_kit.loops import per_loop

from . import protocol
from .conf import app_settings
from .presence import (
    Coalescer,
    Entry,
    RateGate,
    State,
    Timing,
    UserPresence,
    aggregate,
    diff,
    keep_leavers,
    with_connection,
)
from .presence_stores import BasePresenceStore, get_store
from .protocol import Encoded
from .ratelimit import SlidingWindow

logger = logging.getLogger(__name__)

# Receives each presence frame encoded once for every socket (``Encoded`` keeps its other
# formats once made, so a MessagePack socket costs one conversion per frame, not per socket).
Sender = Callable[[Encoded], Awaitable[None]]

# Relayed "started typing" per (room, user) per typing interval (each may be followed by one
# "stopped"): the bound on what [start, stop] x N from one client costs every member.
TYPING_STARTS_PER_INTERVAL = 4


def presence_group(room_id: int) -> str:
    """Channel-layer group of the hubs (one channel per process) holding sockets of a room."""
    return f"chat.presence.{room_id}"


@dataclass
class _Local:
    entry: Entry
    send: Sender
    # False once the socket has ended: its entry is not heartbeated and leaves at the sweep,
    # even if nothing called leave() (a crash the socket's own cleanup did not survive).
    alive: Callable[[], bool] = lambda: True


@dataclass
class _Room:
    coalescer: Coalescer
    local: dict[str, _Local] = field(default_factory=dict)
    state: State = field(default_factory=dict)
    known: bool = False
    # Local connections opened (+) and closed (-) per user since the last sync started, so a
    # new socket's presence_state has exact counts without a store read per join.
    delta: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PresenceHub:
    def __init__(
        self,
        store: BasePresenceStore,
        layer: Any,
        timing: Timing,
        *,
        settle_seconds: float,
        min_interval_seconds: float,
        typing_throttle_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.layer = layer
        self.timing = timing
        self.settle_seconds = settle_seconds
        self.min_interval_seconds = min_interval_seconds
        # Wall-clock seconds: entry expiry times are compared across processes.
        self.clock = clock
        self.rng = random.Random()  # noqa: S311  (jitter, not secrets)
        self.rooms: dict[int, _Room] = {}
        self.channel: str | None = None
        self.epoch: str | None = None
        self.suppress_leaves_until = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        # Relays of "typing: active" per (room, user) in this process.
        self.typing_gate = RateGate(typing_throttle_seconds)
        # (room, user) whose "typing: active" was relayed and not yet followed by "stopped".
        self.typing_relayed: set[tuple[int, int]] = set()
        # New starts (after a stop) relayed per (room, user) and interval: typing again soon
        # after sending shows at once, but toggling cannot buy unbounded relays.
        self.typing_starts = SlidingWindow(TYPING_STARTS_PER_INTERVAL, typing_throttle_seconds)
        self._background: list[asyncio.Task[None]] = []

    # --- sockets -------------------------------------------------------------------------

    async def join(
        self,
        room_id: int,
        conn_id: str,
        user_id: int,
        username: str,
        send: Sender,
        alive: Callable[[], bool] | None = None,
    ) -> State:
        """Register a socket; return the room's presence as that socket should first see it."""
        channel = await self._ensure_started()
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = _Room(
                Coalescer(self.settle_seconds, self.min_interval_seconds)
            )
        entry = Entry(conn_id, user_id, username, self.timing.expires_at(self.clock()))
        try:
            await self.store.add(room_id, [entry])
        except Exception:
            # The next heartbeat re-adds it; presence must not keep anyone out of a room.
            logger.warning("Presence store unavailable on join", exc_info=True)
        await self.layer.group_add(presence_group(room_id), channel)
        if not room.known:
            await self._sync(room_id, extra=[entry])
            state = _apply(room.state, room.delta, room.names)
        else:
            state = with_connection(_apply(room.state, room.delta, room.names), user_id, username)
            room.delta[user_id] = room.delta.get(user_id, 0) + 1
            room.names[user_id] = username
        # Registered only now, with no await since `state` was taken: every diff this socket
        # gets from here on applies on top of `state`.
        room.local[conn_id] = _Local(entry, send, alive or (lambda: True))
        await self._announce(room_id)
        return state

    async def leave(self, room_id: int, conn_id: str) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        local = room.local.pop(conn_id, None)
        if local is None:
            return
        user_id = local.entry.user_id
        room.delta[user_id] = room.delta.get(user_id, 0) - 1
        room.names[user_id] = local.entry.username
        try:
            await self.store.remove(room_id, local.entry)
        except Exception:
            logger.warning("Presence store unavailable on leave", exc_info=True)
        if not room.local:
            # Nobody left here to tell: forget the room (a later join reads it afresh).
            if room.timer is not None:
                room.timer.cancel()
            del self.rooms[room_id]
            if self.channel is not None:
                await self.layer.group_discard(presence_group(room_id), self.channel)
        await self._announce(room_id)
        if not self.rooms:
            await self._stop()

    def current(self, room_id: int) -> State:
        """The room's presence as this process's sockets see it now (no store read)."""
        room = self.rooms.get(room_id)
        if room is None:
            return {}
        return _apply(room.state, room.delta, room.names)

    async def snapshot(self, room_id: int) -> State:
        """The room's current presence, read from the store (for HTTP and the admin)."""
        now = self.clock()
        return aggregate((await self.store.snapshot(room_id, now)).entries, now)

    # --- recomputing ---------------------------------------------------------------------

    async def _announce(self, room_id: int) -> None:
        if room_id in self.rooms:
            self._mark_dirty(room_id)
        try:
            event = {"type": protocol.EVENT_PRESENCE_CHANGED, "room_id": room_id}
            await self.layer.group_send(presence_group(room_id), event)
        except Exception:
            # Other processes still converge at their next sweep.
            logger.warning("Could not announce a presence change", exc_info=True)

    def _mark_dirty(self, room_id: int) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        now = self.clock()
        room.coalescer.mark_dirty(now)
        due = room.coalescer.due_at()
        if room.timer is None and due is not None:
            loop = asyncio.get_running_loop()
            room.timer = loop.call_later(max(0.0, due - now), self._spawn_sync, room_id)

    def _spawn_sync(self, room_id: int) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            room.timer = None
        self._track(self._sync(room_id))

    def _track(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self, room_id: int, extra: list[Entry] | None = None) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        async with room.lock:
            now = self.clock()
            room.coalescer.synced(now)
            room.delta, room.names = {}, {}
            # Our own sockets are present by definition, whatever the store lost or expired.
            fresh = self.timing.expires_at(now)
            local = [replace(i.entry, expires_at=fresh) for i in room.local.values()]
            local += extra or []
            try:
                snap = await self.store.snapshot(room_id, now)
            except Exception:
                logger.warning("Presence store unavailable; keeping the last state", exc_info=True)
                if not room.known:
                    room.state = aggregate(local, now)
                    room.known = True
                return
            self._check_epoch(snap.epoch, now)
            new = aggregate([*snap.entries, *local], now)
            if room.known and now < self.suppress_leaves_until:
                new = keep_leavers(room.state, new)
            joins, leaves = diff(room.state, new)
            room.state = new
            room.known = True
            if joins or leaves:
                enc = Encoded.of(protocol.presence_diff_frame(joins, leaves))
                for item in list(room.local.values()):
                    await self._send(item.send, enc)
            if room.coalescer.dirty_since is not None and room.timer is None:
                self._mark_dirty(room_id)

    async def _send(self, send: Sender, enc: Encoded) -> None:
        try:
            await send(enc)
        except Exception:
            logger.debug("Dropping a presence frame to a closed socket", exc_info=True)

    def _check_epoch(self, epoch: str, now: float) -> None:
        if self.epoch is None:
            self.epoch = epoch
            return
        if epoch == self.epoch:
            return
        # The store was reset: re-add our sockets now, and hold back leaves until every
        # process has had a sweep to notice and re-add its own.
        logger.warning("Presence store was reset; re-adding this process's connections")
        self.epoch = epoch
        self.suppress_leaves_until = now + self.timing.sweep_seconds * 1.5
        self._track(self._refresh_all(announce=True))

    # --- background ----------------------------------------------------------------------

    async def _ensure_started(self) -> str:
        if self.channel is None:
            self.channel = await self.layer.new_channel()
        if not self._background:
            self._background = [
                asyncio.ensure_future(self._receive_loop(self.channel)),
                asyncio.ensure_future(self._heartbeat_loop()),
                asyncio.ensure_future(self._sweep_loop()),
            ]
        return self.channel

    async def _stop(self) -> None:
        background, self._background = self._background, []
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _receive_loop(self, channel: str) -> None:
        while True:
            try:
                message = await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("Presence channel receive failed", exc_info=True)
                await asyncio.sleep(1)
                continue
            if message.get("type") == protocol.EVENT_PRESENCE_CHANGED:
                self._mark_dirty(int(message["room_id"]))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.heartbeat_delay(self.rng))
            await self._refresh_all(announce=False)

    async def _refresh_all(self, announce: bool) -> None:
        now = self.clock()
        for room_id, room in list(self.rooms.items()):
            for conn_id in [c for c, item in room.local.items() if not item.alive()]:
                # Ended without leave(): stop counting it (and stop heartbeating it).
                logger.warning("Releasing the presence of a socket that ended without leaving")
                await self.leave(room_id, conn_id)
            if room_id not in self.rooms:
                continue
            for item in room.local.values():
                item.entry = Entry(
                    item.entry.conn_id,
                    item.entry.user_id,
                    item.entry.username,
                    self.timing.expires_at(now),
                )
            try:
                await self.store.add(room_id, [item.entry for item in room.local.values()])
                if self.channel is not None:
                    # Re-joining is a no-op normally, and repairs a lost subscription.
                    await self.layer.group_add(presence_group(room_id), self.channel)
            except Exception:
                logger.warning("Presence heartbeat failed", exc_info=True)
                continue
            if announce:
                await self._announce(room_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.sweep_seconds)
            for room_id, room in list(self.rooms.items()):
                for conn_id in [c for c, item in room.local.items() if not item.alive()]:
                    await self.leave(room_id, conn_id)
                self._mark_dirty(room_id)


def _apply(state: State, delta: dict[int, int], names: dict[int, str]) -> State:
    """``state`` with local connection changes that no sync has counted yet."""
    if not delta:
        return state
    result = dict(state)
    for user_id, change in delta.items():
        current = result.get(user_id)
        count = (current.connections if current else 0) + change
        if count > 0:
            result[user_id] = UserPresence(user_id, names[user_id], count)
        else:
            result.pop(user_id, None)
    return result


def _new_hub() -> PresenceHub:
    return PresenceHub(
        get_store(),
        get_channel_layer(),
        Timing(app_settings.PRESENCE_TIMEOUT_SECONDS),
        settle_seconds=app_settings.PRESENCE_SETTLE_SECONDS,
        min_interval_seconds=app_settings.PRESENCE_MIN_INTERVAL_SECONDS,
        typing_throttle_seconds=app_settings.TYPING_THROTTLE_SECONDS,
    )


_hubs = per_loop(_new_hub)


def get_hub() -> PresenceHub:
    """The hub of the running event loop (one per process under daphne)."""
    return _hubs.get()
