"""Notification mutations and the broadcasts that follow them: the one place side effects happen.

``notify()`` stores one row per recipient in batches (one INSERT per batch) and, after the
transaction commits, publishes one channel-layer message per batch to every process. Inserts
are serialised (PostgreSQL: a transaction-level advisory lock; SQLite: its single writer), so
ids become visible in id order: once a process sees id N committed, every smaller id is
committed too. Streams rely on that to detect gaps without a per-user sequence.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer, get_channel_layer
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import Max, OuterRef, QuerySet, Subquery
from django.utils import timezone

from . import protocol
from .conf import app_settings
from .models import Level, Notification

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

# Every process's hub joins this one group; a broadcast is one group_send per batch, whatever
# the number of recipients or processes (channels_redis pub/sub: one PUBLISH).
GROUP = "notifications.events"
# Key of the PostgreSQL advisory lock that serialises notification inserts ("noti").
INSERT_LOCK_KEY = 0x6E6F7469
TITLE_MAX_LENGTH = Notification._meta.get_field("title").max_length or 200
URL_MAX_LENGTH = Notification._meta.get_field("url").max_length or 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Recipients: TypeAlias = "AbstractBaseUser | int | Iterable[AbstractBaseUser | int] | QuerySet[Any]"
Event: TypeAlias = tuple[int, str]
"""A notification as sent on a stream: (id, its JSON)."""


class NotificationNotFound(Exception):
    pass


@dataclass(frozen=True)
class UnreadState:
    count: int
    last_id: int


# --- validation --------------------------------------------------------------------------------


def validate_url(url: str) -> None:
    """Accept "", a path on this site ("/…", not "//…") or an absolute http(s) URL."""
    if not url:
        return
    if len(url) > URL_MAX_LENGTH:
        raise ValueError(f"url is longer than {URL_MAX_LENGTH} characters.")
    if _CONTROL.search(url) or "\\" in url:
        raise ValueError("url must not contain control characters or backslashes.")
    if url.startswith("/") and not url.startswith("//"):
        return
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return
    raise ValueError("url must be a path starting with '/' or an http(s) URL.")


def validate(title: str, body: str, url: str, level: str) -> None:
    """Raise ValueError unless the content can be stored and shown safely."""
    if not isinstance(title, str) or not title.strip():
        raise ValueError("title must be a non-empty string.")
    if len(title) > TITLE_MAX_LENGTH:
        raise ValueError(f"title is longer than {TITLE_MAX_LENGTH} characters.")
    if not isinstance(body, str):
        raise ValueError("body must be a string.")
    if "\x00" in title or "\x00" in body:
        raise ValueError("title and body must not contain NUL characters.")
    if level not in Level.values:
        raise ValueError(f"level must be one of {', '.join(Level.values)}, not {level!r}.")
    validate_url(url)


# --- notify ------------------------------------------------------------------------------------


def _recipient_ids(recipients: Recipients) -> list[int]:
    if isinstance(recipients, QuerySet):
        if recipients.model is not get_user_model():
            raise TypeError(f"recipients must be users, not {recipients.model.__name__}.")
        values: Iterable[Any] = recipients.values_list("pk", flat=True)
    elif isinstance(recipients, AbstractBaseUser | int):
        values = [recipients]
    else:
        values = recipients
    ids = set()
    for value in values:
        if isinstance(value, AbstractBaseUser):
            ids.add(int(value.pk))
        elif isinstance(value, int) and not isinstance(value, bool):
            ids.add(value)
        else:
            raise TypeError(f"recipients must be users or user ids, not {type(value).__name__}.")
    return sorted(ids)


def _chunks(values: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _serialise_inserts() -> None:
    # SQLite has one writer at a time already (the demo host begins transactions IMMEDIATE).
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [INSERT_LOCK_KEY])


def _previous_ids(user_ids: Sequence[int]) -> dict[int, int]:
    """Each existing, active user's latest notification id (0 if none), in one query.

    Inactive users get nothing: deactivated people, and bot accounts such as chat's assistant
    (created inactive: nobody reads its notifications).
    """
    latest = Notification.objects.filter(recipient=OuterRef("pk")).order_by("-id").values("id")[:1]
    User = get_user_model()
    users = User.objects.filter(pk__in=user_ids)
    if any(f.name == "is_active" for f in User._meta.get_fields()):
        users = users.filter(is_active=True)
    rows = users.annotate(previous_id=Subquery(latest)).values_list("pk", "previous_id")
    return {int(pk): int(previous or 0) for pk, previous in rows}


def notify(
    recipients: Recipients, title: str, body: str = "", url: str = "", level: str = "info"
) -> int:
    """Store one notification per recipient and push it to their open streams after commit.

    ``recipients`` is a user, a user id, or an iterable or queryset of them; duplicates,
    inactive users and users that do not exist are skipped. Returns the number of
    notifications stored. Call it at the end of a transaction (or outside one): the insert
    lock is held until the outermost commit. From async code use ``anotify``.
    """
    validate(title, body, url, level)
    user_ids = _recipient_ids(recipients)
    if not user_ids:
        return 0
    created_at = timezone.now()
    tail = protocol.notification_tail(title, body, url, level, created_at, read=False)
    messages: list[dict[str, Any]] = []
    stored = 0
    with transaction.atomic():
        _serialise_inserts()
        for chunk in _chunks(user_ids, max(app_settings.BATCH_SIZE, 1)):
            previous = _previous_ids(chunk)
            rows = [
                Notification(
                    recipient_id=user_id,
                    title=title,
                    body=body,
                    url=url,
                    level=level,
                    created_at=created_at,
                )
                for user_id in chunk
                if user_id in previous
            ]
            Notification.objects.bulk_create(rows)
            stored += len(rows)
            if rows and all(row.pk is not None for row in rows):
                items = [
                    protocol.BatchItem(r.recipient_id, r.pk, previous[r.recipient_id]) for r in rows
                ]
                messages.append(protocol.batch_message(tail, items))
            elif rows:
                # The backend cannot return ids from a bulk insert: every process polls instead.
                messages.append(protocol.poll_message())
        if messages:
            transaction.on_commit(lambda: publish(messages), robust=True)
    return stored


anotify = database_sync_to_async(notify)


# --- reads and marks ---------------------------------------------------------------------------


def unread_state(user_id: int) -> UnreadState:
    """The user's unread count among their notifications up to their latest id (two index reads)."""
    mine = Notification.objects.filter(recipient_id=user_id)
    last_id = mine.aggregate(last=Max("id"))["last"] or 0
    count = mine.filter(read_at__isnull=True, id__lte=last_id).count()
    return UnreadState(count=count, last_id=int(last_id))


