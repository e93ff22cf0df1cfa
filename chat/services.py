"""Chat mutations and the broadcasts that follow them: the one place side effects happen.

Consumers and views parse, authorize and delegate here. A message is stored under its room's
row lock (which makes seq gap-free across processes), and broadcast only after the transaction
commits, encoded once for every recipient.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Count, F, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from . import batch_sql, mentions, protocol
from .conf import app_settings
from .delivery.hub import CONTROL_GROUP, room_group
from .models import Membership, Message, ReadMarker, Room

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    # Resolved by django-stubs to settings.AUTH_USER_MODEL; nothing is imported at run time.
    from django.contrib.auth.models import AnonymousUser, User

    AnyUser = User | AnonymousUser


class RoomNotFound(Exception):
    pass


class AccessDenied(Exception):
    pass


class RateLimited(Exception):
    pass


@dataclass(frozen=True)
class PostResult:
    message: Message
    created: bool


class Revoked(Exception):
    """The user may no longer post here (removed from a private room, or deactivated)."""


class MessageNotFound(Exception):
    """No message with this seq in the room, or it was deleted already."""


class NotAuthor(Exception):
    """Only a message's author (or staff) may edit or delete it."""


def visible_rooms(user: AnyUser) -> QuerySet[Room]:
    """Rooms the user may enter: every public room and the private ones they belong to."""
    if not user.is_authenticated:
        return Room.objects.none()
    return Room.objects.filter(Q(is_private=False) | Q(memberships__user=user)).distinct()


def get_room_for(user: AnyUser, slug: str) -> Room:
    """Return the room if ``user`` may enter it; raise RoomNotFound or AccessDenied."""
    try:
        room = Room.objects.get(slug=slug)
    except Room.DoesNotExist:
        raise RoomNotFound(slug) from None
    if not user.is_authenticated:
        raise AccessDenied(slug)
    if room.is_private and not Membership.objects.filter(room=room, user=user).exists():
        raise AccessDenied(slug)
    return room


def last_seq(room_id: int) -> int:
    return Room.objects.values_list("last_seq", flat=True).get(pk=room_id)


def last_update_seq(room_id: int) -> int:
    return Room.objects.values_list("last_update_seq", flat=True).get(pk=room_id)


def heads(room_id: int) -> tuple[int, int]:
    """The room's (last seq, last update_seq), read together."""
    return Room.objects.values_list("last_seq", "last_update_seq").get(pk=room_id)


# room id -> (last seq, last update_seq, monotonic time read): one query per room per
# interval and process, however many sockets ping.
_heads_cache: dict[int, tuple[int, int, float]] = {}


async def arecent_heads(room_id: int, max_age_seconds: float) -> tuple[int, int]:
    """The room's ``heads``, read from the database at most once per ``max_age_seconds``."""
    now = time.monotonic()
    cached = _heads_cache.get(room_id)
    if cached is not None and now - cached[2] < max_age_seconds:
        return cached[0], cached[1]
    seq, update_seq = await aheads(room_id)
    _heads_cache[room_id] = (seq, update_seq, now)
    return seq, update_seq


async def arecent_last_seq(room_id: int, max_age_seconds: float) -> int:
    """The room's last seq, read from the database at most once per ``max_age_seconds``."""
    return (await arecent_heads(room_id, max_age_seconds))[0]


@dataclass(frozen=True)
class PostRequest:
    """One message to store: see ``post_message`` for the fields."""

    user: User
    text: str
    client_id: str = ""
    status: str = ""
    check_rate: bool = True
    origin: str = ""


