"""The per-process room hub: each room event crosses the channel layer once per process.

Why: the per-socket Channels path (layer → each consumer's queue → handler → send) cost ~300 µs
of server CPU per delivered frame here, against ~8 µs for a bare ASGI broadcast. The hub
listens on ONE channel per process, added to the group of every room that has a local socket
(and to ``chat.control`` for revocations). It orders each room's messages by seq, fills gaps
from the database once per process (not once per socket), gathers what arrives within
``batch_window_seconds`` and hands each live socket pre-encoded messages: one JSON array per
batch, packed within the byte budget, encoded once for all sockets that get the same batch.

Ordering guarantee (per socket, unchanged from the per-socket design): a socket attaches
(the room is subscribed) *before* it reads ``last_seq`` and catches up from the database; it
goes live only once its ``last_sent`` has reached the room's ``head`` (the highest seq the hub
has forwarded in order), with no await in between. Every later seq then reaches it through the
hub, in order; a frame at or below ``last_sent`` is skipped per socket.

Out-of-order arrivals (two processes publishing concurrently) are held for
``gap_grace_seconds``: usually the missing seq arrives meanwhile. Otherwise the gap is read from
the database; if that fails, the hub moves on and sockets see the jump (clients resume by seq).

Changes of messages (edits, deletes: ``message_update``) have their own per-room order,
``update_seq``, and the same treatment: forwarded in update_seq order (``update_head``), held
while one is missing, filled from the database after the grace (the database holds each
message's latest change, so a fill sends current states). An update is also held until the
message it changes has been forwarded (``head`` >= its seq): no socket gets an update before
its message. A socket goes live once it has reached both heads; per socket, an update at or
below its ``last_update`` is skipped. A change lost by the channel layer with nothing after it
is recovered when a socket's ping reads a higher ``last_update_seq`` (``note_update_head``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from channels.layers import get_channel_layer
from django.db import DatabaseError

from realtime_kit.loops import per_loop
from realtime_kit.metrics import metrics

from .. import protocol
from ..protocol import Encoded
from ..ratelimit import SlidingWindow
from .writers import Packed

logger = logging.getLogger(__name__)

CONTROL_GROUP = "chat.control"
# Out-of-order messages a room holds while waiting for a missing seq; past it, fill at once.
MAX_HELD_MESSAGES = 1000
# How long a room with no local socket stays subscribed (a reconnecting socket reuses it).
IDLE_ROOM_LINGER_SECONDS = 5.0
# Longest a sender's own message waits for its ack to be queued (the ack comes right after
# its transaction; this only guards against an ack that never comes).
ACK_WAIT_SECONDS = 1.0
# Acks a socket may have queued whose message has not arrived yet (Redis lost it).
MAX_UNMATCHED_ACKS = 100
# How often the largest outbound backlog of the process's sockets is published.
BACKLOG_SAMPLE_SECONDS = 5.0


class Detached(Exception):
    """The socket is not (or no longer) attached to the room."""


def room_group(room_id: int) -> str:
    """Name of the channel-layer group that carries a room's events to every process."""
    return f"chat.room.{room_id}"


class Member(Protocol):
    """A local socket as the hub sees it (``chat.consumers.ChatConsumer``)."""

    conn_id: str
    user_id: int
    session_key: str
    last_sent: int
    live: bool
    # Frames as MessagePack (the chat.v1.msgpack subprotocol) instead of JSON text.
    msgpack: bool

    # Highest update_seq this socket has been sent (or was read past) by its catch-up.
    last_update: int

    def deliver(
        self, messages: list[Packed], last_seq: int | None, last_update: int | None = None
    ) -> None: ...
    def congested(self) -> bool: ...
    def backlog_bytes(self) -> int: ...
    def revoke(self, code: int) -> None: ...


@dataclass(frozen=True)
class Item:
    enc: Encoded
    seq: int | None = None
    # Typing is never echoed to the typist (in any tab).
    exclude_user: int | None = None
    # Dropped for a socket that is falling behind (typing): nothing to resume.
    ephemeral: bool = False
    # The socket (conn_id) that sent this message: it gets its ack first.
    origin: str | None = None
    # A message_update: its place in the room's order of changes, and the message it changes.
    update_seq: int | None = None
    about_seq: int = 0