def latest_id() -> int:
    """The highest notification id committed (of any user)."""
    return int(Notification.objects.aggregate(last=Max("id"))["last"] or 0)


def events_between(user_id: int, after: int, upto: int | None, limit: int) -> list[Event]:
    """The user's notifications with ``after < id <= upto``, oldest first, at most ``limit``."""
    rows = Notification.objects.filter(recipient_id=user_id, id__gt=after)
    if upto is not None:
        rows = rows.filter(id__lte=upto)
    return [
        (n.pk, protocol.notification_json(n.pk, protocol.tail_of(n)))
        for n in rows.order_by("id")[:limit]
    ]


@dataclass(frozen=True)
class PollResult:
    horizon: int
    """Every committed notification with an id up to here has been considered."""
    events: dict[int, list[Event]]
    """The rows of the users asked about, by user id, oldest first."""
    more: bool
    """The limit was reached: poll again at once."""


def poll(after: int, user_ids: Iterable[int], limit: int) -> PollResult:
    """Notifications committed after ``after``, up to ``limit`` of them (of any user).

    The rows returned for ``user_ids`` are all of those users' notifications with
    ``after < id <= horizon``: ids become visible in id order (see the module docstring).
    """
    new = list(
        Notification.objects.filter(id__gt=after)
        .order_by("id")
        .values_list("id", "recipient_id")[:limit]
    )
    if not new:
        return PollResult(after, {}, more=False)
    wanted = set(user_ids)
    ids = [pk for pk, recipient_id in new if recipient_id in wanted]
    found: dict[int, list[Event]] = {}
    if ids:
        for n in Notification.objects.filter(id__in=ids).order_by("id"):
            event = (n.pk, protocol.notification_json(n.pk, protocol.tail_of(n)))
            found.setdefault(n.recipient_id, []).append(event)
    return PollResult(int(new[-1][0]), found, more=len(new) >= limit)


def recent(user: User, limit: int, before: int | None = None) -> list[Notification]:
    """The user's latest notifications, newest first."""
    rows = Notification.objects.filter(recipient=user)
    if before is not None:
        rows = rows.filter(id__lt=before)
    return list(rows.order_by("-id")[:limit])


def mark_read(user: User, notification_id: int) -> UnreadState:
    """Mark one of the user's notifications read; raise NotificationNotFound for anyone else's."""
    with transaction.atomic():
        mine = Notification.objects.filter(recipient=user, pk=notification_id)
        changed = mine.filter(read_at__isnull=True).update(read_at=timezone.now())
        if not changed and not mine.exists():
            raise NotificationNotFound(notification_id)
        if changed:
            _publish_unread_on_commit(user.pk)
    return unread_state(user.pk)


def mark_all_read(user: User) -> UnreadState:
    """Mark every notification of the user read."""
    with transaction.atomic():
        changed = Notification.objects.filter(recipient=user, read_at__isnull=True).update(
            read_at=timezone.now()
        )
        if changed:
            _publish_unread_on_commit(user.pk)
    return unread_state(user.pk)


def _publish_unread_on_commit(user_id: int) -> None:
    message = protocol.unread_message([user_id])
    transaction.on_commit(lambda: publish([message]), robust=True)


# --- broadcast ---------------------------------------------------------------------------------


async def _send_all(layer: BaseChannelLayer, messages: Sequence[dict[str, Any]]) -> None:
    for message in messages:
        await layer.group_send(GROUP, message)


def publish(messages: Sequence[dict[str, Any]]) -> None:
    """Send layer messages to every process (call after commit, from sync code)."""
    layer = get_channel_layer(app_settings.CHANNEL_LAYER)
    if layer is None or not messages:
        return
    # One event loop for all batches: channels_redis opens one connection per loop.
    async_to_sync(_send_all)(layer, messages)


aunread_state = database_sync_to_async(unread_state)
alatest_id = database_sync_to_async(latest_id)
aevents_between = database_sync_to_async(events_between)
apoll = database_sync_to_async(poll)
