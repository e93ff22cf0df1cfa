"""Room replies of the assistant: a message starting with ``@assistant`` gets a streamed reply.

The reply belongs to the room, not to the socket that asked: it runs as a task in a
process-level registry (``registry``), so it goes on when the requester reloads or leaves.
Every member sees it grow through the room's channel-layer group (which crosses processes
with Redis): ``assistant.start``, coalesced ``assistant.delta`` frames, then the stored
``message`` (posted through ``services.post_message``, so seq stays gap-free) and
``assistant.end``. Each frame is encoded once, by the runner.

Each running reply listens on its own channel, added to two groups:

- ``chat.assistant.room.<room id>``: a socket that joins mid-reply asks there for snapshots
  (the text so far, and the index of the next delta), answered to that socket only;
- ``chat.assistant.stream.<stream id>``: ``assistant.stop`` from any process reaches the
  owner process; the requester or staff may stop, and the partial text is stored as stopped.

Failures (upstream errors, timeouts, a malformed stream) end the reply with status ``error``
and the partial text stored with that mark. A server restart (``realtime_kit.drain``, whose
callback ``interrupt_replies`` chat's AppConfig registers) ends every running reply with status
``interrupted`` the same way, before the runner closes the sockets. Every path closes the
upstream stream and leaves the registry; database work goes through
``database_sync_to_async``, which releases the thread's connection around each call.

Limits: ``CHAT_ASSISTANT_MAX_CONCURRENT_PER_USER`` running replies per user (a lease of
``quotas.room_replies``, held while the reply runs: across processes with ``CHAT_REDIS_URL``)
and ``CHAT_ASSISTANT_RATE_LIMIT_REPLIES`` requests per window (counted from stored messages,
so across processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models.functions import Left
from django.utils import timezone

from realtime_kit import drain
from realtime_kit.leases import Lease
from realtime_kit.metrics import metrics

from .. import protocol, services
from ..conf import app_settings
from ..llm import BaseLLMBackend, ChatMessage, LLMError, get_backend
from ..models import Message, Room
from . import protocol as ap
from . import quotas, runs

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

REQUEST_PREFIX = "@assistant"
_REQUEST = re.compile(r"@assistant(?![\w-])", re.IGNORECASE)
# is_request() reads the mention and the one character after it, no more (re folds case one
# code point at a time, so the mention is always 10 characters): the rate limit can then
# decide from these first characters alone.
REQUEST_PREFIX_CHARS = len(REQUEST_PREFIX) + 1
STREAM_ID_PREFIX = protocol.ASSISTANT_CLIENT_ID_PREFIX
# A demo reply's stream id (its stored client_id) says so: its message frame is marked demo.
DEMO_STREAM_ID_PREFIX = protocol.DEMO_REPLY_CLIENT_ID_PREFIX
_END = object()


class AssistantRefused(Exception):
    """A reply request or stop that is not allowed now; ``code`` goes into an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_request(text: str) -> bool:
    """Whether a room message asks the assistant (it starts with ``@assistant``)."""
    return _REQUEST.match(text, 0, REQUEST_PREFIX_CHARS) is not None


def control_group(room_id: int) -> str:
    return f"chat.assistant.room.{room_id}"


def stream_group(stream_id: str) -> str:
    return f"chat.assistant.stream.{stream_id}"


# --- the registry --------------------------------------------------------------------------


