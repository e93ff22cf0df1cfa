"""The chat WebSocket transport: parse, authorize, delegate to services, send frames.

Delivery goes through the process's room hub (``chat.delivery.hub``), not a channel per
socket: the hub receives each room event once per process and hands this socket pre-encoded,
batched messages (``deliver``). The ordering argument lives in the hub's docstring: a socket
attaches before it reads ``last_seq``, catches up from the database, and goes live only once
it has reached the hub's head; ``last_sent`` is the highest seq it delivered. Changes of
messages (``message_update``) follow the same rule with ``last_update`` and the hub's
``update_head``: a resume first sends the changes of the messages the client has
(``after_update``), then the newer messages with their current text.

Bounds, per socket (docs/protocol.md "Limits"):
- outbound: what the client has not taken yet is measured in bytes (``writers``); typing and
  presence diffs are dropped past a quarter of ``CHAT_MAX_OUTBOUND_BYTES`` (presence is sent
  afresh once the socket recovers), and past the whole of it the socket closes with 4008;
- inbound: past ``CHAT_MAX_INBOUND_BYTES`` waiting, the server stops reading the client
  (``inbound``); obvious floods are refused by a per-process window before any transaction;
- every server message is packed within ``CHAT_MAX_SEND_BYTES``;
- sends are pipelined: up to ``CHAT_MAX_PENDING_SENDS`` of a socket's sends are in flight
  (``_sends``), so a client that does not wait for acks gets them into the same group commit
  (``chat.ingest``). They are submitted in the order received and answered in that order (a
  done callback answers the oldest ones whose outcome is known); at the bound the socket reads
  no further frame until the oldest is answered, and any other frame first waits until all
  are (``_settle``), so every answer keeps the order of the client's frames.

Cleanup runs in ``__call__``'s ``finally``: also when daphne cancels the application without
a ``disconnect`` (its close timeout, a crash mid-resume), so no presence entry outlives it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import DatabaseError

from realtime_kit.leases import Lease
from realtime_kit.metrics import metrics

from . import ingest, protocol, quotas, services
from .assistant import replies as assistant
from .assistant import runs as assistant_runs
from .conf import app_settings
from .delivery import inbound, writers
from .delivery.hub import Detached, RoomHub, get_room_hub
from .delivery.writers import Packed
from .models import Message, Room
from .presence import RateGate
from .presence_hub import PresenceHub, get_hub
from .protocol import Encoded

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

# How long a replay waits for a client to take what it was sent before giving up on it.
SLOW_CONSUMER_SECONDS = 10.0
AFTER_ERROR = "after must be a non-negative integer; sending recent history instead."
AFTER_UPDATE_ERROR = "after_update must be a non-negative integer; not replaying changes."


class ChatConsumer(AsyncWebsocketConsumer):
    room: Room
    user: User
    writer: writers.Writer
    hub: RoomHub | None = None
    presence: PresenceHub | None = None
    user_id = 0
    session_key = ""
    last_sent = 0
    last_update = 0
    live = False
    closing = False
    typed = False
    presence_stale = False
    pending_read: int | None = None
    read_timer: asyncio.TimerHandle | None = None
    socket_lease: Lease | None = None
    msgpack = False  # frames as MessagePack (subprotocol chat.v1.msgpack)
    max_outbound_bytes = 1024 * 1024  # CHAT_MAX_OUTBOUND_BYTES, read when the socket starts
    limits: protocol.Limits  # what a client may send (CHAT_MAX_*), read when the socket starts
    counted = False  # in the open-sockets gauge

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn_id = uuid.uuid4().hex
        self._background: set[asyncio.Task[None]] = set()
        self._ended = False
        # This socket's sends in flight, oldest first; each leaves once answered (in order).
        self._sends: collections.deque[_Send] = collections.deque()
        self._asking: asyncio.Task[None] | None = None  # the oldest send's assistant request
        self._advanced: asyncio.Future[None] | None = None  # done when the oldest is answered
        self.max_pending_sends = app_settings.MAX_PENDING_SENDS

    # --- the ASGI application ------------------------------------------------------------

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Not Channels' loop: no channel-layer channel per socket (the room hub has one per
        # process), no helper task per socket, and no thread hop to close old database
        # connections before every frame (database_sync_to_async does it around each call).
        self.scope = scope
        self.channel_layer = None
        self.channel_name = ""
        self.base_send = send
        self.writer = writers.make_writer(send)
        # Read once: the bound is checked on every write (a settings lookup per frame was ~3%
        # of the server's CPU in bench/fanout.py).
        self.max_outbound_bytes = app_settings.MAX_OUTBOUND_BYTES
        # The same for what a client may send: four lookups per received message were ~2 %
        # of the server's CPU in bench/ingest.py (py-spy).
        self.limits = protocol.Limits(
            max_text_length=app_settings.MAX_TEXT_LENGTH,
            max_frame_bytes=app_settings.MAX_FRAME_BYTES,
            max_frames_per_message=app_settings.MAX_FRAMES_PER_MESSAGE,
            max_text_bytes=app_settings.MAX_TEXT_BYTES,
        )
        protocol_ = writers.daphne_protocol(send)
        receive = inbound.bound_receive(receive, protocol_, app_settings.MAX_INBOUND_BYTES)
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.connect":
                    await self.websocket_connect(message)
                elif kind == "websocket.receive":
                    await self.websocket_receive(message)
                elif kind == "websocket.disconnect":
                    await self.websocket_disconnect(message)
        except StopConsumer:
            pass
        finally:
            await self._end()

    async def send(
        self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False
    ) -> None:
        if text_data is not None:
            self._write([Packed.of(text_data)])
        if bytes_data is not None:
            self._write([Packed.of_binary(bytes_data)])
        if close:
            await self.close()

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        self.closing = True
        self.live = False
        await self.writer.close(1000 if code is None or code is True else int(code))

    @property
    def _hub(self) -> RoomHub:
        if self.hub is None:
            raise RuntimeError("The socket has no room hub before connect().")
        return self.hub

    # --- connecting ----------------------------------------------------------------------

    async def connect(self) -> None:
        # Accept before refusing: a close code only reaches a client after the handshake.
        if protocol.SUBPROTOCOL_MSGPACK in self.scope.get("subprotocols", ()):
            self.msgpack = True
            await self.accept(subprotocol=protocol.SUBPROTOCOL_MSGPACK)
        else:
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
        self.user_id = user.pk
        session = self.scope.get("session")
        self.session_key = getattr(session, "session_key", None) or ""
        self.hub = get_room_hub()
        # This process ends the room replies of processes that died (chat/assistant/runs.py).
        assistant_runs.ensure_sweeper()
        # Cluster-wide with CHAT_REDIS_URL (leases expire if this process dies).
        self.socket_lease = await quotas.sockets.acquire(self.user_id, self.conn_id)
        if self.socket_lease is None:
            await self._refuse_too_many()
            return
        await self.hub.attach(self.room.pk, self)
        self.counted = True
        metrics().sockets_open.inc()
        await self._start_session()

    async def _refuse_too_many(self) -> None:
        limit = app_settings.MAX_SOCKETS_PER_USER
        message = f"At most {limit} chat connections per user; close some tabs."
        self._write(self._pack([Encoded.of(protocol.error_frame("too_many_sockets", message))]))
        await self.close(code=protocol.CLOSE_TOO_MANY_SOCKETS)

    async def _start_session(self) -> None:
        after, after_error = self._query_int("after", AFTER_ERROR)
        after_update, update_error = self._query_int("after_update", AFTER_UPDATE_ERROR)
        last_seq, last_update = await services.aheads(self.room.pk)
        hello = protocol.hello_frame(self.room.slug, self.user, last_seq, last_update)
        first = [Encoded.of(hello)]
        for error in (after_error, update_error):
            if error:
                first.append(Encoded.of(protocol.error_frame(protocol.BAD_FRAME, error)))
        if after is None:
            rows = await services.alatest_frames(self.room, last_seq, app_settings.HISTORY_LIMIT)
            self._write(self._pack(first + [enc for _, enc in rows]))
            self.last_sent = last_seq
            # The history shows current texts: no change up to here is news to this client.
            self.last_update = last_update
        else:
            self._write(self._pack(first))
            # A client ahead of the server (database reset) starts again from last_seq.
            self.last_sent = min(after, last_seq)
            # Without after_update the client asks for no changes (an older client).
            self.last_update = last_update if after_update is None else after_update
            await self._replay_changes(last_seq, last_update)
        await self._catch_up()
        if self.closing:
            return
        await self._join_presence()
        # Replies running in the room answer with their text so far (assistant.start).
        await assistant.request_snapshots(self.room.pk, self._hub.channel or "", self.conn_id)

    async def _catch_up(self) -> None:
        """Replay from the database until this socket has reached the hub's head, then go
        live (no await between the last check and going live)."""
        hub = self._hub
        try:
            while not self.closing and not hub.go_live(self.room.pk, self):
                await self._replay(hub.head(self.room.pk))
                await self._replay_updates(hub.update_head(self.room.pk))
        except Detached:
            # Revoked or ended while catching up: nothing more to send.
            self.closing = True

    async def _join_presence(self) -> None:
        self.presence = get_hub()
        self.read_gate = RateGate(app_settings.READ_THROTTLE_SECONDS)
        state = await self.presence.join(
            self.room.pk,
            self.conn_id,
            self.user_id,
            self.user.get_username(),
            self._send_presence,
            alive=self._alive,
        )
        self._send_presence_state(state.values())
        reads = await services.aread_state(self.room.pk, app_settings.READ_STATE_LIMIT)
        budget = app_settings.MAX_SEND_BYTES
        frames = protocol.read_state_frames(reads, budget)
        self._write(self._pack([Encoded.of(f) for f in frames]))

    def _alive(self) -> bool:
        return not self._ended and not self.closing

    def _query_int(self, name: str, error: str) -> tuple[int | None, str | None]:
        """The non-negative integer query parameter ``name`` (None when absent), or ``error``."""
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        values = query.get(name)
        if not values:
            return None, None
        try:
            value = int(values[0])
        except ValueError:
            return None, error
        if value < 0:
            return None, error
        return value, None

    async def _replay_changes(self, upto: int, upto_update: int) -> None:
        """Resume: the changes of the messages the client has (seq <= ``last_sent``), then
        the newer messages, which show their current text."""
        # A client ahead of the server (database reset) starts again from upto_update.
        self.last_update = min(self.last_update, upto_update)
        await self._replay_updates(upto_update)
        await self._replay(upto)
        if not self.closing:
            self.last_update = max(self.last_update, upto_update)

    async def _replay_updates(self, upto: int) -> None:
        """Send the changes after ``last_update`` up to ``upto`` of messages this socket has
        sent (seq <= ``last_sent``), in update_seq order, in batches."""
        batch = app_settings.REPLAY_BATCH_SIZE
        while self.last_update < upto and not self.closing:
            rows = await services.aupdate_frames(
                self.room.pk, self.last_update, upto, self.last_sent, batch
            )
            if not rows or self.closing:
                break
            await self._write_paced(self._pack([enc for _, _, enc in rows]))
            if self.closing:
                break
            self.last_update = rows[-1][0]
        if not self.closing:
            # The rest changed messages the client gets afterwards with their current text.
            self.last_update = max(self.last_update, upto)

    async def _replay(self, upto: int) -> None:
        """Send every message after ``last_sent`` up to ``upto``, in batches, in order."""
        batch = app_settings.REPLAY_BATCH_SIZE
        while self.last_sent < upto and not self.closing:
            rows = await services.amessage_frames(self.room, self.last_sent, upto, batch)
            if not rows or self.closing:
                break
            await self._write_paced(self._pack([enc for _, enc in rows]))
            if self.closing:
                break
            self.last_sent = rows[-1][0]
        if not self.closing:
            self.last_sent = max(self.last_sent, upto)

    # --- ending --------------------------------------------------------------------------

    async def disconnect(self, code: int) -> None:
        await self._end()

    async def _end(self) -> None:
        """Release everything this socket holds; runs once, on every kind of ending."""
        if self._ended:
            return
        self._ended = True
        self.live = False
        if self.counted:
            metrics().sockets_open.dec()
        if self.hub is not None and hasattr(self, "room"):
            self.hub.detach(self.room.pk, self)
        if self.socket_lease is not None:
            # Not awaited: this may run while daphne cancels the application.
            self.socket_lease.release_soon()
        if self.read_timer is not None:
            self.read_timer.cancel()
        await self._drop_pending()
        try:
            if self.pending_read is not None:
                await self._flush_read()
            if self.typed:
                await self._stop_typing()
        except Exception:
            logger.warning("Cleaning up a chat socket failed", exc_info=True)
        finally:
            if self.presence is not None:
                await self.presence.leave(self.room.pk, self.conn_id)

    def revoke(self, code: int) -> None:
        """Close this socket with ``code`` (called by the hub; 4008 drops its backlog)."""
        if self.closing:
            return
        self.closing = True
        self.live = False
        if self.hub is not None:
            self.hub.detach(self.room.pk, self)
        metrics().socket_closes.labels(code=str(code)).inc()
        discard = code == protocol.CLOSE_SLOW_CONSUMER
        self._spawn(self.writer.close(code, discard=discard))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task this socket holds until it ends (tasks are weak refs)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- client frames -------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing or not self.live:
            return
        if (text_data is None) == self.msgpack and (bytes_data is None) != self.msgpack:
            pass  # the socket's own format
        else:
            wanted = "MessagePack in binary" if self.msgpack else "JSON in text"
            await self._settle()
            self._error(protocol.BAD_FRAME, f"Send {wanted} messages on this socket.")
            return
        try:
            if bytes_data is not None:
                frames = protocol.parse_client_msgpack(bytes_data, self.limits)
            else:
                frames = protocol.parse_client_text(text_data or "", self.limits)
        except protocol.ProtocolError as exc:
            await self._settle()
            self._error(exc.code, exc.message)
            return
        for frame in _one_resume(frames):
            if self.closing:
                return
            await self._handle(frame)

    async def _handle(self, frame: protocol.ClientFrame | protocol.FrameError) -> None:
        if isinstance(frame, protocol.SendMessage):
            await self._handle_message(frame)
            return
        # Every other frame (and every refusal) is handled once the sends before it are
        # answered: its answer, and what it changes, come after theirs (docs/protocol.md).
        await self._settle()
        if self.closing:
            return
        if isinstance(frame, protocol.FrameError):
            self._error(frame.code, frame.message, frame.client_id, frame.seq)
        elif isinstance(frame, protocol.Ping):
            await self._handle_ping()
        elif isinstance(frame, protocol.Resume):
            await self._handle_resume(frame)
        elif isinstance(frame, protocol.Typing):
            await self._handle_typing(frame)
        elif isinstance(frame, protocol.Read):
            await self._handle_read(frame)
        elif isinstance(frame, protocol.Edit | protocol.Delete):
            await self._handle_change(frame)
        elif isinstance(frame, protocol.AssistantStop):
            await assistant.request_stop(
                frame.stream_id, self.user, self.room.pk, self._hub.channel or "", self.conn_id
            )

    async def _handle_message(self, frame: protocol.SendMessage) -> None:
        window = self._hub.send_window
        if window.full(self.user_id, time.monotonic(), frame.client_id):
            # Refused without a transaction: this process alone stored the limit already.
            await self._settle()
            if not self.closing:
                self._rate_limited(frame.client_id or None)
            return
        # The bound: the client's next frames wait (in daphne's inbound buffer, then in its
        # TCP window) until the oldest send is answered.
        while len(self._sends) >= self.max_pending_sends:
            await self._advance()
        if self.closing:
            return
        started = time.perf_counter()
        request = services.PostRequest(self.user, frame.text, frame.client_id, origin=self.conn_id)
        # Queued now, so this socket's sends take seqs in the order it sent them.
        stored = ingest.submit(self.room.pk, request)
        self._sends.append(_Send(frame, stored, started))
        # A callback, not a task per send that waits for its outcome and then for the send
        # before it: with 100 pipelining senders, answering took 13.6 % of the server's
        # py-spy samples that way and 3.7 % this way (bench/ingest.py), and acks now reach
        # the hub before its next flush instead of each releasing a held message alone.
        stored.add_done_callback(self._answer_ready)

    def _advance(self) -> asyncio.Future[None]:
        """A future done once the oldest send is answered, or all of them are dropped."""
        if self._advanced is None or self._advanced.done():
            self._advanced = asyncio.get_running_loop().create_future()
        return self._advanced

    def _wake(self) -> None:
        if self._advanced is not None and not self._advanced.done():
            self._advanced.set_result(None)
        self._advanced = None

    async def _settle(self) -> None:
        """Wait until every send of this socket so far is answered."""
        while self._sends:
            await self._advance()

    async def _drop_pending(self) -> None:
        """The socket ends: its sends are stored anyway (``chat.ingest``), unanswered."""
        asking, self._asking = self._asking, None
        sends = list(self._sends)
        self._sends.clear()
        for send in sends:
            if not send.stored.cancel():
                _retrieve(send.stored)  # done already: nobody is told any more
        self._wake()
        if asking is not None:
            asking.cancel()
            # asyncio.wait, not gather: it does not raise the task's cancellation here.
            await asyncio.wait([asking])

    def _answer_ready(self, _: object = None) -> None:
        """Answer the oldest sends whose outcome is known, in the order they were sent.

        The done callback of every send's outcome. A send that asks the assistant stays the
        oldest until that request is made (``_asked``), as its answer is not complete before."""
        sends = self._sends
        answered = False
        while sends and self._asking is None and sends[0].stored.done():
            send = sends[0]
            if self.closing:
                _retrieve(send.stored)
            else:
                try:
                    self._answer_stored(send)
                except Exception:
                    # As an unhandled error in a frame handler: logged, the socket closes (1011).
                    logger.exception("Answering a send in room %s failed", self.room.slug)
                    self._close_soon(protocol.CLOSE_INTERNAL_ERROR)
            if self._asking is not None:
                break
            sends.popleft()
            answered = True
        if answered:
            self._wake()

    def _asked(self, task: asyncio.Task[None]) -> None:
        if task is not self._asking:
            _retrieve(task)  # dropped with the socket (``_drop_pending``): nobody is told
            return
        self._asking = None
        self._sends.popleft()  # the send it answered
        self._wake()
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("Answering a send in room %s failed", self.room.slug, exc_info=exc)
            self._close_soon(protocol.CLOSE_INTERNAL_ERROR)
        self._answer_ready()

    def _close_soon(self, code: int) -> None:
        self.closing = True
        self.live = False
        self._spawn(self.close(code=code))

    def _answer_stored(self, send: _Send) -> None:
        frame = send.frame
        cid = frame.client_id or None
        window = self._hub.send_window
        try:
            result = send.stored.result()
        except services.RateLimited:
            self._rate_limited(cid)
            return
        except services.Revoked:
            self.revoke(protocol.CLOSE_FORBIDDEN)
            return
        except DatabaseError:
            logger.exception("Storing a message in room %s failed", self.room.slug)
            self._error(protocol.UNAVAILABLE, "The message could not be stored; retry.", cid)
            return
        metrics().message_store_seconds.observe(time.perf_counter() - send.started)
        if result.created:
            window.record(self.user_id, time.monotonic(), frame.client_id)
        # The ack goes out with the room's next batch, before the message itself.
        seq = result.message.seq
        self._reply(
            protocol.ack_frame(frame.client_id, seq), ack_seq=seq if result.created else None
        )
        if result.created and assistant.is_request(frame.text):
            self._asking = asyncio.ensure_future(self._ask_assistant(result.message))
            self._asking.add_done_callback(self._asked)

    async def _handle_change(self, frame: protocol.Edit | protocol.Delete) -> None:
        """Edit or delete a message; everybody (this socket too) gets its message_update."""
        seq = frame.seq
        if await quotas.edits.hit(self.user_id) > 0:
            window = app_settings.EDIT_RATE_LIMIT_WINDOW_SECONDS
            limit = app_settings.EDIT_RATE_LIMIT
            message = f"At most {limit} edits and deletes per {window:g} s; retry later."
            self._error(protocol.RATE_LIMITED, message, seq=seq)
            return
        try:
            if isinstance(frame, protocol.Edit):
                await services.aedit_message(self.room.pk, self.user, seq, frame.text)
            else:
                await services.adelete_message(self.room.pk, self.user, seq)
        except services.MessageNotFound:
            self._error(protocol.NOT_FOUND, f"No message {seq} in this room.", seq=seq)
        except services.NotAuthor:
            message = "Only its author (or staff) may change this message."
            self._error(protocol.FORBIDDEN, message, seq=seq)
        except services.Revoked:
            self.revoke(protocol.CLOSE_FORBIDDEN)
        except DatabaseError:
            logger.exception("Changing message %s in room %s failed", seq, self.room.slug)
            self._error(protocol.UNAVAILABLE, "The change could not be stored; retry.", seq=seq)

    def _rate_limited(self, cid: str | None) -> None:
        window = app_settings.RATE_LIMIT_WINDOW_SECONDS
        limit = app_settings.RATE_LIMIT_MESSAGES
        message = f"At most {limit} messages per {window:g} s; retry later."
        self._error(protocol.RATE_LIMITED, message, cid)

    async def _ask_assistant(self, message: Message) -> None:
        # The reply runs in chat.assistant.replies's registry, not here: it outlives this socket.
        try:
            await assistant.request_reply(self.room, self.user, message)
        except assistant.AssistantRefused as exc:
            self._error(exc.code, exc.message)

    async def _handle_ping(self) -> None:
        try:
            room_last, room_update = await services.arecent_heads(
                self.room.pk, app_settings.PONG_SEQ_MAX_AGE_SECONDS
            )
        except DatabaseError:
            room_last, room_update = self.last_sent, 0
        # Changes the channel layer lost with nothing after them: the hub fills them in.
        self._hub.note_update_head(self.room.pk, room_update)
        # Never report less than this socket already delivered (the value may be cached).
        last = max(room_last, self.last_sent)
        self._reply(protocol.pong_frame(last, self.last_update))

    async def _handle_resume(self, frame: protocol.Resume) -> None:
        try:
            upto, upto_update = await services.aheads(self.room.pk)
        except DatabaseError:
            logger.exception("Resume in room %s failed", self.room.slug)
            self._error(protocol.UNAVAILABLE, "History is unavailable; retry.")
            return
        # Off the hub while replaying: _catch_up goes live again once caught up.
        self.live = False
        target = max(self.last_sent, upto)
        update_target = max(self.last_update, upto_update)
        self.last_sent = min(frame.after, target)
        if frame.after_update is not None:
            self.last_update = frame.after_update
        try:
            await self._replay_changes(target, update_target)
            await self._catch_up()
        except DatabaseError:
            logger.exception("Resume in room %s failed", self.room.slug)
            self._error(protocol.UNAVAILABLE, "History is unavailable; retry.")
            await self._catch_up_or_close()

    async def _catch_up_or_close(self) -> None:
        # The socket must not stay off the hub: without the database it cannot catch up, so
        # it closes and the client reconnects with ?after= when the database is back.
        try:
            await self._catch_up()
        except DatabaseError:
            await self.close(code=protocol.CLOSE_TRY_AGAIN)

    async def _handle_typing(self, frame: protocol.Typing) -> None:
        if self.presence is None:
            return
        key = (self.room.pk, self.user_id)
        presence, now = self.presence, time.monotonic()
        if frame.active:
            self.typed = True
            # Clients refresh while typing: one relay per interval keeps indicators alive.
            # A start after a stop is relayed at once, up to a few per interval; the state is
            # per room and user in this process, so no client frame resets it.
            refresh_due = presence.typing_gate.allow(key, now)
            if key in presence.typing_relayed:
                allowed = refresh_due
            else:
                allowed = not presence.typing_starts.full(key, now)
                if allowed:
                    presence.typing_starts.record(key, now)
            if allowed:
                presence.typing_relayed.add(key)
                await services.relay_typing(self.room.pk, self.user, True)
        elif key in presence.typing_relayed:
            await self._stop_typing()

    async def _stop_typing(self) -> None:
        if self.presence is None:
            return
        key = (self.room.pk, self.user_id)
        if key in self.presence.typing_relayed:
            self.presence.typing_relayed.discard(key)
            await services.relay_typing(self.room.pk, self.user, False)

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
        self._spawn(self._flush_read())

    async def _flush_read(self) -> None:
        seq, self.pending_read = self.pending_read, None
        if seq is None:
            return
        self.read_gate.allow("read", time.monotonic())
        try:
            await services.amark_read(self.room.pk, self.user, seq)
        except DatabaseError:
            logger.exception("Storing a read marker in room %s failed", self.room.slug)
            self._error(protocol.UNAVAILABLE, "The read marker could not be stored.")

    # --- what the hub calls --------------------------------------------------------------

    def deliver(
        self, messages: list[Packed], last_seq: int | None, last_update: int | None = None
    ) -> None:
        self._write(messages)
        if last_seq is not None and last_seq > self.last_sent:
            self.last_sent = last_seq
        if last_update is not None and last_update > self.last_update:
            self.last_update = last_update
        if self.presence_stale and not self.congested():
            self.presence_stale = False
            if self.presence is not None:
                self._send_presence_state(self.presence.current(self.room.pk).values())

    def congested(self) -> bool:
        return self.writer.backlog_bytes() > self.max_outbound_bytes // 4

    def backlog_bytes(self) -> int:
        return self.writer.backlog_bytes()

    # --- sending -------------------------------------------------------------------------

    def _write(self, messages: list[Packed]) -> None:
        if self.closing:
            return
        # Measured before writing: a burst written in one go (a batch, a history) reaches
        # the socket only when the event loop next runs, so what counts is whether the
        # client took what it was sent before.
        if self.writer.backlog_bytes() > self.max_outbound_bytes:
            logger.info("Closing a chat socket of user %s: slow consumer", self.user_id)
            self.revoke(protocol.CLOSE_SLOW_CONSUMER)
            return
        for message in messages:
            self.writer.write(message)

    async def _write_paced(self, messages: list[Packed]) -> None:
        """Write what the server pulls (replays) at the client's pace: wait while half the
        outbound bound is unread, and close as a slow consumer if it stays so too long."""
        high = self.max_outbound_bytes // 2
        for message in messages:
            if self.writer.backlog_bytes() > high:
                drained = await self.writer.wait_below(high // 2, SLOW_CONSUMER_SECONDS)
                if not drained:
                    self.revoke(protocol.CLOSE_SLOW_CONSUMER)
            if self.closing:
                return
            self.writer.write(message)

    def _pack(self, frames: list[Encoded]) -> list[Packed]:
        budget = app_settings.MAX_SEND_BYTES
        if self.msgpack:
            return [Packed.of_binary(data) for data in protocol.pack_msgpack(frames, budget)]
        return [Packed.of(text) for text in protocol.pack(frames, budget)]

    def _reply(self, frame: dict[str, Any], ack_seq: int | None = None) -> None:
        """Answer the client, in order: answers go out with the room's next batch."""
        enc = Encoded.of(frame)
        hub = self.hub
        if hub is None or not hub.send_direct(self.room.pk, self.conn_id, enc, ack_seq):
            self._write(self._pack([enc]))

    def _error(
        self, code: str, message: str, client_id: str | None = None, seq: int | None = None
    ) -> None:
        self._reply(protocol.error_frame(code, message, client_id, seq))

    async def _send_presence(self, enc: Encoded) -> None:
        # Presence diffs are the first thing a falling-behind socket goes without: it gets the
        # whole state again once it has caught up (``deliver``).
        if self.closing:
            return
        if self.congested():
            self.presence_stale = True
            return
        self._write(self._pack([enc]))

    def _send_presence_state(self, users: Any) -> None:
        frames = protocol.presence_state_frames(list(users), app_settings.MAX_SEND_BYTES)
        self._write(self._pack([Encoded.of(f) for f in frames]))


