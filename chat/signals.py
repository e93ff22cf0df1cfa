"""Access changes reach open sockets: revocation after the change commits, in every process.

A socket checks access when it connects; these receivers close the sockets that lost it,
whatever made the change (the admin, a view, a shell): a removed member of a private room
(4403), a room made private (its sockets are re-checked), a deleted room (4404), a
deactivated or deleted user (4401), a logout (4401, that login session's sockets only).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import post_delete, post_save

from . import protocol, services
from .models import Membership, Room


def membership_deleted(sender: Any, instance: Membership, **kwargs: Any) -> None:
    # Public rooms stay readable without a membership; only private ones lose the reader.
    room = Room.objects.filter(pk=instance.room_id).values_list("is_private", flat=True).first()
    if room:
        services.revoke_sockets(
            instance.user_id, protocol.CLOSE_FORBIDDEN, room_id=instance.room_id
        )


def room_saved(sender: Any, instance: Room, created: bool, **kwargs: Any) -> None:
    if instance.is_private and not created:
        services.recheck_room(instance.pk)


def room_deleted(sender: Any, instance: Room, **kwargs: Any) -> None:
    services.recheck_room(instance.pk)


def user_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    if not created and not instance.is_active:
        services.revoke_sockets(instance.pk, protocol.CLOSE_UNAUTHENTICATED)


def user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    services.revoke_sockets(instance.pk, protocol.CLOSE_UNAUTHENTICATED)


def logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and session_key:
        services.revoke_sockets(user.pk, protocol.CLOSE_UNAUTHENTICATED, session_key=session_key)


def connect() -> None:
    """Connect the receivers (from ChatConfig.ready)."""
    post_delete.connect(membership_deleted, sender=Membership, dispatch_uid="chat.revoke.m")
    post_save.connect(room_saved, sender=Room, dispatch_uid="chat.revoke.room")
    post_delete.connect(room_deleted, sender=Room, dispatch_uid="chat.revoke.room_del")
    post_save.connect(user_saved, sender=settings.AUTH_USER_MODEL, dispatch_uid="chat.revoke.u")
    post_delete.connect(
        user_deleted, sender=settings.AUTH_USER_MODEL, dispatch_uid="chat.revoke.u_del"
    )
    user_logged_out.connect(logged_out, dispatch_uid="chat.revoke.logout")