def _refusals(room: Room, requests: Sequence[PostRequest]) -> dict[int, Exception]:
    """Per user: Revoked if they may no longer post here; the others are absent."""
    ids = sorted({r.user.pk for r in requests if r.check_rate})
    if not ids:
        return {}
    # The room lock serialises senders of one room; the rate limit is per user over all rooms,
    # so also queue this user's concurrent sends (other rooms, other processes) on their row,
    # locked in pk order so that two batches never wait for each other. A no-op on SQLite,
    # where writers are serialised anyway. The same read tells whether the user was
    # deactivated since the socket opened (revocation closes it within a second; this closes
    # the window before that).
    active = set(
        get_user_model()
        .objects.select_for_update()
        .filter(pk__in=ids, is_active=True)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if room.is_private:
        active &= set(
            Membership.objects.filter(room=room, user_id__in=active).values_list(
                "user_id", flat=True
            )
        )
    return {uid: Revoked() for uid in ids if uid not in active}


def _check_access(room: Room, user: User) -> None:
    """Raise Revoked if ``user`` may no longer change things in ``room`` (locks their row)."""
    if _refusals(room, [PostRequest(user, "")]):
        raise Revoked()


def _recent_counts(requests: Sequence[PostRequest]) -> dict[int, int]:
    """Messages each rate-checked user stored in the rate window (all rooms, all processes)."""
    ids = {r.user.pk for r in requests if r.check_rate}
    if not ids:
        return {}
    since = timezone.now() - timedelta(seconds=app_settings.RATE_LIMIT_WINDOW_SECONDS)
    # Counting stored messages needs no extra state and holds across processes and tabs.
    rows = (
        Message.objects.filter(user_id__in=ids, created_at__gte=since)
        .values("user_id")
        .annotate(n=Count("id"))
        .values_list("user_id", "n")
    )
    return {uid: 0 for uid in ids} | dict(rows)


def post_messages(
    room_id: int,
    requests: Sequence[PostRequest],
    broadcasts: list[dict[str, Any]] | None = None,
) -> list[PostResult | Exception]:
    """Store several messages of one room in one transaction (group commit), in order.

    Each request gets its own outcome: a PostResult (``created=False`` when its client_id was
    already stored, by an earlier transaction or earlier in this batch), or RateLimited /
    Revoked for that request alone. Seqs of the stored ones are consecutive and in request
    order; each is broadcast after commit, ack first for its ``origin``. A database failure
    raises (DatabaseError) and stores none of them.

    With ``broadcasts`` the room events are appended to it instead, for the caller to send
    once this returns (committed): an async caller then sends them from its event loop rather
    than this thread waiting for the loop once per message. Only outside a transaction.
    """
    if broadcasts is not None and transaction.get_connection().in_atomic_block:
        raise RuntimeError("post_messages(broadcasts=...) would broadcast before the commit")
    outcomes: list[PostResult | Exception | None] = [None] * len(requests)
    with transaction.atomic():
        # The row lock serialises senders of this room (all processes) until commit, so seqs
        # are handed out in commit order, and a rollback returns its seqs with it.
        room = (
            Room.objects.select_for_update()
            .only("id", "slug", "last_seq", "is_private")
            .get(pk=room_id)
        )
        known = batch_sql.stored_by_client_id(
            room, [(r.user.pk, r.client_id) for r in requests if r.client_id]
        )
        refused = _refusals(room, requests)
        recent = _recent_counts(requests)
        limit = app_settings.RATE_LIMIT_MESSAGES
        new: list[tuple[int, batch_sql.NewMessage]] = []
        # A resend of a client_id earlier in this batch: (its index, the first one's in new).
        resent: list[tuple[int, int]] = []
        batch_keys: dict[tuple[int, str], int] = {}
        seq = room.last_seq
        for index, request in enumerate(requests):
            key = (request.user.pk, request.client_id)
            if request.client_id and key in known:
                outcomes[index] = PostResult(known[key], created=False)
                continue
            if request.client_id and key in batch_keys:
                resent.append((index, batch_keys[key]))
                continue
            if request.check_rate:
                if request.user.pk in refused:
                    outcomes[index] = refused[request.user.pk]
                    continue
                if recent[request.user.pk] >= limit:
                    outcomes[index] = RateLimited()
                    continue
                recent[request.user.pk] += 1
            seq += 1
            if request.client_id:
                batch_keys[key] = len(new)
            row = batch_sql.NewMessage(
                seq, request.user, request.text, request.client_id, request.status
            )
            new.append((index, row))
        if not new:
            return [o for o in outcomes if o is not None]
        messages = batch_sql.insert_messages(room, [row for _, row in new])
        for (index, _), message in zip(new, messages, strict=True):
            outcomes[index] = PostResult(message, created=True)
        for index, first in resent:
            outcomes[index] = PostResult(messages[first], created=False)
        Room.objects.filter(pk=room.pk).update(last_seq=seq)
        budget = app_settings.MAX_SEND_BYTES
        for (index, _), message in zip(new, messages, strict=True):
            request = requests[index]
            enc = protocol.message_encoded(message, room.slug, request.user, budget)
            event = {"type": protocol.EVENT_MESSAGE, "seq": message.seq, "text": enc.text}
            event["size"] = enc.size
            if request.origin:
                # The sending socket: its process sends it the ack before the message itself.
                event["origin"] = request.origin
            if broadcasts is None:
                transaction.on_commit(partial(broadcast, room.pk, event), robust=True)
            else:
                broadcasts.append(event)  # abroadcast adds the room
            if mentions.wanted(message.text, request.user):
                transaction.on_commit(partial(mentions.notify, message), robust=True)
    return [o for o in outcomes if o is not None]


def post_message(
    room_id: int,
    user: User,
    text: str,
    client_id: str = "",
    *,
    status: str = "",
    check_rate: bool = True,
    origin: str = "",
) -> PostResult:
    """Store a message with the room's next seq, or return the one this client_id already made.

    ``status`` marks an assistant reply that was stopped or failed; ``check_rate=False`` is for
    the assistant's own replies (their requests are rate-limited instead). ``origin`` names
    the sending socket (``conn_id``), so that it gets its ack before the message.
    Raises RateLimited, Revoked, or DatabaseError when the database is unavailable.
    """
    request = PostRequest(user, text, client_id, status, check_rate, origin)
    (outcome,) = post_messages(room_id, [request])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def edit_message(room_id: int, user: User, seq: int, text: str) -> Message:
    """Replace the text of message ``seq``: its author's, or any for staff.

    Raises MessageNotFound (none, or deleted), NotAuthor, Revoked, DatabaseError.
    """
    return _change(room_id, seq, text, user=user)


def delete_message(room_id: int, user: User, seq: int) -> Message:
    """Mark message ``seq`` deleted (its row and seq stay; its text is emptied)."""
    return _change(room_id, seq, None, user=user)


def staff_edit_message(message_id: int, text: str) -> Message:
    """Edit from the admin (or a shell): no author check, the same broadcast."""
    room_id, seq = Message.objects.values_list("room_id", "seq").get(pk=message_id)
    return _change(room_id, seq, text, user=None)


def staff_delete_message(message_id: int) -> Message | None:
    """Delete from the admin: the row is kept (seq stays gap-free). None if already deleted."""
    room_id, seq = Message.objects.values_list("room_id", "seq").get(pk=message_id)
    try:
        return _change(room_id, seq, None, user=None)
    except MessageNotFound:
        return None


def _change(room_id: int, seq: int, text: str | None, *, user: User | None) -> Message:
    """Edit (``text``) or delete (None) a message and broadcast its ``message_update``
    after commit. ``user`` None: staff tools, no access or author check."""
    with transaction.atomic():
        # The room's row lock orders this change among all changes of the room (all
        # processes): update_seq is handed out in commit order, like seq.
        room = (
            Room.objects.select_for_update()
            .only("id", "is_private", "last_update_seq")
            .get(pk=room_id)
        )
        if user is not None:
            _check_access(room, user)
        message = Message.objects.filter(room=room, seq=seq).first()
        if message is None or message.deleted:
            raise MessageNotFound(seq)
        if user is not None and message.user_id != user.pk and not user.is_staff:
            raise NotAuthor(seq)
        update_seq = room.last_update_seq + 1
        Room.objects.filter(pk=room.pk).update(last_update_seq=update_seq)
        message.update_seq = update_seq
        message.edited_at = timezone.now()
        if text is None:
            message.deleted = True
            message.text = ""
        else:
            message.text = text
        message.save(update_fields=["text", "deleted", "edited_at", "update_seq"])
        enc = protocol.message_update_encoded(message, app_settings.MAX_SEND_BYTES)
        event = {
            "type": protocol.EVENT_UPDATE,
            "seq": seq,
            "update_seq": update_seq,
            "text": enc.text,
            "size": enc.size,
        }
        transaction.on_commit(lambda: broadcast(room.pk, event), robust=True)
    return message


def update_frames(
    room_id: int, after: int, upto: int, max_seq: int, limit: int
) -> list[tuple[int, int, protocol.Encoded]]:
    """(update_seq, seq, encoded ``message_update``) of the messages of seq <= ``max_seq``
    whose latest change has ``after < update_seq <= upto``, in update_seq order, at most
    ``limit``. Several changes of one message are one frame: its current state."""
    rows = (
        Message.objects.filter(
            room_id=room_id, update_seq__gt=after, update_seq__lte=upto, seq__lte=max_seq
        )
        .only("seq", "text", "edited_at", "deleted", "update_seq")
        .order_by("update_seq")[:limit]
    )
    budget = app_settings.MAX_SEND_BYTES
    return [(m.update_seq, m.seq, protocol.message_update_encoded(m, budget)) for m in rows]


def encoded_updates(room_id: int, after: int, upto: int) -> list[tuple[int, int, protocol.Encoded]]:
    """``update_frames`` of every message, a batch (the room hub fills its gaps with it)."""
    return update_frames(room_id, after, upto, protocol.MAX_SEQ, app_settings.REPLAY_BATCH_SIZE)


def broadcast(room_id: int, event: dict[str, Any]) -> None:
    """Send an already-encoded event to every process holding sockets of the room (call
    after commit); each process's room hub hands it to its sockets."""
    layer = get_channel_layer()
    if layer is None:
        return
    async_to_sync(layer.group_send)(room_group(room_id), {**event, "room_id": room_id})


async def abroadcast(room_id: int, event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(room_group(room_id), {**event, "room_id": room_id})


async def abroadcast_many(room_id: int, events: Sequence[dict[str, Any]]) -> None:
    """Broadcast ``events`` of room ``room_id`` in order, several to a layer message, each
    message at most ``CHAT_LAYER_BATCH_MAX_BYTES`` of text (an event over it goes alone).

    A group commit of 100 messages of ordinary length travels as one layer message: one Redis
    call instead of 100, one receive per process (bench/ingest.py, docs/benchmarks.md).

    A message the layer refuses does not stop the ones after it; the first failure is raised
    once all were tried (the sockets find its messages by seq: gap fill, resume)."""
    failed: Exception | None = None
    for chunk in _layer_batches(events, app_settings.LAYER_BATCH_MAX_BYTES):
        event = chunk[0] if len(chunk) == 1 else {"type": protocol.EVENT_BATCH, "events": chunk}
        try:
            await abroadcast(room_id, event)
        except Exception as exc:
            failed = failed or exc
    if failed is not None:
        raise failed


def _layer_batches(
    events: Sequence[dict[str, Any]], max_bytes: int
) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    size = 0
    for event in events:
        text_bytes = event.get("size") or len(event["text"].encode("utf-8"))
        if chunk and size + text_bytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(event)
        size += text_bytes
    if chunk:
        yield chunk


async def relay_typing(room_id: int, user: User, active: bool) -> None:
    """Tell the room's other users that ``user`` started or stopped typing (never stored)."""
    text = protocol.encode(protocol.typing_frame(user, active))
    await abroadcast(room_id, {"type": protocol.EVENT_TYPING, "user_id": user.pk, "text": text})


def _control(event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        async_to_sync(layer.group_send)(CONTROL_GROUP, event)
        return
    # Called from async code (a signal fired by an async view): publish without blocking it.
    task = asyncio.ensure_future(layer.group_send(CONTROL_GROUP, event))
    _pending_controls.add(task)
    task.add_done_callback(_pending_controls.discard)


_pending_controls: set[asyncio.Future[None]] = set()


def revoke_sockets(
    user_id: int, code: int, *, room_id: int | None = None, session_key: str | None = None
) -> None:
    """Close the user's open chat sockets in every process (after the current commit).

    ``room_id`` limits it to one room, ``session_key`` to the sockets of one login session.
    """
    event: dict[str, Any] = {"type": protocol.EVENT_REVOKE, "user_id": user_id, "code": code}
    if room_id is not None:
        event["room_id"] = room_id
    if session_key is not None:
        event["session_key"] = session_key
    transaction.on_commit(lambda: _control(event), robust=True)


def recheck_room(room_id: int) -> None:
    """Ask every process to close the room's sockets whose users may no longer read it."""
    event = {"type": protocol.EVENT_RECHECK, "room_id": room_id}
    transaction.on_commit(lambda: _control(event), robust=True)


def allowed_users(room_id: int, user_ids: set[int]) -> set[int] | None:
    """Those of ``user_ids`` that may still read the room (None: the room is gone)."""
    room = Room.objects.filter(pk=room_id).values_list("is_private", flat=True).first()
    if room is None:
        return None
    users = get_user_model().objects.filter(pk__in=user_ids, is_active=True)
    if room:
        users = users.filter(chat_memberships__room_id=room_id)
    return set(users.values_list("pk", flat=True))


def encoded_messages(room_id: int, after: int, upto: int) -> list[tuple[int, protocol.Encoded]]:
    """(seq, encoded frame) of messages with ``after < seq <= upto``, oldest first, a batch."""
    room = Room.objects.only("slug").get(pk=room_id)
    rows = (
        Message.objects.filter(room_id=room_id, seq__gt=after, seq__lte=upto)
        .select_related("user")
        .order_by("seq")[: app_settings.REPLAY_BATCH_SIZE]
    )
    budget = app_settings.MAX_SEND_BYTES
    return [(m.seq, protocol.message_encoded(m, room.slug, m.user, budget)) for m in rows]


def message_frames(
    room: Room, after: int, upto: int, limit: int
) -> list[tuple[int, protocol.Encoded]]:
    """(seq, encoded frame) of messages with ``after < seq <= upto``, oldest first, at most
    ``limit``."""
    rows = (
        Message.objects.filter(room=room, seq__gt=after, seq__lte=upto)
        .select_related("user")
        .order_by("seq")[:limit]
    )
    budget = app_settings.MAX_SEND_BYTES
    return [(m.seq, protocol.message_encoded(m, room.slug, m.user, budget)) for m in rows]


def latest_frames(room: Room, upto: int, limit: int) -> list[tuple[int, protocol.Encoded]]:
    """(seq, encoded frame) of the last ``limit`` messages with ``seq <= upto``, oldest first."""
    rows = (
        Message.objects.filter(room=room, seq__lte=upto)
        .select_related("user")
        .order_by("-seq")[:limit]
    )
    budget = app_settings.MAX_SEND_BYTES
    return [(m.seq, protocol.message_encoded(m, room.slug, m.user, budget)) for m in reversed(rows)]


def mark_read(room_id: int, user: User, seq: int) -> int | None:
    """Move the user's read marker forward to ``seq`` (capped at the room's last seq).

    Returns the new marker, or None when it did not move (markers never go back). The new
    marker is relayed to the room after commit.
    """
    with transaction.atomic():
        upto = min(seq, last_seq(room_id))
        moved = ReadMarker.objects.filter(
            room_id=room_id, user=user, last_read_seq__lt=upto
        ).update(last_read_seq=upto)
        if not moved:
            _, created = ReadMarker.objects.get_or_create(
                room_id=room_id, user=user, defaults={"last_read_seq": upto}
            )
            if not created or upto == 0:
                return None
        frame_text = protocol.encode(protocol.read_frame(user.pk, user.get_username(), upto))
        event = {"type": protocol.EVENT_READ, "text": frame_text}
        transaction.on_commit(lambda: broadcast(room_id, event), robust=True)
    return upto


def read_state(room_id: int, limit: int) -> list[tuple[int, str, int]]:
    """The room's most recently updated read markers as (user id, username, seq)."""
    rows = (
        ReadMarker.objects.filter(room_id=room_id, last_read_seq__gt=0)
        .select_related("user")
        .order_by("-updated_at")[:limit]
    )
    return [(r.user.pk, r.user.get_username(), r.last_read_seq) for r in rows]


def rooms_with_unread(user: AnyUser) -> QuerySet[Room]:
    """Visible rooms annotated with ``unread``: messages after the user's read marker.

    seq has no gaps, so the count is a subtraction, not a COUNT over messages.
    """
    if not user.is_authenticated:
        return Room.objects.none()
    marker = ReadMarker.objects.filter(room=OuterRef("pk"), user=user).values("last_read_seq")[:1]
    return visible_rooms(user).annotate(
        unread=F("last_seq")
        - Coalesce(
            Subquery(marker, output_field=IntegerField()), Value(0), output_field=IntegerField()
        )
    )


aget_room_for = database_sync_to_async(get_room_for)
aallowed_users = database_sync_to_async(allowed_users)
aencoded_messages = database_sync_to_async(encoded_messages)
alast_seq = database_sync_to_async(last_seq)
alast_update_seq = database_sync_to_async(last_update_seq)
aheads = database_sync_to_async(heads)
aedit_message = database_sync_to_async(edit_message)
adelete_message = database_sync_to_async(delete_message)
aupdate_frames = database_sync_to_async(update_frames)
aencoded_updates = database_sync_to_async(encoded_updates)
apost_message = database_sync_to_async(post_message)
apost_messages = database_sync_to_async(post_messages)
amessage_frames = database_sync_to_async(message_frames)
alatest_frames = database_sync_to_async(latest_frames)
amark_read = database_sync_to_async(mark_read)
aread_state = database_sync_to_async(read_state)
