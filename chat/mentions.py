"""Chat's side of @mention notifications: who may read the room, the link, the bot accounts.

``notifications.mentions`` finds the names and applies the caps; it knows nothing of chat.
This module is the only place chat calls it, after a message commits, and only when the
notifications app is installed (soft coupling: chat works without it).

Bots: the assistant user (``CHAT_ASSISTANT_USERNAME``) is never notified, and its replies
notify nobody: they say what the requester asked for, so mentions in them would notify
people on the assistant's behalf, outside the requester's own limits. Users without a usable
password are not taken for bots: single sign-on creates its (human) users that way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from django.urls import reverse

from .conf import app_settings
from .models import Message, Room

if TYPE_CHECKING:
    from django.contrib.auth.models import User


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


def notify(message: Message) -> int:
    """Notify the users ``message`` mentions (call after commit); return how many."""
    from notifications.mentions import notify_mentions

    room = Room.objects.only("slug", "title", "is_private").get(pk=message.room_id)
    return notify_mentions(
        sender=message.user,
        text=message.text,
        readers=readers(room),
        place=room.title,
        url=reverse("chat:room", args=[room.slug]) + f"#seq-{message.seq}",
        exclude_usernames=[app_settings.ASSISTANT_USERNAME],
    )
