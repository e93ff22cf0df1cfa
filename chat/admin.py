from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from .models import Membership, Message, Room


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "is_private", "last_seq", "created_at"]
    list_filter = ["is_private", "created_at"]
    search_fields = ["slug", "title"]
    prepopulated_fields = {"slug": ["title"]}
    readonly_fields = ["last_seq", "created_at"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["room", "user", "created_at"]
    list_filter = ["room__is_private", "room"]
    search_fields = ["room__slug", "room__title", "user__username"]
    raw_id_fields = ["user"]
    list_select_related = ["room", "user"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["room", "seq", "user", "short_text", "created_at"]
    list_filter = ["room", "created_at"]
    search_fields = ["text", "user__username", "room__slug", "client_id"]
    list_select_related = ["room", "user"]
    date_hierarchy = "created_at"
    # seq is handed out by services.post_message; editing it here would break the sequence.
    readonly_fields = ["room", "seq", "user", "client_id", "created_at"]
    ordering = ["-created_at"]

    @admin.display(description="text")
    def short_text(self, obj: Message) -> str:
        return obj.text if len(obj.text) <= 80 else obj.text[:79] + "…"

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Messages get their seq from services.post_message; admin adds would bypass it.
        return False