@dataclass(eq=False)
class Reply:
    """One running reply. ``text`` is what the room has been sent so far."""

    stream_id: str
    room_id: int
    room_slug: str
    requester_id: int
    requested_by: dict[str, Any]
    request_seq: int
    demo: bool
    user: dict[str, Any] = field(default_factory=dict)  # the assistant user's frame
    text: str = ""
    pending: str = ""  # received, waiting to be sent with later deltas
    pending_since: float = 0.0
    next_index: int = 0
    started: bool = False  # assistant.start was broadcast: snapshots may be answered
    stop_requested: bool = False
    lease: Lease | None = None  # the requester's place among their running replies
    stop_status: str = ap.STOPPED  # the status a stop stores: stopped, or interrupted
    # Another process ended it (we looked dead to it): store nothing, broadcast nothing.
    taken_over: bool = False
    task: asyncio.Task[None] | None = None
    next_delta: asyncio.Task[Any] | None = None

    def snapshot_frame(self) -> dict[str, Any]:
        return ap.start_frame(
            stream_id=self.stream_id,
            room_slug=self.room_slug,
            user=self.user,
            requested_by=self.requested_by,
            request_seq=self.request_seq,
            demo=self.demo,
            text=self.text,
            next_index=self.next_index,
        )

    def request_stop(self, status: str = ap.STOPPED) -> None:
        """Stop reading the model: the stream is closed and the partial text stored."""
        if not self.stop_requested:
            self.stop_status = status
        self.stop_requested = True
        if self.next_delta is not None and not self.next_delta.done():
            self.next_delta.cancel()


class ReplyRegistry:
    """The replies running in this process, by stream id."""

    def __init__(self) -> None:
        self._replies: dict[str, Reply] = {}

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, stream_id: str) -> Reply | None:
        return self._replies.get(stream_id)

    def running(self, room_id: int | None = None) -> list[Reply]:
        return [r for r in self._replies.values() if room_id is None or r.room_id == room_id]

    def add(self, reply: Reply) -> None:
        if reply.stream_id not in self._replies:
            metrics().assistant_streams.labels(kind="room").inc()
        self._replies[reply.stream_id] = reply

    def discard(self, reply: Reply) -> None:
        if self._replies.get(reply.stream_id) is reply:
            del self._replies[reply.stream_id]
            metrics().assistant_streams.labels(kind="room").dec()
        if reply.lease is not None:
            reply.lease.release_soon()

    def launch(self, reply: Reply, backend: BaseLLMBackend) -> None:
        # A fresh context: the task must not inherit the requester's (e.g. an HTTP request's
        # thread-sensitive context, which ends with that request).
        reply.task = asyncio.get_running_loop().create_task(
            _run(reply, backend), context=contextvars.Context()
        )
        reply.task.add_done_callback(lambda _: self.discard(reply))

    async def shutdown(self, status: str = ap.STOPPED) -> None:
        """Stop every reply (storing partial text with ``status``) and wait for them to end."""
        replies = list(self._replies.values())
        for reply in replies:
            reply.request_stop(status)
        tasks = [r.task for r in replies if r.task is not None]
        if tasks:
            await asyncio.wait(tasks)


registry = ReplyRegistry()


async def interrupt_replies() -> None:
    """Drain callback: end every running reply as interrupted; members get ``assistant.end``."""
    await registry.shutdown(ap.INTERRUPTED)


# --- what the consumer calls ----------------------------------------------------------------


async def request_reply(room: Room, user: User, message: Message) -> Reply:
    """Start a reply to ``message`` in ``room``; raise AssistantRefused when over a limit."""
    if drain.draining():
        # It would be interrupted at once: the server is about to close this socket.
        raise AssistantRefused(
            protocol.UNAVAILABLE, "The server is restarting; ask again in a moment."
        )
    backend = get_backend()
    prefix = DEMO_STREAM_ID_PREFIX if backend.is_demo else STREAM_ID_PREFIX
    reply = Reply(
        stream_id=prefix + uuid.uuid4().hex,
        room_id=room.pk,
        room_slug=room.slug,
        requester_id=user.pk,
        requested_by=protocol.user_frame(user),
        request_seq=message.seq,
        demo=backend.is_demo,
    )
    reply.lease = await _hold_place(user.pk, reply.stream_id)
    registry.add(reply)
    try:
        await _check_rate(user)
    except BaseException:
        registry.discard(reply)
        raise
    registry.launch(reply, backend)
    return reply