def _one_resume(
    frames: list[protocol.ClientFrame | protocol.FrameError],
) -> list[protocol.ClientFrame | protocol.FrameError]:
    """At most one resume per client message: the earliest ``after``, where the last one was.

    ``[resume after=0] x 50`` would otherwise replay the whole room fifty times.
    """
    resumes = [f for f in frames if isinstance(f, protocol.Resume)]
    if len(resumes) <= 1:
        return frames
    update_afters = [r.after_update for r in resumes if r.after_update is not None]
    earliest = protocol.Resume(
        after=min(r.after for r in resumes),
        after_update=min(update_afters) if update_afters else None,
    )
    last = max(i for i, f in enumerate(frames) if isinstance(f, protocol.Resume))
    return [
        earliest if i == last else f
        for i, f in enumerate(frames)
        if i == last or not isinstance(f, protocol.Resume)
    ]


@dataclasses.dataclass(slots=True)
class _Send:
    """One send of a socket in flight: its frame, and the future of its outcome (``ingest``)."""

    frame: protocol.SendMessage
    stored: asyncio.Future[services.PostResult]
    started: float  # time.perf_counter() when submitted


def _retrieve(outcome: asyncio.Future[Any]) -> None:
    """Mark a done outcome nobody is told of as retrieved (no "never retrieved" log)."""
    if not outcome.cancelled():
        outcome.exception()
