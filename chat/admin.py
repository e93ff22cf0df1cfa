from __future__ import annotations

import asyncio
import uuid
from typing import cast

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils import timezone

from . import quotas, services
from .conf import app_settings
from .export import FORMATS, RoomSnapshot, export_response, too_many_exports_message
from .models import Membership, Message, ReadMarker, Room
from .presence import State
from .presence_hub import get_hub

# The host's user model may log in with something else than "username" (an e-mail): search
# by its USERNAME_FIELD, or every search of these admins is a 500 FieldError.
USER_SEARCH = f"user__{get_user_model().USERNAME_FIELD}"


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    # Picked by username (the user admin's search_fields), not typed as raw ids.
    autocomplete_fields = ["user"]
    readonly_fields = ["created_at"]


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "is_private", "owner", "last_seq", "online", "created_at"]
    list_filter = ["is_private", "created_at"]
    search_fields = ["slug", "title"]
    prepopulated_fields = {"slug": ["title"]}
    autocomplete_fields = ["owner"]
    list_select_related = ["owner"]
    readonly_fields = ["last_seq", "created_at", "online_now"]
    inlines = [MembershipInline]
    actions = ["export_messages_csv", "export_messages_ndjson"]

    @admin.action(description="Export messages of selected rooms (CSV)", permissions=["export"])
    def export_messages_csv(
        self, request: HttpRequest, queryset: QuerySet[Room]
    ) -> HttpResponseBase | None:
        return self._export(request, queryset, "csv")

    @admin.action(description="Export messages of selected rooms (NDJSON)", permissions=["export"])
    def export_messages_ndjson(
        self, request: HttpRequest, queryset: QuerySet[Room]
    ) -> HttpResponseBase | None:
        return self._export(request, queryset, "ndjson")

    def has_export_permission(self, request: HttpRequest) -> bool:
        # An export holds every message text: viewing rooms is not enough.
        return request.user.has_perm("chat.view_message")

    def _export(
        self, request: HttpRequest, queryset: QuerySet[Room], fmt: str
    ) -> HttpResponseBase | None:
        """Stream the rooms' messages the way the export view does, rooms in slug order."""
        rows = queryset.order_by("slug").values_list("id", "slug", "last_seq")
        rooms = [RoomSnapshot(pk, slug, upto) for pk, slug, upto in rows]
        slugs = ",".join(room.slug for room in rooms[:10]) + (",..." if len(rooms) > 10 else "")
        # Staff count against the same per-user cap as everyone (an export holds a thread).
        # Taken last: from here on the response owns it (and gives it back however it ends).
        lease = async_to_sync(quotas.exports.acquire)(cast(int, request.user.pk), uuid.uuid4().hex)
        if lease is None:
            self.message_user(request, too_many_exports_message(), messages.ERROR)
            return None  # back to the change list, which shows the message
        return export_response(
            rooms,
            FORMATS[fmt],
            filename=f"chat-messages-{timezone.now():%Y%m%d-%H%M%S}",
            page_size=app_settings.EXPORT_PAGE_SIZE,
            audit=f"admin user={request.user.pk} rooms={len(rooms)}:{slugs}",
            lease=lease,
        )

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        changelist = super().get_changelist_instance(request)
        # One presence read for the page's rooms (gathered), not one hop per row. The counts
        # ride on the page's own instances: this admin object is shared by every request.
        # (Evaluating result_list caches it: the page renders these same instances.)
        rooms = list(changelist.result_list)
        try:
            states: list[State | None] = list(
                async_to_sync(_presence_snapshots)([room.pk for room in rooms])
            )
        except Exception:
            states = [None] * len(rooms)
        for room, state in zip(rooms, states, strict=True):
            room.online_state = state
        return changelist

    @admin.display(description="online (users / sockets)")
    def online(self, obj: Room) -> str:
        """Live counts from the presence store (every process), for the changelist."""
        if not hasattr(obj, "online_state"):
            return "-"
        state: State | None = obj.online_state
        if state is None:
            return "presence store unavailable"
        if not state:
            return "-"
        return f"{len(state)} / {sum(u.connections for u in state.values())}"

    @admin.display(description="online now")
    def online_now(self, obj: Room) -> str:
        if obj.pk is None:
            return "-"
        try:
            state = async_to_sync(_presence_snapshot)(obj.pk)
        except Exception:
            return "presence store unavailable"
        if not state:
            return "nobody"
        sockets = sum(u.connections for u in state.values())
        return f"{len(state)} users, {sockets} sockets: " + ", ".join(
            f"{u.username} ({u.connections} connection{'s' if u.connections != 1 else ''})"
            for u in sorted(state.values(), key=lambda u: u.username)
        )


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["room", "user", "created_at"]
    list_filter = ["room__is_private", "room"]
    search_fields = ["room__slug", "room__title", USER_SEARCH]
    autocomplete_fields = ["room", "user"]
    readonly_fields = ["created_at"]
    list_select_related = ["room", "user"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["room", "seq", "user", "short_text", "status", "deleted", "created_at"]
    list_filter = ["room", "status", "deleted", "created_at"]
    search_fields = ["text", USER_SEARCH, "room__slug", "client_id"]
    list_select_related = ["room", "user"]
    date_hierarchy = "created_at"
    # seq is handed out by services.post_message; editing it here would break the sequence.
    # Only the text is edited here, through services (edited_at, update_seq, broadcast).
    readonly_fields = [
        "room",
        "seq",
        "user",
        "client_id",
        "status",
        "created_at",
        "edited_at",
        "deleted",
        "update_seq",
    ]
    ordering = ["-created_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: Message | None = None) -> list[str]:
        # A deleted message stays deleted: its (empty) text is not edited back.
        fields = list(self.readonly_fields)
        return [*fields, "text"] if obj is not None and obj.deleted else fields

    def save_model(self, request: HttpRequest, obj: Message, form: ModelForm, change: bool) -> None:
        # An edit here reaches open sockets like one from the socket (a message_update).
        if change and "text" in form.changed_data:
            services.staff_edit_message(obj.pk, obj.text)

    def delete_model(self, request: HttpRequest, obj: Message) -> None:
        # Marked deleted, never removed: seq stays gap-free and clients get a message_update.
        services.staff_delete_message(obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        for pk in queryset.values_list("pk", flat=True):
            services.staff_delete_message(pk)

    @admin.display(description="text")
    def short_text(self, obj: Message) -> str:
        return obj.text if len(obj.text) <= 80 else obj.text[:79] + "…"

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Messages get their seq from services.post_message; admin adds would bypass it.
        return False


async def _presence_snapshot(room_id: int) -> State:
    return await get_hub().snapshot(room_id)


async def _presence_snapshots(room_ids: list[int]) -> list[State]:
    hub = get_hub()
    return list(await asyncio.gather(*(hub.snapshot(room_id) for room_id in room_ids)))


@admin.register(ReadMarker)
class ReadMarkerAdmin(admin.ModelAdmin):
    list_display = ["room", "user", "last_read_seq", "updated_at"]
    list_filter = ["room"]
    search_fields = ["room__slug", USER_SEARCH]
    autocomplete_fields = ["room", "user"]
    # Markers only move forward, through services.mark_read (which relays them to the room).
    readonly_fields = ["last_read_seq", "updated_at"]
    list_select_related = ["room", "user"]