async def _hold_place(user_id: int, stream_id: str) -> Lease:
    try:
        lease = await quotas.room_replies.acquire(user_id, stream_id)
    except quotas.StoreUnavailable:
        logger.warning("Counting running assistant replies failed", exc_info=True)
        raise AssistantRefused(
            protocol.UNAVAILABLE, "The assistant is unavailable; retry."
        ) from None
    if lease is None:
        limit = quotas.room_replies.limit
        raise AssistantRefused(
            ap.ASSISTANT_BUSY,
            f"You already have {limit} assistant repl{'y' if limit == 1 else 'ies'} running: "
            "wait for it to finish, or stop it.",
        )
    return lease


async def request_stop(
    stream_id: str, user: User, room_id: int, reply_to: str, conn_id: str
) -> None:
    """Ask the process running ``stream_id`` to stop it (on behalf of ``user``).

    A refusal is answered to socket ``conn_id`` through the room hub listening on
    ``reply_to`` (its process's channel)."""
    layer = get_channel_layer()
    if layer is None:
        return
    event = {
        "type": protocol.EVENT_ASSISTANT_STOP,
        "stream_id": stream_id,
        "user_id": user.pk,
        "is_staff": bool(user.is_staff),
        "reply_to": reply_to,
        "room_id": room_id,
        "to": conn_id,
    }
    await layer.group_send(stream_group(stream_id), event)


async def request_snapshots(room_id: int, reply_to: str, conn_id: str) -> None:
    """Ask every process for the replies running in the room, answered to socket
    ``conn_id`` through the room hub listening on channel ``reply_to``."""
    layer = get_channel_layer()
    if layer is not None:
        event = {"type": protocol.EVENT_ASSISTANT_SNAPSHOT, "reply_to": reply_to, "to": conn_id}
        await layer.group_send(control_group(room_id), event)


async def _check_rate(user: User) -> None:
    try:
        recent = await _count_recent_requests(user.pk)
    except DatabaseError:
        logger.exception("Counting assistant requests failed")
        raise AssistantRefused(
            protocol.UNAVAILABLE, "The assistant is unavailable; retry."
        ) from None
    limit = app_settings.ASSISTANT_RATE_LIMIT_REPLIES
    # The request itself is stored (and counted) before this check.
    if recent > limit:
        window = app_settings.ASSISTANT_RATE_LIMIT_WINDOW_SECONDS
        raise AssistantRefused(
            protocol.RATE_LIMITED,
            f"At most {limit} assistant requests per {window:g} s; retry later.",
        )


@database_sync_to_async
def _count_recent_requests(user_id: int) -> int:
    # Counted with is_request() itself: an SQL case-insensitive match folds case its own way
    # (SQLite: ASCII only), and "@a\u017f\u017fi\u017ftant" once got replies without counting.
    # Only the first characters of this user's messages in the window are read, and the chat
    # rate limit (CHAT_RATE_LIMIT_MESSAGES) bounds how many messages that is.
    since = timezone.now() - timedelta(seconds=app_settings.ASSISTANT_RATE_LIMIT_WINDOW_SECONDS)
    prefixes = (
        Message.objects.filter(user_id=user_id, created_at__gte=since, text__startswith="@")
        .annotate(prefix=Left("text", REQUEST_PREFIX_CHARS))
        .values_list("prefix", flat=True)
    )
    return sum(1 for prefix in prefixes if is_request(prefix))


# --- the runner ------------------------------------------------------------------------------


