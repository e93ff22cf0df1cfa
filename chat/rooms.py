"""Rooms made and run in the app: create, rename, make private, invite, remove, leave.

Every room mutation of the JSON endpoints happens here, in one transaction. Access changes
reach open sockets through the revocation receivers of chat/signals.py, which fire after
the commit: a removed member of a private room is closed with 4403, a room made private has
its sockets re-checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Count, DateTimeField, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from . import rooms_protocol, services
from .conf import app_settings
from .models import Membership, Message, Room

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from .services import AnyUser


class SlugTaken(Exception):
    pass


class UserNotFound(Exception):
    pass


class AlreadyMember(Exception):
    pass


class NotMember(Exception):
    pass


class TooManyRooms(Exception):
    """The creator owns CHAT_MAX_OWNED_ROOMS rooms already."""


class OwnerStays(Exception):
    """The owner cannot be removed from (or leave) their own room."""


def may_create(user: AnyUser) -> bool:
    """Whether CHAT_ROOM_CREATORS lets ``user`` create rooms."""
    if not user.is_authenticated or not user.is_active:
        return False
    if app_settings.ROOM_CREATORS == rooms_protocol.CREATORS_STAFF:
        return bool(user.is_staff)
    return app_settings.ROOM_CREATORS == rooms_protocol.CREATORS_AUTHENTICATED


def may_manage(user: AnyUser, room: Room) -> bool:
    """Owners and staff rename a room, change its privacy and manage its members."""
    if not user.is_authenticated:
        return False
    return bool(user.is_staff) or (room.owner_id is not None and room.owner_id == user.pk)


def is_member(user: AnyUser, room: Room) -> bool:
    return user.is_authenticated and Membership.objects.filter(room=room, user=user).exists()


def get_room_to_manage(user: AnyUser, slug: str) -> Room:
    """The room if ``user`` may read or manage it (staff manage rooms they cannot read).

    Raises services.RoomNotFound or services.AccessDenied."""
    try:
        return services.get_room_for(user, slug)
    except services.AccessDenied:
        room = Room.objects.get(slug=slug)
        if may_manage(user, room):
            return room
        raise


def create_room(user: User, new: rooms_protocol.NewRoom) -> Room:
    """Create the room owned by ``user``, who becomes its first member.

    Raises SlugTaken, or TooManyRooms when a non-staff user owns CHAT_MAX_OWNED_ROOMS."""
    try:
        with transaction.atomic():
            # Every room is a row, a page and a line in everyone's list: creation is bounded.
            # Two concurrent creations may both pass the count; the bound is not a quota that
            # must hold to the room, only a stop to a script creating rooms in a loop.
            owned = Room.objects.filter(owner=user).count()
            if not user.is_staff and owned >= app_settings.MAX_OWNED_ROOMS:
                raise TooManyRooms(owned)
            room = Room.objects.create(
                slug=new.slug, title=new.title, is_private=new.is_private, owner=user
            )
            Membership.objects.create(room=room, user=user)
    except IntegrityError:
        # The unique slug decides between concurrent creators, whatever was read before.
        raise SlugTaken(new.slug) from None
    return room


def update_room(room: Room, changes: rooms_protocol.RoomChanges) -> Room:
    """Rename the room or change its privacy (the caller checked may_manage)."""
    with transaction.atomic():
        room = Room.objects.select_for_update().get(pk=room.pk)
        fields = []
        if changes.title is not None:
            room.title = changes.title
            fields.append("title")
        if changes.is_private is not None:
            room.is_private = changes.is_private
            fields.append("is_private")
        # post_save re-checks the room's sockets after commit when it is private now.
        room.save(update_fields=fields)
    return room


def add_member(room: Room, username: str) -> Membership:
    """Invite ``username`` into the room (the caller checked may_manage)."""
    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None:
        raise UserNotFound(username)
    try:
        with transaction.atomic():
            return Membership.objects.create(room=room, user=user)
    except IntegrityError:
        raise AlreadyMember(username) from None


def remove_member(actor: AnyUser, room: Room, username: str) -> None:
    """Remove ``username`` from the room: owners and staff remove anyone, members themselves.

    Raises services.AccessDenied, NotMember or OwnerStays."""
    leaving = actor.is_authenticated and actor.get_username() == username
    if not leaving and not may_manage(actor, room):
        raise services.AccessDenied(room.slug)
    with transaction.atomic():
        membership = (
            Membership.objects.select_for_update()
            .filter(room=room, user__username=username)
            .first()
        )
        if membership is None:
            raise NotMember(username)
        if room.owner_id is not None and membership.user_id == room.owner_id:
            raise OwnerStays(username)
        # post_delete closes the user's sockets of a private room after commit (4403).
        membership.delete()


def _with_counts(rooms: QuerySet[Room]) -> QuerySet[Room]:
    members = (
        Membership.objects.filter(room=OuterRef("pk"))
        .order_by()
        .values("room")
        .annotate(n=Count("pk"))
        .values("n")
    )
    # The (room, seq) unique index finds the newest message without scanning the room.
    last_at = Message.objects.filter(room=OuterRef("pk")).order_by("-seq").values("created_at")[:1]
    return rooms.select_related("owner").annotate(
        member_count=Coalesce(
            Subquery(members, output_field=IntegerField()), 0, output_field=IntegerField()
        ),
        last_message_at=Subquery(last_at, output_field=DateTimeField()),
    )


def room_list(user: AnyUser) -> QuerySet[Room]:
    """Visible rooms with ``unread``, ``member_count`` and ``last_message_at``, by slug."""
    return _with_counts(services.rooms_with_unread(user)).order_by("slug")


def room_page(user: AnyUser, after: str | None, limit: int) -> tuple[list[Room], str | None]:
    """At most ``limit`` rooms of room_list after slug ``after``, and the ``after`` of the next
    page (None when this one is the last)."""
    rooms = room_list(user)
    if after is not None:
        rooms = rooms.filter(slug__gt=after)
    page = list(rooms[: limit + 1])
    if len(page) > limit:
        return page[:limit], page[limit - 1].slug
    return page, None


def room_info(user: AnyUser, room: Room) -> Room:
    """``room`` annotated like room_list (unread 0 for staff outside a private room)."""
    found = room_list(user).filter(pk=room.pk).first()
    if found is not None:
        return found
    return _with_counts(Room.objects.filter(pk=room.pk)).annotate(unread=Value(0)).get()


def members(room: Room) -> list[str]:
    """Usernames of the room's members, alphabetically."""
    return list(
        Membership.objects.filter(room=room)
        .order_by("user__username")
        .values_list("user__username", flat=True)
    )