@dataclass
class _Wait:
    """A sender's frames held until the ack of its own message (``seq``) is queued."""

    seq: int
    items: list[Item]
    handle: asyncio.TimerHandle | None = None


Loader = Callable[[int, int, int], Awaitable[list[tuple[int, Encoded]]]]
# Room id, after, upto -> (update_seq, seq, encoded message_update), in update_seq order.
UpdateLoader = Callable[[int, int, int], Awaitable[list[tuple[int, int, Encoded]]]]
HeadReader = Callable[[int], Awaitable[int]]
# Room id, user ids -> those still allowed in the room (None: the room is gone).
AccessReader = Callable[[int, set[int]], Awaitable[set[int] | None]]


@dataclass(eq=False)
class _Room:
    id: int
    members: dict[str, Member] = field(default_factory=dict)
    # Highest seq forwarded in order; meaningful once ``ready`` (read after subscribing).
    head: int = 0
    ready: bool = False
    subscribed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    early: list[dict[str, Any]] = field(default_factory=list)
    pending: list[Item] = field(default_factory=list)
    direct: dict[str, list[Encoded]] = field(default_factory=dict)
    flush_handle: asyncio.Handle | None = None
    held: dict[int, Item] = field(default_factory=dict)
    gap_handle: asyncio.TimerHandle | None = None
    filling: bool = False
    idle_handle: asyncio.TimerHandle | None = None
    # conn_id -> seqs acked to that socket whose message it has not been sent yet.
    acked: dict[str, set[int]] = field(default_factory=dict)
    waits: dict[str, _Wait] = field(default_factory=dict)
    # The same for changes: highest update_seq forwarded in order, those held back, and the
    # highest update_seq known to exist (every missing one up to it is filled or skipped).
    update_head: int = 0
    held_updates: dict[int, Item] = field(default_factory=dict)
    update_known: int = 0
    update_skip_to: int = 0
    update_gap_handle: asyncio.TimerHandle | None = None
    update_filling: bool = False