async def _run(reply: Reply, backend: BaseLLMBackend) -> None:
    layer = get_channel_layer()
    if layer is None:
        raise ImproperlyConfigured("chat needs a channel layer (see check chat.E002).")
    control = await layer.new_channel("chat.assistant.")
    groups = [control_group(reply.room_id), stream_group(reply.stream_id)]
    listener: asyncio.Task[None] | None = None
    heartbeat: asyncio.Task[None] | None = None
    try:
        for group in groups:
            await layer.group_add(group, control)
        listener = asyncio.create_task(_listen(reply, layer, control))
        try:
            assistant_user, context = await _load_context(reply)
        except DatabaseError:
            logger.exception("Loading the context of an assistant reply failed")
            error = (protocol.UNAVAILABLE, "The assistant could not read the room.")
            await _broadcast(reply, ap.end_frame(reply.stream_id, ap.ERROR, None, error))
            return
        reply.user = protocol.user_frame(assistant_user)
        reply.started = True
        heartbeat = asyncio.create_task(_heartbeat(reply))
        await _broadcast(reply, reply.snapshot_frame())
        status, failure = await _pump(reply, backend, context)
        await _flush(reply)
        await _finish(reply, assistant_user, status, failure)
    except Exception:
        # Nothing else awaits this task: log here (backend errors never carry the key).
        logger.exception("Assistant reply %s in room %s failed", reply.stream_id, reply.room_slug)
    finally:
        for task in (heartbeat, listener):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            # Usually deleted with the stored reply already; this covers every other end.
            await runs.aclose_run(reply.stream_id)
        except DatabaseError:
            # Left behind, it is taken over by a sweeper and ends as interrupted.
            logger.warning("Forgetting assistant run %s failed", reply.stream_id, exc_info=True)
        for group in groups:
            try:
                await layer.group_discard(group, control)
            except Exception:
                logger.exception("Leaving %s failed", group)


async def _heartbeat(reply: Reply) -> None:
    """Record the text so far every CHAT_ASSISTANT_HEARTBEAT_SECONDS (chat/assistant/runs.py)."""
    interval = app_settings.ASSISTANT_HEARTBEAT_SECONDS
    while True:
        await asyncio.sleep(interval)
        try:
            ours = await runs.acheckpoint(reply.stream_id, reply.text)
        except DatabaseError:
            logger.warning("Recording assistant reply %s failed", reply.stream_id, exc_info=True)
            continue
        if not ours:
            # A sweeper took it for dead (we were slower than CHAT_ASSISTANT_TAKEOVER_SECONDS)
            # and ended it as interrupted: stop reading the model.
            reply.taken_over = True
            reply.request_stop(ap.INTERRUPTED)
            return


async def _pump(
    reply: Reply, backend: BaseLLMBackend, context: list[ChatMessage]
) -> tuple[str, LLMError | None]:
    """Read the model into ``reply``, sending coalesced deltas; return (status, failure)."""
    loop = asyncio.get_running_loop()
    coalesce_seconds = app_settings.ASSISTANT_COALESCE_SECONDS
    coalesce_chars = app_settings.ASSISTANT_COALESCE_CHARS
    max_chars = app_settings.ASSISTANT_MAX_REPLY_CHARS
    max_bytes = app_settings.MAX_TEXT_BYTES
    deltas = backend.stream(context)
    try:
        while not reply.stop_requested:
            if reply.next_delta is None:
                # A task, so that waiting for the model can time out to send what we have
                # (and be cancelled by a stop) without cancelling the generator itself.
                reply.next_delta = asyncio.ensure_future(_next(deltas))
            timeout = None
            if reply.pending:
                timeout = max(0.0, reply.pending_since + coalesce_seconds - loop.time())
            done, _ = await asyncio.wait({reply.next_delta}, timeout=timeout)
            if not done:
                await _flush(reply)
                continue
            step, reply.next_delta = reply.next_delta, None
            if step.cancelled():
                continue  # only a stop cancels it: the loop condition ends the reply
            try:
                delta = step.result()
            except LLMError as exc:
                return ap.ERROR, exc
            if delta is _END:
                return ap.DONE, None
            if not reply.pending:
                reply.pending_since = loop.time()
            reply.pending += delta
            if len(reply.text) + len(reply.pending) > max_chars:
                reply.pending = reply.pending[: max(0, max_chars - len(reply.text))]
                too_long = f"The reply was cut at {max_chars} characters."
                return ap.ERROR, LLMError(ap.REPLY_TOO_LONG, too_long)
            # The stored reply is a message like any other: its frame must fit one WebSocket
            # message, counted as encoded (a control character is 6 bytes).
            room_bytes = max_bytes - protocol.encoded_text_bytes(reply.text)
            if protocol.encoded_text_bytes(reply.pending) > room_bytes:
                reply.pending = protocol.text_within(reply.pending, room_bytes)
                too_long = f"The reply was cut at {max_bytes} bytes."
                return ap.ERROR, LLMError(ap.REPLY_TOO_LONG, too_long)
            # The first delta goes out at once (time to first token is what people notice);
            # later ones wait up to coalesce_seconds for company.
            if reply.next_index == 0 or len(reply.pending) >= coalesce_chars:
                await _flush(reply)
        return reply.stop_status, None
    finally:
        pending, reply.next_delta = reply.next_delta, None
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait({pending})
        # aclosing semantics: a generator suspended at a yield runs its finally now.
        await deltas.aclose()


