"""@mentions in chat messages become notifications, within two caps.

Chat owns this because chat owns who may read a room: a mention notifies only users who may
read the room (``readers``), never the sender, inactive users or the assistant. It calls only
``notifications.notify``, after the message commits, and only when the notifications app is
installed (soft coupling: chat works without it).

Caps, documented in docs/settings.md: at most ``CHAT_MAX_MENTIONS`` users per message (the first
mentioned), and at most ``CHAT_MENTION_RATE_LIMIT`` notifications per sender per
``CHAT_MENTION_RATE_LIMIT_WINDOW_SECONDS``, counted in the database (``MentionLog``) so the
budget holds across processes. Mentions over a cap are dropped, with a log line.

Bots: the assistant user (``CHAT_ASSISTANT_USERNAME``) is never notified, and its replies
notify nobody: they say what the requester asked for, so mentions in them would notify
people on the assistant's behalf, outside the requester's own limits. Users without a usable
password are not taken for bots: single sign-on creates its (human) users that way.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import QuerySet, Sum
from django.urls import reverse
from django.utils import timezone

from .conf import app_settings
from .models import MentionLog, Message, Room

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

# Django usernames are letters, digits and @ . + - _; "@" must not follow a word character
# (so "me@example.com" is not a mention).
MENTION = re.compile(r"(?<![\w@.+-])@([\w.@+-]{1,150})")
EXCERPT_LENGTH = 200  # characters of the message in the notification's body
TITLE_MAX_LENGTH = 200  # notifications' own bound on a title, in characters


def wanted(text: str, author: User) -> bool:
    """Whether a new message may notify anyone: it has an ``@`` and a human author."""
    return (
        "@" in text
        and apps.is_installed("notifications")
        and author.get_username() != app_settings.ASSISTANT_USERNAME
    )


def readers(room: Room) -> QuerySet[Any]:
    """The users who may read ``room``: the access rule of ``services.get_room_for``."""
    users = get_user_model().objects.all()
    return users.filter(chat_memberships__room=room) if room.is_private else users


def mentioned_usernames(text: str, limit: int) -> list[str]:
    """Usernames mentioned as ``@name``, first-seen order, at most ``2 * limit`` of them.

    Trailing punctuation belongs to the sentence ("thanks @bob."), so each name is also
    tried without it.
    """
    names: list[str] = []
    for match in MENTION.finditer(text):
        name = match.group(1)
        for candidate in (name, name.rstrip(".-@+")):
            if candidate and candidate not in names:
                names.append(candidate)
        if len(names) >= 2 * limit:
            break
    return names


def excerpt(text: str, length: int = EXCERPT_LENGTH) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def notify(message: Message) -> int:
    """Notify the users ``message`` mentions, within the caps (call after commit); how many."""
    from notifications import notify as send_notifications

    limit = app_settings.MAX_MENTIONS
    names = mentioned_usernames(message.text, limit) if limit else []
    if not names:
        return 0
    room = Room.objects.only("slug", "title", "is_private").get(pk=message.room_id)
    recipients = _recipients(names, readers(room), message.user)[:limit]
    if not recipients:
        return 0
    author = message.user.get_username()
    with transaction.atomic():
        granted = _take_budget(message.user, len(recipients))
        if granted < len(recipients):
            logger.info(
                "Mentions by %s over CHAT_MENTION_RATE_LIMIT: %d of %d notified",
                author,
                granted,
                len(recipients),
            )
        if not granted:
            return 0
        return send_notifications(
            recipients[:granted],
            title=f"{author} mentioned you in {room.title}"[:TITLE_MAX_LENGTH],
            body=excerpt(message.text),
            url=reverse("chat:room", args=[room.slug]) + f"#seq-{message.seq}",
        )


def _recipients(names: list[str], readers: QuerySet[Any], sender: User) -> list[int]:
    """Ids of the mentioned readers who may be notified, in the order they were mentioned."""
    model = get_user_model()
    field = model.USERNAME_FIELD
    users = readers.filter(**{f"{field}__in": names}).exclude(pk=sender.pk)
    users = users.exclude(**{field: app_settings.ASSISTANT_USERNAME})
    if any(f.name == "is_active" for f in model._meta.get_fields()):
        users = users.filter(is_active=True)
    by_name = dict(users.values_list(field, "pk"))
    return list(dict.fromkeys(by_name[name] for name in names if name in by_name))


def _take_budget(sender: User, wanted: int) -> int:
    """Reserve up to ``wanted`` notifications of the sender's window; return how many."""
    # The sender's row lock queues their concurrent messages (other processes too) until
    # commit, so two of them cannot both spend the last of the budget.
    get_user_model().objects.select_for_update().filter(pk=sender.pk).values_list("pk").first()
    window = timedelta(seconds=app_settings.MENTION_RATE_LIMIT_WINDOW_SECONDS)
    log = MentionLog.objects.filter(sender_id=sender.pk)
    log.filter(created_at__lt=timezone.now() - window).delete()
    spent = log.aggregate(total=Sum("notified"))["total"] or 0
    granted = max(0, min(wanted, app_settings.MENTION_RATE_LIMIT - spent))
    if granted:
        MentionLog.objects.create(sender_id=sender.pk, notified=granted)
    return granted
