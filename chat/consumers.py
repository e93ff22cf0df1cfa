"""The chat WebSocket transport: parse, authorize, delegate to services, send frames.

Ordering guarantee: the socket joins the room group *before* reading ``last_seq``, so every
message committed after that read also arrives live. ``last_sent`` is the highest seq this
socket has delivered; live events at or below it are duplicates and dropped, and a live event
that skips ahead is preceded by the missing messages read from the database. Each client
therefore sees every seq exactly once, in order, even when processes publish out of order.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import DatabaseError

from . import assistant, protocol, services
from .conf import app_settings
from .models import Message, Room
from .presence import RateGate
from .presence_hub import PresenceHub, get_hub

logger = logging.getLogger(__name__)


class ChatConsumer(AsyncWebsocketConsumer):
    room: Room
    group: str | None = None
    last_sent = 0
    hub: PresenceHub | None = None
    conn_id = ""
    typing_active = False
    pending_read: int | None = None
    read_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._background: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        # Accept before refusing: a close code only reaches a client after the handshake.
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=protocol.CLOSE_UNAUTHENTICATED)
            return
        slug = self.scope["url_route"]["kwargs"]["slug"]
        try:
            self.room = await services.aget_room_for(user, slug)
        except services.RoomNotFound:
            await self.close(code=protocol.CLOSE_NOT_FOUND)
            return
        except services.AccessDenied:
            await self.close(code=protocol.CLOSE_FORBIDDEN)
            return
        self.user = user
        self.group = services.room_group(self.room.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self._start_session()

    async def _start_session(self) -> None:
        after, after_error = self._query_after()
        last_seq = await services.alast_seq(self.room.pk)
        await self._send_frames([protocol.hello_frame(self.room.slug, self.user, last_seq)])
        if after_error:
            await self._send_frames([protocol.error_frame(protocol.BAD_FRAME, after_error)])
        if after is None:
            frames = await services.alatest_frames(self.room, last_seq, app_settings.HISTORY_LIMIT)
            if frames:
                await self._send_frames(frames)
            self.last_sent = last_seq
        else:
            # A client ahead of the server (database reset) starts again from last_seq.
            self.last_sent = min(after, last_seq)
            await self._replay(last_seq)
        await self._join_presence()
        # Replies running in the room answer with their text so far (assistant.start).
        await assistant.request_snapshots(self.room.pk, self.channel_name)

    async def _join_presence(self) -> None:
        self.hub = get_hub()
        self.conn_id = uuid.uuid4().hex
        self.read_gate = RateGate(app_settings.READ_THROTTLE_SECONDS)
        state = await self.hub.join(
            self.room.pk, self.conn_id, self.user.pk, self.user.get_username(), self._send_text
        )
        await self._send_frames([protocol.presence_state_frame(list(state.values()))])
        reads = await services.aread_state(self.room.pk, app_settings.READ_STATE_LIMIT)
        await self._send_frames([protocol.read_state_frame(reads)])

    async def _send_text(self, text: str) -> None:
        await self.send(text_data=text)

    def _query_after(self) -> tuple[int | None, str | None]:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        values = query.get("after")
        if not values:
            return None, None
        try:
            after = int(values[0])
        except ValueError:
            return None, "after must be a non-negative integer; sending recent history instead."
        if after < 0:
            return None, "after must be a non-negative integer; sending recent history instead."
        return after, None

    async def _replay(self, upto: int) -> None:
        """Send every message after ``last_sent`` up to ``upto``, in batches, in order."""
        batch = app_settings.REPLAY_BATCH_SIZE
        while self.last_sent < upto:
            frames = await services.amessage_frames(self.room, self.last_sent, upto, batch)
            if not frames:
                break
            await self._send_frames(frames)
            self.last_sent = frames[-1]["seq"]
        self.last_sent = max(self.last_sent, upto)

    async def disconnect(self, code: int) -> None:
        if self.group is None:
            return
        await self.channel_layer.group_discard(self.group, self.channel_name)
        if self.read_timer is not None:
            self.read_timer.cancel()
        if self.pending_read is not None:
            await self._flush_read()
        if self.typing_active:
            await self._relay_typing(False)
        if self.hub is not None:
            await self.hub.leave(self.room.pk, self.conn_id)

    # --- client frames -----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self._error(protocol.BAD_FRAME, "Send JSON in text messages, not binary.")
            return
        limits = protocol.Limits(
            max_text_length=app_settings.MAX_TEXT_LENGTH,
            max_frame_bytes=app_settings.MAX_FRAME_BYTES,
            max_frames_per_message=app_settings.MAX_FRAMES_PER_MESSAGE,
        )
        try:
            frames = protocol.parse_client_text(text_data, limits)
        except protocol.ProtocolError as exc:
            await self._error(exc.code, exc.message)
            return
        for frame in frames:
            await self._handle(frame)

    async def _handle(self, frame: protocol.ClientFrame | protocol.FrameError) -> None:
        if isinstance(frame, protocol.FrameError):
            await self._error(frame.code, frame.message, frame.client_id)
        elif isinstance(frame, protocol.SendMessage):
            await self._handle_message(frame)
        elif isinstance(frame, protocol.Ping):
            await self._handle_ping()
        elif isinstance(frame, protocol.Resume):
            await self._handle_resume(frame)
        elif isinstance(frame, protocol.Typing):
            await self._handle_typing(frame)
        elif isinstance(frame, protocol.Read):
            await self._handle_read(frame)
        elif isinstance(frame, protocol.AssistantStop):
            await assistant.request_stop(frame.stream_id, self.user, self.channel_name)

    async def _handle_message(self, frame: protocol.SendMessage) -> None:
        cid = frame.client_id or None
        try:
            result = await services.apost_message(
                self.room.pk, self.user, frame.text, frame.client_id
            )
        except services.RateLimited:
            window = app_settings.RATE_LIMIT_WINDOW_SECONDS
            limit = app_settings.RATE_LIMIT_MESSAGES
            await self._error(
                protocol.RATE_LIMITED,
                f"At most {limit} messages per {window:g} s; retry later.",
                cid,
            )
            return
        except DatabaseError:
            logger.exception("Storing a message in room %s failed", self.room.slug)
            await self._error(protocol.UNAVAILABLE, "The message could not be stored; retry.", cid)
            return
        await self._send_frames([protocol.ack_frame(frame.client_id, result.message.seq)])
        if result.created and assistant.is_request(frame.text):
            await self._ask_assistant(result.message)

    async def _ask_assistant(self, message: Message) -> None:
        # The reply runs in chat.assistant's registry, not here: it outlives this socket.
        try:
            await assistant.request_reply(self.room, self.user, message)
        except assistant.AssistantRefused as exc:
            await self._error(exc.code, exc.message)

    async def _handle_ping(self) -> None:
        try:
            room_last = await services.arecent_last_seq(
                self.room.pk, app_settings.PONG_SEQ_MAX_AGE_SECONDS
            )
        except DatabaseError:
            room_last = self.last_sent
        # Never report less than this socket already delivered (the value may be cached).
        await self._send_frames([protocol.pong_frame(max(room_last, self.last_sent))])

    async def _handle_resume(self, frame: protocol.Resume) -> None:
        try:
            upto = await services.alast_seq(self.room.pk)
        except DatabaseError:
            logger.exception("Resume in room %s failed", self.room.slug)
            await self._error(protocol.UNAVAILABLE, "History is unavailable; retry.")
            return
        target = max(self.last_sent, upto)
        self.last_sent = min(frame.after, target)
        await self._replay(target)

    async def _handle_typing(self, frame: protocol.Typing) -> None:
        if self.hub is None:
            return
        key = (self.room.pk, self.user.pk)
        if frame.active:
            self.typing_active = True
            # Clients refresh while typing; one relay per interval keeps indicators alive.
            if self.hub.typing_gate.allow(key, time.monotonic()):
                await self._relay_typing(True)
        elif self.typing_active:
            self.hub.typing_gate.forget(key)
            await self._relay_typing(False)

    async def _relay_typing(self, active: bool) -> None:
        self.typing_active = active
        await services.relay_typing(self.room.pk, self.user, active)

    async def _handle_read(self, frame: protocol.Read) -> None:
        self.pending_read = max(self.pending_read or 0, frame.seq)
        wait = self.read_gate.wait_seconds("read", time.monotonic())
        if wait <= 0:
            await self._flush_read()
        elif self.read_timer is None:
            # Trailing edge: the latest marker is stored once the interval has passed.
            loop = asyncio.get_running_loop()
            self.read_timer = loop.call_later(wait, self._schedule_flush_read)

    def _schedule_flush_read(self) -> None:
        self.read_timer = None
        task = asyncio.ensure_future(self._flush_read())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_read(self) -> None:
        seq, self.pending_read = self.pending_read, None
        if seq is None:
            return
        self.read_gate.allow("read", time.monotonic())
        try:
            await services.amark_read(self.room.pk, self.user, seq)
        except DatabaseError:
            logger.exception("Storing a read marker in room %s failed", self.room.slug)
            await self._error(protocol.UNAVAILABLE, "The read marker could not be stored.")

    # --- room events -------------------------------------------------------------------

    async def chat_message(self, event: dict[str, Any]) -> None:
        seq: int = event["seq"]
        if seq <= self.last_sent:
            return
        if seq > self.last_sent + 1:
            # Another process published a later seq first: fill the gap from the database.
            try:
                await self._replay(seq - 1)
            except DatabaseError:
                # Send the live frame anyway: the client sees the gap and asks to resume.
                logger.exception("Filling a gap in room %s failed", self.room.slug)
            if seq <= self.last_sent:
                return
        await self.send(text_data=event["text"])
        self.last_sent = seq

    async def chat_typing(self, event: dict[str, Any]) -> None:
        # Never echo typing to the typist, in any of their tabs.
        if event["user_id"] != self.user.pk:
            await self.send(text_data=event["text"])

    async def chat_read(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])

    async def assistant_frame(self, event: dict[str, Any]) -> None:
        # Encoded once by the reply's runner (chat/assistant.py) for every member.
        await self.send(text_data=event["text"])

    # --- sending -------------------------------------------------------------------------

    async def _send_frames(self, frames: list[dict[str, Any]]) -> None:
        await self.send(text_data=protocol.encode(frames[0] if len(frames) == 1 else frames))

    async def _error(self, code: str, message: str, client_id: str | None = None) -> None:
        await self._send_frames([protocol.error_frame(code, message, client_id)])