async def _next(deltas: Any) -> Any:
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        return _END


async def _flush(reply: Reply) -> None:
    """Send the waiting text as one delta (the text is the reply's before the send awaits)."""
    if not reply.pending:
        return
    content, reply.pending = reply.pending, ""
    index = reply.next_index
    reply.next_index += 1
    metrics().assistant_tokens.labels(kind="room").inc()
    reply.text += content
    await _broadcast(reply, ap.delta_frame(reply.stream_id, index, content))


async def _finish(
    reply: Reply, assistant_user: User, status: str, failure: LLMError | None
) -> None:
    if reply.taken_over:
        return
    seq = None
    if reply.text:
        stored_status = "" if status == ap.DONE else status
        try:
            seq = await _store(reply, assistant_user, stored_status)
        except (DatabaseError, services.RateLimited, Room.DoesNotExist):
            logger.exception("Storing an assistant reply in room %s failed", reply.room_slug)
            status = ap.ERROR
            failure = LLMError(protocol.UNAVAILABLE, "The reply could not be stored.")
    if seq is None:
        # Nothing stored (no text, or storing failed), so no transaction forgot the run: forget
        # it before members hear the end, so that none finds it left behind and a process
        # dying right after cannot have the sweeper end the reply a second time.
        with contextlib.suppress(DatabaseError):  # the finally tries again, else the sweeper
            await runs.aclose_run(reply.stream_id)
    error = (failure.code, failure.message) if failure is not None else None
    await _broadcast(reply, ap.end_frame(reply.stream_id, status, seq, error))


async def _broadcast(reply: Reply, frame: dict[str, Any]) -> None:
    await broadcast_frame(reply.room_id, frame)


async def broadcast_frame(room_id: int, frame: dict[str, Any]) -> None:
    """Send an assistant frame to every socket of the room, encoded once."""
    event = {"type": protocol.EVENT_ASSISTANT, "text": protocol.encode(frame)}
    await services.abroadcast(room_id, event)


async def _answer(reply: Reply, layer: Any, event: dict[str, Any], frame: dict[str, Any]) -> None:
    """Send ``frame`` to the one socket that asked (through its process's room hub)."""
    answer = {
        "type": protocol.EVENT_ASSISTANT,
        "text": protocol.encode(frame),
        "room_id": event.get("room_id", reply.room_id),
        "to": event.get("to"),
    }
    await layer.send(event["reply_to"], answer)


async def _listen(reply: Reply, layer: Any, channel: str) -> None:
    """Answer snapshot requests and stop requests addressed to this reply."""
    while True:
        event = await layer.receive(channel)
        try:
            await _control(reply, layer, event)
        except Exception:
            logger.exception("Handling %s for an assistant reply failed", event.get("type"))


