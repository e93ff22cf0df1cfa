"""@username mentions in chat messages become notifications (called by chat after commit).

Only chat imports this module, and only when ``notifications`` is installed, so neither app
needs the other. The room rule mirrors chat.services: public rooms admit every user, private
rooms their members.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from django.contrib.auth import get_user_model
from django.urls import reverse

from . import services
from .conf import app_settings

if TYPE_CHECKING:
    from chat.models import Message

# Django usernames are letters, digits and @ . + - _; "@" must not follow a word character
# (so "me@example.com" is not a mention).
MENTION = re.compile(r"(?<![\w@.+-])@([\w.@+-]{1,150})")
EXCERPT_LENGTH = 200


def mentioned_usernames(text: str, limit: int) -> list[str]:
    """Usernames mentioned as ``@name``, first-seen order, at most ``limit`` of them.

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


def notify_mentions(message: Message) -> int:
    """Notify the users a chat message mentions who can read its room, except its author."""
    limit = app_settings.MAX_MENTIONS
    names = mentioned_usernames(message.text, limit) if limit else []
    if not names:
        return 0
    User = get_user_model()
    users = User.objects.filter(**{f"{User.USERNAME_FIELD}__in": names}).exclude(pk=message.user_id)
    if any(f.name == "is_active" for f in User._meta.get_fields()):
        users = users.filter(is_active=True)
    from chat.models import Room

    room = Room.objects.only("slug", "title", "is_private").get(pk=message.room_id)
    if room.is_private:
        users = users.filter(chat_memberships__room=room)
    recipients = list(users.order_by("pk")[:limit])
    if not recipients:
        return 0
    author = message.user.get_username()
    url = reverse("chat:room", args=[room.slug]) + f"#seq-{message.seq}"
    return services.notify(
        recipients,
        title=f"{author} mentioned you in {room.title}"[: services.TITLE_MAX_LENGTH],
        body=excerpt(message.text),
        url=url,
    )
