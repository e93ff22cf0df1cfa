"""@username mentions in a text become notifications, within two caps.

The caller (chat, after a message commits) says who may read the text, where it was written
and where it links to; this module knows nothing of chat. Caps, both documented in
docs/settings.md: at most ``NOTIFICATIONS_MAX_MENTIONS`` users per text (the first
mentioned), and at most ``NOTIFICATIONS_MENTION_RATE_LIMIT`` notifications per sender per
``NOTIFICATIONS_MENTION_RATE_LIMIT_WINDOW_SECONDS``, counted in the database (``MentionLog``)
so the budget holds across processes. Mentions over a cap are dropped, with a log line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.db.models import QuerySet, Sum
from django.utils import timezone

from . import services
from .conf import app_settings
from .models import MentionLog

logger = logging.getLogger(__name__)

# Django usernames are letters, digits and @ . + - _; "@" must not follow a word character
# (so "me@example.com" is not a mention).
MENTION = re.compile(r"(?<![\w@.+-])@([\w.@+-]{1,150})")
EXCERPT_LENGTH = 200


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


def notify_mentions(
    *,
    sender: AbstractBaseUser,
    text: str,
    readers: QuerySet[Any],
    place: str,
    url: str,
    exclude_usernames: Collection[str] = (),
) -> int:
    """Notify the users ``text`` mentions among ``readers``, within the caps; return how many.

    Never notifies ``sender``, inactive users or ``exclude_usernames`` (bot accounts). The
    title is "<sender> mentioned you in <place>". Call it after the text is committed.
    """
    limit = app_settings.MAX_MENTIONS
    names = mentioned_usernames(text, limit) if limit else []
    recipients = _recipients(names, readers, sender, exclude_usernames)[:limit]
    if not recipients:
        return 0
    author = sender.get_username()
    with transaction.atomic():
        granted = _take_budget(sender, len(recipients))
        if granted < len(recipients):
            logger.info(
                "Mentions by %s over NOTIFICATIONS_MENTION_RATE_LIMIT: %d of %d notified",
                author,
                granted,
                len(recipients),
            )
        if not granted:
            return 0
        return services.notify(
            recipients[:granted],
            title=f"{author} mentioned you in {place}"[: services.TITLE_MAX_LENGTH],
            body=excerpt(text),
            url=url,
        )


def _recipients(
    names: list[str],
    readers: QuerySet[Any],
    sender: AbstractBaseUser,
    exclude_usernames: Collection[str],
) -> list[int]:
    """Ids of the mentioned readers who may be notified, in the order they were mentioned."""
    if not names:
        return []
    User = get_user_model()
    field = User.USERNAME_FIELD
    users = readers.filter(**{f"{field}__in": names}).exclude(pk=sender.pk)
    if exclude_usernames:
        users = users.exclude(**{f"{field}__in": list(exclude_usernames)})
    if any(f.name == "is_active" for f in User._meta.get_fields()):
        users = users.filter(is_active=True)
    by_name = dict(users.values_list(field, "pk"))
    return list(dict.fromkeys(by_name[name] for name in names if name in by_name))


def _take_budget(sender: AbstractBaseUser, wanted: int) -> int:
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