class RoomHub:
    def __init__(
        self,
        layer: Any,
        *,
        load_messages: Loader,
        read_head: HeadReader,
        allowed_users: AccessReader,
        budget_bytes: int,
        batch_window_seconds: float,
        gap_grace_seconds: float,
        send_window: SlidingWindow | None = None,
        load_updates: UpdateLoader | None = None,
        read_update_head: HeadReader | None = None,
    ) -> None:
        self.layer = layer
        self.load_messages = load_messages
        self.load_updates = load_updates
        self.read_head = read_head
        self.read_update_head = read_update_head
        self.allowed_users = allowed_users
        self.budget_bytes = budget_bytes
        self.batch_window_seconds = batch_window_seconds
        self.gap_grace_seconds = gap_grace_seconds
        # Messages each user stored through this process (refuses floods before the DB).
        self.send_window = send_window if send_window is not None else SlidingWindow(10, 5.0)
        self.rooms: dict[int, _Room] = {}
        self.by_user: dict[int, set[Member]] = {}
        self.channel: str | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- sockets -------------------------------------------------------------------------

    async def attach(self, room_id: int, member: Member) -> None:
        """Subscribe the process to the room (once) and register ``member`` (not yet live)."""
        await self._ensure_started()
        while True:
            room = self.rooms.get(room_id)
            if room is None:
                room = self.rooms[room_id] = _Room(room_id)
            async with room.lock:
                if self.rooms.get(room_id) is not room:
                    continue  # torn down while we waited: take the new one
                if room.idle_handle is not None:
                    room.idle_handle.cancel()
                    room.idle_handle = None
                room.members[member.conn_id] = member
                self.by_user.setdefault(member.user_id, set()).add(member)
                metrics().rooms_with_sockets.set(len(self.rooms))
                if not room.subscribed:
                    await self._subscribe(room)
                return

    def _channel(self) -> str:
        if self.channel is None:
            raise RuntimeError("The room hub has not started.")
        return self.channel

    async def _subscribe(self, room: _Room) -> None:
        await self.layer.group_add(room_group(room.id), self._channel())
        room.subscribed = True
        # Read after subscribing: every seq committed later arrives live. Changes first: a
        # change is committed after its message, so every change at or below update_head is
        # about a message at or below head (no socket skips a change it cannot have seen).
        if self.read_update_head is not None:
            room.update_head = room.update_skip_to = await self.read_update_head(room.id)
        room.head = await self.read_head(room.id)
        room.ready = True
        early, room.early = room.early, []
        for event in early:
            self._on_event(room, event)

    def detach(self, room_id: int, member: Member) -> None:
        """Forget ``member`` (idempotent). A room left empty unsubscribes after a linger."""
        member.live = False
        users = self.by_user.get(member.user_id)
        if users is not None:
            users.discard(member)
            if not users:
                del self.by_user[member.user_id]
        room = self.rooms.get(room_id)
        if room is None or room.members.pop(member.conn_id, None) is None:
            return
        room.direct.pop(member.conn_id, None)
        room.acked.pop(member.conn_id, None)
        wait = room.waits.pop(member.conn_id, None)
        if wait is not None and wait.handle is not None:
            wait.handle.cancel()
        if not room.members and room.idle_handle is None:
            loop = asyncio.get_running_loop()
            room.idle_handle = loop.call_later(
                IDLE_ROOM_LINGER_SECONDS, lambda: self._spawn(self._teardown(room))
            )

    async def _teardown(self, room: _Room) -> None:
        async with room.lock:
            room.idle_handle = None
            if room.members or self.rooms.get(room.id) is not room:
                return
            del self.rooms[room.id]
            metrics().rooms_with_sockets.set(len(self.rooms))
            for handle in (room.flush_handle, room.gap_handle, room.update_gap_handle):
                if handle is not None:
                    handle.cancel()
            if room.subscribed and self.channel is not None:
                try:
                    await self.layer.group_discard(room_group(room.id), self.channel)
                except Exception:
                    logger.warning("Unsubscribing from room %s failed", room.id, exc_info=True)

    def head(self, room_id: int) -> int:
        room = self.rooms.get(room_id)
        return room.head if room is not None else 0

    def update_head(self, room_id: int) -> int:
        room = self.rooms.get(room_id)
        return room.update_head if room is not None else 0

    def go_live(self, room_id: int, member: Member) -> bool:
        """Make ``member`` live if it has caught up with the room; False: catch up more."""
        room = self.rooms.get(room_id)
        if room is None or room.members.get(member.conn_id) is not member:
            raise Detached(member.conn_id)
        if room.ready and (member.last_sent < room.head or member.last_update < room.update_head):
            return False
        member.live = True
        return True

    def send_direct(
        self, room_id: int, conn_id: str, enc: Encoded, ack_seq: int | None = None
    ) -> bool:
        """Queue a frame for one socket, to go out with the room's next batch (its answers:
        acks coalesce with the message they acknowledge). False if it is not attached.

        ``ack_seq``: the frame acks that seq. A sender never gets its own message before its
        ack: if the message came first, it waited (``_Wait``) and goes out now, after it.
        """
        room = self.rooms.get(room_id)
        member = room.members.get(conn_id) if room is not None else None
        if room is None or member is None:
            return False
        room.direct.setdefault(conn_id, []).append(enc)
        if ack_seq is not None:
            acked = room.acked.setdefault(conn_id, set())
            acked.add(ack_seq)
            if len(acked) > MAX_UNMATCHED_ACKS:
                acked.discard(min(acked))
            wait = room.waits.get(conn_id)
            if wait is not None and wait.seq == ack_seq:
                self._release_wait(room, member)
                return True
        self._schedule_flush(room)
        return True

    def _release_wait(self, room: _Room, member: Member) -> None:
        wait = room.waits.pop(member.conn_id, None)
        if wait is None:
            return
        if wait.handle is not None:
            wait.handle.cancel()
        own = room.direct.pop(member.conn_id, [])
        self._deliver_own(room, member, own, wait.items, force=wait.handle is None)

    def _wait_expired(self, room: _Room, conn_id: str) -> None:
        wait = room.waits.get(conn_id)
        member = room.members.get(conn_id)
        if wait is not None and member is not None:
            wait.handle = None  # deliver anyway: the ack is late (or lost)
            self._release_wait(room, member)

    def members(self) -> list[Member]:
        return [m for room in self.rooms.values() for m in room.members.values()]

    # --- events from the channel layer ----------------------------------------------------

    async def _ensure_started(self) -> None:
        if self._receiver is not None:
            return
        async with self._start_lock:
            if self._receiver is not None:
                return
            self.channel = await self.layer.new_channel("chat.hub.")
            await self.layer.group_add(CONTROL_GROUP, self.channel)
            self._receiver = asyncio.get_running_loop().create_task(self._receive_loop())
            self._spawn(self._sample_loop())

    async def _receive_loop(self) -> None:
        channel = self._channel()
        while True:
            try:
                event = await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("Room hub receive failed", exc_info=True)
                await asyncio.sleep(1)
                await self._resubscribe()
                continue
            try:
                self.dispatch(event)
            except Exception:
                logger.exception("Handling room event %s failed", event.get("type"))

    async def _resubscribe(self) -> None:
        # After a layer failure (Redis restart) re-adding is a no-op or repairs a subscription.
        channel = self._channel()
        with contextlib.suppress(Exception):
            await self.layer.group_add(CONTROL_GROUP, channel)
            for room_id in list(self.rooms):
                await self.layer.group_add(room_group(room_id), channel)

    def dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == protocol.EVENT_REVOKE:
            self._revoke(event)
            return
        if kind == protocol.EVENT_RECHECK:
            self._recheck(event)
            return
        room = self.rooms.get(int(event.get("room_id", -1)))
        if room is None:
            return
        if kind != protocol.EVENT_BATCH:
            self._on_room_event(room, event)
            return
        for one in event["events"]:
            try:
                self._on_room_event(room, one)
            except Exception:  # one malformed event of a batch: the others still count
                logger.exception("Handling room event %s failed", one.get("type"))

    def _on_room_event(self, room: _Room, event: dict[str, Any]) -> None:
        if not room.ready:
            room.early.append(event)  # subscribed, head not read yet
        else:
            self._on_event(room, event)

    def _on_event(self, room: _Room, event: dict[str, Any]) -> None:
        kind = event.get("type")
        enc = Encoded(event["text"], event.get("size") or len(event["text"].encode("utf-8")))
        to = event.get("to")
        if to is not None:
            if to in room.members:
                room.direct.setdefault(to, []).append(enc)
                self._schedule_flush(room)
            return
        if kind == protocol.EVENT_MESSAGE:
            seq = int(event["seq"])
            self._on_message(room, seq, Item(enc, seq=seq, origin=event.get("origin")))
        elif kind == protocol.EVENT_UPDATE:
            update_seq = int(event["update_seq"])
            self._on_update(room, Item(enc, update_seq=update_seq, about_seq=int(event["seq"])))
        elif kind == protocol.EVENT_TYPING:
            self._append(room, Item(enc, exclude_user=event.get("user_id"), ephemeral=True))
        elif kind in (protocol.EVENT_READ, protocol.EVENT_ASSISTANT):
            self._append(room, Item(enc))

    # --- ordering ------------------------------------------------------------------------

    def _on_message(self, room: _Room, seq: int, item: Item) -> None:
        if seq <= room.head or seq in room.held:
            return
        if seq == room.head + 1 and not room.filling:
            self._append(room, item)
            room.head = seq
            self._release_held(room)
            self._release_updates(room)
            return
        room.held[seq] = item
        if room.filling:
            return
        if len(room.held) > MAX_HELD_MESSAGES:
            self._start_fill(room)
        elif room.gap_handle is None:
            loop = asyncio.get_running_loop()
            room.gap_handle = loop.call_later(self.gap_grace_seconds, self._start_fill, room)

    def _release_held(self, room: _Room) -> None:
        while room.head + 1 in room.held:
            room.head += 1
            self._append(room, room.held.pop(room.head))
        if not room.held and room.gap_handle is not None:
            room.gap_handle.cancel()
            room.gap_handle = None

    def _start_fill(self, room: _Room) -> None:
        if room.gap_handle is not None:
            room.gap_handle.cancel()
            room.gap_handle = None
        if not room.filling and room.held:
            room.filling = True
            self._spawn(self._fill(room))

    async def _fill(self, room: _Room) -> None:
        """Read the missing seqs below the held ones from the database, once per process."""
        try:
            target = min(room.held) - 1
            while room.head < target:
                rows = await self.load_messages(room.id, room.head, target)
                if not rows:
                    break
                for seq, enc in rows:
                    if seq > room.head:
                        self._append(room, Item(enc, seq=seq))
                        room.head = seq
                self._release_updates(room)
        except DatabaseError:
            logger.warning("Filling a gap in room %s failed; clients resume", room.id)
        except Exception:
            logger.exception("Filling a gap in room %s failed", room.id)
        finally:
            room.filling = False
            if room.held:
                # Whatever is still missing was lost or rolled back: move on (clients that
                # see the jump resume from the database by seq).
                room.head = max(room.head, min(room.held) - 1)
                self._release_held(room)
                if room.held:
                    self._start_fill(room)
            self._release_updates(room)

    # --- ordering changes ------------------------------------------------------------------

    def _on_update(self, room: _Room, item: Item) -> None:
        update_seq = item.update_seq or 0
        if update_seq <= room.update_head or update_seq in room.held_updates:
            return
        room.held_updates[update_seq] = item
        room.update_known = max(room.update_known, update_seq)
        self._release_updates(room)

    def note_update_head(self, room_id: int, update_seq: int) -> None:
        """The database says changes up to ``update_seq`` exist (read by a socket's ping):
        fill those the channel layer lost, after the grace (they may still be on the way)."""
        room = self.rooms.get(room_id)
        if room is None or not room.ready or update_seq <= room.update_known:
            return
        room.update_known = update_seq
        self._check_update_gap(room)

    def _release_updates(self, room: _Room) -> None:
        """Forward held changes in update_seq order, each once its message was forwarded."""
        while True:
            next_seq = room.update_head + 1
            item = room.held_updates.get(next_seq)
            if item is None:
                if next_seq > room.update_skip_to:
                    break
                room.update_head = next_seq  # superseded by a later change, or lost
                continue
            if item.about_seq > room.head:
                break  # its message comes first (held, or being filled)
            del room.held_updates[next_seq]
            self._append(room, item)
            room.update_head = next_seq
        self._check_update_gap(room)

    def _check_update_gap(self, room: _Room) -> None:
        missing = room.update_known > room.update_head and room.update_head + 1 not in (
            room.held_updates
        )
        if not missing or room.update_filling or self.load_updates is None:
            return
        if len(room.held_updates) > MAX_HELD_MESSAGES:
            self._start_update_fill(room)
        elif room.update_gap_handle is None:
            loop = asyncio.get_running_loop()
            room.update_gap_handle = loop.call_later(
                self.gap_grace_seconds, self._start_update_fill, room
            )

    def _start_update_fill(self, room: _Room) -> None:
        if room.update_gap_handle is not None:
            room.update_gap_handle.cancel()
            room.update_gap_handle = None
        if not room.update_filling and room.update_known > room.update_head:
            room.update_filling = True
            self._spawn(self._fill_updates(room))

    async def _fill_updates(self, room: _Room) -> None:
        """Read the changes missing below ``update_known``: each changed message's current
        state (a message changed twice is one frame, at its latest update_seq)."""
        target = room.update_known
        after = room.update_head
        loader = self.load_updates
        try:
            if self.read_update_head is not None:
                # A ping's cached head may be stale (a database reset): never skip past what
                # the database holds. Every committed change is at or below its head.
                fresh = await self.read_update_head(room.id)
                target = min(target, fresh)
                held_max = max(room.held_updates, default=0)
                room.update_known = max(held_max, min(room.update_known, fresh))
            while loader is not None and after < target:
                rows = await loader(room.id, after, target)
                if not rows:
                    break
                for update_seq, seq, enc in rows:
                    if update_seq > room.update_head and update_seq not in room.held_updates:
                        room.held_updates[update_seq] = Item(
                            enc, update_seq=update_seq, about_seq=seq
                        )
                after = rows[-1][0]
        except DatabaseError:
            logger.warning("Filling changes of room %s failed; clients resume", room.id)
        except Exception:
            logger.exception("Filling changes of room %s failed", room.id)
        finally:
            room.update_filling = False
            # What the database did not return up to the target was superseded by a later
            # change of the same message (or is lost): skip it.
            room.update_skip_to = max(room.update_skip_to, target)
            self._release_updates(room)

    # --- batching ------------------------------------------------------------------------

    def _append(self, room: _Room, item: Item) -> None:
        room.pending.append(item)
        self._schedule_flush(room)

    def _schedule_flush(self, room: _Room) -> None:
        if room.flush_handle is not None:
            return
        loop = asyncio.get_running_loop()
        if self.batch_window_seconds > 0:
            room.flush_handle = loop.call_later(self.batch_window_seconds, self._flush, room)
        else:
            room.flush_handle = loop.call_soon(self._flush, room)

    def _flush(self, room: _Room) -> None:
        room.flush_handle = None
        items, room.pending = room.pending, []
        direct, room.direct = room.direct, {}
        seqs = [i.seq for i in items if i.seq is not None]
        first_seq = seqs[0] if seqs else None
        last_seq = seqs[-1] if seqs else None
        updates = [i.update_seq for i in items if i.update_seq is not None]
        first_update = updates[0] if updates else None
        last_update = updates[-1] if updates else None
        excluded = {i.exclude_user for i in items if i.exclude_user is not None}
        origins = {i.origin for i in items if i.origin is not None}
        has_ephemeral = any(i.ephemeral for i in items)
        # The batch packed once per format (and its size), for every socket that gets all of it.
        common: dict[bool, tuple[list[Packed], int]] = {}
        fast_deliveries = 0
        fast_bytes = 0
        for member in list(room.members.values()):
            own = direct.get(member.conn_id)
            if not member.live:
                # Catching up from the database (a resume): only its own answers (acks).
                if own:
                    member.deliver(self.pack(own, member.msgpack), None)
                continue
            congested = has_ephemeral and member.congested()
            if (
                own is None
                and not congested
                and member.user_id not in excluded
                and member.conn_id not in origins
                and member.conn_id not in room.waits
                and (first_seq is None or member.last_sent < first_seq)
                and (first_update is None or member.last_update < first_update)
            ):
                if not items:
                    continue
                shared = common.get(member.msgpack)
                if shared is None:
                    packed = self.pack([i.enc for i in items], member.msgpack)
                    shared = common[member.msgpack] = (packed, sum(len(p.data) for p in packed))
                member.deliver(shared[0], last_seq, last_update)
                fast_deliveries += 1
                fast_bytes += shared[1]
                continue
            chosen = [
                i
                for i in items
                if (i.seq is None or i.seq > member.last_sent)
                and (i.update_seq is None or i.update_seq > member.last_update)
                and i.exclude_user != member.user_id
                and not (congested and i.ephemeral)
            ]
            wait = room.waits.get(member.conn_id)
            if wait is not None:
                wait.items.extend(chosen)
                if own:  # answers to later frames keep their order behind the wait
                    room.direct.setdefault(member.conn_id, []).extend(own)
                continue
            self._deliver_own(room, member, own or [], chosen)
        if items:
            # Counted once per flush, not per socket (the slow path counts its own).
            m = metrics()
            m.batch_frames.observe(len(items))
            if fast_deliveries:
                m.frames_delivered.inc(len(items) * fast_deliveries)
                m.bytes_delivered.inc(fast_bytes)

    def _deliver_own(
        self,
        room: _Room,
        member: Member,
        own: list[Encoded],
        items: list[Item],
        force: bool = False,
    ) -> None:
        """Deliver ``own`` answers then ``items``, stopping before the member's own message
        whose ack is not queued yet (the rest waits for it, at most ACK_WAIT_SECONDS)."""
        acked = room.acked.get(member.conn_id, set())
        frames = list(own)
        last_seq: int | None = None
        last_update: int | None = None
        for index, item in enumerate(items):
            if item.origin == member.conn_id and item.seq is not None:
                if item.seq not in acked and not force:
                    loop = asyncio.get_running_loop()
                    handle = loop.call_later(
                        ACK_WAIT_SECONDS, self._wait_expired, room, member.conn_id
                    )
                    room.waits[member.conn_id] = _Wait(item.seq, items[index:], handle)
                    break
                acked.discard(item.seq)
            frames.append(item.enc)
            if item.seq is not None:
                last_seq = item.seq
            if item.update_seq is not None:
                last_update = item.update_seq
        if frames:
            packed = self.pack(frames, member.msgpack)
            member.deliver(packed, last_seq, last_update)
            m = metrics()
            m.frames_delivered.inc(len(frames))
            m.bytes_delivered.inc(sum(len(p.data) for p in packed))

    def pack(self, frames: list[Encoded], binary: bool = False) -> list[Packed]:
        """Frames as WebSocket messages within the budget: JSON text, or MessagePack."""
        if binary:
            return [Packed.of_binary(d) for d in protocol.pack_msgpack(frames, self.budget_bytes)]
        return [Packed.of(text) for text in protocol.pack(frames, self.budget_bytes)]

    # --- revocation ----------------------------------------------------------------------

    def _revoke(self, event: dict[str, Any]) -> None:
        user_id = event.get("user_id")
        room_id = event.get("room_id")
        session_key = event.get("session_key")
        code = int(event.get("code", protocol.CLOSE_FORBIDDEN))
        for member in list(self.by_user.get(user_id, ())) if user_id is not None else []:
            if session_key is not None and member.session_key != session_key:
                continue
            if room_id is not None and not self._in_room(member, int(room_id)):
                continue
            member.revoke(code)

    def _in_room(self, member: Member, room_id: int) -> bool:
        room = self.rooms.get(room_id)
        return room is not None and room.members.get(member.conn_id) is member

    def _recheck(self, event: dict[str, Any]) -> None:
        room = self.rooms.get(int(event.get("room_id", -1)))
        if room is not None and room.members:
            self._spawn(self._recheck_room(room))

    async def _recheck_room(self, room: _Room) -> None:
        """Close the room's local sockets whose users may no longer read it (one query)."""
        members = list(room.members.values())
        try:
            allowed = await self.allowed_users(room.id, {m.user_id for m in members})
        except DatabaseError:
            logger.warning("Re-checking access to room %s failed", room.id, exc_info=True)
            return
        for member in members:
            if allowed is None:
                member.revoke(protocol.CLOSE_NOT_FOUND)
            elif member.user_id not in allowed:
                member.revoke(protocol.CLOSE_FORBIDDEN)

    # --- housekeeping --------------------------------------------------------------------

    async def _sample_loop(self) -> None:
        """Publish the largest outbound backlog every few seconds (O(sockets) per sample)."""
        while True:
            await asyncio.sleep(BACKLOG_SAMPLE_SECONDS)
            backlogs = [m.backlog_bytes() for m in self.members()]
            metrics().outbound_backlog_bytes.set(max(backlogs, default=0))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _new_room_hub() -> RoomHub:
    # Imported here: services needs the app registry, this module must import without it.
    from .. import services
    from ..conf import app_settings

    return RoomHub(
        get_channel_layer(),
        load_messages=services.aencoded_messages,
        read_head=services.alast_seq,
        load_updates=services.aencoded_updates,
        read_update_head=services.alast_update_seq,
        allowed_users=services.aallowed_users,
        budget_bytes=app_settings.MAX_SEND_BYTES,
        batch_window_seconds=app_settings.BATCH_WINDOW_MILLISECONDS / 1000,
        gap_grace_seconds=app_settings.GAP_GRACE_MILLISECONDS / 1000,
        send_window=SlidingWindow(
            app_settings.RATE_LIMIT_MESSAGES, app_settings.RATE_LIMIT_WINDOW_SECONDS
        ),
    )


_hubs = per_loop(_new_room_hub)


def get_room_hub() -> RoomHub:
    """The room hub of the running event loop (one per process under daphne)."""
    return _hubs.get()