async def _control(reply: Reply, layer: Any, event: dict[str, Any]) -> None:
    kind = event.get("type")
    reply_to = event.get("reply_to")
    if kind == protocol.EVENT_ASSISTANT_SNAPSHOT and reply.started and reply_to:
        await _answer(reply, layer, event, reply.snapshot_frame())
    elif kind == protocol.EVENT_ASSISTANT_STOP and event.get("stream_id") == reply.stream_id:
        if event.get("user_id") == reply.requester_id or event.get("is_staff"):
            reply.request_stop()
        elif reply_to:
            frame = protocol.error_frame(
                ap.ASSISTANT_FORBIDDEN, "Only the member who asked, or staff, can stop a reply."
            )
            await _answer(reply, layer, event, frame)


# --- database ---------------------------------------------------------------------------------


@database_sync_to_async
def _load_context(reply: Reply) -> tuple[User, list[ChatMessage]]:
    """The assistant user, and the model's input: a system prompt and recent room history."""
    assistant = assistant_user()
    rows = (
        # Deleted messages are gone for the model too (their text is empty anyway).
        Message.objects.filter(room_id=reply.room_id, seq__lte=reply.request_seq, deleted=False)
        .select_related("user")
        .order_by("-seq")[: app_settings.ASSISTANT_CONTEXT_MESSAGES]
    )
    budget = app_settings.ASSISTANT_CONTEXT_CHARS
    history: list[ChatMessage] = []
    for message in rows:  # newest first
        if message.user_id == assistant.pk:
            item = ChatMessage(role="assistant", content=message.text)
        else:
            item = ChatMessage(
                role="user", content=f"{message.user.get_username()}: {message.text}"
            )
        if history and len(item["content"]) > budget:
            break
        budget -= len(item["content"])
        history.append(item)
    history.reverse()
    prompt = app_settings.ASSISTANT_SYSTEM_PROMPT
    system = [ChatMessage(role="system", content=prompt)] if prompt else []
    # Last: from here on a process dying mid-reply leaves a run that another one ends.
    runs.open_run(reply.stream_id, reply.room_id, reply.request_seq)
    return assistant, system + history


def assistant_user() -> User:
    """The user replies are stored as (``CHAT_ASSISTANT_USERNAME``), created if missing.

    It is inactive: a bot that nobody logs in as and that receives no notifications (mentions,
    broadcasts to everyone: ``notifications`` skips inactive users). Its replies are stored
    with ``check_rate=False``, which skips the active-user check of human senders.
    """
    model = get_user_model()
    lookup = {model.USERNAME_FIELD: app_settings.ASSISTANT_USERNAME}
    can_deactivate = any(f.name == "is_active" for f in model._meta.get_fields())
    try:
        user = model.objects.get(**lookup)
    except model.DoesNotExist:
        pass
    else:
        if can_deactivate and user.is_active:
            # Made active by an older version: an update, not save(), so that no signal
            # takes it for a person being locked out.
            model.objects.filter(pk=user.pk).update(is_active=False)
            user.is_active = False
        return user
    user = model(**lookup)
    if can_deactivate:
        user.is_active = False
    user.set_unusable_password()  # nobody logs in as the assistant
    try:
        user.save()
    except IntegrityError:  # another process created it first
        return model.objects.get(**lookup)
    return user


@database_sync_to_async
def _store(reply: Reply, user: User, status: str) -> int:
    # One transaction: once the reply is stored no sweeper can find its run (and store the
    # reply a second time as interrupted).
    with transaction.atomic():
        result = services.post_message(
            reply.room_id,
            user,
            reply.text,
            client_id=reply.stream_id,
            status=status,
            check_rate=False,
        )
        runs.close_run(reply.stream_id)
    return result.message.seq
