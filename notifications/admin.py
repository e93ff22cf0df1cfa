"""Admin for notifications, a "Send notification" page and an action on the user changelist."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from . import services
from .forms import NotificationContentForm, SendNotificationForm
from .models import Notification

SEND_PERMISSION = "notifications.add_notification"


def _recipient_search_fields() -> list[str]:
    """Search recipients by the user model's USERNAME_FIELD and e-mail, whichever it has."""
    User = get_user_model()
    names = [User.USERNAME_FIELD, User.get_email_field_name()]
    fields = {f.name for f in User._meta.get_fields()}
    return [f"recipient__{n}" for n in dict.fromkeys(names) if n in fields]


class ReadFilter(admin.SimpleListFilter):
    title = "read"
    parameter_name = "read"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Unread"), ("yes", "Read")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "no":
            return queryset.filter(read_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(read_at__isnull=False)
        return queryset


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ["id", "recipient", "title", "level", "created_at", "read_at"]
    list_filter = [ReadFilter, "level", "created_at"]
    search_fields = ["title", "body", "url", *_recipient_search_fields()]
    list_select_related = ["recipient"]
    raw_id_fields = ["recipient"]
    date_hierarchy = "created_at"
    ordering = ["-id"]
    readonly_fields = ["recipient", "title", "body", "url", "level", "created_at"]
    change_list_template = "admin/notifications/notification/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Notifications are sent with "Send notification" (services.notify pushes them live);
        # the plain add form would store one silently.
        return False

    def get_urls(self) -> list[URLPattern]:
        send = path(
            "send/",
            self.admin_site.admin_view(self.send_view),
            name="notifications_notification_send",
        )
        return [send, *super().get_urls()]

    def send_view(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm(SEND_PERMISSION):
            raise PermissionDenied
        form = SendNotificationForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            count = services.notify(form.recipients(), **form.content())
            self.message_user(request, f"Sent {count} notification(s).", messages.SUCCESS)
            return HttpResponseRedirect(
                reverse(f"{self.admin_site.name}:notifications_notification_changelist")
            )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Send notification",
            "form": form,
        }
        return TemplateResponse(request, "admin/notifications/send.html", context)


@admin.action(description="Send a notification to the selected users")
def send_notification(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> HttpResponse | None:
    """User admin action: ask for the content, then notify the selected users."""
    if not request.user.has_perm(SEND_PERMISSION):
        modeladmin.message_user(request, "You may not send notifications.", messages.ERROR)
        return None
    form = NotificationContentForm(request.POST if "apply" in request.POST else None)
    if form.is_valid():
        count = services.notify(queryset, **form.content())
        modeladmin.message_user(request, f"Sent {count} notification(s).", messages.SUCCESS)
        return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "opts": modeladmin.opts,
        "title": "Send a notification to the selected users",
        "form": form,
        "queryset": queryset,
        "count": queryset.count(),
        "selected": request.POST.getlist(ACTION_CHECKBOX_NAME),
        "select_across": request.POST.get("select_across", "0"),
        "action_checkbox_name": ACTION_CHECKBOX_NAME,
        "action": "send_notification",
    }
    return TemplateResponse(request, "admin/notifications/send_to_users.html", context)


def _add_user_action() -> None:
    # The host's user admin (django.contrib.auth's or its own) gets the action, if registered
    # before this module is imported (INSTALLED_APPS order). Other admins can list
    # ``notifications.admin.send_notification`` in their ``actions``.
    User = get_user_model()
    if not admin.site.is_registered(User):
        return
    user_admin = admin.site.get_model_admin(User)
    actions = list(user_admin.actions or [])
    if send_notification not in actions:
        user_admin.actions = [*actions, send_notification]


_add_user_action()
